"""Activation recompute (``GPT(..., recompute=mode)``, ``gpt2 train --recompute``): every mode gives the loss and
gradients of ``none`` under every backend that runs here, dropout included; it drops the activations saved for the
backward; it never runs outside training with grad; and the training command records and resumes it.

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` around the forward: every tensor autograd
saves passes the outer pack hook unless a checkpointed region's own hooks take it (those are the dropped ones; the
region's inputs are saved through the outer hook). Tensors are grouped by storage, so views of one buffer (q, k, v of
one qkv matmul; a tensor saved by two ops) count once, and the parameters' storages (weights, their casts to the same
dtype, the tied head's slice) are left out: what remains is the activations' memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from train_runs import metric

from gpt2.cli import main
from gpt2.data import write_shard
from gpt2.model import GPT, RECOMPUTE_MODES, GPTConfig

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:gpt2_kernels.ext.attention:UserWarning")]  # ext: dropout falls back


def test_modes_and_set_recompute():
    assert RECOMPUTE_MODES == ("none", "attn", "mlp", "block")
    cfg = GPTConfig.from_preset("tiny")
    model = GPT(cfg, backend="torch")
    assert model.recompute == "none"
    assert GPT(cfg, backend="torch", recompute="mlp").recompute == "mlp"
    assert model.set_recompute("block") is model and model.recompute == "block"
    with pytest.raises(ValueError, match="unknown recompute mode 'blocks'; modes are none, attn, mlp, block"):
        model.set_recompute("blocks")
    with pytest.raises(ValueError, match="modes are none, attn, mlp, block"):
        GPT(cfg, backend="torch", recompute="all")
    assert model.recompute == "block"  # a refused mode changes nothing


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list:
    """Each call of torch.utils.checkpoint.checkpoint (the model's only way to recompute), still doing its work."""
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


def _loss_and_grads(model: GPT, idx, tgt, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks (and the Triton attention's dropout seed) come from here
    _, loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_rel_close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3e}, {err / max(scale, 1e-30):.3e} relative (> {rel})"


@pytest.mark.usefixtures("highest_fp32_matmul")
def test_every_mode_matches_none(backend, checkpoint_calls):
    """fp32 on the test device, dropout 0.1 on the embeddings, attention weights and both residual branches."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the ``backend`` fixture found it runs
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", block_size=32, dropout=0.1)
    model = GPT(cfg, backend=backend).to(device)
    g = torch.Generator().manual_seed(1)
    idx, tgt = (torch.randint(0, 512, (1, 17), generator=g).to(device) for _ in range(2))
    loss0, grads0 = _loss_and_grads(model, idx, tgt, seed=7)
    other, _ = _loss_and_grads(model, idx, tgt, seed=8)
    assert abs(other.item() - loss0.item()) > 1e-4  # dropout is on: a mask that was not replayed would show
    for mode in RECOMPUTE_MODES[1:]:
        checkpoint_calls.clear()
        loss, grads = _loss_and_grads(model.set_recompute(mode), idx, tgt, seed=7)
        assert len(checkpoint_calls) == cfg.n_layer, mode  # one region per block, really recomputed
        assert all(c["use_reentrant"] is False and c["preserve_rng_state"] for c in checkpoint_calls)
        _assert_rel_close(loss, loss0, f"{backend} {mode}: loss")
        for name, g0 in grads0.items():
            _assert_rel_close(grads[name], g0, f"{backend} {mode}: grad of {name}")


def _saved(model: GPT, idx, tgt) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the unique non-parameter storages saved for the backward, and the shapes of the tensors saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, shapes = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s  # held until counted, so no address is reused meanwhile
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, tgt)
    total = sum(s.nbytes() for s in storages.values())
    loss.backward()  # the recompute works with what was kept
    return total, shapes


@pytest.mark.parametrize("backend_name", ["torch", "ext"])
def test_saved_bytes_drop(backend_name, capsys):
    from gpt2_kernels.registry import unavailable_reason

    if (why := unavailable_reason(backend_name, "cpu")) is not None:
        pytest.skip(f"backend {backend_name!r} cannot run on cpu here: {why}")
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=384)  # the logits are not 4C wide
    model = GPT(cfg, backend=backend_name)
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 384, (4, 128), generator=g), torch.randint(0, 384, (4, 128), generator=g)
    saved, kept = {}, {}
    for mode in RECOMPUTE_MODES:
        saved[mode], shapes = _saved(model.set_recompute(mode), idx, tgt)
        # Which big activations are still kept: attention's (B, nh, T, *) tensors, the MLP's (..., 4C) hidden.
        kept[mode] = {"attn": any(len(sh) == 4 for sh in shapes), "mlp": any(len(sh) > 1 and sh[-1] == 4 * 128 for sh in shapes)}
    assert kept == {"none": {"attn": True, "mlp": True}, "attn": {"attn": False, "mlp": True},
                    "mlp": {"attn": True, "mlp": False}, "block": {"attn": False, "mlp": False}}
    pct = {mode: 100 * b / saved["none"] for mode, b in saved.items()}
    with capsys.disabled():
        print(f"\nsaved for backward, {backend_name}, B=4 T=128 C=128 L=4 fp32: none {saved['none'] / 2**20:.1f} MiB; "
              + ", ".join(f"{m} {p:.1f}%" for m, p in pct.items()))
    assert pct["block"] <= 35
    assert pct["block"] < min(pct["attn"], pct["mlp"]) and max(pct["attn"], pct["mlp"]) < 100


def test_no_recompute_outside_training_with_grad(checkpoint_calls):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", block_size=32)
    plain = GPT(cfg, backend="torch")
    model = GPT(cfg, backend="torch", recompute="block")
    model.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 512, (2, 9))
    _, loss = model(idx, idx)
    loss.backward()
    assert len(checkpoint_calls) == cfg.n_layer  # the spy sees recompute when it is on
    checkpoint_calls.clear()
    with torch.no_grad():
        model(idx, idx)  # training mode, no grad
    model.eval()
    logits, _ = model(idx)
    torch.testing.assert_close(logits, plain.eval()(idx)[0], rtol=0, atol=0)
    out = model.generate(idx[:, :3], 6, greedy=True)
    assert torch.equal(out, plain.generate(idx[:, :3], 6, greedy=True))
    model.train()
    with torch.inference_mode():
        model.generate(idx[:, :3], 4, greedy=True)  # kv-cache decoding in training mode
    assert checkpoint_calls == []


# ----------------------------------------------------------------------------- gpt2 train --recompute


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--backend", "torch", "--device", "cpu",
            "--batch-size", "2", "--block-size", "32", "--max-iters", "4", "--warmup-iters", "1", "--dropout", "0.1",
            "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1", "--sample-tokens", "0",
            "--out-dir", str(out), *extra]


def test_train_recompute_block_matches_none_and_resumes(tmp_path, capsys):
    data = tmp_path / "toy.bin"
    write_shard(data, np.random.default_rng(0).integers(0, 512, size=4000))
    none, block, split = tmp_path / "none", tmp_path / "block", tmp_path / "split"
    assert main(_args(data, none)) == 0
    assert main(_args(data, block, "--recompute", "block")) == 0
    assert "recompute block" in capsys.readouterr().out
    assert [s for s, _ in metric(block, "loss")] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(metric(none, "loss"), metric(block, "loss")):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert main(_args(data, split, "--recompute", "block", "--stop-at", "2")) == 0
    assert torch.load(split / "ckpt.pt", weights_only=True)["train_args"]["recompute"] == "block"
    assert main(["train", "--resume", "--out-dir", str(split)]) == 0  # the mode comes from the checkpoint
    assert "recompute block" in capsys.readouterr().out
    assert metric(split, "loss") == metric(block, "loss")
    assert json.loads((split / "config.json").read_text())["train"]["recompute"] == "block"


def test_train_bad_recompute_is_one_line(tmp_path, capsys):
    assert main(_args(tmp_path / "missing.bin", tmp_path / "out", "--recompute", "blocks")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gpt2 train: error: --recompute must be one of none, attn, mlp, block, got 'blocks'"
    assert not (tmp_path / "out").exists()
