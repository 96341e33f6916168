"""Agent-DeiT / Agent-PVT / Agent-Swin: published sizes, any resolution, training, official checkpoints."""

import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.agent_swin import block_types

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


# published parameter counts (M); Swin's are given to 2 significant digits
PUBLISHED = {
    "agent_deit_tiny": 6.0,
    "agent_deit_small": 22.7,
    "agent_deit_base": 87.2,
    "agent_pvt_tiny": 11.6,
    "agent_pvt_small": 20.6,
    "agent_pvt_medium": 35.9,
    "agent_pvt_large": 48.7,
    "agent_swin_tiny": 29,
    "agent_swin_small": 50,
    "agent_swin_base": 88,
    # higher-resolution releases (position embeddings / agent biases / windows laid out for the training size)
    "agent_deit_small_448": 23.1,
    "agent_pvt_medium_256": 36.1,
    "agent_swin_small_288": 50,
    "agent_swin_base_384": 88,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    model = timm.create_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if name.startswith("agent_swin"):
        assert round(params) == PUBLISHED[name], f"{params:.2f}M"
    else:
        assert abs(params - PUBLISHED[name]) < 0.1, f"{params:.2f}M"


def test_official_stage_configs():
    deit_b = timm.create_model("agent_deit_base", device="meta")
    kinds = [type(b.attn).__name__ for b in deit_b.blocks]
    assert kinds == ["AgentAttention"] * 4 + ["Attention"] * 8 and deit_b.blocks[0].attn.agent_num == 81
    pvt = timm.create_model("agent_pvt_tiny", device="meta")
    assert [s.blocks[0].attn.agent_num for s in pvt.stages] == [9, 16, 49, 49]
    assert [s.blocks[0].attn.grid_size for s in pvt.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert block_types("AAMB2", (2, 2, 4, 2))[2] == ["agent", "agent", "window", "window"]
    swin_b = timm.create_model("agent_swin_base", device="meta")
    stage3 = [type(b.attn).__name__ for b in swin_b.stages[2].blocks]
    assert stage3 == ["AgentAttention"] * 2 + ["WindowAttention2d"] * 16
    assert [b.attn.shift_size for b in swin_b.stages[2].blocks[2:5]] == [(0, 0), (3, 3), (0, 0)]
    with pytest.raises(ValueError, match="attn_type"):
        block_types("AAM", (2, 2, 2))


SMALL = {
    "agent_deit_tiny": dict(depth=2, embed_dim=48, agent_num=4, gate="headwise"),
    "agent_pvt_tiny": dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    "agent_swin_tiny": dict(
        embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), attn_type="AABB", gate="elementwise"
    ),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_runs_at_any_resolution(name):
    """Narrow versions of the official stage layouts (224-trained grids) at 224, 288 and 224x320."""
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL[name]).eval()
    reduction = 16 if "deit" in name else 32
    with torch.no_grad():
        for size in [(224, 224), (288, 288), (224, 320)]:
            last = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)[-1]
            assert last.shape[-2:] == (size[0] // reduction, size[1] // reduction)
            assert torch.isfinite(last).all()
        assert model(torch.randn(2, 3, 224, 320)).shape == (2, 1000)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_trains_with_decreasing_loss(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, img_size=64, **SMALL[name]).train()
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# --- official checkpoint layouts, written from the official key names and shapes ---


class FakeCfgNode(dict):
    """Stands in for the pickled yacs config of official checkpoints (not on the loader's allow-list)."""


def _agent_keys(prefix, dim, heads, n, grid, class_token=False):
    keys = {
        f"{prefix}.dwc.weight": (dim, 1, 3, 3),
        f"{prefix}.dwc.bias": (dim,),
        f"{prefix}.an_bias": (heads, n, 7, 7),
        f"{prefix}.na_bias": (heads, n, 7, 7),
        f"{prefix}.ah_bias": (1, heads, n, grid, 1),
        f"{prefix}.aw_bias": (1, heads, n, 1, grid),
        f"{prefix}.ha_bias": (1, heads, grid, 1, n),
        f"{prefix}.wa_bias": (1, heads, 1, grid, n),
    }
    if class_token:
        keys.update({f"{prefix}.ac_bias": (1, heads, n, 1), f"{prefix}.ca_bias": (1, heads, 1, n)})
    return keys


def _mlp_norm_keys(prefix, dim, ratio):
    return {
        f"{prefix}.norm1.weight": (dim,),
        f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,),
        f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (dim * ratio, dim),
        f"{prefix}.mlp.fc1.bias": (dim * ratio,),
        f"{prefix}.mlp.fc2.weight": (dim, dim * ratio),
        f"{prefix}.mlp.fc2.bias": (dim,),
        f"{prefix}.attn.proj.weight": (dim, dim),
        f"{prefix}.attn.proj.bias": (dim,),
    }


