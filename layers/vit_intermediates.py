"""timm's ``VisionTransformer.forward_intermediates`` around a custom block loop.

Plain ViTs whose blocks need more than ``block(x)`` (Agent-DeiT passes the patch grid, token merging merges between
blocks) share this one implementation of the rest: patch embedding, ``indices`` / ``stop_early``, prefix-token
splitting, ``NCHW`` / ``NLC`` layout and the tuple / list / dict result forms, exactly as timm's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices

__all__ = ["BlockLoop", "vit_forward_intermediates"]

BlockLoop = Callable[[torch.Tensor, nn.Module, Sequence[int], bool, list[int]], tuple[torch.Tensor, list[torch.Tensor]]]
"""``loop(tokens, blocks, take_indices, norm, grid) -> (tokens, intermediates)``: runs ``blocks`` on the embedded
``tokens`` ``(B, P + H*W, C)`` of the patch grid ``grid = [H, W]`` and returns the final tokens and, for every block
index in ``take_indices``, that block's output as a full ``(B, P + H*W, C)`` sequence (after the model's final norm
when ``norm``)."""


def vit_forward_intermediates(
    model: nn.Module,
    x: torch.Tensor,
    loop: BlockLoop,
    indices: int | list[int] | None = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    output_dict: bool = False,
) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
    """``forward_intermediates`` of a timm ``VisionTransformer`` ``model`` whose blocks run through ``loop``.

    Image ``x`` ``(B, in_chans, H_img, W_img)``; the arguments and results are timm's: block outputs as ``NCHW`` maps
    ``(B, C, H, W)`` or ``NLC`` patch tokens ``(B, H*W, C)``, optionally with their prefix tokens, and the final
    normed tokens unless ``intermediates_only``.
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    take_indices, max_index = feature_take_indices(len(model.blocks), indices)
    B = x.shape[0]
    x = model.patch_embed(x)
    grid = [x.shape[1], x.shape[2]] if x.ndim == 4 else list(model.patch_embed.grid_size)
    x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
    blocks = model.blocks[: max_index + 1] if stop_early else model.blocks
    x, intermediates = loop(x, blocks, take_indices, norm, grid)

    npt = model.num_prefix_tokens
    prefix_tokens = [y[:, :npt] for y in intermediates] if npt else None
    intermediates = [y[:, npt:] for y in intermediates]
    if output_fmt == "NCHW":
        intermediates = [y.reshape(B, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
    if output_dict:
        result: dict[str, Any] = {"image_intermediates": intermediates}
        if prefix_tokens is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix_tokens
        if not intermediates_only:
            result["image_features"] = model.norm(x)
        return result
    if return_prefix_tokens and prefix_tokens is not None:
        intermediates = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return intermediates
    return model.norm(x), intermediates
