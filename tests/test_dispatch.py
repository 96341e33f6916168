"""Kernel backend selection."""

import pytest
import torch

from attnzoo.kernels import BACKENDS, resolve_backend
from attnzoo.kernels.dispatch import triton_available


def test_auto_uses_reference_on_cpu():
    x = torch.randn(2)
    assert resolve_backend("auto", x, x) == "reference"
    assert resolve_backend("reference", x) == "reference"
    assert BACKENDS == ("auto", "triton", "reference")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.randn(1))


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="one device"):
        resolve_backend("auto", torch.randn(1), torch.randn(1, device="meta"))


@pytest.mark.skipif(not triton_available(), reason="triton not installed on this platform")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", x) == "triton"
    with pytest.raises(ValueError, match="meta"):
        resolve_backend("triton", torch.randn(1, device="meta"))
