"""Official downstream (COCO / ADE20K) backbones: each option against a check written from the description of the
official detection / segmentation code (../shared/downstream.md section 3), odd input sizes, classification weights
loading into them, and released-layout backbone checkpoints converting onto them."""

import logging
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from test_agent_models import _official_pvt, _official_swin  # official Agent-PVT / Agent-Swin key layouts
from test_biformer import _official_state_dict as _official_biformer  # official BiFormer key layout
from test_nat import _official_state_dict as _official_nat  # official NAT key layout

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.kernels.neighborhood import na2d
from attnzoo.layers import AgentAttention, BiLevelRoutingAttention, NeighborhoodAttention2d, WindowAttention2d
from attnzoo.recipes.detection.backbones import load_backbone_weights
from attnzoo.weights.downstream import convert_backbone_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


NAT_TINY = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2))
BIFORMER_TINY = dict(depths=(1, 1, 1, 1), dims=(32, 32, 32, 32))
SWIN_TINY = dict(depths=(1, 1, 1, 2), embed_dim=16, num_heads=(1, 1, 1, 1))
PVT_TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16), num_heads=(1, 1, 1, 1))

# the official downstream kwargs (README "Downstream backbones"), COCO settings
DINAT_MINI_COCO = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
SWIN_SHAPES = [(9, 9), (12, 12), (14, 14), (7, 7)]
PVT_SHAPES = [(12, 12), (16, 16), (28, 28), (28, 28)]
DOWNSTREAM = {
    "dinat_mini": dict(
        depths=(3, 4, 6, 5),
        embed_dim=8,
        num_heads=(1, 1, 1, 1),
        dilations=DINAT_MINI_COCO,
        out_norms=True,
        small_maps="zero_pad",
    ),
    "biformer_small": dict(BIFORMER_TINY, n_win=16, auto_pad=True, out_norms=True),
    "agent_swin_tiny": dict(SWIN_TINY, downstream_agent_shapes=SWIN_SHAPES, out_norms=True, clamp_window=False),
    "agent_pvt_tiny": dict(PVT_TINY, downstream_agent_shapes=PVT_SHAPES, pad_patches=False),
}


@pytest.mark.parametrize(
    "name, kwargs, eps",
    [("nat_mini", NAT_TINY, 1e-5), ("biformer_small", BIFORMER_TINY, 1e-6), ("agent_swin_tiny", SWIN_TINY, 1e-5)],
)
def test_output_norms_normalise_the_outputs_only(name, kwargs, eps):
    """Stage ``i``'s returned map is LayerNorm(raw stage output) with ``out_norms.i``; every stage equals the model
    without output norms, so the norms never feed the next stage."""
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs).eval()
    normed = timm.create_model(name, out_norms=True, **kwargs).eval()
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"out_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert not unexpected
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for norm in normed.out_norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1.0, 1.0)
        raw = plain.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
        out = normed.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
        for norm, r, o in zip(normed.out_norms, raw, out):
            torch.testing.assert_close(o, F.layer_norm(r, r.shape[-1:], norm.weight, norm.bias, eps))
        torch.testing.assert_close(normed.forward_features(x), plain.forward_features(x))  # classification path
    with pytest.raises(ValueError, match="out_norms"):
        normed.forward_intermediates(x, norm=True)


