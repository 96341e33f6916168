"""Which of timm's registered models belong to attnzoo."""

from __future__ import annotations

import timm
from timm.models import model_entrypoint


def _is_zoo_model(name: str) -> bool:
    return model_entrypoint(name).__module__.startswith("attnzoo.")


def list_models(pattern: str | list[str] = "", exclude_filters: str | list[str] = "") -> list[str]:
    """Names of attnzoo's models in timm's registry, filtered with timm's wildcard ``pattern``."""
    return [n for n in timm.list_models(pattern, exclude_filters=exclude_filters) if _is_zoo_model(n)]
