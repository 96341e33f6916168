"""mmdetection's arithmetic where torchvision's differs (``build_detector(..., ops="mmdet")``).

Released mmdet checkpoints (the NAT, DiNAT, BiFormer and Agent-Attention COCO models) were trained and evaluated with
these; torchvision's defaults give slightly different numbers on the same weights:

- :class:`MMDetRoIAlign`: RoIAlign with ``aligned=True`` (box corners shifted by half a pixel, so a box covers the
  pixel centres it spans), ``sampling_ratio=0`` (``ceil(roi size / output size)`` points per bin) and mmdet's level
  rule ``floor(log2(sqrt(w h) / 56 + 1e-6))``; torchvision samples 2 x 2 points per bin without the half-pixel shift.
- :class:`MMDetAnchorGenerator`: base anchors not rounded to whole pixels (torchvision rounds them, mmdet 2.x does not).
- :class:`LastLevelP6P7OnInput`: RetinaNet's P6 from the last backbone map and P7 from P6 with no ReLU between them
  (mmdet's ``add_extra_convs="on_input"``, ``relu_before_extra_convs=False``); torchvision applies a ReLU.
- :class:`MMDetTransform` / :func:`paste_masks_grid_sample`: instance masks pasted into the image by bilinear sampling
  of the ``M x M`` mask at the pixel centres of the box (mmdet's ``grid_sample`` paste); torchvision resizes the mask,
  padded by one cell, to the integer box size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

__all__ = [
    "OPS",
    "LastLevelP6P7OnInput",
    "MMDetAnchorGenerator",
    "MMDetRoIAlign",
    "MMDetTransform",
    "paste_masks_grid_sample",
]

OPS = ("torchvision", "mmdet")


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdet's ``SingleRoIExtractor`` + ``RoIAlign(aligned=True)``.

    ``forward(features, boxes, image_shapes)``: ``features`` an ordered dict holding ``featmap_names`` (maps of
    strides ``strides``), ``boxes`` one ``(N_i, 4)`` xyxy tensor per image in input pixels ->
    ``(sum N_i, C, *output_size)``.
    A box of scale ``sqrt(w h)`` is pooled from level ``floor(log2(scale / finest_scale + 1e-6))`` (clamped).
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        strides: Sequence[int],
        sampling_ratio: int = 0,
        finest_scale: float = 56.0,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        if len(strides) != len(featmap_names):
            raise ValueError(f"strides {list(strides)} must give one stride per feature map {list(featmap_names)}")
        self.strides = [int(s) for s in strides]
        self.finest_scale = finest_scale

    def levels(self, boxes: Tensor) -> Tensor:
        """Pyramid level index of each box ``(N, 4)`` -> ``(N,)`` int64."""
        scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
        level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return level.clamp(0, len(self.strides) - 1).long()

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.levels(rois[:, 1:])
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(levels == level)[0]
            if len(index):
                pooled = roi_align(
                    feature, rois[index], self.output_size, 1.0 / stride, self.sampling_ratio, aligned=True
                )
                out[index] = pooled.to(out.dtype)
        return out


class MMDetAnchorGenerator(AnchorGenerator):
    """torchvision's anchor grid (centres at ``stride * (i, j)``, the ordering of mmdet 2.x) with base anchors of
    exact, unrounded size, as mmdet 2.x's ``AnchorGenerator`` (``center_offset=0``)."""

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        ws = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class LastLevelP6P7OnInput(LastLevelP6P7):
    """RetinaNet's extra levels as mmdet builds them: ``P6 = conv3x3/2(C5)``, ``P7 = conv3x3/2(P6)`` (no ReLU)."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p7 = self.p7(p6)
        return [*p, p6, p7], [*names, "p6", "p7"]


def paste_masks_grid_sample(masks: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks ``(N, 1, M, M)`` (probabilities over each box) -> ``(N, 1, H, W)`` image masks, by bilinear sampling of
    the mask (cells of ``box / M``, zero outside) at every pixel centre; pixels further than half a cell from the box
    stay 0."""
    height, width = int(size[0]), int(size[1])
    out = masks.new_zeros((len(masks), 1, height, width))
    cells = masks.shape[-1]
    for k, (mask, box) in enumerate(zip(masks, boxes.tolist())):
        x0, y0, x1, y1 = box
        box_w, box_h = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
        cx, cy = box_w / cells, box_h / cells
        left, right = max(math.floor(x0 - cx / 2) - 1, 0), min(math.ceil(x1 + cx / 2) + 1, width)
        top, bottom = max(math.floor(y0 - cy / 2) - 1, 0), min(math.ceil(y1 + cy / 2) + 1, height)
        if right <= left or bottom <= top:
            continue
        xs = (torch.arange(left, right, device=masks.device, dtype=torch.float32) + 0.5 - x0) / box_w * 2 - 1
        ys = (torch.arange(top, bottom, device=masks.device, dtype=torch.float32) + 0.5 - y0) / box_h * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, h, w, 2) as (x, y)
        sampled = F.grid_sample(mask[None].float(), grid, mode="bilinear", align_corners=False)
        out[k, :, top:bottom, left:right] = sampled[0].to(out.dtype)
    return out


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's resize / normalise / batch transform whose ``postprocess`` pastes masks the mmdet way
    (:func:`paste_masks_grid_sample`) instead of ``paste_masks_in_image``."""

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform) -> MMDetTransform:
        """The same transform settings as ``transform``."""
        return cls(
            transform.min_size,
            transform.max_size,
            transform.image_mean,
            transform.image_std,
            size_divisible=transform.size_divisible,
            fixed_size=transform.fixed_size,
            _skip_resize=transform._skip_resize,
        )

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        masks = [r.pop("masks", None) for r in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for r, m, size in zip(result, masks, original_image_sizes):
            if m is not None:
                r["masks"] = paste_masks_grid_sample(m, r["boxes"], size)
        return result
