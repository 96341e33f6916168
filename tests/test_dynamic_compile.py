"""Shape-dynamic ``torch.compile``: one compiled model serves 224, 256, 288 and 224x320 without a recompilation per
size.

Recompilations are counted with ``torch._dynamo``'s frame counter. ``torch.compile(model)`` (automatic dynamic
shapes) compiles the first size statically and one shape-generic graph at the second size; ``torch.compile(model,
dynamic=True)`` compiles one graph. Guards and recompilations are decided by dynamo, whatever the backend, so the
counts use the ``"eager"`` backend (fast); the neighborhood op's backward and an Inductor run are checked on one model.
Models are shallow variants of the registered architectures (every code path, a fraction of the trace time).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx.experimental._config as shape_config
from torch._dynamo.utils import counters

import attnzoo  # noqa: F401  (registers the models)

SIZES = ((224, 224), (256, 256), (288, 288), (224, 320))
SHALLOW = {
    "nat_mini": dict(depths=(1, 1, 1, 1)),
    "dinat_mini": dict(depths=(1, 1, 1, 1), dilations=((8,), (4,), (2,), (1,))),
    "biformer_tiny": dict(depths=(1, 1, 1, 1)),
    "agent_pvt_tiny": dict(depths=(1, 1, 1, 1)),
    "gated_vit_tiny_patch16_224": dict(depth=2, dynamic_img_size=True),
}


def _compiled_frames(model: torch.nn.Module, dynamic: bool | None) -> tuple[int, list[float]]:
    """Frames compiled while running ``model`` compiled at every size of ``SIZES``, and the max abs differences to
    eager."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", dynamic=dynamic)
    errors = []
    with torch.no_grad():
        for height, width in SIZES:
            x = torch.randn(1, 3, height, width)
            errors.append((compiled(x) - model(x)).abs().max().item())
    return counters["stats"]["unique_graphs"], errors


@pytest.mark.parametrize("name", sorted(SHALLOW))
def test_automatic_dynamic_compiles_at_most_twice_for_four_sizes(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SHALLOW[name]).eval()
    frames, errors = _compiled_frames(model, dynamic=None)
    assert frames <= 2, f"{name}: {frames} graphs for {len(SIZES)} sizes"
    assert max(errors) <= 1e-5, errors


@pytest.mark.skipif(not hasattr(shape_config, "use_duck_shape"), reason="this torch has no use_duck_shape switch")
@pytest.mark.parametrize("name", ["nat_mini", "biformer_tiny"])
def test_dynamic_true_compiles_once(name):
    """``dynamic=True`` without duck shaping (which would guard ``H == W`` after a square first input): one graph."""
    torch.manual_seed(0)
    model = timm.create_model(name, **SHALLOW[name]).eval()
    with shape_config.patch(use_duck_shape=False):
        frames, errors = _compiled_frames(model, dynamic=True)
    assert frames == 1, f"{name}: {frames} graphs for {len(SIZES)} sizes"
    assert max(errors) <= 1e-5, errors


def test_neighborhood_backward_through_the_compiled_op_matches_eager():
    """The reference runs as an opaque op while traced; its backward (recompute + autograd) gives eager's gradients
    at two sizes from one shape-generic graph (``aot_eager``: dynamo + AOTAutograd, as Inductor traces)."""
    torch.manual_seed(0)
    model = timm.create_model("dinat_mini", **SHALLOW["dinat_mini"], num_classes=5, drop_path_rate=0.0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    for height, width in ((64, 96), (72, 80)):
        x = torch.randn(2, 3, height, width)
        grads = []
        for fn in (model, compiled):
            model.zero_grad()
            fn(x).square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and any("rpb" in n for n in grads[0])
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] == 1


def test_inductor_dynamic_matches_eager():
    """Inductor compiles the shape-generic graph (the kernels stay opaque ops) and matches eager at three sizes."""
    torch.manual_seed(0)
    model = timm.create_model("nat_mini", **SHALLOW["nat_mini"]).eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        # sizes above 20480 input elements: torch's CPU conv guards on that threshold (a choice of algorithm)
        for height, width in ((96, 128), (112, 96), (128, 128)):
            x = torch.randn(1, 3, height, width)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
