"""The decay masks of RMT (Manhattan) and PPMA (polyline path) against direct N x N constructions written from the
papers, and the mixers' fast paths (SDPA, batched line attention) against dense N x N formulations."""

import math

import pytest
import torch

from attnzoo.layers import ManhattanAttention, PolylineAttention, create_mixer, list_mixers
from attnzoo.layers.decay_masks import (
    add_polyline_path_mask,
    apply_rotary,
    distance_mask_1d,
    manhattan_log_decay,
    manhattan_mask,
    polyline_line_masks,
    polyline_path_mask,
    raster_rotary_tables,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _grid(H, W):
    return [(y, x) for y in range(H) for x in range(W)]


def _direct_manhattan(gamma, H, W):
    """``D[h, i, j] = gamma_h ** (|y_i - y_j| + |x_i - x_j|)`` (RMT's spatial decay matrix), pair by pair."""
    cells = _grid(H, W)
    rows = []
    for h in range(gamma.shape[0]):
        rows.append(
            torch.stack(
                [torch.stack([gamma[h] ** (abs(yi - yj) + abs(xi - xj)) for yj, xj in cells]) for yi, xi in cells]
            )
        )
    return torch.stack(rows)


def _direct_polyline(a, b):
    """PPMA's polyline path mask of one head, pair by pair: the product of the horizontal decays ``a[y, x]`` of the
    tokens passed along the query's row, then of the vertical decays ``b[y, x]`` along the key's column (the start
    token excluded, the end token included). ``a``, ``b``: ``(H, W)`` decay factors in (0, 1)."""
    H, W = a.shape
    cells = _grid(H, W)
    one = torch.ones((), dtype=a.dtype)
    out = []
    for yq, xq in cells:
        row = []
        for yk, xk in cells:
            value = one
            for x in range(min(xq, xk) + 1, max(xq, xk) + 1):  # along row yq, from column xq to xk
                value = value * a[yq, x]
            for y in range(min(yq, yk) + 1, max(yq, yk) + 1):  # then along column xk, from row yq to yk
                value = value * b[y, xk]
            row.append(value)
        out.append(torch.stack(row))
    return torch.stack(out)


def test_rmt_decays_are_the_papers():
    log_gamma = manhattan_log_decay(4, init_value=2.0, heads_range=4.0)
    expected = [math.log(1 - 2 ** (-2 - 4 * h / 4)) for h in range(4)]
    torch.testing.assert_close(log_gamma, torch.tensor(expected))


@pytest.mark.parametrize("size", [(3, 4), (1, 5), (4, 1)])
def test_manhattan_mask_and_its_gradient_match_the_direct_decay_matrix(size):
    H, W = size
    log_gamma = torch.tensor([-0.3, -0.05, -1.2], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, H * W, H * W, dtype=torch.float64)
    fast = manhattan_mask(log_gamma, H, W)
    direct = _direct_manhattan(log_gamma.exp(), H, W)
    torch.testing.assert_close(fast.exp(), direct)
    (grad_fast,) = torch.autograd.grad((fast.exp() * weights).sum(), log_gamma)
    (grad_direct,) = torch.autograd.grad((direct * weights).sum(), log_gamma)
    torch.testing.assert_close(grad_fast, grad_direct)
    # the decomposed form's 1-D masks are the row / column restrictions of the 2-D one
    full = fast.view(3, H, W, H, W)
    torch.testing.assert_close(distance_mask_1d(log_gamma, W), full[:, 0, :, 0, :])
    torch.testing.assert_close(distance_mask_1d(log_gamma, H), full[:, :, 0, :, 0])


@pytest.mark.parametrize("size", [(3, 4), (4, 3), (1, 5), (5, 1)])
def test_polyline_path_mask_and_gradients_match_the_path_products(size):
    H, W = size
    B, heads = 2, 2
    alpha = (-torch.rand(B, heads, H, W, dtype=torch.float64)).requires_grad_()
    beta = (-torch.rand(B, heads, H, W, dtype=torch.float64)).requires_grad_()
    fast = polyline_path_mask(alpha, beta).exp()
    direct = torch.stack(
        [torch.stack([_direct_polyline(alpha[b, h].exp(), beta[b, h].exp()) for h in range(heads)]) for b in range(B)]
    )
    torch.testing.assert_close(fast, direct)
    weights = torch.randn_like(direct)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (alpha, beta))
    # a single row never travels vertically (beta unused), a single column never horizontally
    grads_direct = torch.autograd.grad((direct * weights).sum(), (alpha, beta), allow_unused=True)
    for g_fast, g_direct in zip(grads_fast, grads_direct):
        torch.testing.assert_close(g_fast, torch.zeros_like(g_fast) if g_direct is None else g_direct)
    # vertical first: the other polyline, the transpose
    vertical_first = polyline_path_mask(alpha, beta, vertical_first=True)
    assert torch.equal(vertical_first, polyline_path_mask(alpha, beta).transpose(-1, -2))
    # the fused addition to logits equals adding the materialised mask
    logits = torch.randn_like(direct)
    for flag in (False, True):
        torch.testing.assert_close(
            add_polyline_path_mask(logits, alpha, beta, flag), logits + polyline_path_mask(alpha, beta, flag)
        )
    # the line masks are the restrictions of the 2-D mask to one row / one column
    rows, cols = polyline_line_masks(alpha, beta)
    full = polyline_path_mask(alpha, beta).view(B, heads, H, W, H, W)
    for y in range(H):
        torch.testing.assert_close(rows[:, :, y], full[:, :, y, :, y, :])
    for x in range(W):
        torch.testing.assert_close(cols[:, :, x], full[:, :, :, x, :, x])


