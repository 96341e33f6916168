"""Per-step learning-rate schedule: linear warm-up then half-cosine decay, as a ``LambdaLR`` multiplier."""

from __future__ import annotations

import math

__all__ = ["WarmupCosine", "scaled_lr"]


class WarmupCosine:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up goes linearly from ``warmup_ratio`` (= warmup_lr / lr) to 1 over ``warmup_steps``; then a half cosine
    goes from 1 to ``min_ratio`` (= min_lr / lr) at ``total_steps - cooldown_steps``, and the last
    ``cooldown_steps`` stay at ``min_ratio`` (timm's cool-down epochs). A picklable class (not a closure) so that
    ``LambdaLR.state_dict`` stays complete.
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        min_ratio: float = 0.0,
        cooldown_steps: int = 0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if warmup_steps < 0 or cooldown_steps < 0 or warmup_steps + cooldown_steps > total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) + cooldown_steps ({cooldown_steps}) must be within total_steps "
                f"({total_steps}) and non-negative"
            )
        self.total_steps, self.warmup_steps, self.cooldown_steps = total_steps, warmup_steps, cooldown_steps
        self.warmup_ratio, self.min_ratio = warmup_ratio, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_ratio + (1.0 - self.warmup_ratio) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.cooldown_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int | None) -> float:
    """Linear scaling rule: ``lr`` is given for ``base_batch_size`` images per step (``None``: no scaling)."""
    if base_batch_size is None:
        return lr
    if base_batch_size < 1:
        raise ValueError(f"base_batch_size must be positive, got {base_batch_size}")
    return lr * global_batch_size / base_batch_size
