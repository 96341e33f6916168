"""The hierarchical backbone builder: feature_info, intermediates, pruning, features_only, checkpointing."""

import copy

import pytest
import torch
from timm.models import build_model_with_cfg
from timm.models._manipulate import group_parameters

from attnzoo.layers import (
    ConvDownsample,
    ConvStem,
    HierarchicalVisionTransformer,
    SimPool,
    TransformerBlock,
    build_stages,
    create_mixer,
)

DIMS, DEPTHS, HEADS = (16, 32, 48, 64), (1, 2, 1, 1), (1, 2, 3, 4)


class TinyBackbone(HierarchicalVisionTransformer):
    """A 4-stage test backbone that uses a different registered mixer per stage."""

    def __init__(self, mixers=("attention",) * 4, drop_path_rate=0.0, device=None, dtype=None, **kwargs):
        dd = {"device": device, "dtype": dtype}

        def make_block(i, j, dpr):
            mixer = create_mixer(mixers[i], DIMS[i], num_heads=HEADS[i], **dd)
            return TransformerBlock(DIMS[i], mixer, mlp_ratio=2.0, drop_path=dpr, cpe_kernel_size=3, **dd)

        def make_downsample(i):
            return ConvDownsample(DIMS[i - 1], DIMS[i], **dd) if i else None

        stages = build_stages(DEPTHS, make_block, make_downsample, drop_path_rate)
        super().__init__(ConvStem(3, DIMS[0], **dd), stages, DIMS, device=device, dtype=dtype, **kwargs)


def _build(**kwargs):
    cfg = dict(input_size=(3, 64, 64), num_classes=1000, first_conv="stem.proj.0", classifier="head.fc")
    return build_model_with_cfg(TinyBackbone, "tiny_backbone", pretrained=False, pretrained_cfg=cfg, **kwargs)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return _build().eval()


def test_drop_path_rates_rise_linearly():
    m = _build(drop_path_rate=0.4)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for s in m.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.4, sum(DEPTHS)))


def test_feature_info_and_shapes(model):
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in model.feature_info] == list(DIMS)
    x = torch.randn(2, 3, 75, 100)  # not a multiple of 32
    feats = model.forward_features(x)
    assert feats.shape == (2, 3, 4, 64)  # NHWC
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1:] for t in inter] == [(16, 19, 25), (32, 10, 13), (48, 5, 7), (64, 3, 4)]
    nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[1], inter[1].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")
    assert model(x).shape == (2, 1000)


def test_stop_early_and_pruning_match_taps(model):
    x = torch.randn(1, 3, 64, 64)
    taps = model.forward_intermediates(x, intermediates_only=True)
    for i in range(4):
        early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], taps[i])
        pruned = copy.deepcopy(model)
        kept = pruned.prune_intermediate_layers([i])
        assert kept == [i] and len(pruned.stages) == i + 1
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=kept, intermediates_only=True)[0], taps[i])
        assert pruned(x).shape == taps[i].permute(0, 2, 3, 1).shape  # head and pooling pruned: the NHWC tap
        pruned.reset_classifier(7, "avg")
        assert pruned(x).shape == (1, 7) and pruned.head_hidden_size == DIMS[i]


def test_features_only_getter(model):
    features = _build(features_only=True, feature_cls="getter", out_indices=(0, 1, 2, 3)).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)  # the getter pruned the head
    x = torch.randn(1, 3, 64, 64)
    outs = features(x)
    assert features.feature_info.channels() == list(DIMS)
    for out, tap in zip(outs, model.forward_intermediates(x, intermediates_only=True)):
        torch.testing.assert_close(out, tap)


def test_grad_checkpointing_same_output_and_grads(model):
    x = torch.randn(2, 3, 64, 64)
    model.train()
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_head_api(model):
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((1, 2)))
    model.reset_classifier(0, "")
    assert model(x).shape == feats.shape
    model.reset_classifier(5, "max")
    assert model(x).shape == (1, 5) and model.global_pool == "max"


def test_reset_classifier_switches_to_simpool_and_back(model):
    """A backbone built with average pooling takes SimPool through reset_classifier (and returns to timm pooling)."""
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    model.reset_classifier(5, "simpool")
    assert isinstance(model.head.global_pool, SimPool) and model.global_pool == "simpool"
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, model.head.global_pool(feats))
    torch.testing.assert_close(model(x), model.head.fc(pooled))
    model.reset_classifier(5, "avg")
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((1, 2)))


def test_group_matcher_and_no_weight_decay():
    m = _build(mixers=("attention", "window", "window", "attention"))
    groups = group_parameters(m, m.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 5
    nwd = m.no_weight_decay()
    names = dict(m.named_parameters())
    assert nwd and all(n in names and n.endswith("relative_position_bias_table") for n in nwd)
    assert len(nwd) == DEPTHS[1] + DEPTHS[2]


def test_meta_device_construction():
    m = _build(device="meta")
    assert all(t.device.type == "meta" for t in [*m.parameters(), *m.buffers()])


def test_stage_dims_mismatch_raises():
    with pytest.raises(ValueError, match="dims"):
        HierarchicalVisionTransformer(ConvStem(3, 8), [], dims=[8])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("mixers", [("attention",) * 4, ("window", "window", "attention", "attention")])
def test_backbone_scripts(mixers):
    model = _build(mixers=mixers).eval()
    x = torch.randn(1, 3, 72, 56)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))
