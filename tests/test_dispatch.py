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


@pytest.mark.skipif(not triton_available(), reason="needs triton >= attnzoo.kernels.dispatch.MIN_TRITON")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", x) == "triton"
    with pytest.raises(ValueError, match="meta"):
        resolve_backend("triton", torch.randn(1, device="meta"))


def test_both_kernel_packages_share_one_fp32_precision_policy(monkeypatch):
    """float32 ``tl.dot`` products are exact unless torch allows TF32 (either switch), in both ops."""
    pytest.importorskip("triton")
    from attnzoo.kernels import triton_common
    from attnzoo.kernels.neighborhood import triton_backward as na2d_backward
    from attnzoo.kernels.neighborhood import triton_forward as na2d_forward
    from attnzoo.kernels.routing import triton_backward as routing_backward
    from attnzoo.kernels.routing import triton_forward as routing_forward

    for module in (na2d_forward, na2d_backward, routing_forward, routing_backward):
        assert module.dot is triton_common.dot
    dot_options = triton_common.dot_options
    matmul, precision, allow_tf32 = torch.backends.cuda.matmul, torch.get_float32_matmul_precision(), None
    try:
        allow_tf32 = matmul.allow_tf32
        matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert dot_options(torch.float32)["PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_options(torch.float32)["PRECISION"] == "tf32"
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = True
        assert dot_options(torch.float32)["PRECISION"] == "tf32"
    finally:
        matmul.allow_tf32 = allow_tf32
        torch.set_float32_matmul_precision(precision)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dot_options(torch.bfloat16)["UPCAST"] and not dot_options(torch.float16)["UPCAST"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dot_options(torch.bfloat16)["UPCAST"]
