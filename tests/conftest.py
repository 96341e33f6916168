"""Session set-up shared by every test file.

Without a CUDA device the Triton kernels run through Triton's CPU interpreter, so plain ``pytest`` runs the same
kernel tests as ``.ci/run``. ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel module is imported, so it is set
here, before any test module imports :mod:`attnzoo.kernels`. An explicit ``TRITON_INTERPRET=0`` is respected (the
Triton tests then skip with that reason).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