def _official_deit(depth, dim=192, heads=3, grid=14):
    """Official Agent-DeiT keys (49 agents in every block) for a ``grid x grid`` patch grid."""
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (1000, dim),
        "head.bias": (1000,),
    }
    for i in range(depth):
        keys.update(_mlp_norm_keys(f"blocks.{i}", dim, 4))
        keys.update({f"blocks.{i}.attn.qkv.weight": (3 * dim, dim), f"blocks.{i}.attn.qkv.bias": (3 * dim,)})
        keys.update(_agent_keys(f"blocks.{i}.attn", dim, heads, 49, grid, class_token=True))
    return keys


def _official_pvt(depths, grid=56):
    """Official Agent-PVT-T/S/M/L keys (they differ in depths only); ``grid``: the stage-1 map side."""
    dims, heads, ratios, agents = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (9, 16, 49, 49)
    keys = {"head.weight": (1000, 512), "head.bias": (1000,)}
    for i in range(4):
        side, dim, patch = grid // 2**i, dims[i], 4 if i == 0 else 2
        in_dim = 3 if i == 0 else dims[i - 1]
        keys.update(
            {
                f"patch_embed{i + 1}.proj.weight": (dim, in_dim, patch, patch),
                f"patch_embed{i + 1}.proj.bias": (dim,),
                f"patch_embed{i + 1}.norm.weight": (dim,),
                f"patch_embed{i + 1}.norm.bias": (dim,),
                f"pos_embed{i + 1}": (1, side * side, dim),
            }
        )
        for j in range(depths[i]):
            p = f"block{i + 1}.{j}"
            keys.update(_mlp_norm_keys(p, dim, ratios[i]))
            keys.update({f"{p}.attn.q.weight": (dim, dim), f"{p}.attn.q.bias": (dim,)})
            keys.update({f"{p}.attn.kv.weight": (2 * dim, dim), f"{p}.attn.kv.bias": (2 * dim,)})
            keys.update(_agent_keys(f"{p}.attn", dim, heads[i], agents[i], side))
    return keys


