"""Neighborhood attention: the PyTorch reference and ``na2d`` against a brute-force loop over the definition,
argument checking, and the ``NeighborhoodAttention2d`` mixer."""

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from attnzoo.kernels import na2d
from attnzoo.kernels.neighborhood import na2d_reference
from attnzoo.layers import NeighborhoodAttention2d, create_mixer


def _window(i: int, length: int, kernel: int, dilation: int) -> list[int]:
    """Positions seen by query ``i`` along one axis, written from NATTEN's definition (on the padded axis)."""
    padded = max(length, kernel * dilation)
    group, pos = i % dilation, i // dilation
    group_len = -(-(padded - group) // dilation)
    start = min(max(pos - kernel // 2, 0), group_len - kernel)
    return [(start + t) * dilation + group for t in range(kernel)]


def brute_force_na2d(q, k, v, kernel_size, dilation, rpb=None, scale=None):
    """One query at a time: softmax over its real neighbors of (q . k) * scale + rpb[h, d_row, d_col]."""
    B, H, W, heads, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for i in range(H):
        for j in range(W):
            keys = [
                (r, c)
                for r in _window(i, H, kernel_size[0], dilation[0])
                for c in _window(j, W, kernel_size[1], dilation[1])
                if r < H and c < W
            ]
            kk = torch.stack([k[:, r, c] for r, c in keys], dim=1)  # (B, n, heads, D)
            vv = torch.stack([v[:, r, c] for r, c in keys], dim=1)
            logits = torch.einsum("bhd,bnhd->bhn", q[:, i, j], kk) * scale
            if rpb is not None:
                cells = [
                    ((r - i) // dilation[0] + kernel_size[0] - 1, (c - j) // dilation[1] + kernel_size[1] - 1)
                    for r, c in keys
                ]
                logits = logits + torch.stack([rpb[:, a, b] for a, b in cells], dim=-1)
            out[:, i, j] = torch.einsum("bhn,bnhd->bhd", logits.softmax(-1), vv)
    return out


def _inputs(shape, kernel_size, use_rpb, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    table = (shape[3], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
    rpb = torch.randn(table, generator=g, dtype=dtype).requires_grad_() if use_rpb else None
    return q, k, v, rpb


CASES = [  # (H, W), kernel, dilation
    ((9, 11), (3, 5), (1, 1)),  # non-square, per-axis kernel
    ((9, 11), (3, 3), (2, 3)),  # dilation with unequal group lengths
    ((13, 10), (4, 3), (2, 1)),  # even kernel
    ((8, 8), (7, 7), (1, 1)),  # map barely larger than the kernel: every window shifted
    ((5, 4), (7, 3), (1, 1)),  # rows shorter than the kernel: padded and masked
    ((3, 2), (3, 3), (2, 2)),  # both axes shorter than kernel * dilation
    ((1, 6), (1, 3), (1, 2)),  # kernel 1
]


@pytest.mark.parametrize("use_rpb", [False, True])
@pytest.mark.parametrize(("size", "kernel_size", "dilation"), CASES)
def test_reference_matches_definition(size, kernel_size, dilation, use_rpb):
    q, k, v, rpb = _inputs((1, *size, 2, 5), kernel_size, use_rpb)
    expected = brute_force_na2d(q, k, v, kernel_size, dilation, rpb, scale=0.3)
    out = na2d(q, k, v, kernel_size, dilation=dilation, rpb=rpb, scale=0.3, backend="reference")
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    with torch.no_grad():  # inference takes the fused SDPA path
        inference = na2d(q, k, v, kernel_size, dilation=dilation, rpb=rpb, scale=0.3, backend="reference")
    torch.testing.assert_close(inference, expected.detach(), atol=1e-10, rtol=1e-10)

    grad = torch.randn_like(out)
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    want = torch.autograd.grad(expected, inputs, grad)
    got = torch.autograd.grad(out, inputs, grad)
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


NONFINITE_CASES = [  # (tensor, entry (row, col, head, channel) or None for the whole token, value)
    ("v", (4, 5, 0, 3), float("nan")),
    ("v", (0, 10, 1, 0), float("inf")),
    ("k", (4, 5, 0, 3), float("nan")),
    ("q", (2, 2, 1, 1), float("nan")),
]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(("size", "kernel_size", "dilation"), [((9, 11), (3, 3), (1, 1)), ((9, 11), (3, 5), (2, 3))])
@pytest.mark.parametrize(("name", "entry", "value"), NONFINITE_CASES)
def test_nonfinite_input_reaches_only_its_neighborhoods(name, entry, value, size, kernel_size, dilation, grad):
    """A NaN / inf in one token makes non-finite exactly the outputs that see it, as in the definition (a value
    entry ``v[j, d]``: ``out[i, d]`` of the queries whose neighborhood holds ``j``; a key: their whole rows)."""
    inputs = dict(zip("qkv", _inputs((1, *size, 2, 8), kernel_size, False)[:3]))
    inputs = {key: t.detach().requires_grad_(grad) for key, t in inputs.items()}
    with torch.no_grad():
        inputs[name][(0, *entry)] = value
    expected = brute_force_na2d(*inputs.values(), kernel_size, dilation).detach()
    with torch.set_grad_enabled(grad):
        out = na2d(*inputs.values(), kernel_size, dilation=dilation, backend="reference").detach()
    bad = ~torch.isfinite(expected)
    assert 0 < bad.sum() < bad.numel() // 4
    assert torch.equal(~torch.isfinite(out), bad)
    torch.testing.assert_close(out[~bad], expected[~bad], atol=1e-10, rtol=1e-10)


class _AllocatedBytes(TorchDispatchMode):
    """Sums the storage bytes of every tensor the ops under it return (an upper bound of the memory they use)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += sum(t.untyped_storage().nbytes() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("dilation", [(200, 200), (200, 2), (9, 11)])
def test_dilation_past_the_map_costs_what_the_map_costs(dilation):
    """Groups of a single position: every query sees only itself along that axis, like a dilation of the axis length,
    and the work is bounded by the map (it used to grow with dilation**2: 2.2 GB for 9 x 11 at dilation 1000)."""
    q, k, v, rpb = _inputs((1, 9, 11, 2, 4), (3, 3), True)
    with torch.no_grad(), _AllocatedBytes() as allocated:
        out = na2d(q, k, v, 3, dilation=dilation, rpb=rpb)
    neighborhoods = q.nbytes * 9  # (B, H, W, heads, k0 * k1, D)
    assert allocated.total < 32 * neighborhoods
    torch.testing.assert_close(out, brute_force_na2d(q, k, v, (3, 3), dilation, rpb), atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        clamped = na2d(q, k, v, 3, dilation=(min(dilation[0], 9), min(dilation[1], 11)), rpb=rpb)
    assert torch.equal(out, clamped)


@pytest.mark.parametrize("shape", [(0, 6, 5, 2, 8), (2, 0, 5, 2, 8), (2, 6, 0, 2, 8)])
def test_empty_batch_or_map_gives_empty_outputs_and_gradients(shape):
    q, k, v, rpb = _inputs(shape, (3, 3), True)
    out = na2d(q, k, v, 3, dilation=2, rpb=rpb)
    assert out.shape == shape
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [shape] * 3


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (5, 16)])
def test_tiling_does_not_change_the_result(tile):
    q, k, v, rpb = _inputs((1, 11, 9, 2, 4), (5, 3), True)
    expected = na2d_reference(q, k, v, (5, 3), (2, 1), rpb, 0.5)
    torch.testing.assert_close(na2d_reference(q, k, v, (5, 3), (2, 1), rpb, 0.5, tile), expected)


def test_reference_gradcheck():
    q, k, v, rpb = _inputs((1, 4, 5, 1, 2), (3, 3), True)
    assert torch.autograd.gradcheck(
        lambda *t: na2d(*t[:3], (3, 3), dilation=(1, 2), rpb=t[3], backend="reference"), (q, k, v, rpb)
    )


def test_padding_is_masked_not_attended():
    """On maps smaller than the kernel every query attends to the whole real map (no padding keys)."""
    q, k, v, _ = _inputs((1, 3, 4, 2, 8), (7, 7), False)
    out = na2d(q, k, v, 7)
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
    ).transpose(1, 2)
    torch.testing.assert_close(out.flatten(1, 2), dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(dtype):
    q, k, v, rpb = _inputs((1, 9, 8, 2, 16), (3, 3), True, dtype=torch.float32)
    expected = na2d(q, k, v, 3, dilation=2, rpb=rpb)
    out = na2d(q.to(dtype), k.to(dtype), v.to(dtype), 3, dilation=2, rpb=rpb)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_scriptable_reference_matches_eager():
    q, k, v, rpb = _inputs((1, 6, 5, 2, 4), (3, 3), True, dtype=torch.float32)
    scripted = torch.jit.script(na2d_reference)
    torch.testing.assert_close(
        scripted(q, k, v, (3, 3), (2, 1), rpb, 0.5, None), na2d_reference(q, k, v, (3, 3), (2, 1), rpb, 0.5)
    )


def test_signature_follows_natten_positional_order():
    names = list(inspect.signature(na2d).parameters)
    assert names == ["q", "k", "v", "kernel_size", "stride", "dilation", "is_causal", "rpb", "scale", "backend"]
    q, k, v, _ = _inputs((1, 7, 6, 1, 4), (3, 3), False)
    torch.testing.assert_close(na2d(q, k, v, 3, 1, 2, False), na2d(q, k, v, 3, dilation=2), atol=0, rtol=0)


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 30, 20, 4, 16, device="meta")
    rpb = torch.empty(4, 13, 13, device="meta")
    assert na2d(q, q, q, 7, dilation=(4, 2), rpb=rpb).shape == q.shape


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(stride=2), ValueError, "stride"),
        (dict(is_causal=True), ValueError, "is_causal"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
        (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
        (dict(kernel_size=(3, 3.0)), TypeError, "kernel_size must be an int"),
        (dict(dilation=2.0), TypeError, "dilation must be an int"),
        (dict(dilation=0), ValueError, "dilation"),
        (dict(rpb=torch.zeros(2, 3, 5)), ValueError, "rpb must have shape"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    q = torch.randn(1, 6, 6, 2, 8)
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        na2d(q, q, q, **kwargs)


def test_bad_tensors_raise():
    q = torch.randn(1, 6, 6, 2, 8)
    with pytest.raises(ValueError, match="head dims"):
        na2d(q[..., :0], q[..., :0], q[..., :0], 3)
    with pytest.raises(ValueError, match="heads"):
        na2d(q[..., :0, :], q[..., :0, :], q[..., :0, :], 3)
    with pytest.raises(ValueError, match="same shape"):
        na2d(q, q, q[:, :5], 3)
    with pytest.raises(ValueError, match=r"\(B, H, W, heads, D\)"):
        na2d(q[0], q[0], q[0], 3)
    with pytest.raises(TypeError, match="floating"):
        na2d(q.long(), q.long(), q.long(), 3)
    with pytest.raises(TypeError, match="same dtype"):
        na2d(q, q.double(), q, 3)


def _explicit_layer(layer: NeighborhoodAttention2d, x: torch.Tensor) -> torch.Tensor:
    """qkv projection, brute-force neighborhood attention with the layer's (clamped) dilation, projection."""
    B, H, W, C = x.shape
    qkv = (x @ layer.qkv.weight.T + layer.qkv.bias).view(B, H, W, 3, layer.num_heads, layer.head_dim)
    out = brute_force_na2d(*qkv.unbind(3), layer.kernel_size, layer.effective_dilation(H, W), layer.rpb)
    return out.reshape(B, H, W, C) @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize(("size", "dilation"), [((7, 9), 2), ((4, 12), 3), ((2, 3), 1)])
def test_layer_matches_explicit_formula(size, dilation):
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(16, num_heads=2, kernel_size=3, dilation=dilation).double()
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _explicit_layer(layer, x))


def test_layer_clamps_dilation_like_dinat():
    layer = create_mixer("neighborhood", 32, num_heads=1, kernel_size=7, dilation=8)
    assert layer.effective_dilation(56, 56) == (8, 8)
    assert layer.effective_dilation(16, 24) == (2, 3)
    assert layer.effective_dilation(5, 7) == (1, 1)
    assert layer.no_weight_decay() == {"rpb"} and layer.rpb.shape == (1, 13, 13)
    assert NeighborhoodAttention2d(32, num_heads=1, rpb=False).no_weight_decay() == set()
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention2d(30, num_heads=4)


def _dense_definition(q, k, v, kernel_size, dilation, rpb, scale):
    """All (query, key) pairs at once: logits over the whole map, masked to each query's NATTEN window (``_window``,
    the definition), softmax, values; float64, independent of any tiling."""
    B, H, W, heads, D = q.shape
    axes = []
    for length, kernel, dil in zip((H, W), kernel_size, dilation):
        inside = torch.zeros(length, length, dtype=torch.bool)
        rel = torch.zeros(length, length, dtype=torch.long)
        for i in range(length):
            for j in _window(i, length, kernel, dil):
                if j < length:
                    inside[i, j] = True
                    rel[i, j] = (j - i) // dil + kernel - 1
        axes.append((inside, rel))
    (in_r, rel_r), (in_c, rel_c) = axes
    inside = (in_r[:, None, :, None] & in_c[None, :, None, :]).reshape(H * W, H * W)
    qf, kf, vf = (t.double().permute(0, 3, 1, 2, 4).reshape(B, heads, H * W, D) for t in (q, k, v))
    logits = qf @ kf.transpose(-1, -2) * scale
    if rpb is not None:
        bias = rpb.double()[:, rel_r[:, None, :, None], rel_c[None, :, None, :]]  # (heads, H, W, H, W)
        logits = logits + bias.reshape(heads, H * W, H * W)
    out = logits.masked_fill(~inside, float("-inf")).softmax(-1) @ vf
    return out.view(B, heads, H, W, D).permute(0, 2, 3, 1, 4)


def _every_fitting_dilation(length: int, kernel: int) -> list[int]:
    return list(range(1, max(1, length // kernel) + 1))


@pytest.mark.parametrize(("size", "kernel_size"), [((11, 9), (3, 3)), ((13, 7), (4, 3)), ((4, 6), (5, 7))])
def test_every_dilation_that_fits_matches_the_definition(size, kernel_size):
    """Values and all four gradients of the autograd path, for every pair of dilations that fits the map (and the
    padded maps smaller than ``kernel * dilation`` of the last case), odd and even kernels, on an odd map."""
    q, k, v, rpb = _inputs((1, *size, 2, 3), kernel_size, True)
    grad = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    for d0 in _every_fitting_dilation(size[0], kernel_size[0]):
        for d1 in _every_fitting_dilation(size[1], kernel_size[1]):
            expected = _dense_definition(q, k, v, kernel_size, (d0, d1), rpb, 0.4)
            out = na2d(q, k, v, kernel_size, dilation=(d0, d1), rpb=rpb, scale=0.4, backend="reference")
            torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10, msg=f"dilation {(d0, d1)}")
            got = torch.autograd.grad(out, (q, k, v, rpb), grad)
            want = torch.autograd.grad(expected, (q, k, v, rpb), grad)
            for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"{name}, dilation {(d0, d1)}")


def _reference_op(q, k, v, kernel_size, dilation, rpb, scale):
    """The reference custom op (what ``torch.compile`` runs): its forward and hand-written backward, called eagerly."""
    return torch.ops.attnzoo.na2d_reference_forward(q, k, v, rpb, *kernel_size, *dilation, scale)[0]


@pytest.mark.parametrize(
    ("size", "kernel_size", "dilation"),
    [((9, 11), (3, 5), (1, 1)), ((13, 10), (4, 3), (2, 3)), ((5, 4), (7, 3), (1, 1)), ((3, 2), (3, 3), (2, 2))],
)
@pytest.mark.parametrize("use_rpb", [False, True])
def test_custom_op_backward_matches_the_definition(size, kernel_size, dilation, use_rpb):
    """The op's hand-written backward (probabilities recomputed from the log-sum-exp, halo gradients scattered back):
    odd maps, dilation, padding, with and without RPB."""
    q, k, v, rpb = _inputs((2, *size, 2, 4), kernel_size, use_rpb)
    expected = _dense_definition(q, k, v, kernel_size, dilation, rpb, 0.3)
    out = _reference_op(q, k, v, kernel_size, dilation, rpb, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    grad = torch.randn_like(out)
    for name, a, b in zip(
        ("dq", "dk", "dv", "drpb"), torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)
    ):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 4e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("path", ["autograd", "custom op", "inference"])
def test_cpu_dtypes_match_the_definition(dtype, tol, path):
    """fp32 / bf16 / fp16 on the CPU (inputs rounded to the dtype, fp32 RPB table as under autocast) against the
    float64 definition on the same rounded inputs: values and the four gradients."""
    shape, kernel_size, dilation = (1, 10, 9, 2, 8), (5, 3), (2, 1)
    q, k, v, rpb = _inputs(shape, kernel_size, True, dtype=torch.float32)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    table = rpb.detach().clone().requires_grad_()
    exact = [t.detach().double().requires_grad_() for t in low]
    exact_table = table.detach().double().requires_grad_()
    expected = _dense_definition(*exact, kernel_size, dilation, exact_table, 0.35)
    if path == "inference":
        with torch.no_grad():
            out = na2d(*low, kernel_size, dilation=dilation, rpb=table, scale=0.35, backend="reference")
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected.detach(), atol=tol, rtol=tol)
        return
    if path == "custom op":
        out = _reference_op(*low, kernel_size, dilation, table, 0.35)
    else:
        out = na2d(*low, kernel_size, dilation=dilation, rpb=table, scale=0.35, backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (*low, table), grad.to(dtype))
    want = torch.autograd.grad(expected, (*exact, exact_table), grad.double())
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
        assert a.dtype == (torch.float32 if name == "drpb" else dtype)
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=4 * tol * max(1.0, scale), rtol=4 * tol, msg=name)


def test_one_tiling_function_decides_every_tile():
    """The reference's default tile and the Triton launchers' tiles come from :func:`attnzoo.kernels.tiling.na2d_tile`
    (the AOT sweep replays the launchers): changing it changes them."""
    pytest.importorskip("triton")
    from attnzoo.kernels import tiling
    from attnzoo.kernels.neighborhood import reference, triton_backward, triton_forward

    for dtype in (torch.float32, torch.bfloat16):
        tile = tiling.na2d_tile((7, 7), dtype, "triton")
        forward = triton_forward.forward_config(dtype, 32, (7, 7))
        backward = triton_backward.backward_config(dtype, 32, (7, 7))
        assert (forward["TILE_H"], forward["TILE_W"]) == tile
        assert all((c["TILE_H"], c["TILE_W"]) == tile for c in backward.values())
    assert reference._default_tile(56, 56, (7, 7), (1, 1), torch.float32) == tiling.na2d_tile(
        (7, 7), torch.float32, "reference", (56, 56)
    )
    # a group of at most 2k queries per axis is one tile: DiNAT's dilation 8 at 56 x 56 gives 7 x 7 groups
    assert tiling.na2d_tile((7, 7), torch.float32, "reference", (7, 7)) == (7, 7)
    with pytest.raises(ValueError, match="backend"):
        tiling.na2d_tile((7, 7), torch.float32, "cuda")
