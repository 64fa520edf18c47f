"""Test setup: run Triton kernels under the CPU interpreter when there is no GPU, and the fixtures op tests share.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here,
before the tests import the kernel modules (importing ``kernels`` imports no kernel module).

Shared fixtures: ``backend`` (each registry backend in turn, skipped with its reason where it cannot run:
under the interpreter on a CPU that is torch, triton and cuda, the last when the extension is built),
``backend_op`` (that backend's function of one op, loaded through the registry), ``highest_fp32_matmul``
(fp32 references without TF32) and ``one_thread``. The slowest files are collected first (see ``_SLOWEST_FIRST``).
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

import gpt2_kernels.registry

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# ``auto`` takes the registry's fixed order in the tests (reproducible: tests compare backends), and whatever a test
# stores goes to a folder of this session, never the user's cache (tests/test_auto.py switches timing on, each test
# in its own folder). Subprocesses (torchrun, gpt2 ...) inherit both.
os.environ["GPT2_KERNELS_AUTO"] = "fixed"
os.environ["GPT2_KERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2_kernels_test_cache_")
atexit.register(shutil.rmtree, os.environ["GPT2_KERNELS_CACHE_DIR"], ignore_errors=True)

# The device the op tests run on: the GPU when there is one, else the CPU (Triton under its interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# The files that take longest on a 2-core CPU, longest first. Without a GPU the suite runs on two pytest-xdist
# workers, a file whole on one of them (pytest_cmdline_main below), in collection order: these start first, so that
# the last file to finish is a short one.
_SLOWEST_FIRST = ("test_report.py", "test_fsdp.py", "test_nvcc.py", "test_compile.py", "test_model_parity.py",
                  "test_finetune.py", "test_hf.py", "test_bench_tools.py", "test_ddp.py", "test_recompute.py",
                  "test_plan.py", "test_auto.py", "test_attention.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which starts the workers
def pytest_cmdline_main(config):
    """Two pytest-xdist workers, each file whole on one (its module fixtures run once), when pytest-xdist is installed
    and the device is the CPU; ``-n`` given, ``-p no:xdist``, ``--pdb``, ``--collect-only`` or a GPU (the tests
    share one device): one process, or what was asked."""
    if (config.pluginmanager.hasplugin("xdist") and config.option.numprocesses is None and DEVICE == "cpu"
            and not os.environ.get("PYTEST_XDIST_WORKER") and not config.getoption("usepdb")
            and not config.getoption("collectonly")):
        config.option.numprocesses = 2
        config.option.dist = "loadfile"


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny shapes gain nothing from a second, and on a busy CI machine OpenMP's
    spinning threads make them many times slower. The setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=gpt2_kernels.registry.BACKENDS)
def backend(request) -> str:
    """Each backend of the registry in turn; one that cannot run on the test device here is skipped, saying why."""
    why = gpt2_kernels.registry.unavailable_reason(request.param, DEVICE)
    if why is not None:
        pytest.skip(f"backend {request.param!r} cannot run on {DEVICE} here: {why}")
    return request.param


@pytest.fixture
def backend_op(backend):
    """``backend_op("mlp")``: the registry's function of that op in ``backend`` (every other op of the spec is the
    reference, so only the op under test is imported)."""

    def load(op: str):
        ops = gpt2_kernels.registry.build_ops(f"torch,{op}={backend}", DEVICE)
        assert ops.backends[op] == backend
        return getattr(ops, op)

    return load


@pytest.fixture
def highest_fp32_matmul():
    """fp32 matmuls without TF32 for the test, whatever another module set (on a GPU an fp32 reference in TF32
    would be off by 1e-3); restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