def _official_swin(depths, agent_blocks, embed_dim=96, heads=(3, 6, 12, 24), grid=56, window=7):
    """Official Agent-Swin keys: the first ``agent_blocks[i]`` blocks of stage ``i`` agent, the rest window blocks
    (window ``min(window, map side)``; shifted odd blocks of a map larger than the window keep an ``attn_mask``)."""
    agents, num_features = (9, 16, 49, 49), embed_dim * 8
    keys = {
        "patch_embed.proj.weight": (embed_dim, 3, 4, 4),
        "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,),
        "patch_embed.norm.bias": (embed_dim,),
        "norm.weight": (num_features,),
        "norm.bias": (num_features,),
        "head.weight": (1000, num_features),
        "head.bias": (1000,),
    }
    for i in range(4):
        dim, side = embed_dim * 2**i, grid // 2**i
        win = min(window, side)
        for j in range(depths[i]):
            p = f"layers.{i}.blocks.{j}"
            keys.update(_mlp_norm_keys(p, dim, 4))
            keys.update({f"{p}.attn.qkv.weight": (3 * dim, dim), f"{p}.attn.qkv.bias": (3 * dim,)})
            if j < agent_blocks[i]:
                keys.update(_agent_keys(f"{p}.attn", dim, heads[i], agents[i], side))
            else:
                keys.update({f"{p}.attn.relative_position_bias_table": ((2 * win - 1) ** 2, heads[i])})
                keys.update({f"{p}.attn.relative_position_index": (win * win, win * win)})
                if j % 2 and side > win:  # a shifted block's persistent mask buffer (ignored)
                    keys[f"{p}.attn_mask"] = ((side // win) ** 2, win * win, win * win)
        if i < 3:
            keys.update(
                {
                    f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                    f"layers.{i}.downsample.norm.weight": (4 * dim,),
                    f"layers.{i}.downsample.norm.bias": (4 * dim,),
                }
            )
    return keys


def _write_official_checkpoint(keys, path, name):
    """Random tensors with the official ``keys`` shapes, saved as an official training checkpoint; returns them."""
    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.randint(0, 49, shape, generator=generator)
        if k.endswith("relative_position_index")
        else torch.randn(shape, generator=generator) * 0.05
        for k, shape in keys.items()
    }
    torch.save(
        {
            "model": state,
            "optimizer": {},
            "lr_scheduler": {},
            "max_accuracy": 1.0,
            "epoch": 299,
            "config": FakeCfgNode(MODEL={"NAME": name}),
        },
        path,
        pickle_protocol=pickle.HIGHEST_PROTOCOL,
    )
    return state


# official configs at reduced depth (every block kind and a shifted window block kept) for speed
DEPTHS = {"agent_deit_tiny": 3, "agent_pvt_tiny": (1, 1, 1, 1), "agent_swin_tiny": (2, 2, 2, 2)}
OFFICIAL = {
    "agent_deit_tiny": lambda: _official_deit(DEPTHS["agent_deit_tiny"]),
    "agent_pvt_tiny": lambda: _official_pvt(DEPTHS["agent_pvt_tiny"]),
    "agent_swin_tiny": lambda: _official_swin(DEPTHS["agent_swin_tiny"], agent_blocks=(2, 2, 2, 0)),  # AAAB
}
# (official, attnzoo) prefix of the first agent mixer
FIRST_AGENT = {
    "agent_deit_tiny": ("blocks.0.attn", "blocks.0.attn"),
    "agent_pvt_tiny": ("block1.0.attn", "stages.0.blocks.0.attn"),
    "agent_swin_tiny": ("layers.0.blocks.0.attn", "stages.0.blocks.0.attn"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_checkpoint_loads_at_224_and_288(name, tmp_path):
    """A training checkpoint in the official layout loads strictly through ``pretrained=True``, at 224 and (biases
    and position embeddings resampled) at 288; the 288 model equals the 224 model run at 288."""
    path = tmp_path / "official.pth"
    state = _write_official_checkpoint(OFFICIAL[name](), path, name)
    depth_kwargs = {"depth" if "deit" in name else "depths": DEPTHS[name]}
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **depth_kwargs)
    model = timm.create_model(name, **kwargs).eval()  # strict load: no missing / unexpected keys
    model_288 = timm.create_model(name, img_size=288, **kwargs).eval()
    loaded = model.state_dict()
    if name == "agent_pvt_tiny":
        fused = torch.cat([state["block1.0.attn.q.weight"], state["block1.0.attn.kv.weight"]])
        torch.testing.assert_close(loaded["stages.0.blocks.0.attn.qkv.weight"], fused)
        assert model_288.stem.pos_embed.shape == (1, 72, 72, 64)
    if name == "agent_swin_tiny":
        torch.testing.assert_close(
            loaded["stages.1.downsample.reduction.weight"], state["layers.0.downsample.reduction.weight"]
        )
    official_attn, attn = FIRST_AGENT[name]
    torch.testing.assert_close(loaded[f"{attn}.ha_bias"], state[f"{official_attn}.ha_bias"][0].permute(0, 3, 1, 2))
    assert model_288.state_dict()[f"{attn}.ah_bias"].shape[2] == loaded[f"{attn}.ah_bias"].shape[2] * 288 // 224
    x = torch.randn(1, 3, 288, 288)
    with torch.no_grad():
        torch.testing.assert_close(model_288(x), model(x), atol=1e-4, rtol=1e-4)


# --- higher-resolution releases: agent_deit_small_448, agent_pvt_medium_256, agent_swin_small_288 / base_384 ---

HIRES = {  # name: (input side, crop_pct, reduced depth kwargs, official layout at that resolution and depth)
    "agent_deit_small_448": (448, 0.875, dict(depth=2), lambda: _official_deit(2, dim=384, heads=6, grid=28)),
    "agent_pvt_medium_256": (256, 0.875, dict(depths=(1, 1, 2, 1)), lambda: _official_pvt((1, 1, 2, 1), grid=64)),
    "agent_swin_small_288": (
        288,
        1.0,
        dict(depths=(1, 1, 2, 2)),
        lambda: _official_swin((1, 1, 2, 2), agent_blocks=(1, 1, 0, 0), grid=72, window=9),  # AABB
    ),
    "agent_swin_base_384": (
        384,
        1.0,
        dict(depths=(1, 1, 4, 2)),
        lambda: _official_swin(
            (1, 1, 4, 2), agent_blocks=(1, 1, 2, 0), embed_dim=128, heads=(4, 8, 16, 32), grid=96, window=12
        ),  # AAMB2
    ),
}


def test_high_resolution_configs():
    """Training size, official eval transform and the architecture at that size (meta device)."""
    models = {name: timm.create_model(name, device="meta") for name in HIRES}
    for name, (side, crop_pct, _, _) in HIRES.items():
        data_cfg = timm.data.resolve_data_config({}, model=models[name])
        assert data_cfg["input_size"] == (3, side, side), name
        assert (data_cfg["crop_pct"], data_cfg["crop_mode"]) == (crop_pct, "squash"), name
        assert models[name].pretrained_cfg["url"].startswith("https://cloud.tsinghua.edu.cn/f/"), name
    deit = models["agent_deit_small_448"]
    assert deit.pos_embed.shape == (1, 28 * 28 + 1, 384) and deit.blocks[0].attn.grid_size == (28, 28)
    pvt = models["agent_pvt_medium_256"]
    assert [s.blocks[0].attn.grid_size for s in pvt.stages] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    swin_s = models["agent_swin_small_288"]
    kinds = [type(s.blocks[0].attn).__name__ for s in swin_s.stages]
    assert kinds == ["AgentAttention"] * 2 + ["WindowAttention2d"] * 2  # AABB
    windows = [(b.attn.window_size, b.attn.shift_size) for b in swin_s.stages[2].blocks[:2]]
    assert windows == [((9, 9), (0, 0)), ((9, 9), (4, 4))]
    swin_b = models["agent_swin_base_384"]
    assert swin_b.stages[0].blocks[0].attn.grid_size == (96, 96)
    stage3 = [(type(b.attn).__name__, getattr(b.attn, "window_size", None)) for b in swin_b.stages[2].blocks]
    assert stage3 == [("AgentAttention", None)] * 2 + [("WindowAttention2d", (12, 12))] * 16


@pytest.mark.parametrize("name", sorted(HIRES))
def test_high_resolution_official_checkpoint_loads_unresampled(name, tmp_path):
    """The official layout at the training resolution loads strictly, every tensor as is (nothing resampled)."""
    side, _, depth_kwargs, official = HIRES[name]
    path = tmp_path / "official.pth"
    state = _write_official_checkpoint(official(), path, name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **depth_kwargs)
    loaded = model.state_dict()
    stored = {k: v for k, v in state.items() if not k.endswith(("attn_mask", "relative_position_index"))}
    assert sum(v.numel() for v in loaded.values() if v.is_floating_point()) == sum(v.numel() for v in stored.values())
    if "deit" in name:
        pairs = [("pos_embed", "pos_embed"), ("blocks.1.attn.ah_bias", "blocks.1.attn.ah_bias")]
    elif "pvt" in name:
        pairs = [
            ("pos_embed4", "stages.3.downsample.pos_embed"),
            ("block3.1.attn.aw_bias", "stages.2.blocks.1.attn.aw_bias"),
        ]
    else:
        table, last = "attn.relative_position_bias_table", depth_kwargs["depths"][2] - 1  # a shifted window block
        pairs = [
            (f"layers.2.blocks.{last}.{table}", f"stages.2.blocks.{last}.{table}"),
            (f"layers.3.blocks.0.{table}", f"stages.3.blocks.0.{table}"),
        ]
        assert any(k.endswith("attn_mask") for k in state)  # a shifted window block (dropped on load)
    for official_key, key in pairs:
        torch.testing.assert_close(loaded[key].flatten(), state[official_key].flatten(), rtol=0, atol=0)
    if name == "agent_swin_small_288":  # window-9 blocks (shifted on the 18x18 map) and the 9x9 map at 288
        with torch.no_grad():
            maps = model.eval().forward_intermediates(torch.randn(1, 3, side, side), intermediates_only=True)
        assert [m.shape[-1] for m in maps] == [72, 36, 18, 9] and all(torch.isfinite(m).all() for m in maps)


def test_224_checkpoint_initialises_the_384_swin(tmp_path):
    """Official fine-tuning start: the 224 Agent-Swin-B checkpoint (window 7) loads into ``agent_swin_base_384``
    (window 12) with the relative-position tables bicubically resized and the agent biases resampled to the 96 grid."""
    depths, path = (1, 1, 3, 1), tmp_path / "official_224.pth"
    keys = _official_swin(depths, agent_blocks=(1, 1, 2, 0), embed_dim=128, heads=(4, 8, 16, 32), grid=56, window=7)
    state = _write_official_checkpoint(keys, path, "agent_swin_base")
    model = timm.create_model(
        "agent_swin_base_384", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depths=depths
    )
    loaded = model.state_dict()
    table = loaded["stages.2.blocks.2.attn.relative_position_bias_table"]
    assert table.shape == (23 * 23, 16) and loaded["stages.0.blocks.0.attn.ah_bias"].shape[-2] == 96
    # the zero-offset entry sits on a source sample (13x13 -> 23x23 maps centre onto centre), so bicubic keeps it
    original = state["layers.2.blocks.2.attn.relative_position_bias_table"]
    torch.testing.assert_close(table[11 * 23 + 11], original[6 * 13 + 6])
    assert not torch.allclose(table[0], original[0])  # the corner entries are interpolated
