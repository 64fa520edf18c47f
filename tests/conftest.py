"""Test setup: run Triton kernels under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here,
before the tests import the kernel modules.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def session_launches():
    """Every Triton launch the tests make, recorded as the JIT would specialise it (kernels.runtime.launch);
    tests/test_report.py compiles them ahead of time for every architecture."""
    from kernels import runtime

    with runtime.record_launches() as records:
        yield records
