"""Checkpoints: atomic writes that never damage the previous file, loud loads, RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gpt2.checkpoint import (
    CheckpointError,
    atomic_write,
    check_same_shape,
    load_checkpoint,
    load_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gpt2.model import GPT, ConfigError, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model: GPT, step: int = 3) -> dict:
    from dataclasses import asdict

    return {"model": model.state_dict(), "model_config": asdict(model.config), "step": step}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny"), backend="torch")


def test_round_trip_and_load_model(tmp_path, model):
    save_checkpoint(tmp_path / "ckpt.pt", _state(model))
    ckpt = load_checkpoint(tmp_path)  # a folder means its ckpt.pt
    assert ckpt["step"] == 3
    loaded, _ = load_model(tmp_path, backend="torch")
    idx = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], loaded(idx)[0])
    # The tied output layer is still tied after loading.
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_failed_save_leaves_previous_checkpoint_and_no_temp_files(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(model))
    good = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full halfway")

    with pytest.raises(RuntimeError, match="disk full halfway"):
        save_checkpoint(path, {**_state(model, step=4), "zzz": Unpicklable()})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]

    def write_then_fail(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write_then_fail)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_broken_files_raise_one_clear_error(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(path)
    save_checkpoint(path, _state(model))
    whole = path.read_bytes()
    for cut in (0, 7, len(whole) // 3, len(whole) - 10):
        path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(path)
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(2)}, path)  # a torch file, but not a training checkpoint
    with pytest.raises(CheckpointError, match="not a gpt2 training checkpoint"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_fields():
    a = GPTConfig.from_preset("tiny")
    check_same_shape(a, GPTConfig.from_preset("tiny", dropout=0.2))  # dropout is not shape
    with pytest.raises(ConfigError, match=r"n_layer=2 \(asked 3\).*n_embd=64 \(asked 96\)"):
        check_same_shape(a, GPTConfig.from_preset("tiny", n_layer=3, n_embd=96, n_head=3))


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # move every generator off its seed
    save_checkpoint(tmp_path / "c.pt", {"model": {}, "model_config": {}, "step": 0, "rng": rng_state()})

    def draw():
        return random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1))

    first = draw()
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert draw() == first
