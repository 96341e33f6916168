"""Bi-level routing attention, PyTorch reference: against a dense masked formulation, the layer against the official
formulas, argument checks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels.dispatch import triton_available
from attnzoo.kernels.routing import bra2d, default_scale, route, routed_attention
from attnzoo.kernels.routing.reference import bra2d_reference, map_to_regions, regions_to_map
from attnzoo.layers import BiLevelRoutingAttention, GlobalAttentionLePE


def _dense_masked(q, k, v, index, scale):
    """Region-major inputs; every query attends to all B*R*T keys of its image with a mask allowing the tokens of its
    routed regions (counted with multiplicity), softmax over the unmasked logits."""
    B, R, T, h, D = q.shape
    qf, kf, vf = (x.permute(0, 3, 1, 2, 4).reshape(B, h, R * T, x.shape[-1]) for x in (q, k, v))
    multiplicity = F.one_hot(index, R).sum(2).to(q.dtype)  # (B, R_query, R_key)
    weight = multiplicity.repeat_interleave(T, 1).repeat_interleave(T, 2)[:, None]  # (B, 1, RT, RT)
    logits = (qf @ kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(weight == 0, float("-inf"))
    p = torch.exp(logits - logits.amax(-1, keepdim=True)) * weight
    out = (p / p.sum(-1, keepdim=True)) @ vf
    return out.view(B, h, R, T, -1).permute(0, 2, 3, 1, 4)


def _qkv(shape, dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = dv or shape[-1]
    q, k = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn((*shape[:-1], dv), generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


@pytest.mark.parametrize("topk", [1, 4, 9])
def test_reference_matches_dense_masked_values_and_grads(topk):
    q, k, v = _qkv((2, 9, 5, 2, 4), dv=3)
    index = route(q, k, 3, topk)
    out = routed_attention(q, k, v, index, 3, backend="reference")
    expected = _dense_masked(q, k, v, index, default_scale(q))
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_reference_gradcheck_fp64_with_duplicate_regions():
    q, k, v = _qkv((1, 4, 3, 2, 3))
    index = torch.tensor([[[0, 0, 1], [3, 2, 1], [2, 2, 2], [1, 3, 0]]])  # duplicates count twice
    torch.testing.assert_close(
        routed_attention(q, k, v, index, 2, scale=0.7), _dense_masked(q, k, v, index, 0.7), rtol=1e-10, atol=1e-10
    )
    assert torch.autograd.gradcheck(lambda a, b, c: routed_attention(a, b, c, index, 2, scale=0.7), (q, k, v))


def test_route_is_topk_of_region_mean_affinity_and_detached():
    q, k, _ = _qkv((2, 4, 6, 2, 3), dtype=torch.float32)
    index = route(q, k, 2, 2)
    affinity = q.mean(2).flatten(2) @ k.mean(2).flatten(2).transpose(1, 2)
    expected = affinity.topk(2, dim=-1).indices
    assert index.dtype == torch.int64 and not index.requires_grad
    assert torch.equal(index.sort(-1).values, expected.sort(-1).values)


def test_bra2d_pads_with_zero_tokens_and_crops():
    q, k, v = _qkv((1, 5, 7, 2, 4))
    n_win, topk = 3, 2
    out = bra2d(q, k, v, n_win, topk)
    assert out.shape == (1, 5, 7, 2, 4)
    padded = [F.pad(x, (0, 0, 0, 0, 0, 2, 0, 1)) for x in (q, k, v)]  # 6 x 9
    regions = [map_to_regions(x, n_win) for x in padded]
    index = route(regions[0], regions[1], n_win, topk)
    expected = regions_to_map(_dense_masked(*regions, index, default_scale(q)), n_win, 6, 9)[:, :5, :7]
    torch.testing.assert_close(out, expected)


def test_map_and_region_layouts_agree():
    q, k, v = _qkv((2, 6, 4, 3, 2), dtype=torch.float32)
    out_map = bra2d(q, k, v, 2, 3)
    regions = [map_to_regions(x, 2) for x in (q, k, v)]
    index = route(regions[0], regions[1], 2, 3)
    out_regions = routed_attention(*regions, index, 2)
    torch.testing.assert_close(out_map, regions_to_map(out_regions, 2, 6, 4))


def test_argument_errors():
    q, k, v = _qkv((1, 4, 3, 2, 4), dtype=torch.float32)
    index = route(q, k, 2, 2)
    with pytest.raises(ValueError, match="topk"):
        route(q, k, 2, 5)
    with pytest.raises(ValueError, match="topk"):
        bra2d(q, k, v, 2, 0)
    with pytest.raises(ValueError, match="n_win"):
        routed_attention(q, k, v, index, 3)
    with pytest.raises(ValueError, match="n_win"):
        bra2d(q, k, v, 0, 1)
    with pytest.raises(TypeError, match="floating-point"):
        routed_attention(q.long(), k, v, index, 2)
    with pytest.raises(TypeError, match="integer"):
        routed_attention(q, k, v, index.float(), 2)
    with pytest.raises(ValueError, match="index"):
        routed_attention(q, k, v, index[:, :1], 2)
    with pytest.raises(ValueError, match="backend"):
        routed_attention(q, k, v, index, 2, backend="cuda")
    with pytest.raises(TypeError, match="triton"):
        routed_attention(q.double(), k.double(), v.double(), index, 2, backend="triton")
    wide = torch.randn(1, 4, 3, 1, 300)
    with pytest.raises(ValueError, match="head dims"):
        routed_attention(wide, wide, wide, index, 2, backend="triton")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad", [-1, 4])
def test_out_of_range_index_is_a_clear_error(backend, bad):
    """Checked before dispatch: the Triton kernel would otherwise read out of bounds silently."""
    q, k, v = _qkv((1, 4, 3, 2, 4), dtype=torch.float32)
    index = route(q, k, 2, 2).to(torch.int32)
    index[0, 2, 1] = bad
    with pytest.raises(
        ValueError, match=rf"index values must be in \[0, n_win\*\*2 = 4\), got values in \[{min(bad, 0)}"
    ):
        routed_attention(q, k, v, index, 2, backend=backend)


@pytest.mark.skipif(not triton_available(), reason="needs triton >= attnzoo.kernels.dispatch.MIN_TRITON")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv((1, 4, 3, 2, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        routed_attention(q, k, v, route(q, k, 2, 2), 2, backend="triton")


def _official_bra(m: BiLevelRoutingAttention, x):
    """The official BiFormer BRA forward (auto_pad, gather formulation), written out from the paper/README facts."""
    n = m.n_win
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, (-W) % n, 0, (-H) % n))
    Hp, Wp = x.shape[1:3]
    rh, rw = Hp // n, Wp // n
    xr = x.view(B, n, rh, n, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, rh * rw, C)
    q, k, v = (xr @ m.qkv.weight.T + m.qkv.bias).split([m.qk_dim, m.qk_dim, C], -1)
    scale = m.qk_dim**-0.5
    affinity = (q.mean(2) * scale) @ k.mean(2).transpose(-1, -2)
    idx = affinity.topk(m.topk, -1).indices  # (B, R, topk)
    k_sel = torch.stack([k[b][idx[b]] for b in range(B)]).flatten(2, 3)  # (B, R, topk*T, qk)
    v_sel = torch.stack([v[b][idx[b]] for b in range(B)]).flatten(2, 3)
    h = m.num_heads
    qh = q.unflatten(-1, (h, -1)).transpose(2, 3)
    kh, vh = (t.unflatten(-1, (h, -1)).transpose(2, 3) for t in (k_sel, v_sel))
    out = torch.softmax((qh * scale) @ kh.transpose(-1, -2), -1) @ vh  # (B, R, h, T, c)
    out = out.transpose(2, 3).reshape(B, n, n, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    v_map = v.reshape(B, n, n, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    out = out + m.lepe(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = out @ m.proj.weight.T + m.proj.bias
    return out[:, :H, :W]


@pytest.mark.parametrize("size", [(14, 14), (9, 12)])
def test_layer_matches_official_formulas(size):
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(32, num_heads=2, n_win=7, topk=4, qk_dim=16).double().eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, *size, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), _official_bra(m, x))


def test_global_attention_lepe_matches_formula():
    torch.manual_seed(0)
    m = GlobalAttentionLePE(32, num_heads=8).eval()
    assert m.qkv.bias is None
    x = torch.randn(2, 3, 5, 32)
    t = x.reshape(2, 15, 32)
    q, k, v = (t @ m.qkv.weight.T).unflatten(-1, (3, 8, 4)).permute(2, 0, 3, 1, 4)
    out = (torch.softmax(q @ k.transpose(-1, -2) * 4**-0.5, -1) @ v).transpose(1, 2).reshape(2, 3, 5, 32)
    out = out + m.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), out @ m.proj.weight.T + m.proj.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_layer_scripts_and_matches_eager():
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2).eval()
    x = torch.randn(1, 5, 3, 16)
    scripted = torch.jit.script(copy.deepcopy(m))
    torch.testing.assert_close(scripted(x), m(x))


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=5)
    with pytest.raises(ValueError, match="num_heads"):
        BiLevelRoutingAttention(32, num_heads=3)
    with pytest.raises(ValueError, match="side_dwconv"):
        BiLevelRoutingAttention(32, num_heads=2, side_dwconv=4)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_nan_input_reaches_exactly_the_outputs_that_see_it(name):
    """A NaN stays a NaN whatever path SDPA takes (its fused CPU kernel turns a small head's NaN query into zeros): a
    query entry its own row, a value entry its channel in the query regions routed to its region, a key entry the
    rows of those regions."""
    q, k, v = (t.detach().float() for t in _qkv((1, 4, 4, 1, 8)))
    {"q": q, "k": k, "v": v}[name][0, 1, 1, 0, 2] = float("nan")
    out, index = bra2d_reference(q, k, v, 2, 2, default_scale(q))
    torch.testing.assert_close(out, bra2d(q, k, v, 2, 2, backend="reference"), equal_nan=True)
    reached = torch.zeros(1, 2, 2, 1, 8, dtype=torch.bool)  # per (query region row, column, head, channel)
    if name == "q":
        expected = torch.zeros_like(out, dtype=torch.bool)
        expected[0, 1, 1, 0] = True
    else:
        routed = (index[0] == 0).any(-1).view(2, 2)  # query regions routed to region 0, which holds token (1, 1)
        reached[0, routed] = True if name == "k" else torch.arange(8) == 2
        expected = reached.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert expected.any() and torch.equal(torch.isnan(out), expected)


@pytest.mark.parametrize("shape", [(0, 7, 9, 2, 4), (2, 0, 9, 2, 4), (1, 7, 0, 2, 4)])
def test_empty_batch_or_map_gives_empty_outputs_and_gradients(shape):
    q, k, v = _qkv(shape, dv=3, dtype=torch.float32)
    for padding in ("zero", "mask"):
        out = bra2d(q, k, v, 3, 2, padding=padding)
        assert out.shape == (*shape[:-1], 3)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert bra2d_reference(q, k, v, 3, 2, 1.0)[0].shape == out.shape  # the layer's TorchScript path
    regions = _qkv((shape[0], 9, 0 if 0 in shape[1:3] else 4, 2, 4), dv=3, dtype=torch.float32)
    index = route(*regions[:2], 3, 2)
    assert index.shape == (shape[0], 9, 2)
    assert routed_attention(*regions, index, 3).shape == regions[2].shape


def test_float_sizes_and_empty_heads_are_clear_errors():
    q, k, v = _qkv((1, 4, 4, 2, 4), dtype=torch.float32)
    with pytest.raises(TypeError, match="n_win must be an int"):
        bra2d(q, k, v, 2.0, 2)
    with pytest.raises(TypeError, match="topk must be an int"):
        bra2d(q, k, v, 2, 2.0)
    with pytest.raises(ValueError, match="head dims"):
        bra2d(q[..., :0], k[..., :0], v[..., :0], 2, 2)
    with pytest.raises(ValueError, match="heads"):
        bra2d(q[..., :0, :], k[..., :0, :], v[..., :0, :], 2, 2)
    regions = _qkv((1, 4, 3, 2, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        routed_attention(*(t[..., :0] for t in regions), torch.zeros(1, 4, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="head dims"):
        route(regions[0][..., :0], regions[1][..., :0], 2, 2)
