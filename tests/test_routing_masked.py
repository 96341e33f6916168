"""Bi-level routing attention with masked padding (``padding="mask"``): the reference against a direct definition on
the valid tokens only, the Triton kernels (interpreter) against the reference, the layer and BiFormer models."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401
from attnzoo.kernels.dispatch import triton_available, triton_interpreter_enabled
from attnzoo.kernels.routing import bra2d, default_scale, reference
from attnzoo.kernels.routing.reference import (
    bra2d_reference,
    map_to_regions,
    regions_to_map,
    routed_attention_reference,
)
from attnzoo.layers import BiLevelRoutingAttention

requires_triton = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or triton_interpreter_enabled()),
    reason="needs triton >= MIN_TRITON (attnzoo.kernels.dispatch) and CUDA, or TRITON_INTERPRET=1 on CPU",
)
TRITON = pytest.param("triton", marks=[pytest.mark.triton, requires_triton])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _valid_only(q, k, v, n_win, topk, scale):
    """BRA over the ``H x W`` valid tokens only, no padding anywhere: token ``(y, x)`` belongs to region
    ``(y // ceil(H / n_win), x // ceil(W / n_win))``; region means average the tokens a region holds; regions holding
    none are never routed to; every query attends to all tokens of its region's routed regions (with multiplicity).
    Returns the output ``(B, H, W, heads, Dv)`` and the routing index ``(B, n_win**2, topk)``."""
    B, H, W, h, _ = q.shape
    R = n_win * n_win
    rh, rw = -(-H // n_win), -(-W // n_win)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    region = ((ys // rh) * n_win + xs // rw).reshape(-1)  # (N,)
    member = F.one_hot(region, R).to(q.dtype)  # (N, R)
    counts = member.sum(0)
    qf, kf, vf = (x.reshape(B, H * W, h, x.shape[-1]) for x in (q, k, v))

    def means(x):  # (B, R, heads * D)
        return torch.einsum("nr,bnc->brc", member, x.detach().flatten(2)) / counts.clamp(min=1)[:, None]

    affinity = (means(qf) @ means(kf).transpose(1, 2)).masked_fill(counts == 0, float("-inf"))
    index = affinity.topk(topk, dim=-1).indices
    multiplicity = F.one_hot(index, R).sum(2).to(q.dtype)  # (B, R_query, R_key)
    weight = multiplicity[:, region][:, :, region][:, None]  # (B, 1, N_query, N_key)
    logits = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale
    logits = logits.masked_fill(weight == 0, float("-inf"))
    p = torch.exp(logits - logits.amax(-1, keepdim=True)) * weight
    out = torch.einsum("bhnm,bmhe->bnhe", p / p.sum(-1, keepdim=True), vf)
    return out.reshape(B, H, W, h, -1), index


def _qkv(shape, dv=None, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dv = dv or shape[-1]
    q, k = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn((*shape[:-1], dv), generator=g, dtype=dtype)
    return [x.to(device).requires_grad_() for x in (q, k, v)]


# (B, H, W, n_win, topk): fully padded region rows and columns (H=8, n_win=7: regions of 2 rows, rows 4-6 padding);
# partially padded regions only; topk larger than the 6 regions that hold tokens
CASES = [(2, 8, 5, 7, 4), (1, 5, 7, 3, 2), (1, 2, 3, 3, 8)]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_valid_token_definition(case):
    B, H, W, n_win, topk = case
    q, k, v = _qkv((B, H, W, 2, 4), dv=3)
    scale = default_scale(q)
    out = bra2d(q, k, v, n_win, topk, backend="reference", padding="mask")
    expected, index = _valid_only(q, k, v, n_win, topk, scale)
    torch.testing.assert_close(out, expected)
    # same routed regions for every region holding query tokens (top-k is sorted: regions holding keys come first)
    got_index = bra2d_reference(q, k, v, n_win, topk, scale, True)[1]
    holds = torch.zeros(n_win, n_win, dtype=torch.bool)  # regions holding tokens: ceil(H / region height) rows, ...
    holds[: -(-H // -(-H // n_win)), : -(-W // -(-W // n_win))] = True
    holds = holds.reshape(-1)
    n_routable = min(topk, int(holds.sum()))
    for idx in (got_index, index):
        assert holds[idx[:, :, :n_routable]].all()
    assert torch.equal(got_index[:, holds, :n_routable].sort(-1).values, index[:, holds, :n_routable].sort(-1).values)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, msg=f"d{name}")


def test_reference_gradcheck_fp64():
    q, k, v = _qkv((1, 4, 3, 1, 2))  # n_win 3: regions of 2 x 1 tokens, region row 2 entirely padding
    fn = lambda a, b, c: bra2d(a, b, c, 3, 2, scale=0.8, backend="reference", padding="mask")  # noqa: E731
    torch.testing.assert_close(fn(q, k, v), _valid_only(q, k, v, 3, 2, 0.8)[0], rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_mask_differs_from_zero_padding():
    q, k, v = _qkv((1, 5, 7, 2, 4))
    masked = bra2d(q, k, v, 3, 2, backend="reference", padding="mask")
    assert not torch.allclose(masked, bra2d(q, k, v, 3, 2, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_mask_equals_zero_exactly_without_padding(backend):
    q, k, v = _qkv((1, 6, 3, 1, 16), dtype=torch.float32, device=DEVICE)
    outs, grads = [], []
    for padding in ("zero", "mask"):
        out = bra2d(q, k, v, 3, 2, backend=backend, padding=padding)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_unknown_padding_is_a_clear_error():
    q, k, v = _qkv((1, 4, 4, 1, 4))
    with pytest.raises(ValueError, match="padding must be one of"):
        bra2d(q, k, v, 2, 1, padding="reflect")
    with pytest.raises(ValueError, match="padding must be one of"):
        BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=1, padding="masked")
    with pytest.raises(ValueError, match="padding must be one of"):
        timm.create_model("biformer_tiny", padding="none", device="meta")


def _layer(padding="mask", dtype=torch.float64):
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(32, num_heads=2, n_win=3, topk=2, qk_dim=16, padding=padding).to(dtype).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def test_layer_mask_projects_the_unpadded_input():
    m = _layer()
    x = torch.randn(2, 5, 7, 32, dtype=torch.float64)
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split([16, 16, 32], -1)
    heads = [t.unflatten(-1, (2, -1)) for t in (q, k, v)]
    out = _valid_only(*heads, 3, 2, 16**-0.5)[0].flatten(3)
    out = out + m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LCE on the unpadded V map
    torch.testing.assert_close(m(x), out @ m.proj.weight.T + m.proj.bias)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_layer_mask_scripts_and_matches_eager():
    m = _layer(dtype=torch.float32)
    x = torch.randn(1, 5, 4, 32)
    torch.testing.assert_close(torch.jit.script(copy.deepcopy(m))(x), m(x))


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    zero = timm.create_model("biformer_tiny", num_classes=10).eval()
    masked = timm.create_model("biformer_tiny", num_classes=10, padding="mask").eval()
    masked.load_state_dict(zero.state_dict())
    return zero, masked


def test_biformer_mask_output_ignores_padded_content(tiny_models, monkeypatch):
    _, model = tiny_models
    assert {m.padding for m in model.modules() if isinstance(m, BiLevelRoutingAttention)} == {"mask"}
    x = torch.randn(1, 3, 200, 300)  # stage maps 50x75, 25x38, 13x19: none a multiple of n_win=7
    with torch.no_grad():
        logits = model(x)
    pad_map, calls = reference.pad_map, []

    def pad_with_noise(t, n_win):  # padded positions hold large random values instead of zeros
        noisy = torch.randn_like(pad_map(t, n_win)) * 100
        noisy[:, : t.shape[1], : t.shape[2]] = t
        calls.append(noisy.shape != t.shape)
        return noisy

    monkeypatch.setattr(reference, "pad_map", pad_with_noise)
    with torch.no_grad():
        noisy = model(x)
    assert any(calls)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(noisy, logits, atol=1e-5, rtol=1e-5)


def test_biformer_mask_equals_zero_without_padding_and_differs_with(tiny_models):
    zero, masked = tiny_models
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)  # stage maps 56, 28, 14: multiples of n_win=7
        assert torch.equal(zero(x), masked(x))
        x = torch.randn(1, 3, 200, 300)
        assert not torch.allclose(zero(x), masked(x))


# --- Triton (interpreter on CPU) against the reference -----------------------------------------------------------


@pytest.mark.triton
@requires_triton
def test_triton_kernel_masks_padded_keys_whatever_their_content():
    """The op on a 16 x 16 map (n_win 2: regions of 8 x 8 = 64 tokens, one 64-key block per routed region) valid in
    its top-left 6 x 9 only (regions 2 and 3 entirely padding), random content in the padding, and routes whose first
    region is entirely padding (a first key block without a valid key): output and dq/dk/dv match the masked
    reference, and padded keys get zero dk/dv."""
    from attnzoo.kernels.routing.ops import routed_attention_forward_op

    q, k, v = _qkv((1, 16, 16, 1, 16), dtype=torch.float32, device=DEVICE)
    index = torch.tensor([[[2, 0], [3, 1], [0, 2], [1, 3]]], device=DEVICE)
    out = routed_attention_forward_op(q, k, v, index, 2, "map", 0.25, 6, 9)[0]
    valid = torch.zeros(16, 16, dtype=torch.bool, device=DEVICE)
    valid[:6, :9] = True
    key_valid = map_to_regions(valid[None, :, :, None, None], 2).reshape(4, 64)
    regions = [map_to_regions(x, 2) for x in (q, k, v)]
    ref = regions_to_map(routed_attention_reference(*regions, index, 0.25, key_valid), 2, 16, 16)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=4e-4, rtol=4e-4, msg=f"d{name}")
    assert not got[1][:, ~valid].any() and not got[2][:, ~valid].any()


def test_biformer_empty_batch_gives_empty_logits_and_gradients(tiny_models):
    for model in tiny_models:
        x = torch.randn(0, 3, 64, 96, requires_grad=True)
        logits = model(x)
        assert logits.shape == (0, 10)
        assert torch.autograd.grad(logits.sum(), x)[0].shape == x.shape
