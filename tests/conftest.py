"""Test setup: run Triton kernels under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here,
before the tests import the kernel modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