def test_polyline_decay_parameters_get_the_gradients_of_the_direct_mask():
    """Through the mixer's decay prediction (dt_proj, dt_bias, A_log), the fast mask and the pair-by-pair one give the
    same parameter gradients."""
    mixer = PolylineAttention(16, num_heads=2).double()
    x = torch.randn(1, 3, 4, 16, dtype=torch.float64)
    params = (mixer.dt_proj.weight, mixer.dt_bias, mixer.A_log)
    alpha, beta = mixer.log_decays(x)
    assert (alpha < 0).all() and (beta < 0).all()
    weights = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    fast = torch.autograd.grad((polyline_path_mask(alpha, beta).exp() * weights).sum(), params)
    alpha, beta = mixer.log_decays(x)
    direct_mask = torch.stack([_direct_polyline(alpha[0, h].exp(), beta[0, h].exp()) for h in range(2)])[None]
    direct = torch.autograd.grad((direct_mask * weights).sum(), params)
    for g_fast, g_direct in zip(fast, direct):
        assert g_fast.abs().sum() > 0
        torch.testing.assert_close(g_fast, g_direct)


def test_rotary_rotates_channel_pairs_by_the_raster_index():
    H, W, D = 3, 5, 8
    sin, cos = raster_rotary_tables(H, W, D)
    x = torch.randn(2, H, W, D)
    out = apply_rotary(x, sin, cos)
    for y, xx in [(0, 0), (1, 3), (2, 4)]:
        position = y * W + xx
        for m in range(D // 2):
            theta = 10000 ** (-m / (D // 2 - 1))
            c, s = math.cos(position * theta), math.sin(position * theta)
            x0, x1 = x[:, y, xx, 2 * m], x[:, y, xx, 2 * m + 1]
            torch.testing.assert_close(out[:, y, xx, 2 * m], x0 * c - x1 * s, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[:, y, xx, 2 * m + 1], x1 * c + x0 * s, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="even head_dim"):
        raster_rotary_tables(2, 2, 7)


def _rotated_qkv(mixer, x):
    B, H, W, C = x.shape
    q, k, v = mixer.qkv(x).view(B, H, W, 3, mixer.num_heads, mixer.head_dim).permute(3, 0, 4, 1, 2, 5).unbind(0)
    sin, cos = raster_rotary_tables(H, W, mixer.head_dim, dtype=x.dtype)
    return apply_rotary(q, sin, cos), apply_rotary(k, sin, cos), v


def _dense_line_attention(logits_rows, logits_cols, H, W):
    """Row attention ``(B, h, H, W, W)`` and column attention ``(B, h, W, H, H)`` as ``(B, h, N, N)`` matrices."""
    B, heads = logits_rows.shape[:2]
    rows = torch.zeros(B, heads, H, W, H, W, dtype=logits_rows.dtype)
    cols = torch.zeros_like(rows)
    a_rows, a_cols = logits_rows.softmax(-1), logits_cols.softmax(-1)
    for y in range(H):
        rows[:, :, y, :, y, :] = a_rows[:, :, y]
    for x in range(W):
        cols[:, :, :, x, :, x] = a_cols[:, :, x]
    return rows.reshape(B, heads, H * W, H * W), cols.reshape(B, heads, H * W, H * W)


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("size", [(4, 5), (1, 3), (6, 1)])
def test_manhattan_fast_paths_equal_dense_attention(size, attn_impl):
    H, W = size
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    for decomposed in (False, True):
        mixer = ManhattanAttention(
            16, num_heads=2, decomposed=decomposed, init_value=1.0, heads_range=3.0, attn_impl=attn_impl
        ).double()
        q, k, v = _rotated_qkv(mixer, x)
        out = mixer.attend(x, q, k, v).flatten(2, 3)
        log_gamma = mixer.log_gamma(x.device).double()
        qf, kf, vf = (t.flatten(2, 3) for t in (q, k, v))
        logits = qf @ kf.transpose(-1, -2) / math.sqrt(8)
        if decomposed:  # rows, then columns: A_cols @ A_rows
            d = logits.view(2, 2, H, W, H, W)
            rows = torch.stack([d[:, :, y, :, y, :] for y in range(H)], 2) + distance_mask_1d(log_gamma, W)[:, None]
            cols = torch.stack([d[:, :, :, c, :, c] for c in range(W)], 2) + distance_mask_1d(log_gamma, H)[:, None]
            a_rows, a_cols = _dense_line_attention(rows, cols, H, W)
            expected = a_cols @ (a_rows @ vf)
        else:
            expected = (logits + manhattan_mask(log_gamma, H, W)).softmax(-1) @ vf
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("size", [(4, 5), (1, 3), (6, 1)])
def test_polyline_fast_paths_equal_dense_attention(size):
    H, W = size
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    for decomposed in (False, True):
        mixer = PolylineAttention(16, num_heads=2, decomposed=decomposed).double()
        q, k, v = _rotated_qkv(mixer, x)
        out = mixer.attend(x, q, k, v).flatten(2, 3)
        alpha, beta = mixer.log_decays(x)
        qf, kf, vf = (t.flatten(2, 3) for t in (q, k, v))
        logits = qf @ kf.transpose(-1, -2) / math.sqrt(8)
        mask = torch.stack(
            [torch.stack([_direct_polyline(alpha[b, h].exp(), beta[b, h].exp()) for h in range(2)]) for b in range(2)]
        ).log()
        if decomposed:  # (A_cols A_rows + A_rows A_cols) v / 2 with the row / column restrictions of the mask
            d, m = logits.view(2, 2, H, W, H, W), mask.view(2, 2, H, W, H, W)
            rows = torch.stack([d[:, :, y, :, y, :] + m[:, :, y, :, y, :] for y in range(H)], 2)
            cols = torch.stack([d[:, :, :, c, :, c] + m[:, :, :, c, :, c] for c in range(W)], 2)
            a_rows, a_cols = _dense_line_attention(rows, cols, H, W)
            expected = 0.5 * (a_cols @ a_rows + a_rows @ a_cols) @ vf
        else:  # the mask and its transpose, averaged
            expected = 0.5 * ((logits + mask).softmax(-1) + (logits + mask.transpose(-1, -2)).softmax(-1)) @ vf
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["manhattan", "polyline"])
def test_mixers_are_registered_and_take_any_size_and_gates(name):
    assert name in list_mixers()
    for gate, decomposed, sizes in [
        ("none", False, [(1, 1), (1, 6), (5, 1), (7, 9)]),
        ("none", True, [(1, 1), (1, 6), (5, 1), (7, 9)]),
        ("headwise", True, [(3, 4)]),
        ("elementwise", False, [(3, 4)]),
    ]:
        mixer = create_mixer(name, 32, num_heads=4, decomposed=decomposed, gate=gate)
        for size in sizes:
            x = torch.randn(2, *size, 32)
            out = mixer(x)
            assert out.shape == x.shape and torch.isfinite(out).all()
        out.sum().backward()
        assert all(p.grad is not None for p in mixer.parameters())
    with pytest.raises(ValueError, match="even"):
        create_mixer(name, 36, num_heads=4)  # head_dim 9
    with pytest.raises(ValueError, match="gate must be one of"):
        create_mixer(name, 32, num_heads=4, gate="sigmoid")
    with pytest.raises(ValueError, match="attn_mask"):
        create_mixer(name, 32, num_heads=4)(torch.randn(1, 2, 2, 32), attn_mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        ManhattanAttention(32, num_heads=4, attn_impl="flash")
    with pytest.raises(ValueError, match="alpha and beta"):
        polyline_line_masks(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, 3))


def test_decay_mixers_plug_into_metapool_stages():
    import timm

    import attnzoo  # noqa: F401

    model = timm.create_model(
        "metapool_hybrid_s12",
        depths=(1, 1, 1, 1),
        dims=(32, 64, 96, 128),
        mixers=("polyline", "manhattan", "polyline", "manhattan"),
        num_classes=5,
    ).eval()
    kinds = [type(stage.blocks[0].attn).__name__ for stage in model.stages]
    assert kinds == ["PolylineAttention", "ManhattanAttention", "PolylineAttention", "ManhattanAttention"]
    assert {"stages.0.blocks.0.attn.dt_bias", "stages.2.blocks.0.attn.A_log"} <= model.no_weight_decay()
    out = model(torch.randn(1, 3, 97, 131))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_manhattan_mixer_compiles_without_graph_breaks():
    """``torch.compile(fullgraph=True)`` (aot_eager, as the contract test) of both forms matches eager; the contract
    compiles the whole network on PPMA only, which shares everything but the mixer with RMT."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        for decomposed in (False, True):
            mixer = create_mixer("manhattan", 32, num_heads=4, decomposed=decomposed, gate="headwise").eval()
            x = torch.randn(1, 5, 7, 32)
            with torch.no_grad():
                out = torch.compile(mixer, backend="aot_eager", fullgraph=True)(x)
                torch.testing.assert_close(out, mixer(x), rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()
