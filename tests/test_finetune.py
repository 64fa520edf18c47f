"""``gpt2 train --init-from DIR`` (fine-tuning from a Hugging Face GPT-2 folder or one of our out dirs) and
``--eval-hellaswag FILE``, through ``gpt2.cli.main`` as the command line would run them.

The Hugging Face source is a randomly initialised ``transformers.GPT2LMHeadModel`` of GPT-2's vocabulary (50257,
padded to 50304 rows in our model) and a tiny body, written with ``save_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_runs import metric, records

from gpt2.checkpoint import load_model
from gpt2.cli import main
from gpt2.data import write_shard
from gpt2.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50257
HF_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}


def save_hf(folder: Path, seed: int) -> Path:
    """A random transformers GPT-2 of GPT-2's vocabulary and a tiny body, saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, **HF_SHAPE)).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf") / "gpt2-tiny", seed=0)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """Token ids over GPT-2's whole vocabulary, from a random order-1 chain (4 successors per token)."""
    rng = np.random.default_rng(0)
    succ = rng.integers(0, VOCAB, size=(VOCAB, 4))
    toks = np.empty(6000, dtype=np.int64)
    toks[0] = 1
    for i, c in enumerate(rng.integers(0, 4, size=len(toks) - 1), start=1):
        toks[i] = succ[toks[i - 1], c]
    path = tmp_path_factory.mktemp("data") / "toy.bin"
    write_shard(path, toks)
    return path


def ft_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--backend", "torch", "--device", "cpu", "--batch-size", "2",
            "--block-size", "32", "--max-iters", "3", "--warmup-iters", "0", "--lr", "3e-3", "--min-lr", "3e-4",
            "--eval-interval", "100", "--eval-iters", "1", "--log-interval", "1", "--sample-tokens", "0",
            "--out-dir", str(out), *extra]


def ckpt_of(out: Path) -> dict:
    return torch.load(out / "ckpt.pt", weights_only=True)


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, VOCAB, (3, 41), generator=g)
    return idx[:, :-1], idx[:, 1:]


def our_loss(model: GPT) -> float:
    x, y = fixed_batch()
    with torch.no_grad():
        return float(model.eval()(x, y)[1])


def assert_close(a: float, b: float, rel: float = 1e-5) -> None:
    assert abs(a - b) <= rel * abs(b), f"{a} vs {b}: rel diff {abs(a - b) / abs(b):.2e} > {rel:.0e}"


@pytest.fixture(scope="module")
def finetuned(hf_dir, shard, tmp_path_factory) -> Path:
    """One step from the Hugging Face folder at a negligible learning rate (and no weight decay)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    assert main(ft_args(shard, out, "--init-from", str(hf_dir), "--max-iters", "1", "--lr", "1e-12",
                        "--min-lr", "0", "--weight-decay", "0")) == 0
    return out


# ----------------------------------------------------------------------------- the weights arrive intact


@pytest.fixture(scope="module")
def hf_loss(hf_dir) -> float:
    """transformers' own loss of the source model on ``fixed_batch``."""
    from transformers import GPT2LMHeadModel

    x, y = fixed_batch()
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return float(F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()))


def test_init_from_hf_keeps_the_source_model(hf_dir, finetuned, hf_loss):
    ckpt = ckpt_of(finetuned)
    assert ckpt["step"] == 1 and ckpt["train_args"]["init_from"] == str(hf_dir)
    assert ckpt["model_config"]["vocab_size"] == VOCAB and ckpt["model_config"]["n_embd"] == 64
    assert ckpt["model"]["transformer.wte.weight"].shape[0] == GPTConfig(vocab_size=VOCAB).padded_vocab_size
    tuned, _ = load_model(finetuned, backend="torch")
    source_loss = our_loss(GPT.from_pretrained(str(hf_dir), backend="torch"))
    assert_close(source_loss, hf_loss)
    assert_close(our_loss(tuned), hf_loss)
    # Not a coincidence of scale: a model of the same shape with other weights is far off.
    torch.manual_seed(1)
    assert abs(our_loss(GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64, block_size=64),
                            backend="torch")) - hf_loss) > 1e-3


