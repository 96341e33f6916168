"""Pooling token mixer (PoolFormer) and SimPool global pooling against explicit formulas; SimPool as a backbone head."""

import math

import pytest
import torch
from timm.layers import ClassifierHead

from attnzoo.layers import (
    ConvDownsample,
    ConvStem,
    HierarchicalVisionTransformer,
    PoolingMixer,
    SimPool,
    SimPoolClassifierHead,
    TransformerBlock,
    build_stages,
    create_mixer,
)


def _explicit_pooling(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over the in-map k x k neighbourhood of every position, minus the position, with Python loops."""
    B, H, W, C = x.shape
    out = torch.empty_like(x)
    for i in range(H):
        for j in range(W):
            window = x[:, max(i - k // 2, 0) : i + k // 2 + 1, max(j - k // 2, 0) : j + k // 2 + 1]
            out[:, i, j] = window.mean(dim=(1, 2)) - x[:, i, j]
    return out


@pytest.mark.parametrize("pool_size", [3, 5])
def test_pooling_mixer_matches_explicit_formula(pool_size):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 6)
    mixer = create_mixer("pooling", 6, num_heads=2, pool_size=pool_size)
    assert isinstance(mixer, PoolingMixer) and not list(mixer.parameters())
    torch.testing.assert_close(mixer(x), _explicit_pooling(x, pool_size))


def test_pooling_mixer_gate_and_bad_args():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 3, 8)
    mixer = PoolingMixer(8, num_heads=2, gate="headwise")
    gate = torch.sigmoid(x @ mixer.gate.weight.T + mixer.gate.bias)  # (1, 3, 3, 2): one gate per channel group
    expected = (_explicit_pooling(x, 3).view(1, 3, 3, 2, 4) * gate.unsqueeze(-1)).view(1, 3, 3, 8)
    torch.testing.assert_close(mixer(x), expected)
    with pytest.raises(ValueError, match="pool_size"):
        PoolingMixer(8, pool_size=2)
    with pytest.raises(ValueError, match="num_heads"):
        PoolingMixer(9, num_heads=2, gate="headwise")


def _explicit_simpool(pool: SimPool, tokens: torch.Tensor) -> torch.Tensor:
    """u = GAP(X), X^ = LN(X), a = softmax(W_q u (W_k X^)^T / sqrt(d)) per head; out = a X^ (gamma: GeM with shift)."""
    B, N, C = tokens.shape
    h, d = pool.num_heads, C // pool.num_heads
    values = torch.nn.functional.layer_norm(tokens, (C,), pool.norm.weight, pool.norm.bias, eps=pool.norm.eps)
    q = (tokens.mean(1) @ pool.q.weight.T).view(B, h, 1, d)
    k = (values @ pool.k.weight.T).view(B, N, h, d).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, h, 1, N)
    v = values.view(B, N, h, d).transpose(1, 2)
    if pool.gamma == 1.0:
        return (attn @ v).reshape(B, C)
    shift = values.amin(dim=(1, 2)).view(B, 1, 1, 1)
    return ((attn @ (v - shift).clamp_min(pool.eps) ** pool.gamma) ** (1 / pool.gamma) + shift).reshape(B, C)


@pytest.mark.parametrize("num_heads, gamma", [(1, None), (4, None), (2, 1.25)])
def test_simpool_matches_explicit_formula_in_every_layout(num_heads, gamma):
    torch.manual_seed(0)
    pool = SimPool(16, num_heads=num_heads, gamma=gamma, input_fmt="NLC")
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 3, 5, 16)  # NHWC
    expected = _explicit_simpool(pool, x.flatten(1, 2))
    torch.testing.assert_close(pool(x.flatten(1, 2)), expected)
    for fmt, inp in (("NHWC", x), ("NCHW", x.permute(0, 3, 1, 2))):
        pool.input_fmt = fmt
        torch.testing.assert_close(pool(inp), expected)


def test_simpool_is_device_agnostic_and_validates():
    pool = SimPool(8, device="meta")
    assert pool(torch.randn(2, 4, 4, 8, device="meta")).shape == (2, 8)
    with pytest.raises(ValueError, match="gamma"):
        SimPool(8, gamma=0.0)
    with pytest.raises(ValueError, match="input_fmt"):
        SimPool(8, input_fmt="NCL")


def test_simpool_head_reset_switches_pooling():
    torch.manual_seed(0)
    head = SimPoolClassifierHead(16, 5)
    x = torch.randn(2, 3, 3, 16)
    pool = head.global_pool
    torch.testing.assert_close(head(x, pre_logits=True), pool(x))
    head.reset(7)  # keeps the trained SimPool
    assert head.global_pool is pool and head(x).shape == (2, 7)
    head.reset(0, "")
    assert head(x).shape == x.shape  # unpooled map
    head.reset(3, "avg")
    torch.testing.assert_close(head(x, pre_logits=True), x.mean((1, 2)))
    head.reset(3, "simpool", in_features=16)
    assert isinstance(head.global_pool, SimPool) and head(x).shape == (2, 3)
    head.reset(0, None, in_features=8)  # a narrower input (pruned backbone) gets a matching SimPool
    assert head.global_pool.dim == 8 and head(torch.randn(1, 2, 2, 8)).shape == (1, 8)


class _PoolBackbone(HierarchicalVisionTransformer):
    """Two stages: pooling mixer, then attention."""

    def __init__(self, global_pool="simpool"):
        dims = (16, 32)

        def make_block(i, j, dpr):
            return TransformerBlock(dims[i], create_mixer(("pooling", "attention")[i], dims[i], num_heads=2))

        stages = build_stages((1, 1), make_block, lambda i: ConvDownsample(16, 32) if i else None)
        super().__init__(ConvStem(3, 16), stages, dims, num_classes=4, global_pool=global_pool)


def test_backbone_simpool_option():
    torch.manual_seed(0)
    model = _PoolBackbone().eval()
    assert isinstance(model.head, SimPoolClassifierHead) and model.global_pool == "simpool"
    x = torch.randn(2, 3, 36, 44)
    features = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), model.head.global_pool(features))
    assert model(x).shape == (2, 4)
    model.reset_classifier(0, "")
    assert model(x).shape == features.shape
    assert type(_PoolBackbone(global_pool="avg").head) is ClassifierHead  # other pool types: unchanged head
