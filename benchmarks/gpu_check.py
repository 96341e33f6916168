"""One prepared GPU check of attnzoo's fused Triton kernels and models (at most ~8 minutes on one H100 / H200).

    python benchmarks/gpu_check.py OUT_DIR                # on a CUDA machine: writes OUT_DIR/*.md
    python benchmarks/gpu_check.py OUT_DIR --dry-run      # CPU: tiny shapes, Triton interpreter, tiny models

Three sections, each written to its own markdown table as soon as it finishes (a timeout keeps what is done):

* ``correctness.md``: ``na2d`` (RPB, dilation, padded maps, head dim 64), ``bra2d`` (zero and masked padding) and
  region-layout ``routed_attention`` on the Triton backend vs the PyTorch reference run in float32 on the same
  (rounded) inputs: forward and every gradient, in float32 (exact), float32 with TF32, float16 and bfloat16.
  Reported per tensor: max |error| / max |reference|.
* ``kernels.md``: forward and forward+backward time (``triton.testing.do_bench``, median) and peak memory above the
  inputs of the Triton ops at NAT / DiNAT / BiFormer shapes (bfloat16), next to anchors at the same shapes: dense SDPA
  (flash) over all tokens, FlexAttention (``torch.compile``-d) with a block mask of the same neighbourhood / routing,
  the official gather formulation of BRA (``bench_routing.gather_formulation``) and NATTEN when importable. Effective
  TFLOP/s count each implementation's own work with :mod:`attnzoo.kernels.flops` (forward ``2 * MACs``,
  forward+backward ``6 * MACs``; dense SDPA counts all ``N x N`` logits), and the fraction of the device's dense peak
  (:data:`PEAK_TFLOPS`).
* ``models.md``: training-step throughput (img/s, AdamW, bfloat16 autocast) and peak memory at 224 px, batch 64, of
  zoo models next to timm baselines.

Without a CUDA device it exits with status 2 and says so, unless ``--dry-run``: tiny shapes and models on the CPU,
the Triton kernels through the interpreter (``TRITON_INTERPRET=1``), FlexAttention eager and forward-only (no CPU
backward), one timed repeat — every code path runs, no number is a measurement. Exit status 1 when a correctness
check fails or errors.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_DEVICE = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False). Run it on an A100 / H100 / H200, or pass "
    "--dry-run to run every code path on the CPU with tiny shapes and Triton's interpreter."
)

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets; matched in order against the device name.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}

TOLERANCES = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 5e-3, "bf16": 4e-2}
"""Max |error| / max |reference| allowed for outputs; gradients get 4x (as tests/test_na2d_triton.py)."""


@dataclass(frozen=True)
class NACase:
    """An ``na2d`` call: ``shape`` ``(B, H, W, heads, D)``."""

    name: str
    shape: tuple[int, int, int, int, int]
    kernel: tuple[int, int] = (7, 7)
    dilation: tuple[int, int] = (1, 1)
    rpb: bool = True


@dataclass(frozen=True)
class BRACase:
    """A ``bra2d`` call on a ``(B, H, W, heads, D)`` map, or ``routed_attention`` when ``padding == "regions"``
    (region-major ``(B, n_win**2, H*W // n_win**2, heads, D)`` with a random index)."""

    name: str
    shape: tuple[int, int, int, int, int]
    n_win: int = 7
    topk: int = 4
    padding: str = "zero"


@dataclass(frozen=True)
class Plan:
    """What one run checks: the GPU plan or the tiny CPU dry run."""

    device: str
    precisions: tuple[str, ...]
    correctness: tuple[NACase | BRACase, ...]
    timing: tuple[NACase | BRACase, ...]
    models: tuple[tuple[str, dict[str, Any]], ...]
    model_batch: int
    model_size: int
    model_steps: int
    flex_compile: bool
    dry_run: bool


_GPU_MODELS = (
    "nat_tiny",
    "dinat_tiny",
    "biformer_small",
    "agent_pvt_small",
    "agent_swin_tiny",
    "gated_vit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "convnext_tiny",
    "deit_small_patch16_224",
)
GPU_PLAN = Plan(
    device="cuda",
    precisions=("bf16", "fp32", "fp16", "tf32"),
    correctness=(
        NACase("NAT stage 1, k7, RPB", (2, 56, 56, 2, 32)),
        NACase("DiNAT stage 1, k7, dilation 8, RPB", (2, 56, 56, 2, 32), dilation=(8, 8)),
        NACase("k11, dilation (4, 3), non-square, RPB", (1, 48, 40, 3, 32), (11, 11), (4, 3)),
        NACase("padded 5x6 map < k7, no RPB", (2, 5, 6, 4, 32), rpb=False),
        NACase("head dim 64, k7, RPB", (2, 28, 28, 4, 64)),
        BRACase("BiFormer stage 1, topk 1", (2, 56, 56, 2, 32), topk=1),
        BRACase("BiFormer stage 3, topk 16", (2, 14, 14, 8, 32), topk=16),
        BRACase("BiFormer 512 px stage 1, masked padding", (1, 128, 128, 2, 32), topk=4, padding="mask"),
        BRACase("BiFormer 512 px stage 1, zero padding", (1, 128, 128, 2, 32), topk=4),
        BRACase("routed_attention, region layout", (2, 28, 28, 4, 32), topk=4, padding="regions"),
    ),
    timing=(
        NACase("NAT-T stage 1 (224 px, batch 64)", (64, 56, 56, 2, 32)),
        NACase("DiNAT-T stage 1, dilation 8", (64, 56, 56, 2, 32), dilation=(8, 8)),
        NACase("NAT-T stage 3", (64, 14, 14, 8, 32)),
        BRACase("BiFormer-S stage 1 (224 px, batch 64)", (64, 56, 56, 2, 32), topk=1),
        BRACase("BiFormer-S stage 2", (64, 28, 28, 4, 32), topk=4),
        BRACase("BiFormer-S stage 3", (64, 14, 14, 8, 32), topk=16),
        BRACase("BiFormer-S stage 1 at 512 px (batch 8), masked", (8, 128, 128, 2, 32), topk=1, padding="mask"),
    ),
    models=tuple((name, {}) for name in _GPU_MODELS),
    model_batch=64,
    model_size=224,
    model_steps=10,
    flex_compile=True,
    dry_run=False,
)
DRY_PLAN = Plan(
    device="cpu",
    precisions=("fp32", "tf32", "bf16"),
    correctness=(
        NACase("k3, dilation (1, 2), RPB", (1, 7, 9, 2, 16), (3, 3), (1, 2)),
        BRACase("bra2d, masked padding", (1, 5, 6, 2, 16), n_win=2, topk=2, padding="mask"),
        BRACase("routed_attention, region layout", (1, 4, 4, 2, 16), n_win=2, topk=2, padding="regions"),
    ),
    timing=(
        NACase("tiny na2d", (1, 8, 8, 2, 16), (3, 3)),
        BRACase("tiny bra2d, masked", (1, 6, 6, 2, 16), n_win=2, topk=2, padding="mask"),
    ),
    models=(("nat_mini", {"depths": (1, 1, 1, 1)}), ("deit_tiny_patch16_224", {"img_size": 32, "depth": 2})),
    model_batch=2,
    model_size=32,
    model_steps=1,
    flex_compile=False,
    dry_run=True,
)
_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------------------------- helpers


def dtype_of(precision: str) -> Any:
    import torch

    return getattr(torch, _DTYPES[precision])


@contextlib.contextmanager
def fp32_matmul(tf32: bool) -> Iterator[None]:
    """Allow TF32 for float32 matmuls (torch's and, through :func:`attnzoo.kernels.triton_common.dot_options`, the
    kernels') inside the block, or forbid it."""
    import torch

    matmul, precision = torch.backends.cuda.matmul, torch.get_float32_matmul_precision()
    allow = matmul.allow_tf32
    try:
        matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        yield
    finally:
        matmul.allow_tf32 = allow
        torch.set_float32_matmul_precision(precision)


def device_peak(name: str) -> dict[str, float] | None:
    """Dense peak TFLOP/s of the device called ``name`` (first key of :data:`PEAK_TFLOPS` it contains), or None."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


@dataclass
class Section:
    """One markdown output: a title, notes and a table, with the time it took."""

    title: str
    header: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    rows: list[tuple[str, ...]] = field(default_factory=list)
    failures: int = 0

    def markdown(self, environment: list[str]) -> str:
        lines = [f"# {self.title}", "", *environment, *(f"- {n}" for n in self.notes), ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


class Deadline:
    """Seconds left of a time budget; items started after it are skipped (their rows say so)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


# --------------------------------------------------------------------------------------------------- correctness


def _random(shape: tuple[int, ...], generator: Any, device: str, dtype: Any) -> Any:
    import torch

    return torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()


def _call(case: NACase | BRACase, tensors: dict[str, Any], backend: str) -> Any:
    """Run ``case``'s op on ``tensors`` (``q, k, v`` and ``rpb`` or ``index``) with ``backend``."""
    from attnzoo.kernels import na2d
    from attnzoo.kernels.routing import bra2d, routed_attention

    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if isinstance(case, NACase):
        return na2d(q, k, v, case.kernel, dilation=case.dilation, rpb=tensors.get("rpb"), backend=backend)
    if case.padding == "regions":
        return routed_attention(q, k, v, tensors["index"], case.n_win, backend=backend)
    return bra2d(q, k, v, case.n_win, case.topk, backend=backend, padding=case.padding)


def make_inputs(case: NACase | BRACase, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """Random differentiable inputs of ``case``: ``q, k, v`` in ``dtype``, a float32 ``rpb`` (as under autocast)
    or an int64 routing ``index``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = case.shape
    if isinstance(case, BRACase) and case.padding == "regions":
        B, H, W, heads, D = shape
        regions = case.n_win**2
        shape = (B, regions, H * W // regions, heads, D)
    tensors = {name: _random(shape, g, device, dtype) for name in ("q", "k", "v")}
    if isinstance(case, NACase) and case.rpb:
        table = (shape[3], 2 * case.kernel[0] - 1, 2 * case.kernel[1] - 1)
        tensors["rpb"] = _random(table, g, device, torch.float32)
    if isinstance(case, BRACase) and case.padding == "regions":
        scores = torch.rand(shape[0], shape[1], shape[1], generator=g)
        tensors["index"] = scores.topk(case.topk, dim=-1).indices.to(device)
    return tensors


def relative_errors(case: NACase | BRACase, precision: str, device: str) -> dict[str, float]:
    """Max |Triton - reference| / max |reference| of the output and each gradient; the reference runs in float32
    (TF32 off) on the same rounded inputs."""
    import torch

    tensors = make_inputs(case, device, dtype_of(precision))
    grads_of = [n for n in ("q", "k", "v", "rpb") if n in tensors]
    with fp32_matmul(precision == "tf32"):
        out = _call(case, tensors, "triton")
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        got = torch.autograd.grad(out, [tensors[n] for n in grads_of], grad.to(out.dtype))
    ref_tensors = {n: t.detach().float().requires_grad_() if t.is_floating_point() else t for n, t in tensors.items()}
    with fp32_matmul(False):
        ref = _call(case, ref_tensors, "reference")
        want = torch.autograd.grad(ref, [ref_tensors[n] for n in grads_of], grad)
    errors = {"out": _relative(out, ref)}
    errors.update({f"d{n}": _relative(a, b) for n, a, b in zip(grads_of, got, want)})
    return errors


def _relative(got: Any, want: Any) -> float:
    scale = want.abs().max().item()
    return (got.float() - want).abs().max().item() / (scale if scale > 0 else 1.0)


def check_correctness(plan: Plan, deadline: Deadline) -> Section:
    section = Section(
        "Triton kernels vs the PyTorch reference",
        ("case", "precision", "out", "dq", "dk", "dv", "drpb", "limit (out / grads)", "result"),
        notes=["Entries: max |Triton - reference| / max |reference|; reference in float32 on the same rounded inputs"],
    )
    for precision in plan.precisions:  # precision-major: a run cut short by its budget has every case in bf16
        for case in plan.correctness:
            limit = TOLERANCES[precision]
            cells = [case.name, precision]
            if deadline.left() <= 0:
                section.rows.append((*cells, *["-"] * 5, f"{limit:g} / {4 * limit:g}", "skipped: time budget"))
                continue
            try:
                errors = relative_errors(case, precision, plan.device)
            except Exception as error:  # reported in the table, counted as a failure
                section.failures += 1
                traceback.print_exc()
                section.rows.append((*cells, *["-"] * 5, f"{limit:g} / {4 * limit:g}", _error_text(error)))
                continue
            ok = all(e <= (limit if n == "out" else 4 * limit) for n, e in errors.items())
            section.failures += not ok
            values = [f"{errors[n]:.1e}" if n in errors else "-" for n in ("out", "dq", "dk", "dv", "drpb")]
            section.rows.append((*cells, *values, f"{limit:g} / {4 * limit:g}", "ok" if ok else "FAIL"))
            print(f"correctness {case.name} {precision}: {values} {'ok' if ok else 'FAIL'}", flush=True)
    return section


# ------------------------------------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Impl:
    """One implementation timed at a case: ``run(backward)`` builds and returns a zero-argument callable that runs
    the forward (and the backward) on prepared inputs; ``macs`` is the work it is credited with."""

    name: str
    run: Callable[[bool], Callable[[], Any]]
    macs: int
    note: str = ""


def _map_inputs(case: NACase | BRACase, device: str, backward: bool) -> dict[str, Any]:
    import torch

    tensors = make_inputs(case, device, torch.bfloat16)
    for t in tensors.values():
        if t.is_floating_point():
            t.requires_grad_(backward)
    return tensors


def _runner(forward: Callable[[], Any], backward: bool, inputs: list[Any]) -> Callable[[], Any]:
    """``forward`` alone, or forward then the gradients of ``inputs`` for a fixed random output gradient
    (``torch.autograd.grad``: nothing accumulates between repeats)."""
    import torch

    if not backward:
        return forward
    out = forward()
    grad = torch.randn(out.shape, device=out.device).to(out.dtype)
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def attnzoo_impl(case: NACase | BRACase, device: str) -> Impl:
    from attnzoo.kernels.flops import na2d_macs, routed_attention_macs
    from attnzoo.kernels.routing.api import bra2d_macs

    def run(backward: bool) -> Callable[[], Any]:
        tensors = _map_inputs(case, device, backward)
        inputs = [t for t in tensors.values() if t.is_floating_point()]
        return _runner(lambda: _call(case, tensors, "triton"), backward, inputs)

    if isinstance(case, NACase):
        macs = na2d_macs(case.shape, case.kernel, case.dilation)
    elif case.padding == "regions":
        B, H, W, heads, D = case.shape
        macs = routed_attention_macs(B, case.n_win**2, H * W // case.n_win**2, heads, D, D, case.topk)
    else:
        q = _meta(case.shape)
        macs = bra2d_macs(q, q, case.n_win, case.topk)
    return Impl("attnzoo Triton", run, macs, "" if isinstance(case, NACase) else "routing included")


def _meta(shape: tuple[int, ...]) -> Any:
    import torch

    return torch.empty(shape, device="meta")


def _heads_first(t: Any) -> Any:
    """``(B, H, W, heads, D)`` -> ``(B, heads, H * W, D)``."""
    B, H, W, heads, D = t.shape
    return t.reshape(B, H * W, heads, D).transpose(1, 2)


def sdpa_impl(case: NACase | BRACase, device: str) -> Impl:
    import torch
    import torch.nn.functional as F

    from attnzoo.kernels.flops import sdpa_macs

    B, H, W, heads, D = case.shape

    def run(backward: bool) -> Callable[[], Any]:
        q, k, v = (torch.randn(B, heads, H * W, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        for t in (q, k, v):
            t.requires_grad_(backward)

        def forward() -> Any:
            if device != "cuda":
                return F.scaled_dot_product_attention(q, k, v)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        return _runner(forward, backward, [q, k, v])

    return Impl("dense SDPA (flash)", run, sdpa_macs(B, heads, H * W, H * W, D, D), "global attention, all tokens")


def _axis_window(pos: Any, length: int, kernel: int, dilation: int) -> tuple[Any, Any]:
    """``(group, window start in group positions)`` per position of one axis (NATTEN semantics)."""
    group, inner = pos % dilation, pos // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = (inner - kernel // 2).clamp(min=0)
    return group, start.minimum(group_len - kernel)


def na_mask_mod(case: NACase, device: str) -> Callable[..., Any]:
    """FlexAttention ``mask_mod`` of ``case``'s neighbourhoods on the row-major ``H * W`` token sequence."""
    import torch

    _, H, W, _, _ = case.shape
    (kh, kw), (dh, dw) = case.kernel, case.dilation
    rows, cols = torch.arange(H, device=device), torch.arange(W, device=device)
    group_h, start_h = _axis_window(rows, H, kh, dh)
    group_w, start_w = _axis_window(cols, W, kw, dw)

    def inside(q_pos, k_pos, group, start, kernel, dilation):
        k_inner = k_pos // dilation
        return (k_pos % dilation == group[q_pos]) & (k_inner >= start[q_pos]) & (k_inner < start[q_pos] + kernel)

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx, ky, kx = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        return inside(qy, ky, group_h, start_h, kh, dh) & inside(qx, kx, group_w, start_w, kw, dw)

    return mask_mod


def bra_mask_mod(case: BRACase, q: Any, k: Any) -> tuple[Callable[..., Any], int]:
    """FlexAttention ``mask_mod`` of ``case``'s routing (computed from ``q, k`` maps, padded to ``n_win``) on the
    padded row-major token sequence, and that sequence's length."""
    import torch

    from attnzoo.kernels.routing.reference import pad_map, route_map, valid_tokens

    B, H, W = q.shape[:3]
    qp, kp = pad_map(q, case.n_win), pad_map(k, case.n_win)
    Hp, Wp = qp.shape[1:3]
    valid = valid_tokens(H, W, case.n_win, q.device) if case.padding == "mask" else None
    index = route_map(qp, kp, case.n_win, case.topk, valid)
    regions = case.n_win**2
    routed = torch.zeros(B, regions, regions, dtype=torch.bool, device=q.device).scatter_(2, index, True)
    rh, rw = Hp // case.n_win, Wp // case.n_win

    def region(idx):
        return (idx // Wp // rh) * case.n_win + (idx % Wp) // rw

    def mask_mod(b, h, q_idx, kv_idx):
        ok = routed[b, region(q_idx), region(kv_idx)]
        if case.padding == "mask":
            ok = ok & (kv_idx // Wp < H) & (kv_idx % Wp < W)
        return ok

    return mask_mod, Hp * Wp


def flex_impl(case: NACase | BRACase, device: str, compiled: bool) -> Impl:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnzoo.kernels.flops import na2d_macs, routed_attention_macs
    from attnzoo.kernels.routing.reference import pad_map

    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    B, H, W, heads, D = case.shape
    if isinstance(case, NACase):
        macs = na2d_macs(case.shape, case.kernel, case.dilation)
    else:
        Hp, Wp = -(-H // case.n_win) * case.n_win, -(-W // case.n_win) * case.n_win
        macs = routed_attention_macs(B, case.n_win**2, Hp * Wp // case.n_win**2, heads, D, D, case.topk)

    def run(backward: bool) -> Callable[[], Any]:
        if backward and device == "cpu":
            raise NotImplementedError("FlexAttention has no backward on the CPU")
        tensors = make_inputs(case, device, torch.bfloat16)
        q, k, v = (tensors[n].detach() for n in ("q", "k", "v"))
        if isinstance(case, NACase):
            mask_mod, length = na_mask_mod(case, device), H * W
        else:
            mask_mod, length = bra_mask_mod(case, q, k)
            q, k, v = (pad_map(t, case.n_win) for t in (q, k, v))
        batch = None if isinstance(case, NACase) else B  # neighbourhoods are the same in every image
        block_mask = create_block_mask(
            mask_mod, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=device, _compile=compiled
        )
        q, k, v = (_heads_first(t).contiguous().requires_grad_(backward) for t in (q, k, v))
        return _runner(lambda: attend(q, k, v, block_mask=block_mask), backward, [q, k, v])

    note = ("" if compiled else "eager, ") + "block mask prebuilt" + (", no RPB" if isinstance(case, NACase) else "")
    return Impl("FlexAttention + block mask", run, macs, note)


def gather_impl(case: BRACase, device: str) -> Impl:
    from bench_routing import gather_formulation

    from attnzoo.kernels.routing.api import bra2d_macs
    from attnzoo.kernels.routing.reference import pad_map

    def run(backward: bool) -> Callable[[], Any]:
        tensors = _map_inputs(case, device, False)
        q, k, v = (pad_map(tensors[n].detach(), case.n_win).requires_grad_(backward) for n in ("q", "k", "v"))
        return _runner(lambda: gather_formulation(q, k, v, case.n_win, case.topk), backward, [q, k, v])

    q = _meta(case.shape)
    return Impl("gather (official BRA)", run, bra2d_macs(q, q, case.n_win, case.topk), "padded map, no mask")


def natten_impl(case: NACase, device: str) -> Impl | None:
    """NATTEN's ``na2d`` (heads-last, NATTEN >= 0.17) when importable, else None."""
    try:
        from natten.functional import na2d as natten_na2d
    except ImportError:
        return None
    from attnzoo.kernels.flops import na2d_macs

    def run(backward: bool) -> Callable[[], Any]:
        tensors = _map_inputs(case, device, backward)
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        forward = lambda: natten_na2d(q, k, v, kernel_size=case.kernel, dilation=case.dilation)  # noqa: E731
        return _runner(forward, backward, [q, k, v])

    return Impl("NATTEN", run, na2d_macs(case.shape, case.kernel, case.dilation), "no RPB")


def measure(fn: Callable[[], Any], device: str, dry_run: bool) -> tuple[float, float | None]:
    """``(milliseconds, peak MiB above what was allocated before)`` of ``fn``. On CUDA: run once (compilation), then
    ``do_bench``'s median and a separate peak-memory run. Dry run: one run timed under a dispatch mode that tracks the
    peak of CPU tensor storage (``None`` where the op does not run under one)."""
    import torch

    if dry_run:
        from bench_routing import PeakTensorMemory

        start = time.perf_counter()
        try:
            with PeakTensorMemory() as tracker:
                fn()
        except NotImplementedError:  # e.g. FlexAttention's higher-order op under a dispatch mode
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3, None
        return (time.perf_counter() - start) * 1e3, tracker.peak / 2**20
    import triton

    fn()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_kernels(plan: Plan, deadline: Deadline, device_name: str) -> Section:
    peak = device_peak(device_name)
    section = Section(
        "Kernel timings (bfloat16)",
        ("case", "implementation", "pass", "ms", "TFLOP/s", "% of bf16 peak", "peak MiB", "note"),
        notes=[
            "TFLOP/s: each implementation's own work (attnzoo.kernels.flops; forward 2 x MACs, forward+backward "
            "6 x MACs); dense SDPA computes all N x N logits",
            f"bf16 dense peak of this device: {peak['bf16'] if peak else 'unknown'} TFLOP/s (NVIDIA datasheet)",
        ],
    )
    try:
        import natten  # noqa: F401

        section.notes.append(f"NATTEN {getattr(natten, '__version__', '?')}")
    except ImportError:
        section.notes.append("NATTEN: not importable here (no rows)")
    work = []  # (implementation slot, case number, case, impl): every case's Triton rows first, Flex (slowest to
    for i, case in enumerate(plan.timing):  # compile) last
        anchor = gather_impl(case, plan.device) if isinstance(case, BRACase) else natten_impl(case, plan.device)
        impls = (attnzoo_impl(case, plan.device), sdpa_impl(case, plan.device), anchor)
        impls += (flex_impl(case, plan.device, plan.flex_compile),)
        work += [(j, i, case, impl) for j, impl in enumerate(impls) if impl is not None]
    rows = []
    for j, i, case, impl in sorted(work, key=lambda w: w[:2]):
        for backward in (False, True):
            cells = (case.name, impl.name, "fwd+bwd" if backward else "fwd")
            if deadline.left() <= 0:
                rows.append(((i, j, backward), (*cells, "-", "-", "-", "-", "skipped: time budget")))
                continue
            try:
                ms, mib = measure(impl.run(backward), plan.device, plan.dry_run)
            except Exception as error:  # e.g. no CPU backward for Flex, an out-of-memory anchor
                rows.append(((i, j, backward), (*cells, "-", "-", "-", "-", _error_text(error))))
                continue
            tflops = (6 if backward else 2) * impl.macs / (ms * 1e-3) / 1e12
            share = f"{tflops / peak['bf16']:.1%}" if peak else "-"
            memory = "-" if mib is None else f"{mib:.1f}"
            rows.append(((i, j, backward), (*cells, f"{ms:.3f}", f"{tflops:.3g}", share, memory, impl.note)))
            print(f"kernels {' / '.join(cells)}: {ms:.3f} ms {tflops:.3g} TFLOP/s {memory} MiB", flush=True)
    section.rows = [row for _, row in sorted(rows)]
    return section


# -------------------------------------------------------------------------------------------------------- models


def train_step_rate(name: str, kwargs: dict[str, Any], plan: Plan) -> tuple[float, float, float, str]:
    """``(params in millions, img/s, peak GiB, source)`` of AdamW training steps under bfloat16 autocast."""
    import timm
    import torch
    import torch.nn.functional as F

    model = timm.create_model(name, **kwargs).to(plan.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(plan.model_batch, 3, plan.model_size, plan.model_size, device=plan.device)
    y = torch.randint(0, model.num_classes, (plan.model_batch,), device=plan.device)

    def step() -> None:
        with torch.autocast(plan.device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = plan.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(1 if plan.dry_run else 3):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if cuda:
        for _ in range(plan.model_steps):
            step()
        sync()
        peak = torch.cuda.max_memory_allocated()
    else:
        from bench_routing import PeakTensorMemory

        with PeakTensorMemory() as tracker:
            for _ in range(plan.model_steps):
                step()
        peak = tracker.peak
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters()) / 1e6
    source = "attnzoo" if type(model).__module__.startswith("attnzoo") else "timm"
    return params, plan.model_batch * plan.model_steps / seconds, peak / 2**30, source


def bench_models(plan: Plan, deadline: Deadline) -> Section:
    import torch

    section = Section(
        f"Training step at {plan.model_size} px, batch {plan.model_batch}, bfloat16 autocast, AdamW",
        ("model", "from", "params (M)", "img/s", "peak memory (GiB)", "note"),
        notes=[f"{plan.model_steps} timed steps after warm-up; peak memory includes weights and optimizer state"],
    )
    for name, kwargs in plan.models:
        if deadline.left() <= 0:
            section.rows.append((name, "-", "-", "-", "-", "skipped: time budget"))
            continue
        try:
            params, rate, peak, source = train_step_rate(name, kwargs, plan)
        except Exception as error:
            traceback.print_exc()
            section.rows.append((name, "-", "-", "-", "-", _error_text(error)))
            continue
        finally:
            if plan.device == "cuda":
                torch.cuda.empty_cache()
        section.rows.append((name, source, f"{params:.1f}", f"{rate:.1f}", f"{peak:.2f}", ""))
        print(f"models {name}: {rate:.1f} img/s, {peak:.2f} GiB", flush=True)
    return section


# ---------------------------------------------------------------------------------------------------------- main


def environment(plan: Plan, device_name: str, argv: list[str]) -> list[str]:
    import timm
    import torch
    import triton

    lines = [
        f"- Device: {device_name}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__},"
        f" timm {timm.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.datetime.now().isoformat(timespec='minutes')}; command: "
        f"`python benchmarks/gpu_check.py {' '.join(argv)}`",
    ]
    if plan.dry_run:
        lines.append(
            "- DRY RUN on the CPU: tiny shapes, Triton interpreter, one repeat. These numbers are not measurements."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for correctness.md, kernels.md, models.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, Triton interpreter, tiny models")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for the three sections (default 400)")
    parser.add_argument("--sections", nargs="+", default=["correctness", "kernels", "models"])
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before attnzoo's kernel modules import triton
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(NO_DEVICE, file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_routing, imported from this folder
    import attnzoo  # noqa: F401  (registers the zoo with timm)

    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    device_name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    env = environment(plan, device_name, argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shares = {"correctness": 0.4, "kernels": 0.35, "models": 0.25}
    failures = 0
    for name in args.sections:
        start = time.perf_counter()
        deadline = Deadline(args.budget * shares[name] if not args.dry_run else math.inf)
        if name == "correctness":
            section = check_correctness(plan, deadline)
            failures += section.failures
        elif name == "kernels":
            section = bench_kernels(plan, deadline, device_name)
        else:
            section = bench_models(plan, deadline)
        section.notes.append(f"section time: {time.perf_counter() - start:.0f} s")
        (args.out_dir / f"{name}.md").write_text(section.markdown(env))
        print(f"wrote {args.out_dir / f'{name}.md'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