def test_gpt2_eval_of_the_finetune_equals_gpt2_eval_of_the_source(hf_dir, shard, finetuned, tmp_path):
    """The issue's proof, through the command line: ``gpt2 eval --ckpt`` of the one-step fine-tune and
    ``gpt2 eval --pretrained`` of its source agree, on the same shard and windows."""
    results = []
    for source in (["--pretrained", str(hf_dir)], ["--ckpt", str(finetuned)]):
        out = tmp_path / f"eval{len(results)}.json"
        assert main(["eval", *source, "--data", str(shard), "--stride", "32", "--backend", "torch",
                     "--device", "cpu", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["tokens"] == results[1]["tokens"] == 5999
    assert_close(results[1]["loss"], results[0]["loss"])


def test_loaded_model_trains_like_a_fresh_one(shard, tmp_path, capsys):
    """The shakespeare preset (GPT-2's 50257-token vocabulary, padded to 50304) as freshly built, then the same
    weights through our out dir and through a Hugging Face export: three runs, one loss curve."""
    fresh, src, export = tmp_path / "fresh", tmp_path / "src", tmp_path / "hf"
    preset = ("--preset", "shakespeare")
    assert main(ft_args(shard, fresh, *preset)) == 0
    assert main(ft_args(shard, src, *preset, "--max-iters", "0")) == 0  # the fresh weights, saved untrained
    load_model(src, backend="torch")[0].save_pretrained(export)
    # The same preset as the source's shape is fine.
    assert main(ft_args(shard, tmp_path / "from_ours", "--init-from", str(src), *preset)) == 0
    assert main(ft_args(shard, tmp_path / "from_hf", "--init-from", str(export))) == 0
    assert "gpt2 train: --init-from" in capsys.readouterr().out
    want = metric(fresh, "loss")
    assert [s for s, _ in want] == [1, 2, 3]
    for run in ("from_ours", "from_hf"):
        got = metric(tmp_path / run, "loss")
        assert [s for s, _ in got] == [1, 2, 3]
        for (_, a), (_, b) in zip(got, want):
            assert_close(a, b, 1e-6)


def test_init_from_our_out_dir_starts_a_fresh_optimizer(shard, finetuned, hf_loss, tmp_path):
    out = tmp_path / "again"
    assert main(ft_args(shard, out, "--init-from", str(finetuned), "--max-iters", "2", "--lr", "2e-12",
                        "--min-lr", "0", "--weight-decay", "0")) == 0
    ckpt = ckpt_of(out)
    assert ckpt["step"] == 2 and ckpt["train_args"]["init_from"] == str(finetuned)
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {2}  # AdamW's own count: fresh moments, not the source's
    assert ckpt["train_args"]["lr"] == 2e-12  # this run's options, not the source's
    # The first evaluation (step 0, the same validation batches) sees the source's weights, and they are still
    # the Hugging Face model's after three steps at a negligible rate.
    assert metric(out, "val_loss")[0] == (0, metric(finetuned, "val_loss")[-1][1])
    assert_close(our_loss(load_model(out, backend="torch")[0]), hf_loss)


# ----------------------------------------------------------------------------- resume


def test_resume_continues_the_finetune_not_the_source(hf_dir, shard, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(hf_dir, source)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(ft_args(shard, straight, "--init-from", str(source))) == 0
    capsys.readouterr()
    # --resume with --init-from: the first session starts the fine-tune, since the out dir has no checkpoint yet.
    assert main(ft_args(shard, split, "--init-from", str(source), "--stop-at", "1", "--resume")) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    save_hf(source, seed=1)  # other weights at the source from now on
    assert main(["train", "--resume", "--out-dir", str(split), "--init-from", str(source)]) == 0
    err = capsys.readouterr().err
    assert f"--init-from is ignored (the run started from {source})" in err
    assert metric(split, "loss") == metric(straight, "loss")  # bit for bit: the source was not read again
    assert ckpt_of(split)["train_args"]["init_from"] == str(source)
    assert ckpt_of(split)["step"] == 3


# ----------------------------------------------------------------------------- bad input


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gpt2 train: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_a_preset_of_another_shape_is_refused(hf_dir, shard, finetuned, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(ft_args(shard, out, "--init-from", str(hf_dir), "--preset", "tiny"), capsys, "--preset tiny",
           "vocab_size=50257 (asked 512)")
    _fails(ft_args(shard, out, "--init-from", str(hf_dir), "--preset", "shakespeare"), capsys,
           "n_layer=2 (asked 4)", "n_embd=64 (asked 128)", "block_size=64 (asked 128)")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"preset": "gpt2"}))  # a config file's preset is asked for too
    _fails(ft_args(shard, out, "--init-from", str(finetuned), "--config", str(config)), capsys, "n_layer=2 (asked 12)")
    assert not out.exists()


def test_bad_sources_fail_in_one_line_writing_nothing(hf_dir, shard, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(ft_args(shard, out, "--init-from", str(tmp_path / "missing")), capsys, "missing: no such folder")
    bert = tmp_path / "bert"
    shutil.copytree(hf_dir, bert)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30522}))
    _fails(ft_args(shard, out, "--init-from", str(bert)), capsys, "'bert' model, not a GPT-2")
    bare = tmp_path / "bare"
    bare.mkdir()
    _fails(ft_args(shard, out, "--init-from", str(bare)), capsys, "neither a training out dir")
    shutil.copy(hf_dir / "config.json", bare / "config.json")
    _fails(ft_args(shard, out, "--init-from", str(bare)), capsys, "no weights (model.safetensors or pytorch_model")
    (bare / "model.safetensors").write_bytes(b"\x00not safetensors")
    _fails(ft_args(shard, out, "--init-from", str(bare)), capsys, "corrupt or truncated")
    _fails(ft_args(shard, out, "--init-from", str(hf_dir / "model.safetensors")), capsys, "expected a folder")
    # GPT-2's tokenizer cannot serve a 512-token model: text data needs ids far beyond it.
    small = tmp_path / "small"
    GPT(GPTConfig.from_preset("tiny"), backend="torch").save_pretrained(small)
    text = tmp_path / "book.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    _fails(ft_args(text, out, "--init-from", str(small)), capsys, "outside the model's vocabulary of 512",
           f"--init-from {small}")
    assert not out.exists()


