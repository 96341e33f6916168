"""Compile attnzoo's Triton kernels ahead of time for sm_80 and sm_90 without a GPU, and report their resources.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the unit tests) accepts programs a GPU compile rejects. This
script compiles every launch the fused ops make for the zoo's real shapes to PTX and cubin for A100 (sm_80) and
H100/H200 (sm_90):

1. **Shapes.** Each zoo model of :data:`WORKLOADS` is built on the ``meta`` device and run forward there; the
   arguments of every ``na2d`` / ``bra2d`` call are captured (exact strides, clamped dilations, padded maps). Region
   layout ``routed_attention`` calls are derived from the unpadded ``bra2d`` ones.
2. **Launches.** Each call is replayed in every precision of :data:`PRECISIONS` (float16 / bfloat16 with the RPB
   table in float32, as under autocast, and in the input dtype; float32 exact and TF32) through the ops' own host code
   — ``na2d_forward`` / ``na2d_backward`` and the routing launchers, on ``meta`` tensors — inside
   :func:`attnzoo.kernels.triton_common.record_launches`, which records each ``launch`` (kernel, grid, arguments,
   constexprs, ``num_warps``, ``num_stages``) instead of running it. The tiling is the pure function the launcher
   calls (``forward_config`` / ``backward_config``, their ``na2d`` tiles from :func:`attnzoo.kernels.tiling.na2d_tile`,
   the one tiling function of the CPU reference too), so nothing here restates it.
3. **Compilation.** Each launch is specialised exactly as ``JITFunction.run`` does (its argument binder and
   ``_pack_args``: pointer dtypes, 16-divisibility and ``== 1`` specialisation of the integers) for a
   ``GPUTarget("cuda", 80 | 90, 32)``, deduplicated, and compiled with ``triton.compile``. Shared memory is the
   compiled kernel's ``metadata.shared``; registers and spills come from ``ptxas -v`` (the ``ptxas`` shipped in the
   Triton wheel, run on the kernel's PTX with Triton's own flags: a ``CompiledKernel`` learns ``n_regs`` /
   ``n_spills`` only when loaded on a device).
4. **Occupancy.** Resident warps per SM, limited by registers (allocated per warp in units of 256), shared memory
   (plus 1 KB reserved per block), threads and blocks, from the documented limits in :data:`TARGETS`.

    python benchmarks/triton_aot.py --markdown benchmarks/results/triton-aot.md
    python benchmarks/triton_aot.py --subset --json /tmp/aot.json   # what tests/test_triton_aot.py runs

Run it in a process without ``TRITON_INTERPRET=1`` (the kernels must be ``triton.jit`` functions, not the
interpreter's). Exit status 1 when a launch fails to compile, exceeds the shared memory of its target or spills.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MAX_SPILL_BYTES = 32
"""Spill stores + loads allowed per launch below the 255-register ceiling (the bound ``tests/test_triton_aot.py``
enforces). ``ptxas`` sometimes caps a kernel at an occupancy step (80, 128, 168 registers) and spills a few bytes
for it; at the ceiling any spill means the tile does not fit the register file and fails."""


@dataclass(frozen=True)
class Target:
    """Documented per-SM limits of one compute capability (CUDA C Programming Guide, compute capabilities table)."""

    arch: int
    name: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    smem_per_sm: int = 0
    smem_per_block: int = 0
    reserved_smem_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    max_warps_per_sm: int = 64


TARGETS = {
    80: Target(80, "sm_80 (A100)", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: Target(90, "sm_90 (H100/H200)", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


@dataclass(frozen=True)
class Workload:
    """A zoo model at one input size; ``kwargs`` go to ``timm.create_model``."""

    model: str
    size: int
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.model}@{self.size}" + (f"[{extra}]" if extra else "")


_NAT = ("nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base")
WORKLOADS: tuple[Workload, ...] = (
    *(Workload(m, s) for m in _NAT for s in (224, 384)),
    Workload("dinat_large.in22k_ft_in1k", 224),
    Workload("dinat_large.in22k_ft_in1k_384", 384),
    Workload("dinat_large.in22k_ft_in1k_384_k11", 384),
    Workload("nat_tiny", 224, (("num_heads", (1, 2, 4, 8)),)),  # head dim 64
    Workload("nat_mini", 128),  # stage-4 map 4x4 < kernel 7: padded, masked keys
    *(Workload(m, s) for m in ("biformer_tiny", "biformer_small", "biformer_base") for s in (224, 512)),
    *(Workload(m, 512, (("padding", "mask"),)) for m in ("biformer_tiny", "biformer_small", "biformer_base")),
    Workload("biformer_tiny", 224, (("head_dim", 64),)),
)
VARIANT_WORKLOAD = Workload("nat_tiny", 224)
"""The workload also compiled with the RPB table in the input dtype (a model cast with ``.half()``) and frozen."""


@dataclass(frozen=True)
class Probe:
    """One call of a workload (the ``index``-th of op ``op``) in one precision: the CI subset is a few of these."""

    workload: Workload
    op: str
    index: int
    precision: str


SUBSET: tuple[Probe, ...] = (
    Probe(Workload("dinat_mini", 224), "na2d", 1, "bf16"),  # stage 1, dilation 8, RPB trained, tensor cores
    Probe(Workload("biformer_tiny", 512, (("padding", "mask"),)), "bra2d", 0, "fp32"),  # masked, exact fp32 (FMA)
)

PRECISIONS = ("fp16", "bf16", "fp32", "tf32")
"""Input precisions: ``tf32`` is float32 inputs with TF32 matmuls allowed (``PRECISION="tf32"`` in the kernels)."""
EXHAUSTIVE = ("bf16", "fp32")
"""Precisions compiled in every specialisation; the others once per kernel, tiling and flags (their codegen differs
from bfloat16's only in element types, resp. from float32's in the tensor-core products)."""
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}


@dataclass(frozen=True)
class Call:
    """One captured op call on ``meta`` tensors: ``op`` is ``"na2d"``, ``"bra2d"`` or ``"routed_attention"``."""

    op: str
    tensors: dict[str, torch.Tensor | None]
    params: dict[str, Any]
    source: str


# ---------------------------------------------------------------------------------------------------------- shapes


def _load_zoo() -> None:
    import attnzoo  # noqa: F401  (registers the models with timm)


def capture_calls(workload: Workload, batch: int = 2) -> list[Call]:
    """Run ``workload`` forward on the ``meta`` device and return the ``na2d`` / ``bra2d`` calls it makes."""
    import timm

    from attnzoo.kernels.neighborhood import api as na2d_api
    from attnzoo.kernels.routing import api as routing_api

    calls: list[Call] = []
    na2d_dispatch, bra2d_dispatch = na2d_api._na2d_dispatch, routing_api._bra2d_dispatch

    def on_na2d(q, k, v, kernel_size, dilation, rpb, scale, backend):
        params = dict(kernel_size=kernel_size, dilation=dilation, scale=scale)
        calls.append(Call("na2d", dict(q=q, k=k, v=v, rpb=rpb), params, workload.label))
        return na2d_dispatch(q, k, v, kernel_size, dilation, rpb, scale, backend)

    def on_bra2d(q, k, v, n_win, topk, scale, backend, padding):
        params = dict(n_win=n_win, topk=topk, scale=scale, padding=padding)
        calls.append(Call("bra2d", dict(q=q, k=k, v=v), params, workload.label))
        return bra2d_dispatch(q, k, v, n_win, topk, scale, backend, padding)

    patches = _patched(na2d_api, "_na2d_dispatch", on_na2d), _patched(routing_api, "_bra2d_dispatch", on_bra2d)
    with patches[0], patches[1], torch.device("meta"), torch.no_grad():
        model = timm.create_model(workload.model, **dict(workload.kwargs))
        model(torch.empty(batch, 3, workload.size, workload.size))
    return calls + _region_calls(calls)


def _region_calls(calls: list[Call]) -> list[Call]:
    """``routed_attention`` (region-major layout) calls with the shapes of the unpadded ``bra2d`` calls."""
    out = []
    for call in calls:
        if call.op != "bra2d":
            continue
        B, H, W, heads, D = call.tensors["q"].shape
        n_win = call.params["n_win"]
        if H % n_win or W % n_win:
            continue
        R, T = n_win * n_win, (H // n_win) * (W // n_win)
        qkv = torch.empty(B, R, T, 3, heads, D, device="meta").unbind(3)
        index = torch.empty(B, R, call.params["topk"], dtype=torch.int64, device="meta")
        tensors = dict(q=qkv[0], k=qkv[1], v=qkv[2], index=index)
        out.append(Call("routed_attention", tensors, dict(n_win=n_win, scale=call.params["scale"]), call.source))
    return out


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``meta`` tensor with ``t``'s sizes, strides and storage offset (in elements), in ``dtype``."""
    extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return torch.empty(extent, dtype=dtype, device="meta").as_strided(t.shape, t.stride(), t.storage_offset())


