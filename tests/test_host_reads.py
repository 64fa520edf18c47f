"""The training loop reads device values on the host only where a log line, an evaluation or a checkpoint needs
them: every ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``.tolist()`` or synchronize on a GPU tensor
stalls the launch queue.

The reads are counted on the CPU, where they cost nothing, because the test is about the code path: every such
call whose caller is a file of this project (``gpt2/``, ``kernels/``) counts, whatever the device.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2
import gpt2_kernels.registry
from gpt2.cli import main
from gpt2.data import write_shard

OURS = tuple(str(Path(m.__file__).resolve().parent) for m in (gpt2, gpt2_kernels.registry))
# Tensor methods that hand a device value to the host.
READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__index__", "__bool__", "__format__")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def host_reads(monkeypatch) -> Counter:
    """Count host reads made from the project's own files, by ``file:line``."""
    counts: Counter = Counter()

    def counted(fn, name):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if str(Path(caller).resolve()).startswith(OURS):
                counts[f"{name} at {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), name))
    monkeypatch.setattr(torch.cuda, "synchronize", counted(torch.cuda.synchronize, "torch.cuda.synchronize"))
    return counts


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.bin"
    write_shard(path, np.random.default_rng(0).integers(0, 512, size=20_000))
    return path


def _train(shard: Path, out: Path, steps: int, log_interval: int, *extra: str) -> None:
    argv = ["train", "--preset", "tiny", "--data", str(shard), "--backend", "torch", "--device", "cpu",
            "--batch-size", "2", "--block-size", "16", "--max-iters", str(steps), "--warmup-iters", "2",
            "--log-interval", str(log_interval), "--eval-interval", "100000", "--eval-iters", "1",
            "--sample-tokens", "0", "--out-dir", str(out), *extra]
    assert main(argv) == 0


@pytest.mark.parametrize("extra", [(), ("--grad-accum", "2", "--grad-clip", "0")], ids=["clip", "accum-noclip"])
def test_host_reads_only_at_log_lines_evaluations_and_checkpoints(shard, tmp_path, capsys, host_reads, extra):
    steps, k = 24, 8
    _train(shard, tmp_path / "run", steps, k, *extra)
    printed = capsys.readouterr().out
    log_lines = len(re.findall(r"^step \d+/", printed, flags=re.MULTILINE))
    evals = len(re.findall(r"^eval step", printed, flags=re.MULTILINE))
    assert (log_lines, evals) == (4, 2), printed  # steps 1, 8, 16, 24; evaluations at 0 and 24 (each saves)
    reads = sum(host_reads.values())
    budget = (log_lines + 2 * evals) * 2  # each evaluation also writes a checkpoint
    assert reads <= budget, f"{reads} host reads in {steps} steps (budget {budget}): {dict(host_reads)}"


def test_the_counter_sees_a_read_from_the_project(host_reads):
    from gpt2 import metrics

    class _Rt:
        ddp, world, device = False, 1, torch.device("cpu")

        @staticmethod
        def all_sum(x):
            return x

    pending = metrics.PendingSteps()
    pending.add(1, torch.tensor(2.0), None, 0.1, 0.0)
    records, stop = pending.read(_Rt, False)
    assert records[0].loss == 2.0 and not stop
    assert sum(host_reads.values()) == 1 and "tolist" in next(iter(host_reads))
