"""DDP on the CPU: ``torchrun --nproc_per_node=2 -m gpt2 train`` (gloo) follows the same loss curve
as one process with the same global batch, and its checkpoint resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from train_runs import metric, torchrun

from gpt2.cli import main
from gpt2.data import write_shard

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


def _args(data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    # float32: the runs are compared to 1e-6, which bf16 autocast (auto on a CPU with native bf16) would not meet.
    return ["train", "--preset", "tiny", "--data", str(data), "--backend", "torch", "--device", "cpu", "--dtype", "float32",
            "--batch-size", str(batch), "--block-size", "32", "--grad-accum", "2", "--max-iters", "5",
            "--warmup-iters", "1", "--lr", "3e-3", "--eval-interval", "5", "--eval-iters", "2", "--sample-tokens", "0",
            "--out-dir", str(out), *extra]


def test_two_gloo_processes_match_one(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "toy.bin"
    write_shard(data, rng.integers(0, 512, size=8000))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(data, one, 4)) == 0
    assert torchrun(*_args(data, two, 2, "--stop-at", "3")).count("stopped at step 3") == 1  # only rank 0 speaks
    # Resume with the same world size. --device cpu (gloo) explicitly: on a machine with fewer GPUs than
    # processes, a GPU default would put rank 1 on a GPU it does not have (the checkpoint says cpu too).
    torchrun("train", "--resume", "--out-dir", str(two), "--device", "cpu")
    a, b = metric(one, "loss"), metric(two, "loss")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5]
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-5, (a, b)
    (sa, va), (sb, vb) = metric(one, "val_loss")[-1], metric(two, "val_loss")[-1]
    assert sa == sb == 5 and abs(va - vb) < 1e-5
