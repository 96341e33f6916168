"""Shared building blocks: token mixers, output gate, transformer block, stems, downsampling and the backbone."""

from .attention import Attention
from .backbone import HierarchicalVisionTransformer, Stage, build_stages
from .block import ConvPosEnc, TransformerBlock
from .downsample import ConvDownsample, PatchMerging
from .gate import GATE_MODES, OutputGate, create_gate
from .mixer import create_mixer, get_mixer, list_mixers, register_mixer
from .stem import ConvStem, OverlapPatchEmbed
from .window_attention import WindowAttention2d

__all__ = [
    "GATE_MODES",
    "Attention",
    "ConvDownsample",
    "ConvPosEnc",
    "ConvStem",
    "HierarchicalVisionTransformer",
    "OverlapPatchEmbed",
    "OutputGate",
    "PatchMerging",
    "Stage",
    "TransformerBlock",
    "WindowAttention2d",
    "build_stages",
    "create_gate",
    "create_mixer",
    "get_mixer",
    "list_mixers",
    "register_mixer",
]
