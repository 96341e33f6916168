"""The fused Triton kernels compile to real GPU code for sm_80 (A100) and sm_90 (H100/H200) without a GPU.

The unit tests run the kernels through Triton's CPU interpreter, which accepts programs a GPU compile rejects. Here
``benchmarks/triton_aot.py --subset`` compiles the launches of two representative calls — a dilated DiNAT stage-1
``na2d`` in bfloat16 with a trained RPB (tensor cores) and a masked-padding 512 px BiFormer ``bra2d`` in exact float32
(FMA units) — forward and both backward kernels, through the launchers' own host code, to cubin for both targets,
and fails on a compile error, shared memory over the target's per-block limit, or register spills (any at the
255-register ceiling, more than ``MAX_SPILL_BYTES`` where ptxas capped the registers lower for occupancy). It runs
in a subprocess: this session's kernels are the interpreter's."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo.kernels.dispatch import MIN_TRITON, triton_available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not triton_available(), reason=f"needs triton >= {MIN_TRITON} (kernels.dispatch)")


def _load_aot():
    spec = importlib.util.spec_from_file_location("triton_aot", ROOT / "benchmarks" / "triton_aot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


aot = _load_aot() if triton_available() else None


def test_occupancy_follows_the_documented_limits():
    sm80, sm90 = aot.TARGETS[80], aot.TARGETS[90]
    # 128 registers x 32 threads = 4096 per warp: 16 warps fit the 64K register file
    assert aot.occupancy(128, 0, 4, sm80) == (16, "registers")
    # 32 registers: 64 warps by registers, and by threads (2048 / 128 = 16 blocks of 4 warps)
    assert aot.occupancy(32, 0, 4, sm80)[0] == 64
    # 100 KB of shared memory per block: one block on sm_80 (164 KB / SM), two on sm_90 (228 KB / SM)
    assert aot.occupancy(32, 100 * 1024, 4, sm80) == (4, "shared memory")
    assert aot.occupancy(32, 100 * 1024, 4, sm90) == (8, "shared memory")
    # 255 registers round up to 8192 per warp: 8 warps
    assert aot.occupancy(255, 0, 8, sm90) == (8, "registers")


def test_representative_launches_compile_for_sm80_and_sm90(tmp_path):
    if not aot.ptxas_available():
        pytest.skip("this Triton build ships no ptxas (NVIDIA backend) to compile with")
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_aot.py"), "--subset", "--quiet", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stderr[-3000:]
    results = json.loads(out.read_text())
    problems = [f"sm_{r['arch']} {r['kernel']} {r['precision']} {r['config']}: {r['problems']}" for r in results]
    assert not [p for p, r in zip(problems, results) if r["problems"]], "\n".join(problems)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = {
        "na2d_forward_kernel",
        "na2d_backward_query_kernel",
        "na2d_backward_key_kernel",
        "routed_attention_forward_kernel",
        "routed_attention_backward_query_kernel",
        "routed_attention_backward_key_kernel",
    }
    assert {(r["kernel"], r["arch"]) for r in results} == {(k, a) for k in kernels for a in (80, 90)}
    for r in results:
        limit = aot.TARGETS[r["arch"]].smem_per_block
        assert r["ok"] and 0 < r["shared"] <= limit and 0 < r["regs"] <= 255, r
        assert r["spill_bytes"] <= aot.MAX_SPILL_BYTES and not (r["spill_bytes"] and r["regs"] == 255), r
        assert 0 < r["warps_per_sm"] <= 64, r
