"""``attnzoo export --onnx``: a zoo model (with its weights) as an ONNX file that onnxruntime runs.

Exports trace once with ``torch.export`` (non-strict) and convert with torch's dynamo ONNX exporter; the fused
attention kernels take their PyTorch reference path, so every op is a standard ONNX op. ``dynamic_size=True`` makes
the image height and width (32 to 4096 px) symbolic where the architecture's shape logic is symbolic too (plain
ViTs); models whose tiling is computed in Python from the input size (neighborhood, routing and window attention,
agent bias tables) are exported at one size, and asking for a dynamic size raises ``ValueError``. Where that is known
from the model itself (:func:`dynamic_size_refusal`: token reduction, whose per-block token counts are Python ints of
the export size, and model classes that set ``dynamic_size_unsupported``), it is refused before any tracing;
otherwise a trace that fails or specialises the size is refused after it. Requires the ``onnx`` extra
(``pip install "attnzoo[onnx]"``) and torch >= 2.9 (tested with 2.14.1).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import timm
import torch
from packaging.version import Version

__all__ = ["dynamic_size_refusal", "export_onnx", "onnx_export_supported", "run_onnx"]

DEFAULT_OPSET = 18
MIN_TORCH = "2.9"  # dynamo ONNX export is torch's default from 2.9; torch 2.5's fails on batch norm (measured)


def onnx_export_supported() -> bool:
    """Whether the installed torch is recent enough for :func:`export_onnx`."""
    return Version(torch.__version__.split("+")[0]) >= Version(MIN_TORCH)


def dynamic_size_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot be exported with a symbolic image size, known without tracing it; ``None``: unknown
    (the export then tries). Token reduction (ToMe, PPT, Token Pooling, unless it keeps every token): the number of
    tokens each block removes is computed in Python from the token count (clamped, rounded), so a graph traced at
    one size is only right at that size (ToMe exported at 224 px: 36% relative L2 and 25% top-1 agreement at
    96x128; Token Pooling fails in the ONNX converter). A model class states its own reason in
    ``dynamic_size_unsupported``."""
    reducer = getattr(model, "token_reducer", None)
    if reducer is not None and not reducer.is_identity():
        return (
            f"its token reduction ({reducer.name}) computes the number of tokens each block removes from the token "
            "count in Python, so a graph traced at one size is only right at that size"
        )
    return getattr(model, "dynamic_size_unsupported", None)


def _build(model_name: str, weights: str | os.PathLike | None) -> torch.nn.Module:
    if weights is None:
        return timm.create_model(model_name)
    from .convert import load_source

    return load_source(model_name, weights)


def export_onnx(
    model_name: str,
    out: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    dynamic_size: bool = False,
    opset: int = DEFAULT_OPSET,
    img_size: int | tuple[int, int] | None = None,
) -> Path:
    """Export ``model_name`` (random init, or ``weights``: a checkpoint file or exported folder) to ``out``.

    The graph takes ``images: (batch, 3, H, W)`` float32 and returns the logits; the batch is always dynamic. Returns
    ``out``. Raises ``ValueError`` when ``dynamic_size`` is asked of a model whose shape logic is not symbolic
    (before tracing where :func:`dynamic_size_refusal` knows it).
    """
    import onnx  # noqa: F401  (fail early with the extra's name)

    if not onnx_export_supported():
        raise RuntimeError(f"ONNX export needs torch >= {MIN_TORCH}, found {torch.__version__} (pip install -U torch)")

    model = _build(model_name, weights).eval()
    reason = dynamic_size_refusal(model) if dynamic_size else None
    if reason is not None:
        raise ValueError(
            f"{model_name} cannot be exported with a dynamic image size: {reason}; export it without --dynamic-size "
            "at the size you deploy (--img-size)"
        )
    size = img_size or model.pretrained_cfg["input_size"][-2:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    example = torch.randn(2, model.pretrained_cfg["input_size"][0], *size)
    axes = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic_size:
        axes.update({2: torch.export.Dim("height", min=32, max=4096), 3: torch.export.Dim("width", min=32, max=4096)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # one trace through torch.export, so a dynamic size that cannot be exported fails at once
        exported = torch.export.export(model, (example,), dynamic_shapes=(axes,), strict=False)
    except Exception as err:
        if not dynamic_size:
            raise
        raise ValueError(
            f"{model_name} cannot be exported with a dynamic image size: its shape logic depends on the concrete "
            f"size ({type(err).__name__}); export it without --dynamic-size at the size you deploy (--img-size)"
        ) from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes
        program = torch.onnx.export(
            exported, (), dynamo=True, opset_version=opset, input_names=["images"], output_names=["logits"],
            verbose=False,
        )  # fmt: skip
    if dynamic_size and not _has_symbolic_size(program.model_proto):
        raise ValueError(
            f"{model_name} cannot be exported with a dynamic image size: the exporter specialised it to {size} (its "
            "shape logic depends on the concrete size); export it without --dynamic-size at the size you deploy"
        )
    program.save(str(out))
    return out


def _has_symbolic_size(model_proto) -> bool:
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    return all(dims[i].dim_param and not dims[i].HasField("dim_value") for i in (2, 3))


def run_onnx(path: str | os.PathLike, images: torch.Tensor) -> torch.Tensor:
    """Run an exported file in onnxruntime (CPU) on ``images (B, 3, H, W)``; returns the logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy().astype("float32")})
    return torch.from_numpy(logits)
