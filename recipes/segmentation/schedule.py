"""Iteration-based learning-rate schedules of the segmentation recipes (mmcv's ``LrUpdaterHook`` rules)."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "IterationSchedule"]

SCHEDULES = ("poly", "cosine")


class IterationSchedule:
    """``LambdaLR`` multiplier at optimizer step ``step`` of ``max_iters``, with ``t = step / max_iters``:

    - ``"poly"``: ``(1 - t) ** power * (1 - min_lr_ratio) + min_lr_ratio`` (mmcv ``PolyLrUpdaterHook``);
    - ``"cosine"``: ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi t)) / 2`` (``CosineAnnealingLrUpdaterHook``);

    times mmcv's linear warm-up over the first ``warmup_iters`` steps: ``1 - (1 - step / warmup_iters) * (1 -
    warmup_ratio)`` (from ``warmup_ratio`` up to 1). A class, not a closure, so that ``LambdaLR.state_dict`` is
    complete."""

    def __init__(
        self,
        max_iters: int,
        kind: str = "poly",
        power: float = 1.0,
        min_lr_ratio: float = 0.0,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}; got {kind!r}")
        if max_iters < 1:
            raise ValueError(f"max_iters must be positive, got {max_iters}")
        if warmup_iters < 0 or not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"need warmup_iters >= 0 and warmup_ratio in [0, 1], got {warmup_iters}, {warmup_ratio}")
        if not 0.0 <= min_lr_ratio <= 1.0 or power <= 0:
            raise ValueError(f"need min_lr_ratio in [0, 1] and power > 0, got {min_lr_ratio}, {power}")
        self.max_iters, self.kind, self.power, self.min_lr_ratio = max_iters, kind, power, min_lr_ratio
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio

    def __call__(self, step: int) -> float:
        t = min(step, self.max_iters) / self.max_iters
        factor = (1.0 - t) ** self.power if self.kind == "poly" else (1.0 + math.cos(math.pi * t)) / 2
        factor = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * factor
        if step < self.warmup_iters:
            factor *= 1.0 - (1.0 - step / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor
