"""Shared building blocks: token mixers, output gate, transformer block, stems, downsampling and the backbone."""

from .agent_attention import AgentAttention, convert_agent_biases, resize_agent_bias
from .attention import Attention
from .backbone import HierarchicalVisionTransformer, Stage, build_stages
from .block import ConvPosEnc, TransformerBlock
from .decay_attention import DecayMaskedAttention
from .downsample import ConvDownsample, PatchMerging
from .efficient_probing import EfficientProbing
from .gate import GATE_MODES, GATES, OutputGate, create_gate, gate_output
from .manhattan_attention import ManhattanAttention
from .mixer import MapTokenMixer, check_no_attn_mask, create_mixer, get_mixer, list_mixers, register_mixer
from .mlp import DWConvMlp
from .moh import MoHGate, check_moh_args, moh_balance_loss
from .neighborhood_attention import NeighborhoodAttention2d
from .polyline_attention import PolylineAttention
from .pool_head import ATTENTION_POOL_TYPES, AttentionPoolClassifierHead, SimPoolClassifierHead, create_attention_pool
from .pooling_mixer import PoolingMixer
from .ppt import PPTReducer, ppt_policy, prune_by_importance
from .reduction_patch import (
    REDUCTION_METHODS,
    MergedTokens,
    PPTVisionTransformer,
    ReducedTokens,
    TokenMergingMixin,
    TokenPoolingVisionTransformer,
    TokenReductionMixin,
    TokenReductionVisionTransformer,
    ToMeVisionTransformer,
    apply_token_merging,
    apply_token_reduction,
    create_token_reducer,
    remove_token_merging,
    remove_token_reduction,
)
from .routing_attention import BiLevelRoutingAttention, GlobalAttentionLePE
from .simpool import SimPool
from .stem import ConvStem, DeepConvStem, OverlapPatchEmbed
from .token_merging import (
    MergePlan,
    ToMeReducer,
    bipartite_soft_matching,
    merge_schedule,
    merge_token_map,
    merge_tokens,
    proportional_attention_mask,
    token_map_to_source,
    unmerge_tokens,
)
from .token_pooling import TokenPoolingReducer, pool_tokens, weighted_kmedoids
from .token_reduction import BlockAttention, Reduction, TokenReducer, restore_tokens
from .vit_intermediates import BlockLoop, vit_forward_intermediates
from .vit_pool import AttentionPoolViTMixin, ZooVisionTransformer
from .window_attention import WindowAttention2d

__all__ = [
    "ATTENTION_POOL_TYPES",
    "GATES",
    "GATE_MODES",
    "REDUCTION_METHODS",
    "AgentAttention",
    "AttentionPoolClassifierHead",
    "AttentionPoolViTMixin",
    "Attention",
    "BiLevelRoutingAttention",
    "BlockAttention",
    "BlockLoop",
    "ConvDownsample",
    "ConvPosEnc",
    "ConvStem",
    "DWConvMlp",
    "DecayMaskedAttention",
    "DeepConvStem",
    "EfficientProbing",
    "GlobalAttentionLePE",
    "HierarchicalVisionTransformer",
    "ManhattanAttention",
    "MapTokenMixer",
    "MergePlan",
    "MergedTokens",
    "MoHGate",
    "NeighborhoodAttention2d",
    "OutputGate",
    "OverlapPatchEmbed",
    "PPTReducer",
    "PPTVisionTransformer",
    "PatchMerging",
    "PolylineAttention",
    "PoolingMixer",
    "ReducedTokens",
    "Reduction",
    "SimPool",
    "SimPoolClassifierHead",
    "Stage",
    "ToMeReducer",
    "ToMeVisionTransformer",
    "TokenMergingMixin",
    "TokenPoolingReducer",
    "TokenPoolingVisionTransformer",
    "TokenReducer",
    "TokenReductionMixin",
    "TokenReductionVisionTransformer",
    "TransformerBlock",
    "WindowAttention2d",
    "ZooVisionTransformer",
    "apply_token_merging",
    "apply_token_reduction",
    "bipartite_soft_matching",
    "build_stages",
    "check_moh_args",
    "check_no_attn_mask",
    "convert_agent_biases",
    "create_attention_pool",
    "create_gate",
    "create_mixer",
    "create_token_reducer",
    "gate_output",
    "get_mixer",
    "list_mixers",
    "merge_schedule",
    "merge_token_map",
    "merge_tokens",
    "moh_balance_loss",
    "pool_tokens",
    "ppt_policy",
    "proportional_attention_mask",
    "prune_by_importance",
    "register_mixer",
    "remove_token_merging",
    "remove_token_reduction",
    "resize_agent_bias",
    "restore_tokens",
    "token_map_to_source",
    "unmerge_tokens",
    "vit_forward_intermediates",
    "weighted_kmedoids",
]
