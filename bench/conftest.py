"""pytest options and fixtures of the benchmark suite (``pytest bench/ --benchmark-only``).

Options (all optional; list options are comma-separated):

  --bench-backends  implementations to run, e.g. ``torch,torch-compile,ext,sdpa-flash`` (default: all)
  --bench-shapes    shape names such as ``124M-B16-T1024`` or model names such as ``1.5B`` (default: the grid)
  --bench-dtypes    ``fp32``, ``fp16``, ``bf16`` (default: fp32 on the CPU, bf16 on a GPU)
  --bench-modes     ``fwd``, ``bwd``, ``fwd+bwd`` (default: all three)
  --full            the whole grid: every GPT-2 width at every T from 128 to 4096, all dtypes (for a GPU)
  --bench-max-time  seconds of timed rounds per benchmark (default 0.5 on the CPU, 0.1 on a GPU)
  --bench-budget    seconds for the whole run; benchmarks past it are skipped, saying so (default: none)
  --bench-no-check  skip the comparison of each forward with the fp32 reference (by default a forward
                    outside the tolerance of kernels/testing.py fails its benchmark)
  --bench-threads   torch CPU threads, or ``auto`` (the default): one thread when the 1-minute load
                    average exceeds the core count (a shared CPU), else torch's choice; recorded
                    with every result

A bad value skips (naming it) rather than stopping the run. Triton is not benchmarked on the CPU:
there it runs only under its interpreter, which is far too slow to be worth timing.
"""

from __future__ import annotations

import os
import time

from gpt2.cli import allocator_defaults

# As `gpt2 train` does: large CPU tensors on transparent huge pages, so that a run times the
# kernels rather than the kernel's page faults. Must run before torch is first imported.
allocator_defaults()

import pytest

from bench import cases
from bench.common import BenchSettings, Ceilings, bench_device
from bench.shapes import grid_name

_START = time.monotonic()
_MODULE_ORDER = ("bench_train_step", "bench_generate", "bench_attention", "bench_mlp", "bench_linear_cross_entropy",
                 "bench_layer_norm", "bench_fused")


def pytest_addoption(parser):
    group = parser.getgroup("gpt2-kernels benchmarks")
    group.addoption("--bench-backends", default=None, help="comma-separated implementations (default: all)")
    group.addoption("--bench-shapes", default=None, help="comma-separated shape names (124M-B16-T1024) or models")
    group.addoption("--bench-dtypes", default=None, help="comma-separated dtypes: fp32, fp16, bf16")
    group.addoption("--bench-modes", default=None, help="comma-separated modes: fwd, bwd, fwd+bwd")
    group.addoption("--full", action="store_true", default=False, help="run the whole grid of GPT-2 shapes")
    group.addoption("--bench-max-time", type=float, default=None, help="seconds of timed rounds per benchmark")
    group.addoption("--bench-budget", type=float, default=None, help="seconds for the whole benchmark run")
    group.addoption("--bench-threads", default="auto",
                    help="torch CPU threads: a number, or 'auto' (default: one thread when the CPU is oversubscribed)")
    group.addoption("--bench-no-check", action="store_true", default=False,
                    help="do not compare each forward with the fp32 reference (by default a forward outside "
                         "the tolerance of kernels/testing.py fails its benchmark)")


def _opts(config):
    return {
        "backends": cases.parse_list(config.getoption("--bench-backends")),
        "shapes": cases.parse_list(config.getoption("--bench-shapes")),
        "dtypes": cases.parse_list(config.getoption("--bench-dtypes")),
        "modes": cases.parse_list(config.getoption("--bench-modes")),
    }


def _param(choice):
    marks = [pytest.mark.skip(reason=choice.skip)] if choice.skip else []
    return pytest.param(choice.case, id=choice.id, marks=marks)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device_type = bench_device().type
    full = config.getoption("--full")
    o = _opts(config)
    if "op_case" in metafunc.fixturenames:
        op = metafunc.module.OP
        choices = cases.op_choices(op, grid_name(device_type, full), device_type, full, **o)
        metafunc.parametrize("op_case", [_param(c) for c in choices])
    if "model_case" in metafunc.fixturenames:
        choices = cases.model_choices(device_type, full, o["backends"], o["dtypes"])
        metafunc.parametrize("model_case", [_param(c) for c in choices])