# ----------------------------------------------------------------------------- --eval-hellaswag


def hellaswag_file(path: Path, n: int = 6) -> Path:
    rows = [{"ctx": f"A man walks his dog number {i}. Then he", "label": i % 4,
             "endings": ["sits down.", "runs to the park.", "eats an apple.", "goes home again."]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_hellaswag_is_recorded_at_every_evaluation(hf_dir, shard, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(ft_args(shard, out, "--init-from", str(hf_dir), "--max-iters", "2", "--eval-interval", "1",
                        "--eval-hellaswag", str(hellaswag_file(tmp_path / "hs.jsonl")))) == 0
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert 0 <= r["hellaswag_acc"] <= 1 and 0 <= r["hellaswag_acc_norm"] <= 1
        assert r["hellaswag_acc"] * 6 == pytest.approx(round(r["hellaswag_acc"] * 6))  # a count of 6 examples
    assert "hellaswag" in capsys.readouterr().out
    # The same model and examples scored directly agree with the step-2 record.
    from gpt2.hellaswag import load_hellaswag, score_hellaswag

    model, _ = load_model(out, backend="torch")
    direct = score_hellaswag(model, load_hellaswag(tmp_path / "hs.jsonl"))
    assert (evals[-1]["hellaswag_acc"], evals[-1]["hellaswag_acc_norm"]) == (direct["accuracy"],
                                                                              direct["accuracy_norm"])


def test_a_bad_hellaswag_file_fails_before_training(hf_dir, shard, tmp_path, capsys):
    out = tmp_path / "o"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n')
    _fails(ft_args(shard, out, "--init-from", str(hf_dir), "--eval-hellaswag", str(bad)), capsys, "bad.jsonl:1")
    _fails(ft_args(shard, out, "--init-from", str(hf_dir), "--eval-hellaswag", str(tmp_path / "none.jsonl")), capsys,
           "does not exist")
    # A file this model cannot score: GPT-2's tokens are outside the tiny preset's 512-token vocabulary.
    tiny = tmp_path / "tiny.bin"
    write_shard(tiny, np.arange(4000) % 512)
    _fails(ft_args(tiny, out, "--preset", "tiny", "--eval-hellaswag", str(hellaswag_file(tmp_path / "hs.jsonl"))),
           capsys, "outside the model's vocabulary of 512")
    assert not out.exists()
