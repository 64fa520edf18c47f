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


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny shapes gain nothing from a second, and on a busy CI machine OpenMP's
    spinning threads make them many times slower. The setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