def pytest_collection_modifyitems(config, items):
    # Run order, so that a run cut short by --bench-budget still covers every op: the headline
    # numbers (train step, generation) first, then each op's first shape, then each op's second
    # shape, and so on; within one shape, the parametrisation order (implementation fastest).
    positions = [i for i, it in enumerate(items) if _module_name(it) in _MODULE_ORDER]
    ours = [items[i] for i in positions]
    ordinals: dict[tuple[str, str], int] = {}
    per_module: dict[str, int] = {}
    for it in ours:
        case = getattr(getattr(it, "callspec", None), "params", {}).get("op_case")
        if case is not None:
            key = (_module_name(it), case.shape.name)
            if key not in ordinals:
                ordinals[key] = per_module.get(key[0], 0)
                per_module[key[0]] = ordinals[key] + 1

    def rank(pair):
        index, it = pair
        name = _module_name(it)
        case = getattr(getattr(it, "callspec", None), "params", {}).get("op_case")
        if name in ("bench_train_step", "bench_generate"):
            return (0, _MODULE_ORDER.index(name), 0, index)
        shape_ordinal = ordinals[(name, case.shape.name)] if case is not None else -1
        return (1, shape_ordinal, _MODULE_ORDER.index(name), index)

    ours_sorted = [it for _, it in sorted(enumerate(ours), key=rank)]
    for pos, it in zip(positions, ours_sorted):
        items[pos] = it


def _module_name(item) -> str:
    module = getattr(item, "module", None)
    return module.__name__.split(".")[-1] if module is not None else ""


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads is None:
        return
    if threads == "auto":
        threads, why = auto_threads()
        if threads is None:
            return
    else:
        try:
            threads = int(threads)
        except ValueError:
            raise pytest.UsageError(f"--bench-threads takes a positive integer or 'auto', got {threads!r}") from None
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be >= 1, got {threads}")
        why = f"--bench-threads {threads}"
    import torch

    torch.set_num_threads(threads)
    config._bench_threads_why = why


def auto_threads() -> tuple[int | None, str]:
    """One torch thread when the CPU is oversubscribed, else torch's own choice (None).

    With more runnable processes than cores, every parallel region of a small op waits until all of
    its threads are scheduled; on a shared 2-core machine this made generation 6x to 60x slower.
    """
    import torch

    if torch.cuda.is_available():
        return None, "a GPU run: torch's default CPU threads"
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None, "load average unknown: torch's default threads"
    if load > cores:
        return 1, f"1-minute load average {load:.1f} > {cores} cores: one torch thread (--bench-threads auto)"
    return None, f"1-minute load average {load:.1f} <= {cores} cores: torch's default threads"


def pytest_report_header(config):
    why = getattr(config, "_bench_threads_why", None)
    lines = [f"bench: {why}"] if why else []
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    lines.append(f"bench: THP_MEM_ALLOC_ENABLE={thp} " + ("(large CPU tensors on transparent huge pages, as gpt2 "
                                                          "train runs)" if thp == "1" else "(torch's default pages)"))
    return lines


@pytest.fixture(scope="session")
def device():
    """The device under benchmark: the GPU when there is one, else the CPU."""
    return bench_device()


@pytest.fixture(scope="session")
def ceilings(device):
    """This machine's copy bandwidth and matmul rate, each measured once per session on first use."""
    return Ceilings(device)


@pytest.fixture(scope="session")
def settings(request, device):
    config = request.config
    max_time = config.getoption("--bench-max-time")
    if device.type == "cuda":
        return BenchSettings(max_time=0.1 if max_time is None else max_time, min_rounds=10, min_round_s=1e-3,
                             memory_budget=4 * 2**30, check=not config.getoption("--bench-no-check"))
    # A shared CPU stalls now and then: cap the rounds so a slow spell cannot stretch one benchmark.
    return BenchSettings(max_time=0.5 if max_time is None else max_time, min_rounds=3, max_rounds=50,
                         min_round_s=0.0,
                         memory_budget=2**29, check=not config.getoption("--bench-no-check"))


@pytest.fixture(autouse=True)
def _within_budget(request):
    budget = request.config.getoption("--bench-budget")
    if budget is not None and time.monotonic() - _START > budget:
        pytest.skip(f"--bench-budget of {budget:.0f} s for the whole run is spent")
