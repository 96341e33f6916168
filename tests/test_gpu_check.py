"""``benchmarks/gpu_check.py``: its dry run (tiny shapes, Triton interpreter, tiny models on the CPU) runs every code
path and writes sane tables; without a CUDA device and without ``--dry-run`` it refuses with a clear message."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.kernels.dispatch import MIN_TRITON, triton_available

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _table(path: Path) -> list[list[str]]:
    """Rows of the markdown table in ``path`` (header first, separator dropped)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.skipif(not triton_available(), reason=f"needs triton >= {MIN_TRITON} (the interpreter runs the kernels)")
def test_dry_run_writes_the_three_tables(tmp_path):
    run = _run(str(tmp_path), "--dry-run")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for name in ("correctness", "kernels", "models"):
        assert "DRY RUN" in (tmp_path / f"{name}.md").read_text()

    header, *rows = _table(tmp_path / "correctness.md")
    assert header[:2] == ["case", "precision"] and len(rows) == 3 * 3  # na2d, bra2d, routed_attention x 3
    assert {row[1] for row in rows} == {"fp32", "tf32", "bf16"}
    for row in rows:
        assert row[-1] == "ok", row
        errors = [float(cell) for cell in row[2:7] if cell != "-"]
        assert len(errors) >= 4 and all(0 <= e < 0.05 for e in errors), row

    header, *rows = _table(tmp_path / "kernels.md")
    impls = {row[1] for row in rows}
    assert {"attnzoo Triton", "dense SDPA (flash)", "FlexAttention + block mask", "gather (official BRA)"} <= impls
    timed = [row for row in rows if re.fullmatch(r"\d+\.\d+", row[3])]
    assert {(row[1], row[2]) for row in timed} >= {("attnzoo Triton", "fwd"), ("attnzoo Triton", "fwd+bwd")}
    assert all(float(row[3]) > 0 and float(row[4]) >= 0 for row in timed)
    flex_backward = [row for row in rows if row[1].startswith("Flex") and row[2] == "fwd+bwd"]
    assert flex_backward and all("no backward on the CPU" in row[-1] for row in flex_backward)

    header, *rows = _table(tmp_path / "models.md")
    assert [row[0] for row in rows] == ["nat_mini", "deit_tiny_patch16_224"]
    assert [row[1] for row in rows] == ["attnzoo", "timm"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the real check would run")
def test_without_a_device_it_says_so_and_fails(tmp_path):
    run = _run(str(tmp_path / "out"))
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "--dry-run" in run.stderr
    assert not (tmp_path / "out").exists()
