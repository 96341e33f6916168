"""Shared building blocks: token mixers, output gate, transformer block, stems, downsampling and the backbone."""

from .agent_attention import AgentAttention, convert_agent_biases, resize_agent_bias
from .attention import Attention
from .backbone import HierarchicalVisionTransformer, Stage, build_stages
from .block import ConvPosEnc, TransformerBlock
from .downsample import ConvDownsample, PatchMerging
from .gate import GATE_MODES, OutputGate, create_gate, gate_output
from .mixer import MapTokenMixer, check_no_attn_mask, create_mixer, get_mixer, list_mixers, register_mixer
from .neighborhood_attention import NeighborhoodAttention2d
from .pooling_mixer import PoolingMixer
from .routing_attention import BiLevelRoutingAttention, GlobalAttentionLePE
from .simpool import SimPool, SimPoolClassifierHead
from .stem import ConvStem, OverlapPatchEmbed
from .token_merging import (
    MergePlan,
    bipartite_soft_matching,
    merge_schedule,
    merge_token_map,
    merge_tokens,
    proportional_attention_mask,
    token_map_to_source,
    unmerge_tokens,
)
from .tome_patch import (
    MergedTokens,
    TokenMergingMixin,
    ToMeVisionTransformer,
    apply_token_merging,
    remove_token_merging,
)
from .vit_intermediates import BlockLoop, vit_forward_intermediates
from .window_attention import WindowAttention2d

__all__ = [
    "GATE_MODES",
    "AgentAttention",
    "Attention",
    "BiLevelRoutingAttention",
    "BlockLoop",
    "ConvDownsample",
    "ConvPosEnc",
    "ConvStem",
    "GlobalAttentionLePE",
    "HierarchicalVisionTransformer",
    "MapTokenMixer",
    "MergePlan",
    "MergedTokens",
    "NeighborhoodAttention2d",
    "OutputGate",
    "OverlapPatchEmbed",
    "PatchMerging",
    "PoolingMixer",
    "SimPool",
    "SimPoolClassifierHead",
    "Stage",
    "ToMeVisionTransformer",
    "TokenMergingMixin",
    "TransformerBlock",
    "WindowAttention2d",
    "apply_token_merging",
    "bipartite_soft_matching",
    "build_stages",
    "check_no_attn_mask",
    "convert_agent_biases",
    "create_gate",
    "create_mixer",
    "gate_output",
    "get_mixer",
    "list_mixers",
    "merge_schedule",
    "merge_token_map",
    "merge_tokens",
    "proportional_attention_mask",
    "register_mixer",
    "remove_token_merging",
    "resize_agent_bias",
    "token_map_to_source",
    "unmerge_tokens",
    "vit_forward_intermediates",
]
