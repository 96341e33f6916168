"""Whether torch is tracing for export: ``torch.compiler.is_exporting`` where this torch has it."""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """``torch.compiler.is_exporting()`` (``torch.export`` and the ONNX exporter built on it); ``False`` on a torch
    without that function (it arrived after 2.5, the oldest torch this package supports)."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check is not None and check())
