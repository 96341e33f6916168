"""BiFormer family: published sizes, any input size, training, official checkpoint layout."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnzoo  # noqa: F401
from attnzoo.biformer import checkpoint_filter_fn

# published params (M) and FLOPs (G, multiply-accumulates at 224)
PUBLISHED = {"biformer_tiny": (13.1, 2.2), "biformer_small": (25.5, 4.5), "biformer_base": (56.8, 9.8)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_flops_match_the_paper(name):
    model = timm.create_model(name, device="meta").eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    macs = counter.get_total_flops() / 2e9
    assert round(params, 1) == PUBLISHED[name][0]
    assert abs(macs - PUBLISHED[name][1]) < 0.06, f"{macs:.3f} GMACs"


def test_default_cfg_metadata():
    cfg = timm.create_model("biformer_tiny", device="meta").pretrained_cfg
    assert cfg["license"] == "mit" and "2303.08810" in str(cfg["paper_ids"])
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN and cfg["url"].startswith("https://")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("biformer_tiny", num_classes=10).eval()


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (320, 320), (200, 300)])
def test_runs_at_any_size(tiny, size):
    model = tiny
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    for f, r in zip(feats, (4, 8, 16, 32)):
        assert f.shape[-2:] == (-(-size[0] // r), -(-size[1] // r))


def test_trains_with_decreasing_loss():
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=4, depths=(1, 1, 1, 1)).train()
    x, y = torch.randn(4, 3, 48, 64), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses


def _official_state_dict(depths, dims, num_classes=1000):
    """Random tensors under the official BiFormer key names and shapes (``BiFormer:models/biformer.py``)."""
    sd = {}

    def conv(key, cout, cin, k, bias=True):
        sd[f"{key}.weight"] = torch.randn(cout, cin, k, k)
        if bias:
            sd[f"{key}.bias"] = torch.randn(cout)

    def bn(key, c):
        sd.update({f"{key}.weight": torch.rand(c) + 0.5, f"{key}.bias": torch.randn(c)})
        sd.update({f"{key}.running_mean": torch.randn(c), f"{key}.running_var": torch.rand(c) + 0.5})
        sd[f"{key}.num_batches_tracked"] = torch.tensor(10)

    def linear(key, cout, cin, bias=True):
        sd[f"{key}.weight"] = torch.randn(cout, cin) * cin**-0.5
        if bias:
            sd[f"{key}.bias"] = torch.randn(cout) * 0.1

    conv("downsample_layers.0.0", dims[0] // 2, 3, 3)
    bn("downsample_layers.0.1", dims[0] // 2)
    conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
    bn("downsample_layers.0.4", dims[0])
    for i in range(1, 4):
        conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3)
        bn(f"downsample_layers.{i}.1", dims[i])
    for i, (depth, c) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}"
            sd[f"{p}.pos_embed.weight"], sd[f"{p}.pos_embed.bias"] = torch.randn(c, 1, 3, 3), torch.randn(c)
            for norm in ("norm1", "norm2"):
                sd[f"{p}.{norm}.weight"], sd[f"{p}.{norm}.bias"] = torch.rand(c) + 0.5, torch.randn(c)
            sd[f"{p}.attn.lepe.weight"], sd[f"{p}.attn.lepe.bias"] = torch.randn(c, 1, 5, 5), torch.randn(c)
            if i < 3:
                linear(f"{p}.attn.qkv.qkv", 3 * c, c)
                linear(f"{p}.attn.wo", c, c)
            else:
                linear(f"{p}.attn.qkv", 3 * c, c, bias=False)
                linear(f"{p}.attn.proj", c, c)
            linear(f"{p}.mlp.0", 3 * c, c)
            linear(f"{p}.mlp.3", c, 3 * c)
    bn("norm", dims[3])
    linear("head", num_classes, dims[3])
    return sd


def test_official_checkpoint_layout_loads_strictly(tmp_path):
    official = _official_state_dict((2, 2, 8, 2), (64, 128, 256, 512))
    path = tmp_path / "biformer_tiny_in1k.pth"
    torch.save({"model": official, "epoch": 299}, path)
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    state = model.state_dict()
    assert len(state) == len(official)
    torch.testing.assert_close(state["stages.2.blocks.5.attn.qkv.weight"], official["stages.2.5.attn.qkv.qkv.weight"])
    torch.testing.assert_close(state["stages.3.blocks.1.attn.proj.weight"], official["stages.3.1.attn.proj.weight"])
    torch.testing.assert_close(state["stages.1.blocks.0.mlp.fc2.bias"], official["stages.1.0.mlp.3.bias"])
    torch.testing.assert_close(state["stem.norm.running_var"], official["downsample_layers.0.4.running_var"])
    torch.testing.assert_close(state["stages.3.downsample.norm.bias"], official["downsample_layers.3.1.bias"])
    torch.testing.assert_close(state["head.fc.weight"], official["head.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()
    # already-converted state dicts pass through
    assert checkpoint_filter_fn(state, model).keys() == state.keys()
