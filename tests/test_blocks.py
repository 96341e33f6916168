"""Transformer block, conditional position encoding, stems and downsampling."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from attnzoo.layers import (
    Attention,
    ConvDownsample,
    ConvPosEnc,
    ConvStem,
    OverlapPatchEmbed,
    PatchMerging,
    TransformerBlock,
)


def test_block_is_prenorm_residual():
    """The block equals the written-out pre-norm formula with layer scale."""
    torch.manual_seed(0)
    block = TransformerBlock(16, Attention(16, num_heads=2), mlp_ratio=2.0, layer_scale_init_value=0.5).eval()
    x = torch.randn(2, 5, 6, 16)
    y = x + 0.5 * block.attn(block.norm1(x))
    y = y + 0.5 * block.mlp(block.norm2(y))
    torch.testing.assert_close(block(x), y)
    assert block.mlp.fc1.out_features == 32


def test_block_cpe_is_depthwise_residual():
    torch.manual_seed(0)
    block = TransformerBlock(8, Attention(8, num_heads=2), cpe_kernel_size=3).eval()
    x = torch.randn(1, 4, 5, 8)
    conv = block.pos_embed
    x_cpe = x + F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=1, groups=8).permute(0, 2, 3, 1)
    y = x_cpe + block.attn(block.norm1(x_cpe))
    y = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(block(x), y)
    assert block.pos_embed.weight.shape == (8, 1, 3, 3)


def test_block_on_token_sequences_passes_masks():
    block = TransformerBlock(8, Attention(8, num_heads=2)).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool)
    torch.testing.assert_close(block(x, attn_mask=mask), block(x))
    assert not torch.allclose(block(x, is_causal=True), block(x))


def test_block_rejects_masks_for_maskless_mixers():
    from attnzoo.layers import WindowAttention2d

    block = TransformerBlock(8, WindowAttention2d(8, num_heads=2, window_size=2))
    with pytest.raises(ValueError, match="takes no attention mask"):
        block(torch.randn(1, 4, 4, 8), is_causal=True)


def test_block_drop_path_only_in_training():
    block = TransformerBlock(8, Attention(8, num_heads=2), drop_path=0.5)
    x = torch.randn(64, 2, 2, 8)
    block.eval()
    torch.testing.assert_close(block(x), block(x))
    block.train()
    torch.manual_seed(1)
    assert not torch.allclose(block(x), block(x))


def test_cpe_rejects_even_kernels():
    with pytest.raises(ValueError, match="kernel_size"):
        ConvPosEnc(8, kernel_size=4)


@pytest.mark.parametrize("size", [(224, 224), (97, 130), (8, 8)])
def test_conv_stem_shapes(size):
    stem = ConvStem(3, 32, mid_norm_layer=nn.BatchNorm2d, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d)
    y = stem(torch.randn(2, 3, *size))
    assert y.shape == (2, -(-size[0] // 4), -(-size[1] // 4), 32)
    plain = ConvStem(3, 32)  # NAT layout: proj.0, proj.1, norm
    assert [k for k in plain.state_dict()] == [
        "proj.0.weight",
        "proj.0.bias",
        "proj.1.weight",
        "proj.1.bias",
        "norm.weight",
        "norm.bias",
    ]


def test_overlap_patch_embed_matches_conv_then_layernorm():
    torch.manual_seed(0)
    embed = OverlapPatchEmbed(3, 16, patch_size=7, stride=4, norm_layer=LayerNorm2d)
    x = torch.randn(1, 3, 30, 41)
    conv = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=4, padding=3).permute(0, 2, 3, 1)
    torch.testing.assert_close(embed(x), F.layer_norm(conv, (16,), embed.norm.weight, embed.norm.bias, eps=1e-6))


@pytest.mark.parametrize("size", [(14, 14), (7, 9), (1, 1)])
def test_conv_downsample_channels_last(size):
    torch.manual_seed(0)
    down = ConvDownsample(8, 16)
    x = torch.randn(2, *size, 8)
    y = down(x)
    assert y.shape == (2, -(-size[0] // 2), -(-size[1] // 2), 16)
    conv = F.conv2d(x.permute(0, 3, 1, 2), down.reduction.weight, stride=2, padding=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, F.layer_norm(conv, (16,), down.norm.weight, down.norm.bias, eps=1e-6))
    assert down.reduction.bias is None


@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
def test_patch_merging_concatenates_2x2_neighbourhoods(size):
    torch.manual_seed(0)
    merge = PatchMerging(4, out_dim=6)
    x = torch.randn(1, *size, 4)
    y = merge(x)
    assert y.shape == (1, -(-size[0] // 2), -(-size[1] // 2), 6)
    padded = F.pad(x, (0, 0, 0, size[1] % 2, 0, size[0] % 2))
    patch = padded[0, :2, :2].permute(1, 0, 2).reshape(-1)  # Swin order: (0,0), (1,0), (0,1), (1,1)
    torch.testing.assert_close(y[0, 0, 0], merge.reduction(merge.norm(patch)))
