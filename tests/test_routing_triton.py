"""Fused Triton routed attention against the PyTorch reference (run on CPU through ``TRITON_INTERPRET=1``).

Sizes are tiny: the interpreter executes every program of the grid in Python.
"""

from functools import partial

import pytest
import torch

from attnzoo.kernels.dispatch import triton_available, triton_interpreter_enabled
from attnzoo.kernels.routing import bra2d, route, routed_attention
from attnzoo.layers import BiLevelRoutingAttention

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not triton_available() or not (torch.cuda.is_available() or triton_interpreter_enabled()),
        reason="needs triton >= MIN_TRITON (attnzoo.kernels.dispatch) and CUDA, or TRITON_INTERPRET=1 on CPU",
    ),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {  # (atol, rtol) of outputs and gradients
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _inputs(shape, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = dv or shape[-1]
    tensors = [
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.randn(*shape[:-1], dv, generator=g),
    ]
    return [t.to(DEVICE, dtype).requires_grad_() for t in tensors]


def _compare(fn, inputs, dtype):
    """Triton forward and input gradients vs the reference run in float32 on the same (rounded) inputs."""
    atol, rtol = TOLERANCES[dtype]
    out = fn(*inputs, backend="triton")
    assert out.dtype == dtype
    ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
    ref = fn(*ref_inputs, backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_inputs, grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.float(), b, atol=atol * 4, rtol=rtol * 4, msg=f"d{name}")


@pytest.mark.parametrize("topk", [1, 4, 9])
def test_region_layout_matches_reference(topk):
    q, k, v = _inputs((2, 9, 5, 2, 8), dv=12)  # head dims 8 / 12 padded to 16-wide tiles
    index = route(q, k, 3, topk)
    _compare(lambda a, b, c, backend: routed_attention(a, b, c, index, 3, backend=backend), (q, k, v), torch.float32)


@pytest.mark.parametrize("size", [(7, 10), (6, 6)])
def test_padded_map_matches_reference(size):
    q, k, v = _inputs((1, *size, 2, 16))
    _compare(lambda a, b, c, backend: bra2d(a, b, c, 3, 4, backend=backend), (q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = _inputs((1, 4, 4, 2, 16), dtype=dtype)
    # route once in float32 so both backends attend over the same regions
    index = route(q.float(), k.float(), 2, 2)
    _compare(lambda a, b, c, backend: routed_attention(a, b, c, index, 2, backend=backend), (q, k, v), dtype)


def test_long_regions_span_several_blocks():
    """T = 72 tokens per region: several query and key blocks per region, and key blocks crossing regions."""
    q, k, v = _inputs((1, 4, 72, 1, 16))
    index = route(q, k, 2, 2)
    _compare(lambda a, b, c, backend: routed_attention(a, b, c, index, 2, backend=backend), (q, k, v), torch.float32)


def test_duplicate_indices_strided_inputs_and_deterministic_backward():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, 4, 3, 2, 3 * 16, generator=g).to(DEVICE).requires_grad_()
    q, k, v = qkv.split(16, dim=-1)  # non-contiguous views, as the layer's qkv split
    index = torch.tensor([[[1, 1], [0, 3], [2, 2], [3, 0]]], device=DEVICE)

    def grads(backend):
        out = routed_attention(q, k, v, index, 2, backend=backend)
        (g_qkv,) = torch.autograd.grad(out.sum(), qkv)  # expanded (stride-0) output gradient
        return out, g_qkv

    out, g1 = grads("triton")
    ref, g_ref = grads("reference")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g1, g_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(grads("triton")[1], g1), "backward is not deterministic"


def test_inverted_routing_index():
    from attnzoo.kernels.routing.triton_backward import invert_routing_index

    index = torch.tensor([[[2, 0], [2, 1], [0, 2]], [[1, 1], [0, 1], [1, 0]]])
    queries, offsets = invert_routing_index(index)
    for b in range(2):
        for key_region in range(3):
            entries = queries[b, offsets[b, key_region] : offsets[b, key_region + 1]].tolist()
            expected = [r for r in range(3) for j in range(2) if index[b, r, j] == key_region]
            assert entries == expected


@pytest.mark.parametrize("layout", ["regions", "masked map"])
def test_custom_op_passes_opcheck(layout):
    from attnzoo.kernels.routing.ops import routed_attention_forward_op

    q, k, v = _inputs((1, 4, 2, 1, 16) if layout == "regions" else (1, 4, 4, 1, 16))
    index = torch.tensor([[[0, 1], [2, 0], [1, 3], [3, 2]]], device=DEVICE)
    # masked map: n_win 2 regions of 2 x 2 tokens, keys outside the top-left 3 x 3 masked
    extra = ("regions", 0.25) if layout == "regions" else ("map", 0.25, 3, 3)
    torch.library.opcheck(routed_attention_forward_op, (q, k, v, index, 2, *extra))


COMPILED = {  # inputs (B, 4, 4, 2, 16): a region-major 2 x 2 grid of 4 tokens, or a 4 x 4 map
    "bra2d": lambda a, b, c, backend: bra2d(a, b, c, 2, 2, backend=backend),
    "bra2d masked": lambda a, b, c, backend: bra2d(a[:, :3], b[:, :3], c[:, :3], 2, 2, backend=backend, padding="mask"),
    "routed_attention": lambda a, b, c, backend: routed_attention(a, b, c, route(a, b, 2, 2), 2, backend=backend),
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiles_without_graph_breaks(name):
    """fullgraph: the custom ops trace, and routed_attention skips its data-dependent index check while compiling."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = _inputs((1, 4, 4, 2, 16))
    fn = torch.compile(partial(COMPILED[name], backend="triton"), backend="aot_eager", fullgraph=True)
    out = fn(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, COMPILED[name](q, k, v, backend="reference"), atol=1e-4, rtol=1e-4)
    assert q.grad is not None and torch.isfinite(q.grad).all()
    torch._dynamo.reset()


def test_layer_triton_backend_matches_reference():
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=2, backend="triton").to(DEVICE)
    x = torch.randn(1, 5, 3, 32, device=DEVICE, requires_grad=True)
    out = layer(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    layer.backend = "reference"
    ref = layer(x)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("size", "dtype"), [((4, 3), torch.float32), ((5, 7), torch.float32), ((5, 7), torch.float16)])
def test_masked_padding_matches_reference(size, dtype):
    """``padding="mask"``: (4, 3) with n_win 3 has regions of 2 x 1 tokens and region row 2 entirely padding; (5, 7)
    has partial regions."""
    q, k, v = _inputs((1, *size, 2, 16), dtype=dtype)
    _compare(partial(bra2d, n_win=3, topk=2, padding="mask"), (q, k, v), dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
@pytest.mark.parametrize("name", ["q", "v"])
def test_nan_inputs_give_the_reference_nan_pattern(name):
    q, k, v = (t.detach() for t in _inputs((1, 4, 4, 1, 8)))
    {"q": q, "v": v}[name][0, 1, 1, 0, 2] = float("nan")
    out = bra2d(q, k, v, 2, 2, backend="triton")
    ref = bra2d(q, k, v, 2, 2, backend="reference")
    assert torch.isnan(ref).any()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_empty_batch_gives_empty_output_and_gradients():
    q, k, v = _inputs((0, 5, 6, 2, 16))
    out = bra2d(q, k, v, 2, 2, backend="triton")
    assert out.shape == q.shape
    assert [g.shape for g in torch.autograd.grad(out.sum(), (q, k, v))] == [q.shape] * 3
