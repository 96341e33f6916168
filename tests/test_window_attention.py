"""Tests for the (shifted) window attention token mixer :class:`attnzoo.layers.window_attention.WindowAttention2d`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

from attnzoo.layers.mixer import create_mixer, get_mixer
from attnzoo.layers.window_attention import WindowAttention2d


def _make(dim=16, num_heads=4, window_size=7, shift_size=0, gate="none", seed=0, **kwargs) -> WindowAttention2d:
    """A module in eval mode with a large random bias table, so that a wrong bias lookup cannot go unnoticed."""
    torch.manual_seed(seed)
    mod = WindowAttention2d(
        dim, num_heads=num_heads, window_size=window_size, shift_size=shift_size, gate=gate, **kwargs
    )
    with torch.no_grad():
        mod.relative_position_bias_table.normal_(std=1.0)
        if mod.gate is not None:
            mod.gate.weight.normal_(std=0.5)
            mod.gate.bias.normal_(std=0.5)
    return mod.eval()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def oracle(
    mod: WindowAttention2d, x: torch.Tensor, mask_padding: bool = True, separate_wrapped: bool = True
) -> torch.Tensor:
    """Brute-force reference of the module's forward, token by token.

    Every position of the zero-padded map is placed in the rolled coordinate system explicitly: a token at original
    ``(y, x)`` lands at rolled ``((y - sy) mod Hp, (x - sx) mod Wp)``. A query attends to the keys that lie in the same
    rolled window, that did (or did not) wrap around in the roll exactly like the query on both axes, and that are
    real map tokens; the bias uses the offset of their rolled in-window coordinates. ``mask_padding`` /
    ``separate_wrapped`` switch those rules off (to check that the comparison can fail).
    """
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = mod.window_size, mod.shift_size
    eh, ew = min(wh, H), min(ww, W)
    sy = sh if wh < H else 0
    sx = sw if ww < W else 0
    Hp, Wp = math.ceil(H / eh) * eh, math.ceil(W / ew) * ew
    nh, hd = mod.num_heads, mod.head_dim

    positions = [(y, xx) for y in range(Hp) for xx in range(Wp)]
    xp = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    xp[:, :H, :W] = x
    tokens = xp.reshape(B, Hp * Wp, C)

    info = []
    for y, xx in positions:
        ry, rx = (y - sy) % Hp, (xx - sx) % Wp
        info.append(
            {
                "window": (ry // eh, rx // ew),
                "wrapped": (y < sy, xx < sx),
                "local": (ry % eh, rx % ew),
                "real": y < H and xx < W,
            }
        )
    n = len(positions)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    bias = torch.zeros(nh, n, n, dtype=x.dtype)
    table = mod.relative_position_bias_table.detach()
    for i, qi in enumerate(info):
        for j, kj in enumerate(info):
            if qi["window"] != kj["window"]:
                continue
            if separate_wrapped and qi["wrapped"] != kj["wrapped"]:
                continue
            if mask_padding and not kj["real"]:
                continue
            allowed[i, j] = True
            dy = qi["local"][0] - kj["local"][0]
            dx = qi["local"][1] - kj["local"][1]
            bias[:, i, j] = table[(dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)]

    qkv = tokens @ mod.qkv.weight.detach().T
    if mod.qkv.bias is not None:
        qkv = qkv + mod.qkv.bias.detach()
    q, k, v = qkv.view(B, n, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (B, heads, n, hd) each
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    real_rows = torch.tensor([p["real"] for p in info])
    probs = torch.softmax(scores[:, :, real_rows], dim=-1)  # real queries only
    out = (probs @ v).transpose(1, 2).reshape(B, H * W, C)  # real positions are row-major first H rows/W cols

    inp = x.reshape(B, H * W, C)
    if mod.gate is not None:
        g = torch.sigmoid(inp @ mod.gate.weight.detach().T + mod.gate.bias.detach())
        if mod.gate.mode == "headwise":
            out = (out.view(B, H * W, nh, hd) * g.unsqueeze(-1)).reshape(B, H * W, C)
        else:
            out = out * g
    out = out @ mod.proj.weight.detach().T + mod.proj.bias.detach()
    return out.view(B, H, W, C)


# (map H, W), window_size, shift_size, gate
ORACLE_CASES = [
    ((7, 7), 7, 0, "none"),  # exactly one window
    ((14, 14), 7, 3, "none"),  # Swin's canonical shifted case
    ((14, 14), 7, 0, "headwise"),
    ((11, 9), 4, 2, "none"),  # non-square, sides not multiples of the window, shifted
    ((11, 9), 4, 0, "elementwise"),  # padded, no shift
    ((9, 13), (3, 5), (1, 2), "headwise"),  # non-square window and shift
    ((10, 6), (4, 3), (3, 0), "elementwise"),  # shift on one axis only
    ((8, 8), 7, 3, "none"),  # a shifted region made only of padding
    ((5, 6), 7, 3, "elementwise"),  # map smaller than the window: clamped window, no shift
    ((5, 12), 7, 3, "headwise"),  # clamped on H, shifted and padded on W
    ((1, 3), 2, 1, "none"),  # degenerate map
]


@pytest.mark.parametrize("size, window, shift, gate", ORACLE_CASES)
def test_matches_bruteforce_oracle(size, window, shift, gate):
    mod = _make(dim=16, num_heads=4, window_size=window, shift_size=shift, gate=gate)
    torch.manual_seed(1)
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        out = mod(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, oracle(mod, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "size, window, shift, rule",
    [((11, 9), 4, 2, "mask_padding"), ((14, 14), 7, 3, "separate_wrapped"), ((10, 10), 4, 0, "mask_padding")],
)
def test_oracle_rules_matter(size, window, shift, rule):
    """Dropping the padding mask or the shifted-region mask from the oracle changes the result, so the oracle test
    above checks both (padded tokens are zeros, but their keys/values are not: ``qkv`` has a bias)."""
    mod = _make(dim=16, num_heads=4, window_size=window, shift_size=shift)
    torch.manual_seed(2)
    x = torch.randn(1, *size, 16)
    with torch.no_grad():
        out = mod(x)
    assert not torch.allclose(out, oracle(mod, x, **{rule: False}), atol=1e-3)


@pytest.mark.parametrize("window", [7, (4, 6)])
def test_single_window_is_full_attention_with_bias(window):
    wh, ww = _pair(window)
    mod = _make(dim=24, num_heads=3, window_size=window, gate="none")
    torch.manual_seed(3)
    x = torch.randn(2, wh, ww, 24)
    with torch.no_grad():
        out = mod(x)

    n, nh, hd = wh * ww, 3, 8
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None] + ww - 1)
    bias = mod.relative_position_bias_table.detach()[index].permute(2, 0, 1)  # (heads, n, n)
    tokens = x.reshape(2, n, 24)
    q, k, v = F.linear(tokens, mod.qkv.weight, mod.qkv.bias).detach().view(2, n, 3, nh, hd).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5 + bias, dim=-1)
    ref = F.linear((attn @ v).transpose(1, 2).reshape(2, n, 24), mod.proj.weight, mod.proj.bias).detach()
    torch.testing.assert_close(out, ref.view(2, wh, ww, 24), atol=1e-5, rtol=1e-5)


def test_loads_timm_window_attention():
    torch.manual_seed(4)
    dim, heads = 32, 4
    ref = WindowAttention(dim, num_heads=heads, window_size=7).eval()
    with torch.no_grad():
        ref.relative_position_bias_table.normal_(std=1.0)
    mod = WindowAttention2d(dim, num_heads=heads, window_size=7, shift_size=0).eval()
    sd = ref.state_dict()
    assert set(sd) == set(mod.state_dict())
    mod.load_state_dict(sd, strict=True)
    torch.testing.assert_close(mod.relative_position_index, ref.relative_position_index)

    x = torch.randn(2 * 4, 49, dim)  # (B * num_windows, window area, C)
    with torch.no_grad():
        expected = ref(x)
        out = mod(x.view(-1, 7, 7, dim)).view(-1, 49, dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size, window, shift", [((14, 14), 7, 3), ((12, 15), (4, 5), (2, 2))])
def test_matches_timm_shifted_swin_block(size, window, shift):
    """On maps that are multiples of the window (where timm does not pad) the shifted mixer equals the attention
    branch of timm's ``SwinTransformerBlock`` (roll, windows, Swin mask, attention, unroll) with the same weights."""
    torch.manual_seed(5)
    dim, heads = 32, 4
    block = SwinTransformerBlock(
        dim, input_resolution=size, num_heads=heads, window_size=window, shift_size=shift
    ).eval()
    assert block.shift_size == _pair(shift)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(std=1.0)
    mod = WindowAttention2d(dim, num_heads=heads, window_size=window, shift_size=shift).eval()
    mod.load_state_dict(block.attn.state_dict(), strict=True)
    x = torch.randn(2, *size, dim)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), block._attn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["none", "headwise", "elementwise"])
