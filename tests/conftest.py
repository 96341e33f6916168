"""Session set-up shared by every test file.

Without a CUDA device the Triton kernels run through Triton's CPU interpreter, so plain ``pytest`` runs the same
kernel tests as ``.ci/run``. ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel module is imported, so it is set
here, before any test module imports :mod:`attnzoo.kernels`. An explicit ``TRITON_INTERPRET=0`` is respected (the
Triton tests then skip with that reason).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the rest of the test module: for tiny models on a loaded 2-core machine, threads only
    add synchronisation (a one-step detection fit took 15 s with 2 threads and 1 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