@contextlib.contextmanager
def _fp32_matmul(tf32: bool) -> Iterator[None]:
    matmul, precision, allow = torch.backends.cuda.matmul, torch.get_float32_matmul_precision(), None
    try:
        allow = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        yield
    finally:
        matmul.allow_tf32 = allow
        torch.set_float32_matmul_precision(precision)


# -------------------------------------------------------------------------------------------------------- launches


def replay(call: Call, precision: str, variants: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield ``(variant, launch)`` for the forward and backward launches of ``call`` in ``precision``: with a float32
    RPB table that trains (autocast training), and with ``variants`` also an RPB table in the input dtype and a frozen
    one; ``variant`` names them."""
    from attnzoo.kernels.triton_common import record_launches

    dtype = _DTYPES[precision]
    t = {name: None if x is None else _like(x, dtype) for name, x in call.tensors.items()}
    with _fp32_matmul(precision == "tf32"):
        if call.op == "na2d":
            rpb = call.tensors["rpb"]
            rpb_variants = [("", None)] if rpb is None else [("rpb fp32", torch.float32)]
            if variants and rpb is not None and dtype != torch.float32:
                rpb_variants.append((f"rpb {precision}", dtype))
            for label, rpb_dtype in rpb_variants:
                for rpb_grad in (True, False) if variants and rpb is not None else (rpb is not None,):
                    variant = label + ("" if rpb is None or rpb_grad else ", rpb frozen")
                    table = None if rpb is None else _like(rpb, rpb_dtype)
                    with record_launches() as launches:
                        _na2d_host(t["q"], t["k"], t["v"], table, call.params, rpb_grad)
                    yield from ((variant, launch) for launch in launches)
        else:
            with record_launches() as launches:
                _routing_host(call, t)
            yield from (("", launch) for launch in launches)


def _na2d_host(q, k, v, rpb, params: dict, rpb_grad: bool) -> None:
    """Forward and backward host code of the ``na2d`` custom ops (:mod:`attnzoo.kernels.neighborhood.ops`)."""
    from attnzoo.kernels.neighborhood.triton_backward import na2d_backward
    from attnzoo.kernels.neighborhood.triton_forward import na2d_forward

    kernel_size, dilation, scale = params["kernel_size"], params["dilation"], params["scale"]
    out, lse = na2d_forward(q, k, v, rpb, kernel_size, dilation, scale)
    na2d_backward(torch.empty_like(out), q, k, v, rpb, out, lse, kernel_size, dilation, scale, rpb_grad)


def _routing_host(call: Call, t: dict[str, torch.Tensor]) -> None:
    """The public op's Triton branch (``_bra2d_dispatch`` / ``_routed_attention_dispatch``: padding, routing) with the
    forward custom op replaced by its host code, then the backward host code on the same arguments."""
    from attnzoo.kernels.routing import api
    from attnzoo.kernels.routing.triton_backward import routed_attention_backward
    from attnzoo.kernels.routing.triton_forward import routed_attention_forward

    forwards = []

    def forward_op(*args):
        forwards.append((args, routed_attention_forward(*args)))
        return forwards[-1][1]

    p = call.params
    with _patched(api, "routed_attention_forward_op", forward_op):
        if call.op == "bra2d":
            api._bra2d_dispatch(t["q"], t["k"], t["v"], p["n_win"], p["topk"], p["scale"], "triton", p["padding"])
        else:
            index = call.tensors["index"]
            api._routed_attention_dispatch(t["q"], t["k"], t["v"], index, p["n_win"], p["scale"], "triton")
    (q, k, v, index, n_win, layout, scale, *valid), (out, lse) = forwards[0]
    routed_attention_backward(torch.empty_like(out), q, k, v, index, out, lse, n_win, layout, scale, *valid)


# ----------------------------------------------------------------------------------------------------- compilation


def specialize(launch: Any, arch: int) -> tuple[Any, Any, str]:
    """``(ASTSource, options, key)`` of ``launch`` for ``arch``, built like ``JITFunction.run`` builds them for the
    device it runs on (argument binder, ``_pack_args``)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a triton.jit function (is TRITON_INTERPRET=1 set?)")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return src, options, f"{arch}:{src.hash()}:{options.hash()}"


@dataclass
class Result:
    """One compiled specialisation on one target."""

    kernel: str
    arch: int
    precision: str
    config: str
    num_warps: int
    num_stages: int
    ok: bool = False
    error: str = ""
    shared: int = 0
    regs: int = 0
    spill_bytes: int = 0
    stack_bytes: int = 0
    warps_per_sm: int = 0
    limiter: str = ""
    seconds: float = 0.0
    sources: list[str] = field(default_factory=list)

    @property
    def occupancy(self) -> float:
        return self.warps_per_sm / TARGETS[self.arch].max_warps_per_sm

    def problems(self) -> list[str]:
        """Why this result fails the check (empty when it passes)."""
        if not self.ok:
            return [f"compile error: {self.error}"]
        found = []
        if self.shared > TARGETS[self.arch].smem_per_block:
            found.append(f"shared memory {self.shared} B > {TARGETS[self.arch].smem_per_block} B per block")
        if self.spill_bytes and self.regs >= TARGETS[self.arch].max_regs_per_thread:
            found.append(f"{self.spill_bytes} B of register spills at {self.regs} registers (the ceiling)")
        elif self.spill_bytes > MAX_SPILL_BYTES:
            found.append(f"{self.spill_bytes} B of register spills > {MAX_SPILL_BYTES} B")
        return found


_CONFIG_KEYS = ("TILE_H", "TILE_W", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_Q", "BLOCK_D", "BLOCK_DQK", "BLOCK_DV")
_FLAG_KEYS = ("HAS_RPB", "RPB_GRAD", "MASK_PAD")


def describe(launch: Any) -> str:
    """The constexprs that shape a launch: tile / block sizes and feature flags."""
    kw = launch.kwargs
    parts = [f"{k.lower()}={kw[k]}" for k in _CONFIG_KEYS if k in kw]
    parts += [k.lower() for k in _FLAG_KEYS if kw.get(k)]
    return " ".join(parts)


def compile_launch(launch: Any, arch: int, precision: str) -> Result:
    """Compile ``launch`` for ``arch`` and measure its resources (a failed compile gives ``ok=False``)."""
    import triton

    src, options, _ = specialize(launch, arch)
    result = Result(
        kernel=launch.kernel.__name__.lstrip("_"),
        arch=arch,
        precision=precision,
        config=describe(launch),
        num_warps=options.num_warps,
        num_stages=options.num_stages,
    )
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=_target(arch), options=options.__dict__)
    except Exception as error:  # a compile error is a result here, reported and checked
        result.error = " ".join(str(error).split())[:300]
        return result
    result.seconds = time.perf_counter() - start
    result.ok = True
    result.shared = compiled.metadata.shared
    result.regs, result.spill_bytes, result.stack_bytes = ptxas_resources(compiled.asm["ptx"], arch, options)
    result.warps_per_sm, result.limiter = occupancy(result.regs, result.shared, result.num_warps, TARGETS[arch])
    return result


def _target(arch: int) -> Any:
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def ptxas_available() -> bool:
    """Whether the ``ptxas`` Triton ships (or ``TRITON_PTXAS_PATH`` names) can be run."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.access(get_ptxas(90).path, os.X_OK)
    except Exception:  # no NVIDIA backend in this Triton build
        return False


def ptxas_resources(ptx: str, arch: int, options: Any) -> tuple[int, int, int]:
    """``(registers per thread, spill store + load bytes, stack frame bytes)`` from ``ptxas -v`` on ``ptx``, with the
    flags Triton's own cubin step uses. Memoised next to Triton's cache, keyed by ``ptxas``, its flags and the PTX."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
    extra = options.ptx_options.split() if options.ptx_options else []
    flags = ["-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", *extra, f"--gpu-name={sm_arch_from_capability(arch)}"]
    ptxas = get_ptxas(arch).path
    digest = hashlib.sha256("\0".join([ptxas, *flags, ptx]).encode()).hexdigest()
    memo = Path(knobs.cache.dir) / "attnzoo-ptxas" / f"{digest}.log"
    if memo.exists():
        log = memo.read_text()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            run = subprocess.run([ptxas, *flags, path, "-o", path + ".o"], capture_output=True, text=True, check=True)
        log = run.stderr
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(log)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stack, stores, loads = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                                              r"loads", log).groups())  # fmt: skip
    return regs, stores + loads, stack