def test_nat_zero_pad_is_the_official_small_map_padding():
    """``small_maps="zero_pad"``: a short axis is zero-padded to kernel * dilation before the qkv projection (padded
    tokens carry the qkv bias and take part), attention runs with the full dilation, the output is cropped."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(8, num_heads=2, kernel_size=3, dilation=3, small_maps="zero_pad")
    x = torch.randn(2, 5, 11, 8)  # rows 5 < 3 * 3: padded to 9; columns 11 >= 9: not padded
    with torch.no_grad():
        q, k, v = layer.qkv(F.pad(x, (0, 0, 0, 0, 0, 4))).view(2, 9, 11, 3, 2, 4).unbind(3)
        attended = na2d(q, k, v, 3, dilation=3, rpb=layer.rpb, backend="reference")[:, :5].reshape(2, 5, 11, 8)
        torch.testing.assert_close(layer(x), layer.proj(attended))
        clamped = NeighborhoodAttention2d(8, num_heads=2, kernel_size=3, dilation=3)
        clamped.load_state_dict(layer.state_dict())
        assert not torch.allclose(clamped(x), layer(x), atol=1e-3)
    # the per-task dilations of DiNAT-Mini on COCO; the RPB stays (heads, 13, 13) whatever the dilation
    model = timm.create_model("dinat_mini", device="meta", **DOWNSTREAM["dinat_mini"])
    for stage, dilations in zip(model.stages, DINAT_MINI_COCO):
        assert [block.attn.dilation for block in stage.blocks] == [(d, d) for d in dilations]
        assert all(
            block.attn.rpb.shape[1:] == (13, 13) and block.attn.small_maps == "zero_pad" for block in stage.blocks
        )


def _bra_auto_pad_reference(layer, x):
    """BiFormer BRA with the official ``auto_pad``, from its description: zero-pad the (normed) input at the bottom
    / right to a multiple of n_win, then qkv; region means of q and k route every query region to its top-k key
    regions; attention over their tokens; + LCE (depthwise conv of the padded V map); crop; output projection."""
    B, H, W, C = x.shape
    n, heads = layer.n_win, layer.num_heads
    Hp, Wp = -(-H // n) * n, -(-W // n) * n
    q, k, v = layer.qkv(F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))).split([layer.qk_dim, layer.qk_dim, C], dim=-1)
    rh, rw = Hp // n, Wp // n

    def regions(t):  # (B, Hp, Wp, c) -> (B, n * n, rh * rw, c), regions and their tokens row-major
        return t.reshape(B, n, rh, n, rw, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, rh * rw, -1)

    qr, kr, vr = regions(q), regions(k), regions(v)
    routes = torch.topk(qr.mean(2) @ kr.mean(2).transpose(1, 2), layer.topk, dim=-1).indices
    out = torch.empty(B, n * n, rh * rw, C)
    for b in range(B):
        for r in range(n * n):
            qh = qr[b, r].reshape(rh * rw, heads, -1).transpose(0, 1)
            kh = kr[b, routes[b, r]].reshape(-1, heads, layer.qk_dim // heads).transpose(0, 1)
            vh = vr[b, routes[b, r]].reshape(-1, heads, C // heads).transpose(0, 1)
            attn = torch.softmax(qh @ kh.transpose(1, 2) * layer.scale, dim=-1)
            out[b, r] = (attn @ vh).transpose(0, 1).reshape(rh * rw, C)
    out = out.reshape(B, n, n, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    out = out + layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return layer.proj(out[:, :H, :W])


def test_biformer_auto_pad_is_the_official_padding():
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=2, side_dwconv=3, backend="reference").eval()
    x = torch.randn(2, 5, 7, 8)  # padded to 6 x 8: regions of 3 x 4 holding padded tokens
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _bra_auto_pad_reference(layer, x))
    model = timm.create_model("biformer_small", device="meta", **DOWNSTREAM["biformer_small"])
    routing = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    assert routing and all(m.n_win == 16 and m.padding == "zero" for m in routing)
    for bad in (dict(auto_pad=False), dict(auto_pad=True, padding="mask")):
        with pytest.raises(ValueError, match="auto_pad"):
            timm.create_model("biformer_small", device="meta", **BIFORMER_TINY, **bad)


def _relative_position_bias(table, window):
    """Swin's bias ``(heads, N, N)``: row ``(dy + w - 1) * (2w - 1) + (dx + w - 1)`` of the table."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None, :] + window - 1) * (2 * window - 1) + (xs[:, None] - xs[None, :] + window - 1)
    return table[index].permute(2, 0, 1)


