"""``gpt2 train``: schedule, optimizer groups, outputs, exact resume, Ctrl-C, NaN stop and bad input.

Runs use the ``tiny`` preset on a small synthetic token shard (a random Markov chain over the
tiny vocabulary, so the loss has something to learn) with the torch backend, through
``gpt2.cli.main`` exactly as the command line would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2 import train
from gpt2.cli import build_parser, main
from gpt2.data import write_shard
from gpt2.model import GPT, GPTConfig
from gpt2.options import TrainOptions, given_options, load_options, resolve_options

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_shard(path: Path, n: int = 20_000, vocab: int = 512, seed: int = 0) -> Path:
    """A .bin shard of a random order-1 Markov chain: each token has 4 possible successors."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, size=(vocab, 4))
    toks = np.empty(n, dtype=np.int64)
    toks[0] = 1
    choice = rng.integers(0, 4, size=n)
    for i in range(1, n):
        toks[i] = succ[toks[i - 1], choice[i]]
    write_shard(path, toks)
    return path


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return make_shard(tmp_path_factory.mktemp("data") / "toy.bin")


def tiny_args(shard: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(shard), "--backend", "torch", "--device", "cpu",
            "--batch-size", "4", "--block-size", "32", "--max-iters", "12", "--warmup-iters", "2",
            "--lr", "3e-3", "--min-lr", "3e-4", "--eval-interval", "8", "--eval-iters", "2", "--log-interval", "4",
            "--sample-tokens", "0", "--out-dir", str(out), *extra]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]


# ----------------------------------------------------------------------------- pieces


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    o = TrainOptions(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    lrs = [train.lr_at(s, o) for s in range(101)]
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))  # linear warmup rises
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert lrs[10] == pytest.approx(1e-3)  # peak right after warmup
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))  # then never rises
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert lrs[100] == pytest.approx(1e-4)


def test_weight_decay_only_on_2d_weights():
    model = GPT(GPTConfig.from_preset("tiny"), backend="torch")
    opt = train.make_optimizer(model, TrainOptions(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied embedding counted once


def test_config_file_and_flags_merge(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"batch-size": 3, "lr": 1e-3, "max_iters": 7}))
    args = build_parser().parse_args(["train", "--config", str(cfg), "--lr", "2e-3"])
    o = resolve_options(given_options(args), {"batch_size": 5, "eval_iters": 3, "out_dir": "elsewhere"})
    assert o.batch_size == 3 and o.max_iters == 7  # from the file, over the checkpoint's
    assert o.lr == 2e-3  # the command line wins
    assert o.eval_iters == 3  # the checkpoint's, where nothing else says
    assert o.out_dir == TrainOptions().out_dir  # a session-only option is never inherited
    assert resolve_options(given_options(args)).eval_iters == TrainOptions().eval_iters  # untouched default
    cfg.write_text(json.dumps({"batch_sise": 3}))
    with pytest.raises(ValueError, match="unknown option 'batch_sise'"):
        given_options(build_parser().parse_args(["train", "--config", str(cfg)]))
    cfg.write_text(json.dumps({"batch_size": 2.5}))
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1 or auto, got 2.5"):
        resolve_options(given_options(build_parser().parse_args(["train", "--config", str(cfg)])))


# ----------------------------------------------------------------------------- runs


def test_train_writes_checkpoint_metrics_plot_and_learns(shard, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(shard, out, "--max-iters", "16", "--sample-tokens", "8")) == 0
    printed = capsys.readouterr().out
    for word in ("step 16/16", "loss", "lr", "tok/s", "mfu n/a", "peak mem", "sample"):
        assert word in printed
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 16
    assert set(ckpt["data"]) == {"train", "val"} and ckpt["model_config"]["n_embd"] == 64
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"][0])
    recs = read_metrics(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in steps)
    evals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    assert [s for s, _ in evals] == [0, 8, 16]
    assert evals[-1][1] < evals[0][1] - 0.05  # it learns
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grad_accum_matches_one_big_batch(shard, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # float32: bf16 autocast (auto on a CPU with native bf16) rounds the two batchings differently.
    common = ("--max-iters", "4", "--dtype", "float32")
    assert main(tiny_args(shard, a, *common, "--batch-size", "4")) == 0
    assert main(tiny_args(shard, b, *common, "--batch-size", "2", "--grad-accum", "2")) == 0
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == len(lb) == 4
    for (_, x), (_, y) in zip(la, lb):
        assert abs(x - y) < 1e-5


def test_resume_is_bit_exact(shard, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # With dropout, the torch RNG must resume exactly too.
    common = ("--max-iters", "20", "--dropout", "0.1", "--eval-interval", "10")
    assert main(tiny_args(shard, straight, *common)) == 0
    assert main(tiny_args(shard, split, *common, "--stop-at", "10")) == 0
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 10
    assert "stopped at step 10" in capsys.readouterr().out
    # Simulate a crash after the checkpoint: lines past step 10 must go, the rest stay as written.
    before = (split / "metrics.jsonl").read_text()
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 11, "loss": 9.9}) + "\n" + '{"step": 12, "lo')
    assert main(["train", "--resume", "--out-dir", str(split)]) == 0  # every other option from the checkpoint
    assert train_losses(split) == train_losses(straight)  # float equality: bit for bit
    assert (split / "metrics.jsonl").read_text().startswith(before)
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    val = [r for r in read_metrics(split) if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 10, 20]