def occupancy(regs: int, shared: int, num_warps: int, target: Target) -> tuple[int, str]:
    """``(resident warps per SM, limiting resource)`` of a kernel using ``regs`` registers per thread and ``shared``
    bytes of shared memory per block of ``num_warps`` warps (registers are allocated per warp in units of 256,
    shared memory per block in units of 128 bytes plus the 1 KB the driver reserves)."""
    regs_per_warp = max(256, math.ceil(regs * 32 / 256) * 256)
    smem_per_block = math.ceil((shared + target.reserved_smem_per_block) / 128) * 128
    limits = {
        "registers": (target.regs_per_sm // regs_per_warp) // num_warps,
        "shared memory": target.smem_per_sm // smem_per_block,
        "threads": target.max_threads_per_sm // (num_warps * 32),
        "blocks": target.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter] * num_warps, limiter


# ----------------------------------------------------------------------------------------------------------- sweep


def jobs(workloads: tuple[Workload, ...], precisions: tuple[str, ...]) -> Iterator[tuple[str, str, Any]]:
    """``(source, precision, launch)`` of every launch of ``workloads`` in ``precisions``."""
    _load_zoo()
    for workload in workloads:
        for call in capture_calls(workload):
            for precision in precisions:
                for variant, launch in replay(call, precision, variants=workload == VARIANT_WORKLOAD):
                    yield f"{workload.label} {call.op}" + (f" ({variant})" if variant else ""), precision, launch


def probe_jobs(probes: tuple[Probe, ...]) -> Iterator[tuple[str, str, Any]]:
    """``(source, precision, launch)`` of the launches of each probe's call."""
    _load_zoo()
    for probe in probes:
        call = [c for c in capture_calls(probe.workload) if c.op == probe.op][probe.index]
        for _, launch in replay(call, probe.precision):
            yield f"{probe.workload.label} {call.op} #{probe.index}", probe.precision, launch


def sweep(
    items: Iterator[tuple[str, str, Any]],
    archs: tuple[int, ...],
    exhaustive: tuple[str, ...] = PRECISIONS,
    log: Any = None,
) -> list[Result]:
    """Compile every distinct ``(source, precision, launch)`` of ``items`` for ``archs``: launches that specialise
    alike are compiled once and list every source; precisions not in ``exhaustive`` only once per kernel, tiling and
    flags."""
    results: dict[str, Result] = {}
    for source, precision, launch in items:
        for arch in archs:
            if precision in exhaustive:
                key = specialize(launch, arch)[2]
            else:
                key = f"{arch}:{launch.kernel.__name__}:{precision}:{describe(launch)}"
            if key not in results:
                results[key] = r = compile_launch(launch, arch, precision)
                if log:
                    status = "ok" if r.ok else "FAILED"
                    line = f"[{len(results)}] sm_{arch} {r.kernel} {precision} {r.config}: {status} regs={r.regs} "
                    print(line + f"smem={r.shared} spills={r.spill_bytes} ({r.seconds:.1f} s)", file=log, flush=True)
            if source not in results[key].sources:
                results[key].sources.append(source)
    return list(results.values())


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    """One row per (kernel, config, precision, target, warps, stages): worst resources over its specialisations."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.config, r.precision, r.arch, r.num_warps, r.num_stages), []).append(r)
    rows = []
    for (kernel, config, precision, arch, warps, stages), group in sorted(groups.items()):
        ok = [r for r in group if r.ok]
        rows.append(
            dict(
                kernel=kernel,
                config=config,
                precision=precision,
                arch=arch,
                num_warps=warps,
                num_stages=stages,
                specializations=len(group),
                failed=len(group) - len(ok),
                regs=max((r.regs for r in ok), default=0),
                spill_bytes=max((r.spill_bytes for r in ok), default=0),
                shared=max((r.shared for r in ok), default=0),
                warps_per_sm=min((r.warps_per_sm for r in ok), default=0),
                limiter=",".join(sorted({r.limiter for r in ok if r.warps_per_sm == min(x.warps_per_sm for x in ok)})),
            )
        )
    return rows


def _cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else the platform's machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def markdown(results: list[Result], command: str, seconds: float, exhaustive: tuple[str, ...]) -> str:
    """The results as a markdown report (machine, versions, date, command, one table per target)."""
    import triton

    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"- Machine: {_cpu_name()}, {os.cpu_count()} CPU threads, no GPU "
        "(compiled for the targets below with Triton's bundled ptxas)",
        f"- torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.date.today().isoformat()}; command: `{command}` ({seconds:.0f} s)",
        f"- {len(results)} distinct specialisations compiled (every one in {', '.join(exhaustive)}; in other "
        "precisions one per kernel, tiling and flags), "
        f"{sum(not r.ok for r in results)} failed, {sum(bool(r.problems()) for r in results)} fail the check "
        f"(compile error, shared memory over the per-block limit, register spills at the 255-register ceiling, or "
        f"more than {MAX_SPILL_BYTES} B of spills where ptxas capped the registers lower for occupancy)",
        "",
        "Registers per thread and spills from `ptxas -v`, shared memory from the compiled kernel's metadata (bytes "
        "per block), occupancy = resident warps per SM / 64 from the documented limits (65536 registers, "
        "2048 threads, 32 blocks per SM; shared memory per SM: sm_80 164 KB, sm_90 228 KB; 1 KB reserved per "
        "block). Each row is the worst case over the specialisations (strides, dilations, RPB dtype) of that "
        "configuration; `spec.` counts them.",
    ]
    rows = summarize(results)
    for arch, target in TARGETS.items():
        arch_rows = [r for r in rows if r["arch"] == arch]
        if not arch_rows:
            continue
        lines += [
            "",
            f"## {target.name}",
            "",
            "| kernel | tiles / blocks, flags | precision | warps | stages | spec. | failed | regs | spills (B) "
            "| smem (B) | warps/SM | occupancy | limited by |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in arch_rows:
            occ = r["warps_per_sm"] / target.max_warps_per_sm
            lines.append(
                f"| {r['kernel']} | {r['config']} | {r['precision']} | {r['num_warps']} | {r['num_stages']} "
                f"| {r['specializations']} | {r['failed']} | {r['regs']} | {r['spill_bytes']} | {r['shared']} "
                f"| {r['warps_per_sm']} | {occ:.0%} | {r['limiter']} |"
            )
    failures = [r for r in results if r.problems()]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines.append(f"- sm_{r.arch} {r.kernel} {r.precision} {r.config}: {'; '.join(r.problems())}")
    lines += ["", "## Workloads", ""]
    lines += [f"- {w.label}" for w in WORKLOADS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="the representative subset the CI test compiles")
    parser.add_argument("--archs", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: all (ignored with --subset)")
    parser.add_argument("--exhaustive", action="store_true", help=f"every specialisation, not only {EXHAUSTIVE}")
    parser.add_argument("--markdown", help="write the report to this markdown file")
    parser.add_argument("--json", help="write every specialisation's result to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no per-compile progress lines")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        print("triton_aot.py compiles for the GPU: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not ptxas_available():
        print("no ptxas: this Triton has no NVIDIA toolchain to compile with", file=sys.stderr)
        return 2
    start = time.perf_counter()
    items = probe_jobs(SUBSET) if args.subset else jobs(WORKLOADS, tuple(args.precisions or PRECISIONS))
    exhaustive = PRECISIONS if args.subset or args.exhaustive else EXHAUSTIVE
    results = sweep(items, tuple(args.archs), exhaustive, log=None if args.quiet else sys.stderr)
    seconds = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), problems=r.problems()) for r in results], f, indent=1)
    if args.markdown:
        command = "python benchmarks/triton_aot.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.markdown, "w") as f:
            f.write(markdown(results, command.strip(), seconds, exhaustive))
    failures = [r for r in results if r.problems()]
    for r in failures:
        print(f"FAIL sm_{r.arch} {r.kernel} {r.precision} {r.config}: {'; '.join(r.problems())}", file=sys.stderr)
    print(f"{len(results)} specialisations, {len(failures)} failing, {seconds:.0f} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
