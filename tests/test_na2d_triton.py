"""Fused Triton neighborhood attention against the PyTorch reference (run on CPU through ``TRITON_INTERPRET=1``):
forward and the four gradients (q, k, v, RPB), odd / non-square maps, dilation, padding, fp32 / fp16 / bf16, and
``torch.compile`` through the custom op. Sizes are tiny: the interpreter runs every program of the grid in Python."""

import pytest
import torch

from attnzoo.kernels import na2d
from attnzoo.kernels.dispatch import triton_available, triton_interpreter_enabled

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not triton_available() or not (torch.cuda.is_available() or triton_interpreter_enabled()),
        reason="needs triton >= MIN_TRITON (attnzoo.kernels.dispatch) and CUDA, or TRITON_INTERPRET=1 on CPU",
    ),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {  # (atol, rtol) of outputs; gradients get 4x
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _inputs(shape, kernel_size, use_rpb, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    table = (shape[3], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
    rpb = torch.randn(table, generator=g).to(DEVICE).requires_grad_() if use_rpb else None
    return q, k, v, rpb


def _compare(shape, kernel_size, dilation, use_rpb, dtype=torch.float32):
    """Triton output and gradients vs the reference in fp32 on the same (rounded) inputs."""
    atol, rtol = TOLERANCES[dtype]
    q, k, v, rpb = _inputs(shape, kernel_size, use_rpb, dtype)
    out = na2d(q, k, v, kernel_size, dilation=dilation, rpb=rpb, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_rpb = rpb.detach().clone().requires_grad_() if use_rpb else None
    ref = na2d(*ref_inputs, kernel_size, dilation=dilation, rpb=ref_rpb, backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)

    grad = torch.randn_like(ref)
    inputs = [q, k, v] + ([rpb] if use_rpb else [])
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_inputs + ([ref_rpb] if use_rpb else []), grad)
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
        assert a.dtype == (torch.float32 if name == "drpb" else dtype)
        torch.testing.assert_close(a.float(), b, atol=atol * 4, rtol=rtol * 4, msg=name)


@pytest.mark.parametrize(
    ("size", "kernel_size", "dilation", "use_rpb"),
    [
        ((9, 11), (3, 5), (1, 1), True),  # odd, non-square, per-axis kernel, several tiles per axis
        ((9, 11), (3, 3), (2, 3), True),  # dilation, unequal group lengths
        ((8, 8), (7, 7), (1, 1), False),  # NAT's kernel, border-shifted windows, no RPB
        ((5, 4), (7, 3), (1, 1), True),  # rows shorter than the kernel: padded keys masked
        ((12, 7), (4, 3), (2, 1), True),  # even kernel
    ],
)
def test_triton_matches_reference(size, kernel_size, dilation, use_rpb):
    _compare((1, *size, 2, 20), kernel_size, dilation, use_rpb)  # head_dim 20 padded to a 32-wide tile


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    _compare((1, 7, 9, 2, 16), (3, 3), (2, 1), True, dtype)


def test_triton_batched_heads_and_strided_inputs():
    """Several images and heads, q/k/v as strided views of one fused projection (as the layer passes them)."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 6, 5, 3, 3, 8, generator=g).to(DEVICE).requires_grad_()
    rpb = torch.randn(3, 5, 5, generator=g).to(DEVICE).requires_grad_()
    out = na2d(*qkv.unbind(3), 3, rpb=rpb, backend="triton")
    ref_qkv = qkv.detach().clone().requires_grad_()
    ref_rpb = rpb.detach().clone().requires_grad_()
    ref = na2d(*ref_qkv.unbind(3), 3, rpb=ref_rpb, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    (out * ref.detach()).sum().backward()
    (ref * ref.detach()).sum().backward()
    torch.testing.assert_close(qkv.grad, ref_qkv.grad, atol=4e-4, rtol=4e-4)
    torch.testing.assert_close(rpb.grad, ref_rpb.grad, atol=4e-4, rtol=4e-4)


def test_triton_compiles_without_graph_breaks():
    q, k, v, rpb = _inputs((1, 5, 6, 1, 16), (3, 3), True)
    fn = torch.compile(
        lambda q, k, v, rpb: na2d(q, k, v, 3, rpb=rpb, backend="triton"), backend="aot_eager", fullgraph=True
    )
    out = fn(q, k, v, rpb)
    torch.testing.assert_close(out, na2d(q, k, v, 3, rpb=rpb, backend="reference"), atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v, rpb))


def test_triton_rejects_what_it_cannot_run():
    q = torch.randn(1, 4, 4, 1, 8, device=DEVICE)
    with pytest.raises(TypeError, match="backend='triton' supports"):
        na2d(q.double(), q.double(), q.double(), 3, backend="triton")
    big = torch.randn(1, 3, 3, 1, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        na2d(big, big, big, 3, backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
@pytest.mark.parametrize(
    ("name", "entry", "value", "dilation"),
    [
        ("v", (4, 5, 0, 3), float("nan"), (1, 1)),
        ("v", (4, 5, 0, 3), float("nan"), (2, 1)),
        ("k", (3, 1, 0, 0), float("inf"), (1, 2)),
    ],
)
def test_triton_keeps_nonfinite_inputs_in_their_neighborhoods(name, entry, value, dilation):
    """Masked keys of a tile must not carry a NaN / inf into rows whose neighborhood does not hold them: the kernel
    marks exactly the outputs the reference marks (a value entry: that channel; a key: whole rows)."""
    q, k, v, _ = _inputs((1, 9, 11, 1, 16), (3, 3), False)
    inputs = dict(q=q.detach(), k=k.detach(), v=v.detach())
    inputs[name][(0, *entry)] = value
    out = na2d(*inputs.values(), 3, dilation=dilation, backend="triton")
    ref = na2d(*inputs.values(), 3, dilation=dilation, backend="reference")
    bad = ~torch.isfinite(ref)
    assert 0 < bad.sum() < bad.numel() // 8
    assert torch.equal(~torch.isfinite(out), bad)
    torch.testing.assert_close(out[~bad], ref[~bad], atol=1e-4, rtol=1e-4)


def test_triton_empty_batch_gives_empty_output_and_gradients():
    q, k, v, rpb = _inputs((0, 5, 6, 2, 16), (3, 3), True)
    out = na2d(q, k, v, 3, rpb=rpb, backend="triton")
    assert out.shape == q.shape
    assert [g.shape for g in torch.autograd.grad(out.sum(), (q, k, v))] == [q.shape] * 3