def test_nan_loss_stops_without_touching_checkpoint(shard, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(shard, out, "--stop-at", "3")) == 0
    good = (out / "ckpt.pt").read_bytes()
    # An absurd learning rate blows the weights up within a step or two.
    assert main(["train", "--resume", "--out-dir", str(out), "--lr", "1e30", "--warmup-iters", "0"]) == 1
    msg = capsys.readouterr().out
    assert "stopping" in msg and ("nan" in msg or "inf" in msg)
    assert (out / "ckpt.pt").read_bytes() == good


def test_ctrl_c_saves_and_resume_continues(shard, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpt2", *tiny_args(shard, out, "--max-iters", "100000", "--log-interval", "1",
                                                     "--eval-interval", "100000")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step 2/"):
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted; saved step" in rest
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 2
    assert max(s for s, _ in train_losses(out)) == step
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", str(step + 2)]) == 0
    assert [s for s, _ in train_losses(out)] == list(range(1, step + 3))


# ----------------------------------------------------------------------------- bad input


def _fails(argv, capsys, *needles, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gpt2 train: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_data_paths(tmp_path, capsys):
    _fails(tiny_args(tmp_path / "nope", tmp_path / "o"), capsys, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(tiny_args(empty, tmp_path / "o"), capsys, "holds no")
    (empty / "a.txt").write_text("  \n")
    _fails(tiny_args(empty, tmp_path / "o"), capsys, "holds no text")
    assert not (tmp_path / "o").exists()


def test_batch_and_block_that_do_not_fit(shard, tmp_path, capsys):
    small = make_shard(tmp_path / "small.bin", n=300)
    _fails(tiny_args(small, tmp_path / "o", "--batch-size", "16"), capsys, "does not fit", "--batch-size")
    _fails(tiny_args(shard, tmp_path / "o", "--block-size", "65"), capsys, "--block-size 65", "context of 64")
    _fails(tiny_args(shard, tmp_path / "o", "--batch-size", "0"), capsys, "--batch-size must be")
    assert not (tmp_path / "o").exists()


def test_dtype_the_device_lacks(shard, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    _fails(tiny_args(shard, tmp_path / "o", "--dtype", "bfloat16"), capsys, "--dtype bfloat16", "no native bfloat16")
    assert not (tmp_path / "o").exists()


@pytest.fixture()
def trained(shard, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(shard, out, "--max-iters", "2")) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    return out, files


def _unchanged(out: Path, files: dict) -> None:
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_resume_errors_leave_the_run_intact(shard, tmp_path, trained, capsys):
    out, files = trained
    _fails(["train", "--resume", "--out-dir", str(tmp_path / "empty")], capsys, "no checkpoint")
    _fails(["train", "--resume", "--out-dir", str(out), "--preset", "shakespeare"], capsys, "another shape",
           "n_embd=64 (asked 128)")
    _fails(tiny_args(shard, out), capsys, "already holds a checkpoint", "--resume")
    _unchanged(out, files)


def test_resume_takes_every_option_from_the_checkpoint_once(trained):
    """A resumed run's options are the checkpoint's (device included: torchrun set up its process group from a
    second, checkpoint-less resolution, and put a CPU run's ranks on GPUs), except the session-only ones."""
    out, _ = trained
    opts, ckpt = load_options(build_parser().parse_args(["train", "--resume", "--out-dir", str(out),
                                                         "--max-iters", "3"]))
    assert ckpt["step"] == 2
    assert (opts.device, opts.preset, opts.backend, opts.batch_size) == ("cpu", "tiny", "torch", 4)
    assert opts.max_iters == 3 and opts.resume and opts.out_dir == str(out)


def test_corrupt_checkpoint(tmp_path, trained, capsys):
    out, files = trained
    whole = files["ckpt.pt"]
    for cut in (10, len(whole) // 2, len(whole) - 1):
        (out / "ckpt.pt").write_bytes(whole[:cut])
        files["ckpt.pt"] = (out / "ckpt.pt").read_bytes()
        _fails(["train", "--resume", "--out-dir", str(out)], capsys, "corrupt or truncated")
        _unchanged(out, files)
