"""FSDP2 on the CPU: ``torchrun --nproc_per_node=2 -m gpt2 train --fsdp`` (gloo) follows DDP's losses and gradient
norms with the same global batch, resumes exactly, and writes whole checkpoints that ``gpt2 sample``,
``save_pretrained`` and a run without ``--fsdp`` read.

The torchrun launches (a few seconds each) run once, in the module's ``runs`` fixture; the tests read their outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from train_runs import metric, torchrun

from gpt2.checkpoint import load_checkpoint, load_model
from gpt2.cli import main
from gpt2.data import write_shard
from gpt2.model import GPT

CLIP = 0.5  # below every step's gradient norm here, so clipping (by the norm of the whole gradient) acts each step


def _has_fsdp2() -> bool:
    try:
        from gpt2.runtime import fsdp_api

        fsdp_api()
    except ImportError:
        return False
    return True


pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.skipif(not _has_fsdp2(), reason="FSDP2 (fully_shard) needs torch >= 2.5")]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    # float32: FSDP and DDP are compared to 1e-6, which bf16 autocast (auto on a CPU with native bf16) would not meet.
    return ["train", "--preset", "tiny", "--data", str(data), "--backend", "torch", "--device", "cpu", "--dtype", "float32",
            "--batch-size", "2", "--block-size", "32", "--grad-accum", "2", "--max-iters", "8", "--warmup-iters", "1",
            "--lr", "3e-3", "--grad-clip", str(CLIP), "--eval-interval", "8", "--eval-iters", "1",
            "--log-interval", "1", "--sample-tokens", "0", "--out-dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Five 2-process runs of 8 steps: FSDP in one go, DDP in one go, FSDP with ``--recompute block`` in 4 + 4
    (resumed), and that run's step-4 checkpoint resumed without ``--fsdp``."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = tmp / "toy.bin"
    write_shard(data, np.random.default_rng(0).integers(0, 512, size=8000))
    out = {name: tmp / name for name in ("fsdp", "ddp", "split", "to_ddp")}
    assert "2 processes, FSDP" in torchrun(*_args(data, out["fsdp"], "--fsdp"))
    torchrun(*_args(data, out["ddp"]))
    # The split run also recomputes every block: recompute is exact, so it must still match the others (and its
    # resumed copy without --fsdp runs DDP with recompute).
    split = torchrun(*_args(data, out["split"], "--fsdp", "--recompute", "block", "--stop-at", "4"))
    assert split.count("stopped at step 4") == 1
    shutil.copytree(out["split"], out["to_ddp"])
    # --device cpu again: on a machine with fewer GPUs than processes a GPU default would fail (see test_ddp).
    assert "FSDP" in torchrun("train", "--resume", "--out-dir", str(out["split"]), "--device", "cpu")
    assert "FSDP" not in torchrun("train", "--resume", "--no-fsdp", "--out-dir", str(out["to_ddp"]), "--device",
                                   "cpu")
    return out


def _close(a: list, b: list, tol: float) -> None:
    assert [s for s, _ in a] == [s for s, _ in b], (a, b)
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b))
    assert worst <= tol, f"max difference {worst:.3g} > {tol:g}\n{a}\n{b}"


def _max_diff(x, y) -> float:
    """The largest absolute difference between two (nested) state dicts of the same structure."""
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        return max((_max_diff(x[k], y[k]) for k in x), default=0.0)
    if isinstance(x, (list, tuple)):
        return max((_max_diff(a, b) for a, b in zip(x, y, strict=True)), default=0.0)
    if isinstance(x, torch.Tensor):
        assert x.shape == y.shape
        return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
    assert x == y
    return 0.0


def test_fsdp_follows_ddp(runs):
    losses = metric(runs["fsdp"], "loss")
    assert [s for s, _ in losses] == list(range(1, 9))
    _close(losses, metric(runs["ddp"], "loss"), 1e-5)
    norms = metric(runs["fsdp"], "grad_norm")
    assert min(n for _, n in norms) > CLIP  # clipped every step: the norm is the whole gradient's, not a shard's
    _close(norms, metric(runs["ddp"], "grad_norm"), 1e-5)
    _close(metric(runs["fsdp"], "val_loss"), metric(runs["ddp"], "val_loss"), 1e-5)


def test_fsdp_resume_is_exact(runs):
    _close(metric(runs["split"], "loss"), metric(runs["fsdp"], "loss"), 1e-6)
    whole, split = load_checkpoint(runs["fsdp"]), load_checkpoint(runs["split"])
    assert whole["step"] == split["step"] == 8
    assert _max_diff(whole["model"], split["model"]) <= 1e-6
    assert _max_diff(whole["optimizer"], split["optimizer"]) <= 1e-6


def test_fsdp_checkpoint_resumes_without_fsdp(runs):
    _close(metric(runs["to_ddp"], "loss"), metric(runs["fsdp"], "loss"), 1e-5)
    assert load_checkpoint(runs["fsdp"])["train_args"]["fsdp"] is True
    assert load_checkpoint(runs["to_ddp"])["train_args"]["fsdp"] is False


def test_fsdp_checkpoint_is_whole(runs):
    """The same keys, shapes and optimizer layout as a DDP checkpoint, the tied head stored once."""
    f, d = load_checkpoint(runs["fsdp"]), load_checkpoint(runs["ddp"])
    assert {k: v.shape for k, v in f["model"].items()} == {k: v.shape for k, v in d["model"].items()}
    assert f["model"]["lm_head.weight"].data_ptr() == f["model"]["transformer.wte.weight"].data_ptr()
    impl = ("foreach", "fused")  # which AdamW kernels ran: foreach on FSDP's CPU shards, fused for DDP on the CPU
    groups = [[{k: v for k, v in g.items() if k not in impl} for g in c["optimizer"]["param_groups"]] for c in (f, d)]
    assert groups[0] == groups[1]
    assert _max_diff(f["optimizer"]["state"], d["optimizer"]["state"]) < 1e-6


def test_fsdp_checkpoint_samples_and_exports(runs, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(runs["fsdp"]), "--max-new-tokens", "4", "--device", "cpu",
                 "--backend", "torch", "--prompt", "a b"]) == 0  # ids 64 275: in the tiny vocabulary
    assert capsys.readouterr().out.startswith("a b")
    model, ckpt = load_model(runs["fsdp"], backend="torch")
    model.save_pretrained(tmp_path / "hf")
    again = GPT.from_pretrained(str(tmp_path / "hf"), backend="torch")
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k], rtol=0, atol=0, msg=k)


def test_fsdp_needstorchrun(tmp_path, capsys):
    data = tmp_path / "toy.bin"
    write_shard(data, np.random.default_rng(0).integers(0, 512, size=4000))
    assert main(_args(data, tmp_path / "out", "--fsdp")) == 2
    assert "--fsdp shards the model over the processes of a torchrun launch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fsdp_refuses_float16():
    from gpt2.runtime import Runtime

    rt = Runtime(torch.device("cpu"), torch.float16, distributed=True)  # refused before any process group is used
    with pytest.raises(ValueError, match="--fsdp does not support float16"):
        rt.shard(torch.nn.Linear(2, 2), [])


def test_fsdp_refuses_eval_hellaswag():
    from gpt2.options import TrainOptions

    with pytest.raises(ValueError, match="--eval-hellaswag is not supported with --fsdp"):
        TrainOptions(fsdp=True, eval_hellaswag="hs.jsonl")
    TrainOptions(fsdp=True, eval_hellaswag="")  # '' turns it off in a resumed run
