"""Gradient accumulation against one big batch (issue 22 item 5), through ``gpt2 train`` as the command line runs it.

Four sequences per optimizer step as one micro-batch of 4, two of 2 and four of 1 (the batcher draws the same
sequences either way): the accumulated gradient before clipping, its norm, the clipped gradient the optimizer steps
with, and the logged loss and gradient norm must be the big batch's, step after step. Clipping is active (the norm
is far above ``--grad-clip``); AdamW alone would hide a gradient scaled by the number of micro-steps, the clipping
threshold, the norm and the logged loss do not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2.cli import main
from gpt2.data import write_shard

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = 0.05


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("accum") / "toy.bin"
    write_shard(path, np.random.default_rng(0).integers(0, 512, 4000))
    return path


def _train(shard, out, monkeypatch, batch: int, accum: int) -> tuple[list, list[dict]]:
    """Two optimizer steps of 4 sequences each; returns ([(grads before clipping, norm, grads after)] per step,
    the metrics lines with a training loss)."""
    steps = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        before = [p.grad.detach().clone() for p in params]
        norm = clip(params, max_norm, *args, **kwargs)
        steps.append((before, norm.detach().clone(), [p.grad.detach().clone() for p in params]))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    argv = ["train", "--preset", "tiny", "--data", str(shard), "--backend", "torch", "--device", "cpu",
            "--dtype", "float32", "--dropout", "0", "--block-size", "16", "--batch-size", str(batch),
            "--grad-accum", str(accum), "--max-iters", "2", "--warmup-iters", "1", "--lr", "1e-2",
            "--grad-clip", str(CLIP), "--eval-interval", "100", "--eval-iters", "1", "--log-interval", "1",
            "--sample-tokens", "0", "--out-dir", str(out)]
    assert main(argv) == 0
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return steps, [r for r in lines if "loss" in r]


def test_accumulated_micro_steps_equal_one_big_batch(shard, tmp_path, monkeypatch):
    big_steps, big_log = _train(shard, tmp_path / "big", monkeypatch, 4, 1)
    assert len(big_steps) == len(big_log) == 2
    for batch, accum in ((2, 2), (1, 4)):
        steps, log = _train(shard, tmp_path / f"b{batch}", monkeypatch, batch, accum)
        assert len(steps) == len(log) == 2
        for step, ((before, norm, after), (want_before, want_norm, want_after)) in enumerate(zip(steps, big_steps)):
            where = f"{accum} micro-steps of {batch}, step {step + 1}"
            assert want_norm > 10 * CLIP, "clipping must be active"
            torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0, msg=f"{where}: gradient norm")
            for g, w in zip(before, want_before):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=f"{where}: gradient before clipping")
            for g, w in zip(after, want_after):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=f"{where}: clipped gradient")
        for got, want in zip(log, big_log):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), (batch, accum, got, want)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), (batch, accum, got, want)
