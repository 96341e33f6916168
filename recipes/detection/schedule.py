"""Detection schedules: linear warm-up over steps, then step decay at epoch milestones ("1x", "3x")."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SCHEDULES", "WarmupMultiStep", "resolve_schedule"]

SCHEDULES = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}


def resolve_schedule(
    schedule: str | None, epochs: int | None = None, milestones: Sequence[int] | None = None
) -> tuple[int, tuple[int, ...]]:
    """``(epochs, milestones)`` of a named schedule (``"1x"``: 12 epochs, steps at 8 and 11; ``"3x"``: 36, steps at
    27 and 33), overridden by explicit ``epochs`` / ``milestones``; ``schedule=None`` needs both explicit."""
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} or None, got {schedule!r}")
    base_epochs, base_milestones = SCHEDULES[schedule] if schedule else (None, None)
    epochs = epochs if epochs is not None else base_epochs
    milestones = tuple(milestones) if milestones is not None else base_milestones
    if epochs is None or milestones is None:
        raise ValueError("schedule=None needs both epochs and milestones")
    if epochs < 1 or any(not 0 < m <= epochs for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing epochs in (0, {epochs}], got {list(milestones)}")
    return epochs, milestones


class WarmupMultiStep:
    """``LambdaLR`` multiplier at optimizer step ``step``: ``gamma ** (milestones passed)`` at epoch
    ``step // steps_per_epoch``, times a linear warm-up from ``warmup_ratio`` to 1 over ``warmup_steps``.
    A class (not a closure) so that ``LambdaLR.state_dict`` is complete."""

    def __init__(
        self,
        steps_per_epoch: int,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.001,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        if warmup_steps < 0 or not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"need warmup_steps >= 0 and warmup_ratio in [0, 1], got {warmup_steps}, {warmup_ratio}")
        self.steps_per_epoch, self.milestones, self.gamma = steps_per_epoch, tuple(milestones), gamma
        self.warmup_steps, self.warmup_ratio = warmup_steps, warmup_ratio

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        factor = self.gamma ** sum(epoch >= m for m in self.milestones)
        if step < self.warmup_steps:
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * step / self.warmup_steps
        return factor
