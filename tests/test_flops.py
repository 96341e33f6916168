"""MAC counting: the papers' numbers on every torch version, exact formulas for the fused attention ops."""

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401
from attnzoo.kernels import bra2d, na2d, routed_attention
from attnzoo.kernels.flops import count_macs, na2d_macs, sdpa_macs

# GFLOPs (fvcore multiply-accumulates) at 224 px as the papers publish them
PUBLISHED_GMACS = {
    "nat_mini": 2.7,
    "nat_tiny": 4.3,
    "nat_small": 7.8,
    "nat_base": 13.7,
    "dinat_mini": 2.7,
    "dinat_tiny": 4.3,
    "dinat_small": 7.8,
    "dinat_base": 13.7,
    "biformer_tiny": 2.2,
    "biformer_small": 4.5,
    "biformer_base": 9.8,
    "agent_deit_tiny": 1.2,
    "agent_deit_small": 4.4,
    "agent_deit_base": 17.6,
    "agent_pvt_tiny": 2.0,
    "agent_pvt_small": 4.0,
    "agent_pvt_medium": 7.0,
    "agent_pvt_large": 10.4,
    "agent_swin_tiny": 4.5,
    "agent_swin_small": 8.7,
    "agent_swin_base": 15.4,
    "deit_small_patch16_224": 4.6,  # timm's DeiT: plain SDPA attention
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_model_macs_match_the_papers(name):
    model = timm.create_model(name, device="meta").eval()
    macs, _ = count_macs(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert macs / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.01, abs=0.05)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "nat_mini", "biformer_tiny"])
def test_cpu_count_equals_meta_count(name):
    """Real CPU kernels (fused CPU SDPA, the tiled NA reference, the gathered BRA reference) count like the formulas."""
    x = torch.randn(1, 3, 224, 224)
    cpu, out = count_macs(timm.create_model(name).eval(), x)
    meta, _ = count_macs(timm.create_model(name, device="meta").eval(), x.to("meta"))
    assert cpu == meta and torch.isfinite(out).all()


def test_sdpa_counts_both_matmuls():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 5)
    macs, _ = count_macs(F.scaled_dot_product_attention, q, k, v)
    assert macs == sdpa_macs(2, 3, 10, 12, 8, 5) == 2 * 3 * 10 * 12 * (8 + 5)


def _keys_per_axis(length: int, kernel: int, dilation: int) -> int:
    """Brute force over NATTEN's window rule (axes shorter than ``kernel * dilation`` padded at the end)."""
    padded, total = max(length, kernel * dilation), 0
    for i in range(length):
        group, group_len = i % dilation, -(-(padded - i % dilation) // dilation)
        start = min(max(i // dilation - kernel // 2, 0), group_len - kernel)
        total += sum((start + t) * dilation + group < length for t in range(kernel))
    return total


@pytest.mark.parametrize(
    "size, kernel, dilation", [((9, 11), (3, 5), (1, 1)), ((9, 11), (3, 3), (2, 3)), ((4, 5), (3, 3), (2, 2))]
)
def test_na2d_counts_exact_neighbourhoods(size, kernel, dilation):
    """Every query against its real neighbours only: small maps (padded like NATTEN <= 0.14) see fewer keys."""
    B, heads, D = 2, 2, 4
    q = torch.randn(B, *size, heads, D)
    macs, _ = count_macs(lambda: na2d(q, q, q, kernel_size=kernel, dilation=dilation))
    keys = _keys_per_axis(size[0], kernel[0], dilation[0]) * _keys_per_axis(size[1], kernel[1], dilation[1])
    assert macs == na2d_macs(tuple(q.shape), kernel, dilation) == B * heads * keys * 2 * D


def test_routing_to_every_region_counts_like_dense_attention():
    B, S, T, heads, D = 1, 2, 6, 2, 4
    q, k, v = (torch.randn(B, S * S, T, heads, D) for _ in range(3))
    index = torch.arange(S * S).expand(B, S * S, S * S)
    routed, _ = count_macs(routed_attention, q, k, v, index, S)
    dense, _ = count_macs(F.scaled_dot_product_attention, *(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)))
    assert routed == dense


def test_bra2d_counts_routing_and_attention_on_the_padded_map():
    B, H, W, heads, D, n_win, topk = 1, 7, 9, 2, 4, 2, 3
    q = torch.randn(B, H, W, heads, D)
    macs, _ = count_macs(bra2d, q, q, q, n_win, topk)
    regions, tokens = n_win**2, 4 * 5  # 4 x 5 tokens per region of the map padded to 8 x 10
    assert macs == B * regions * regions * heads * D + sdpa_macs(B * regions, heads, tokens, topk * tokens, D, D)