def _mmdet_window_reference(layer, x, window, shift):
    """mmdet Swin's (and Agent-Swin downstream's) window attention, from its description: zero-pad to a multiple of
    the window (unmasked), roll by -shift, label the slices ``[0, -w)``, ``[-w, -s)``, ``[-s, end)`` of both axes of
    the padded map, ``-100`` between different labels of a window, attend, roll back, crop, project."""
    B, H, W, C = x.shape
    heads = layer.num_heads
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    shifted = torch.roll(F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)), (-shift, -shift), (1, 2))
    labels = torch.zeros(Hp, Wp)
    if shift:
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, rows in enumerate(cuts):
            for j, cols in enumerate(cuts):
                labels[rows, cols] = 3 * i + j

    def windows(t):  # (B, Hp, Wp, c) -> (B * nW, w * w, c)
        t = t.reshape(t.shape[0], Hp // window, window, Wp // window, window, -1).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(-1, window * window, t.shape[-1])

    label = windows(labels[None, :, :, None])[..., 0]  # (nW, N)
    mask = (label[:, :, None] != label[:, None, :]).float() * -100.0  # B == 1: windows line up with the mask
    q, k, v = layer.qkv(windows(shifted)).reshape(-1, window * window, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * (C // heads) ** -0.5
    logits = logits + _relative_position_bias(layer.relative_position_bias_table, window) + mask[:, None]
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(-1, window * window, C)
    out = out.reshape(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    out = torch.roll(out.reshape(B, Hp, Wp, C), (shift, shift), (1, 2))
    return layer.proj(out[:, :H, :W])


@pytest.mark.parametrize("size", [(11, 9), (4, 5)])
@pytest.mark.parametrize("shift", [0, 3])
def test_swin_downstream_windows_are_mmdet_windows(size, shift):
    """``clamp_window=False``: 7x7 windows on the zero-padded map whatever its size, shift 3 with the region mask."""
    torch.manual_seed(0)
    layer = WindowAttention2d(8, num_heads=2, window_size=7, shift_size=shift, clamp_window=False, padding="zero")
    x = torch.randn(1, *size, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _mmdet_window_reference(layer, x, 7, shift))


def test_shifted_stage4_windows_mask_across_window_borders():
    """On a 14x14 map shifted by 3, token (0, 0) shares the rolled bottom-right window with (13, 13) but comes from
    another region: it must not see it, while it sees (1, 1) of its own region."""
    torch.manual_seed(0)
    model = timm.create_model("agent_swin_tiny", clamp_window=False, **SWIN_TINY)
    shifted = model.stages[3].blocks[1].attn
    assert (shifted.window_size, shifted.shift_size, shifted.clamp_window) == ((7, 7), (3, 3), False)
    x = torch.randn(1, 14, 14, shifted.dim, requires_grad=True)
    shifted(x)[0, 0, 0].sum().backward()
    assert x.grad[0, 13, 13].abs().sum() == 0 and x.grad[0, 1, 1].abs().sum() > 0
    classification = timm.create_model("agent_swin_tiny", **SWIN_TINY).stages[3].blocks[1].attn
    assert classification.clamp_window and classification.padding == "mask"


def _downstream_agent_reference(layer, x, agent_shape):
    """Official downstream agent attention, from its description: agents = q average-pooled to ``agent_shape``;
    every bias table is resized bilinearly to the map, then along the agent grid from s x s to ``agent_shape``."""
    B, H, W, C = x.shape
    h, s, n = layer.num_heads, layer.pool_size, agent_shape[0] * agent_shape[1]
    q, k, v = layer.qkv(x.reshape(B, H * W, C)).chunk(3, dim=-1)
    agents = F.adaptive_avg_pool2d(q.reshape(B, H, W, C).permute(0, 3, 1, 2), agent_shape).flatten(2).transpose(1, 2)

    def split(t):  # (B, L, C) -> (B, heads, L, d)
        return t.reshape(B, -1, h, C // h).transpose(1, 2)

    def resized(table):  # (heads, s*s, G1, G2) -> (heads, H*W, n): spatially first, then along the agents
        spatial = F.interpolate(table, size=(H, W), mode="bilinear").reshape(h, s, s, H * W).permute(0, 3, 1, 2)
        return F.interpolate(spatial, size=agent_shape, mode="bilinear").reshape(h, H * W, n)

    scale = (C // h) ** -0.5
    agent_bias = (resized(layer.an_bias) + resized(layer.ah_bias + layer.aw_bias)).transpose(1, 2)
    token_bias = resized(layer.na_bias) + resized(layer.ha_bias + layer.wa_bias)
    q, k, v, agents = split(q), split(k), split(v), split(agents)
    agent_v = torch.softmax(agents * scale @ k.transpose(-1, -2) + agent_bias, dim=-1) @ v
    out = (torch.softmax(q * scale @ agents.transpose(-1, -2) + token_bias, dim=-1) @ agent_v).transpose(1, 2)
    out = out.reshape(B, H, W, C) + layer.dwc(v.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(
        0, 2, 3, 1
    )
    return layer.proj(out)


def test_downstream_agents_and_bias_resizing():
    torch.manual_seed(0)
    layer = AgentAttention(8, num_heads=2, agent_num=9, agent_shape=(9, 9), grid_size=(8, 8)).eval()
    x = torch.randn(2, 11, 13, 8)
    with torch.no_grad():
        assert layer._biases(11, 13, torch.float32)[0].shape == (2, 81, 11 * 13)
        torch.testing.assert_close(layer(x), _downstream_agent_reference(layer, x, (9, 9)))
        # at the training grid with the classification agents, the official resizing is the identity
        classification = AgentAttention(8, num_heads=2, agent_num=9, grid_size=(8, 8)).eval()
        classification.load_state_dict(layer.state_dict())
        x = torch.randn(2, 8, 8, 8)
        torch.testing.assert_close(classification(x), _downstream_agent_reference(classification, x, (3, 3)))
    # the official agent counts of the downstream configs
    for name, counts in [("agent_swin_tiny", [81, 144, 196]), ("agent_pvt_tiny", [144, 256, 784, 784])]:
        model = timm.create_model(name, device="meta", **DOWNSTREAM[name])
        first = [stage.blocks[0].attn for stage in model.stages]
        assert [m.agent_shape[0] * m.agent_shape[1] for m in first if isinstance(m, AgentAttention)] == counts
    with pytest.raises(ValueError, match="downstream_agent_shapes"):
        timm.create_model("agent_pvt_tiny", downstream_agent_shapes=[(12, 12)], device="meta", **PVT_TINY)


@pytest.mark.parametrize("name", list(DOWNSTREAM))
def test_downstream_backbones_at_odd_sizes(name):
    torch.manual_seed(0)
    body = timm.create_model(name, features_only=True, **DOWNSTREAM[name]).eval()
    floor = name.startswith("agent_pvt")  # pad_patches=False: the patch convolutions drop the remainder
    for size in [(333, 517), (517, 333)]:
        with torch.no_grad():
            maps = body(torch.randn(1, 3, *size))
        expected = []
        h, w = size
        for stride in (4, 2, 2, 2):
            h, w = (h // stride, w // stride) if floor else (-(-h // stride), -(-w // stride))
            expected.append((h, w))
        assert [tuple(m.shape[-2:]) for m in maps] == expected
        assert all(torch.isfinite(m).all() for m in maps)


NAT_OFFICIAL_TINY = (NAT_TINY["depths"], NAT_TINY["num_heads"], NAT_TINY["embed_dim"], 3, None)


def test_classification_weights_load_into_the_downstream_backbone(tmp_path, caplog):
    """Official classification weights: everything but the classifier and final norm loads; the output norms start
    fresh and are named, through the detection / segmentation adapter and through timm's ``pretrained=True``."""
    official = _official_nat(NAT_OFFICIAL_TINY)
    path = tmp_path / "nat_mini.pth"
    torch.save({"model": official}, path)
    kwargs = dict(NAT_TINY, out_norms=True, small_maps="zero_pad")
    body = timm.create_model("nat_mini", features_only=True, **kwargs)
    with caplog.at_level(logging.WARNING):
        new = load_backbone_weights(body, path, "nat_mini", kwargs)
    assert new == sorted(f"out_norms.{i}.{p}" for i in range(4) for p in ("bias", "weight"))
    assert "start untrained" in caplog.text and all(key in caplog.text for key in new)
    state = body.model.state_dict()
    torch.testing.assert_close(state["stages.2.blocks.0.attn.rpb"], official["levels.2.blocks.0.attn.rpb"])
    torch.testing.assert_close(state["stages.1.downsample.norm.bias"], official["levels.0.downsample.norm.bias"])
    assert torch.equal(state["out_norms.3.weight"], torch.ones(128))
    via_timm = timm.create_model("nat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 features_only=True, **kwargs)  # fmt: skip
    assert all(torch.equal(v, state[k]) for k, v in via_timm.model.state_dict().items())


def test_a_larger_sibling_is_refused(tmp_path):
    """nat_tiny-like weights (more blocks in stage 3) into nat_mini: an error naming the extra tensors; tensors of
    the stages that features_only pruned may be extra."""
    torch.save(_official_nat(((1, 1, 3, 1), *NAT_OFFICIAL_TINY[1:])), tmp_path / "larger.pth")
    body = timm.create_model("nat_mini", features_only=True, out_norms=True, **NAT_TINY)
    with pytest.raises(ValueError, match=r"tensors that nat_mini does not have: stages\.2\.blocks\.1\."):
        load_backbone_weights(body, tmp_path / "larger.pth", "nat_mini", dict(NAT_TINY, out_norms=True))
    torch.save(_official_nat(NAT_OFFICIAL_TINY), tmp_path / "mini.pth")
    three = timm.create_model("nat_mini", features_only=True, out_indices=(0, 1, 2), **NAT_TINY)
    assert load_backbone_weights(three, tmp_path / "mini.pth", "nat_mini", NAT_TINY) == []
    assert not any(k.startswith("stages.3") for k in three.model.state_dict())


def _random(shapes):
    generator = torch.Generator().manual_seed(0)
    return {
        k: torch.randint(0, 49, s, generator=generator) if k.endswith("_index") else torch.randn(s, generator=generator)
        for k, s in shapes.items()
    }


def _released_backbone(name):
    """A released downstream backbone (``backbone.`` removed) in the official layout: the classification layout
    without classifier and final norm, plus the output norms; the model kwargs it was trained with."""
    if name == "nat_mini":
        state, dims = _official_nat(NAT_OFFICIAL_TINY), (16, 32, 64, 128)
        norms, kwargs = "norm{}", dict(NAT_TINY, out_norms=True, small_maps="zero_pad")
    elif name == "biformer_small":
        state, dims = _official_biformer((1, 1, 1, 1), BIFORMER_TINY["dims"]), BIFORMER_TINY["dims"]
        norms, kwargs = "extra_norms.{}", DOWNSTREAM["biformer_small"]
    elif name == "agent_swin_tiny":
        state, dims = _random(_official_swin((1, 1, 1, 2), (1, 1, 1, 0), 16, (1, 1, 1, 1))), (16, 32, 64, 128)
        norms, kwargs = "norm{}", DOWNSTREAM["agent_swin_tiny"]
    else:
        state, norms = _random(_official_pvt((1, 1, 1, 1))), None
        kwargs = dict(depths=(1, 1, 1, 1), downstream_agent_shapes=PVT_SHAPES, pad_patches=False)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
    if norms:
        for i, dim in enumerate(dims):
            state.update({norms.format(i) + ".weight": torch.rand(dim), norms.format(i) + ".bias": torch.randn(dim)})
    return state, kwargs


@pytest.mark.parametrize("name", ["nat_mini", "biformer_small", "agent_swin_tiny", "agent_pvt_tiny"])
def test_released_backbone_layout_converts_strictly(name):
    state, kwargs = _released_backbone(name)
    body = timm.create_model(name, features_only=True, **kwargs)
    converted = convert_backbone_state(name, state, body)
    body.load_state_dict(converted)  # strict: every tensor of the backbone, nothing else
    if name != "agent_pvt_tiny":
        official_norm = "extra_norms.2.weight" if name == "biformer_small" else "norm2.weight"
        assert torch.equal(converted["model.out_norms.2.weight"], state[official_norm])
        without_norms = timm.create_model(name, features_only=True, **{**kwargs, "out_norms": False})
        with pytest.raises(ValueError, match=r"out_norms=True\): .*" + re.escape(official_norm)):
            convert_backbone_state(name, state, without_norms)
    else:
        torch.testing.assert_close(converted["model.stem.pos_embed"].flatten(1, 2), state["pos_embed1"])
    with pytest.raises(ValueError, match="head.weight"):
        convert_backbone_state(name, {**state, "head.weight": torch.zeros(3, 3)}, body)