@pytest.mark.parametrize("size", [(11, 9), (8, 8), (5, 6)])
def test_gradients_reach_all_parameters(gate, size):
    mod = _make(
        dim=16, num_heads=4, window_size=7 if size != (11, 9) else 4, shift_size=3 if size == (8, 8) else 2, gate=gate
    ).train()
    x = torch.randn(2, *size, 16, requires_grad=True)
    out = mod(x)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mod.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bfloat16_forward_backward():
    mod = _make(dim=16, num_heads=4, window_size=4, shift_size=2, gate="elementwise")
    x = torch.randn(2, 11, 9, 16)
    with torch.no_grad():
        ref = mod(x)
    mod_bf16 = mod.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = mod_bf16(xb)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(xb.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in mod_bf16.parameters())
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_autocast_bfloat16():
    mod = _make(dim=16, num_heads=4, window_size=4, shift_size=2, gate="headwise")
    x = torch.randn(2, 11, 9, 16)
    with torch.no_grad():
        ref = mod(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mod(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shift_size": 7}, "shift_size"),
        ({"shift_size": -1}, "shift_size"),
        ({"window_size": (7, 5), "shift_size": (3, 5)}, "shift_size"),
        ({"window_size": 0}, "window_size"),
        ({"window_size": (7, 7, 7)}, "window_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"gate": "bogus"}, "gate"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowAttention2d(16, **{"num_heads": 4, **kwargs})


def test_registry_meta_device_and_no_weight_decay():
    assert get_mixer("window") is WindowAttention2d
    mod = create_mixer("window", 32, 4, window_size=(4, 6), shift_size=(2, 3), gate="headwise")
    assert isinstance(mod, WindowAttention2d)
    assert mod.relative_position_bias_table.shape == (7 * 11, 4)
    assert mod.relative_position_index.shape == (24, 24)
    assert "relative_position_index" not in mod.state_dict()
    assert mod.no_weight_decay() == {"relative_position_bias_table"}
    assert mod.no_weight_decay() <= {name for name, _ in mod.named_parameters()}
    assert 0.01 < mod.relative_position_bias_table.std().item() < 0.03  # trunc_normal_(std=0.02)

    meta = WindowAttention2d(32, num_heads=4, window_size=(4, 6), shift_size=(2, 3), gate="headwise", device="meta")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device="cpu")
    meta.init_non_persistent_buffers()
    meta.load_state_dict(mod.state_dict(), strict=True)
    x = torch.randn(1, 9, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(meta(x), mod(x))


def test_dropout_only_in_training():
    mod = _make(dim=16, num_heads=4, window_size=4, shift_size=2, attn_drop=0.5, proj_drop=0.5)
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), mod(x))
        mod.train()
        assert not torch.allclose(mod(x), mod(x))


def test_torch_compile_traces_without_graph_breaks():
    """Dynamo traces forward and backward in one graph (``fullgraph=True``); the cheap ``aot_eager`` backend keeps this
    fast, the inductor run is below."""
    mod = _make(dim=16, num_heads=2, window_size=4, shift_size=2, gate="headwise")
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 6, 7, 16, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    ref = mod(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    mod = _make(dim=16, num_heads=2, window_size=4, shift_size=2, gate="headwise")
    x = torch.randn(1, 6, 7, 16)
    compiled = torch.compile(mod)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mod(x), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "kwargs", [{}, {"shift_size": 3}, {"window_size": (4, 6), "shift_size": (2, 3), "gate": "headwise"}]
)
def test_torchscript_matches_eager(kwargs):
    """``torch.jit.script`` compiles the module (clamped windows, padding, shifts and the gate included) and the
    scripted forward equals the eager one on maps that are multiples of the window, padded, and smaller than it."""
    mod = _make(dim=32, num_heads=4, **kwargs)
    scripted = torch.jit.script(mod)
    for size in [(14, 14), (9, 17), (3, 5)]:
        x = torch.randn(2, *size, 32)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), mod(x), atol=1e-6, rtol=0)
