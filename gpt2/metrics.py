"""What a training run records: ``metrics.jsonl``, the loss plot, and the per-step values that wait on the device
until a log line, an evaluation or a checkpoint needs them.

``metrics.jsonl`` holds one JSON object per line: per optimizer step ``step``, ``loss`` (that step's training
loss, averaged over its micro-steps and processes), ``lr``, ``grad_norm`` (before clipping; NaN without
``--grad-clip``), ``tokens_per_s`` and ``mfu`` (the mean over the steps since the previous read of the device, see
``PendingSteps``) and ``time_s`` (seconds since the loop started, when the step was queued); per evaluation
``step`` and ``val_loss``, and with ``--eval-hellaswag`` ``hellaswag_acc`` and ``hellaswag_acc_norm`` (the share of
examples whose likeliest ending is the right one, plain and length-normalised, as ``gpt2.hellaswag`` scores them).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.checkpoint import atomic_write

__all__ = ["Metrics", "PendingSteps", "StepRecord", "ema", "plot_losses"]


class Metrics:
    """``metrics.jsonl``, appended as the run goes, and the losses it holds (for the plot).

    On resume, lines with a step past the checkpoint's are dropped (they belong to work the checkpoint does not
    hold) by rewriting the file atomically; everything else is kept.
    """

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.hellaswag: list[tuple[int, float, float]] = []  # (step, accuracy, length-normalised accuracy)
        kept = []
        if keep_until is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= keep_until:
                    kept.append(line)
                    self._remember(rec)
        data = "".join(line + "\n" for line in kept).encode()
        atomic_write(path, lambda f: f.write(data))
        self._f = open(path, "a")  # noqa: SIM115 - held open for the run, closed by close()

    def _remember(self, rec: dict) -> None:
        if "val_loss" in rec:
            self.val.append((rec["step"], rec["val_loss"]))
            if "hellaswag_acc" in rec:
                self.hellaswag.append((rec["step"], rec["hellaswag_acc"], rec.get("hellaswag_acc_norm", math.nan)))
        elif "loss" in rec:
            self.train.append((rec["step"], rec["loss"]))

    def log(self, **rec) -> None:
        """Append one record (a line of JSON) and flush it."""
        self._remember(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def plot(self, path: Path, title: str) -> None:
        """Write the train and validation loss curves (and HellaSwag accuracy) to ``path`` (PNG, replaced
        atomically)."""
        plot_losses(path, title, self.train, self.val, self.hellaswag)


def plot_losses(path: Path, title: str, train: list, val: list, hellaswag: list = ()) -> None:
    """Plot (step, loss) pairs: the raw training loss, its EMA, and the validation loss; and (step, accuracy,
    normalised accuracy) triples of HellaSwag on a second axis at the right. Write a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        s, v = zip(*train)
        ax.plot(s, v, color="tab:blue", alpha=0.3, lw=0.8)
        ax.plot(s, ema(v, 0.9), color="tab:blue", lw=1.5, label="train (EMA 0.9)")
    if val:
        s, v = zip(*val)
        ax.plot(s, v, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, top = ax.get_legend_handles_labels()[0], ax
    if hellaswag:
        top = ax.twinx()
        handles += _plot_hellaswag(top, hellaswag)
    if handles:
        top.legend(handles=handles, fontsize=8)  # on the top axes, so no curve is drawn over it
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _plot_hellaswag(ax, points: list) -> list:
    """HellaSwag accuracy and normalised accuracy against step on ``ax`` (0 to 1); returns the lines."""
    s, acc, acc_norm = zip(*points)
    lines = ax.plot(s, acc, "s--", color="tab:green", lw=1.2, ms=3, label="HellaSwag acc")
    lines += ax.plot(s, acc_norm, "^-", color="tab:red", lw=1.2, ms=3, label="HellaSwag acc_norm")
    ax.set_ylabel("HellaSwag accuracy")
    ax.set_ylim(0.0, 1.0)
    return lines


def ema(values, beta: float) -> list[float]:
    """Exponential moving average: m_0 = v_0, m_i = beta m_(i-1) + (1 - beta) v_i."""
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step's values once read from the device."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    time_s: float


class PendingSteps:
    """Per-step training values kept on the device until ``read``: the loop never waits for the device between
    the points that need a number (a log line, an evaluation, a checkpoint), as nanoGPT's does.

    ``read`` makes one collective (under DDP: the losses' sum over processes and the stop flag's, in one
    all-reduce) and one host read for everything queued since the previous ``read``.
    """

    def __init__(self):
        self._steps: list[tuple[int, torch.Tensor, torch.Tensor | None, float, float]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, lr: float, time_s: float) -> None:
        """Queue a step's 0-d loss and gradient-norm tensors (no host read)."""
        self._steps.append((step, loss.detach(), None if grad_norm is None else grad_norm.detach(), lr, time_s))

    def read(self, rt, stop: bool) -> tuple[list[StepRecord], bool]:
        """Read every queued step and agree on ``stop`` across processes; empties the queue.

        Args:
            rt: the ``gpt2.runtime.Runtime`` (for the all-reduce).
            stop: whether this process was asked to stop.
        Returns:
            ``(records, stop)``: the steps' values (losses averaged over processes) and whether any process
            was asked to stop.
        """
        steps, self._steps = self._steps, []
        if not steps and not rt.ddp:
            return [], stop
        device = rt.device
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        losses = [s[1].float().reshape(1) for s in steps]
        summed = rt.all_sum(torch.cat(losses + [flag]))  # (n + 1,)
        norms = [s[2].float().reshape(1) for s in steps if s[2] is not None]
        values = torch.cat([summed[:-1] / rt.world, summed[-1:]] + norms).tolist()  # the one host read
        n = len(steps)
        norm_iter = iter(values[n + 1:])
        records = [StepRecord(step, values[i], lr, next(norm_iter) if norm is not None else math.nan, t)
                   for i, (step, _, norm, lr, t) in enumerate(steps)]
        return records, values[n] > 0
