"""``gpt2 train``: the training loop, on one CPU or GPU or under ``torchrun`` with DDP or FSDP.

With no arguments it trains the ``shakespeare`` preset on the built-in corpus on the best device present, and
prints a sample at the end. Options: ``gpt2.options``; device, dtype and processes: ``gpt2.runtime``; what is
recorded: ``gpt2.metrics``.

The loop: AdamW (weight decay on 2-D weights only), linear warmup then cosine decay to ``--min-lr``, gradient
accumulation (no DDP all-reduce on all but the last micro-step), gradient clipping, autocast in the runtime's
dtype (a GradScaler with float16), optional ``torch.compile``. The loss is the registry's fused
``linear_cross_entropy`` (the model calls it when given targets).

``--fsdp`` (under torchrun) shards parameters, gradients and AdamW's state over the processes with FSDP2 instead of
replicating them: each block's attention and MLP are a group gathered only while they compute (``fsdp_units``), the
optimizer is built on the shards, gradient accumulation skips the reduce-scatter on all but the last micro-step, and
gradient clipping uses the norm of the whole gradient. Checkpoints are gathered whole, the same file as DDP's.

The host reads device values only at sync points: each log line, evaluation and checkpoint. Each step's loss and
gradient norm wait on the device until then (``PendingSteps``), so nothing stalls the launch queue in between.
At a sync point a NaN or infinite loss since the previous one stops the run (exit 1) without touching the last
good checkpoint, and under DDP the processes agree there whether Ctrl-C was pressed. Ctrl-C saves a checkpoint
and exits with status 130; ``--resume`` continues exactly where the checkpoint left off.

``--init-from DIR`` fine-tunes: the weights come from a training out dir or a Hugging Face GPT-2 folder (every
process reads the same file; DDP also broadcasts rank 0's weights when it wraps the model), the shape is theirs,
and the optimizer, the schedule and the step count start afresh. ``--eval-hellaswag FILE`` adds HellaSwag accuracy
to every evaluation (under DDP each process scores every world-th example and the counts are summed).

Out dir: ``ckpt.pt`` (see ``gpt2.checkpoint``), ``metrics.jsonl`` (see ``gpt2.metrics``), ``loss.png`` and
``config.json``, all replaced atomically as the run goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gpt2 import runtime
from gpt2.checkpoint import (
    CKPT_NAME,
    CheckpointError,
    InitSource,
    atomic_write,
    config_from_checkpoint,
    gather_full,
    open_init_source,
    rng_state,
    save_checkpoint,
    set_rng_state,
    shard_optimizer_state,
)
from gpt2.data import Batcher, DataError, load_dataset
from gpt2.metrics import Metrics, PendingSteps, StepRecord
from gpt2.model import GPT, ConfigError, GPTConfig, peak_flops
from gpt2.options import TrainOptions, add_args, load_options

__all__ = ["METRICS_NAME", "PLOT_NAME", "Trainer", "add_args", "lr_at", "make_optimizer", "run"]

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def lr_at(step: int, o: TrainOptions) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over ``warmup_iters`` steps,
    then cosine decay to ``min_lr`` at ``max_iters``."""
    if step < o.warmup_iters:
        return o.lr * (step + 1) / (o.warmup_iters + 1)
    if step >= o.max_iters:
        return o.min_lr
    frac = (step - o.warmup_iters) / max(1, o.max_iters - o.warmup_iters)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (o.lr - o.min_lr)


def make_optimizer(model: torch.nn.Module, o: TrainOptions, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on biases or LayerNorm gains;
    the fused implementation (on the CPU too: at 124M it took 0.3 s a step against 0.9-1.5 s for foreach on the
    2-core EPYC), except for FSDP's sharded parameters on the CPU, which take foreach."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"foreach": True} if device.type == "cpu" and o.fsdp else {"fused": True}
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), **kw)


def fsdp_units(model: GPT) -> list[torch.nn.Module]:
    """FSDP's groups under the root: each block's attention and MLP. Not whole blocks: a block's forward also
    applies the next block's ln_1 (fused with the residual add, see ``gpt2.model.Block``), whose parameters would
    still be sharded then. The LayerNorms (4 x n_embd per block), the embeddings and the tied head form the root
    group."""
    return [m for block in model.transformer.h for m in (block.attn, block.mlp)]


def run(args) -> int:
    """Run ``gpt2 train`` with parsed ``args``; returns the exit status (0 done, 130 interrupted and saved,
    1 stopped on a non-finite loss). Bad input raises ValueError (and subclasses), FileNotFoundError or
    TypeError with a one-line message, before anything is written."""
    opts, ckpt = load_options(args)
    rt = runtime.start(opts.device, opts.dtype)
    try:
        return Trainer(opts, ckpt, rt).fit()
    finally:
        rt.close()


# ----------------------------------------------------------------------------- set-up


def model_origin(opts: TrainOptions) -> str:
    """Where the model's shape comes from, for messages: ``--init-from DIR`` or ``preset NAME``."""
    return f"--init-from {opts.init_from}" if opts.init_from else f"preset {opts.preset}"


def model_config(opts: TrainOptions, ckpt: dict | None, source: InitSource | None = None) -> tuple[GPTConfig, int]:
    """The model's shape (the checkpoint's when resuming, the ``--init-from`` source's when fine-tuning, else the
    preset's; dropout always ``--dropout``) and the sequence length T."""
    if ckpt is not None:
        shape = config_from_checkpoint(ckpt, Path(opts.out_dir) / CKPT_NAME)
    else:
        shape = source.config if source is not None else GPTConfig.from_preset(opts.preset)
    config = GPTConfig(**{**asdict(shape), "dropout": float(opts.dropout)})
    T = opts.block_size or config.block_size
    if T > config.block_size:
        raise ValueError(f"--block-size {T} is larger than the model's context of {config.block_size} tokens "
                         f"({model_origin(opts)})")
    from gpt2.tokenizer import VOCAB_SIZE

    if config.vocab_size > VOCAB_SIZE and opts.sample_tokens > 0:
        raise ConfigError(f"the model's vocabulary of {config.vocab_size} ({model_origin(opts)}) is larger than the "
                          f"GPT-2 tokenizer's {VOCAB_SIZE}: its final sample could not be decoded; pass "
                          "--sample-tokens 0")
    return config, T


def load_data(opts: TrainOptions, config: GPTConfig, T: int, rt: runtime.Runtime):
    """The dataset and its train and validation batchers (this process's slice), after checking that every
    token id fits the vocabulary and a global batch fits the training split.

    Returns:
        ``(dataset, train batcher, val batcher)``. Every token id is checked on the host: here for corpora up to
        10^8 tokens, else by the batchers batch by batch, so the model need not check on the device (a host read
        per micro-step).
    """
    ds = load_dataset(opts.data)
    small = True
    for split in ("train", "val"):
        arrays = [a for a in ds.split(split) if a.size]
        if not arrays:
            raise DataError(f"data {opts.data!r} has no {split} tokens")
        small = small and sum(a.size for a in arrays) <= 100_000_000
        top = max(int(a.max()) for a in arrays) if small else -1
        if top >= config.vocab_size:
            raise DataError(f"data {opts.data!r} holds token id {top}, outside the model's vocabulary of "
                            f"{config.vocab_size} ({model_origin(opts)})")
    rows, n_train = opts.batch_size * rt.world, ds.num_tokens("train")
    if rows * T > n_train:
        raise DataError(f"a batch of {rows} x {T} tokens does not fit the {n_train:,}-token training split of "
                        f"{opts.data!r}; use a smaller --batch-size or --block-size")
    per_batch = None if small else config.vocab_size
    train = Batcher(ds.split("train"), opts.batch_size, T, seed=opts.seed, rank=rt.rank, world_size=rt.world,
                    vocab_size=per_batch, name=f"the train split of {opts.data!r}")
    val = Batcher(ds.split("val"), opts.batch_size, T, seed=opts.seed + 1, rank=rt.rank, world_size=rt.world,
                  vocab_size=per_batch, name=f"the validation split of {opts.data!r}")
    return ds, train, val


def load_hellaswag_file(opts: TrainOptions, config: GPTConfig) -> list | None:
    """``--eval-hellaswag``'s examples, read and checked once at set-up, so a bad file (or one this model cannot
    score: a token outside its vocabulary, an ending longer than its context) fails before training; None when
    off."""
    if not opts.eval_hellaswag:
        return None
    from gpt2.hellaswag import load_hellaswag
    from gpt2.tokenizer import encode

    flag = f"--eval-hellaswag {opts.eval_hellaswag}"
    examples = load_hellaswag(opts.eval_hellaswag)
    if not examples:
        raise DataError(f"{flag} holds no examples")
    for i, ex in enumerate(examples):
        ends = [encode(" " + e) for e in ex.endings]
        top = max(max(ids, default=0) for ids in [encode(ex.ctx), *ends])
        if top >= config.vocab_size:
            raise DataError(f"{flag}: example {i + 1} tokenizes to id {top}, outside the model's vocabulary of "
                            f"{config.vocab_size} ({model_origin(opts)})")
        if max(len(ids) for ids in ends) > config.block_size:
            raise DataError(f"{flag}: example {i + 1} has an ending longer than the model's context of "
                            f"{config.block_size} tokens")
    return examples


def auto_batch(opts: TrainOptions, config: GPTConfig, T: int, rt: runtime.Runtime) -> TrainOptions:
    """``--batch-size auto``: the options with the largest micro-batch whose step fits this GPU (``gpt2.plan``,
    for this run's dtype, processes, ``--fsdp``, ``--recompute`` and backend). On a CPU it is an error: there is
    no memory budget to size to. The number is what the checkpoint records."""
    from gpt2.plan import auto_batch_size

    batch = auto_batch_size(config, T, rt.dtype, rt.device, rt.world, opts.fsdp, opts.recompute, opts.backend)
    if rt.master:
        print(f"gpt2 train: --batch-size auto: {batch} sequences per micro-step fit {rt.device} (gpt2 plan)",
              file=sys.stderr)
    return dataclasses.replace(opts, batch_size=batch)


class _StopRequest:
    """SIGINT sets a flag that the loop reads at its sync points; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ----------------------------------------------------------------------------- the run


class Trainer:
    """One training run: ``Trainer(options, checkpoint or None, runtime).fit()`` -> exit status."""

    def __init__(self, opts: TrainOptions, ckpt: dict | None, rt: runtime.Runtime):
        self.opts, self.rt = opts, rt
        self.out_dir = Path(opts.out_dir)
        self.ckpt_file = self.out_dir / CKPT_NAME
        self.resumed = ckpt is not None
        self.source = open_init_source(opts.init_from) if opts.init_from and ckpt is None else None
        self.config, self.T = model_config(opts, ckpt, self.source)
        if opts.batch_size == "auto":
            opts = self.opts = auto_batch(opts, self.config, self.T, rt)
        self.hellaswag = load_hellaswag_file(opts, self.config)
        self.ds, self.train_batcher, self.val_batcher = load_data(opts, self.config, self.T, rt)
        self.val_start = self.val_batcher.state_dict()  # every evaluation sees the same batches
        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed)
        self.raw_model = GPT(self.config, recompute=opts.recompute).to(rt.device)
        # The per-forward id check costs a host sync (and a graph break under --compile): every id was checked on
        # the host already (load_data).
        self.raw_model.check_inputs = False
        self.raw_model.set_backend(opts.backend)  # resolved now: an unavailable backend fails before training
        # Ops left to auto are timed now on this run's step (every rank takes rank 0's choice), before compile traces.
        self.raw_model.choose_backends(opts.batch_size, self.T, rt.dtype, mode="train")
        if ckpt is not None:
            self.load_weights(ckpt)
        elif self.source is not None:
            self.load_source()
        if opts.fsdp:  # the whole weights are in; the optimizer is built on the shards
            rt.shard(self.raw_model, fsdp_units(self.raw_model))
        self.optimizer = make_optimizer(self.raw_model, opts, rt.device)
        self.scaler = rt.grad_scaler()
        self.step, self.last_eval_step, self.best_val = 0, None, float("inf")
        if ckpt is not None:
            self.restore(ckpt)
        else:
            torch.manual_seed(opts.seed + rt.rank)  # dropout masks differ between ranks; the weights were drawn above
        self.model = self._wrap(self.raw_model)
        self.tokens_per_step = opts.batch_size * self.T * opts.grad_accum * rt.world
        self.peak = peak_flops(rt.device)  # datasheet FLOP/s, for MFU; None when unknown
        self.pending = PendingSteps()
        self.metrics, self.bar, self.updating = None, None, False

    def load_source(self) -> None:
        """``--init-from``: the source's weights into the model built above (which keeps its tied head, padded
        vocabulary rows and parameter groups, so it trains as a fresh model of that shape would). The optimizer,
        schedule and step count stay fresh."""
        try:
            self.raw_model.load_state_dict(self.source.state_dict())
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"--init-from {self.opts.init_from}: its weights do not fit its own configuration "
                              f"({str(e).splitlines()[0]})") from e

    def load_weights(self, ckpt: dict) -> None:
        """The checkpoint's (whole) weights into the model, before any sharding."""
        try:
            self.raw_model.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {self.ckpt_file} does not fit this model "
                                  f"({str(e).splitlines()[0]})") from e

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint (its weights are in already): optimizer, scaler, counters, data position,
        random streams."""
        try:
            state = ckpt["optimizer"]
            self.optimizer.load_state_dict(shard_optimizer_state(state, self.optimizer) if self.opts.fsdp else state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {self.ckpt_file} does not fit this model or optimizer "
                                  f"({str(e).splitlines()[0]})") from e
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.last_eval_step = ckpt.get("last_eval_step")
        self.best_val = float(ckpt.get("best_val_loss", float("inf")))
        self.train_batcher.load_state_dict(ckpt["data"]["train"])
        rngs, world = ckpt.get("rng") or [], ckpt.get("world_size", 1)
        if world != self.rt.world and self.rt.master:
            print(f"warning: the checkpoint was written by {world} processes, this run has {self.rt.world}; the "
                  "data order stays the same, but random streams differ", file=sys.stderr)
        if rngs:
            set_rng_state(rngs[self.rt.rank] if self.rt.rank < len(rngs) else rngs[0])

    def _wrap(self, model: GPT) -> torch.nn.Module:
        """The model the loop calls: compiled with ``--compile`` (after FSDP's sharding), in DDP under torchrun
        without ``--fsdp``."""
        if self.rt.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.opts.compile:
            model = torch.compile(model)
        if self.rt.ddp and not self.opts.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.rt.local_rank] if self.rt.device.type == "cuda" else None)
        return model

    def say(self, msg: str) -> None:
        """Print a line (rank 0 only), above the progress bar."""
        if self.rt.master:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def say_last(self, msg: str) -> None:
        """Close the progress bar, then print the run's last line."""
        if self.bar is not None:
            self.bar.close()
        self.say(msg)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to ``--max-iters`` (or ``--stop-at``); returns the exit status."""
        self._open_outputs()
        self._announce()
        from tqdm import tqdm

        o = self.opts
        self.bar = tqdm(total=o.max_iters, initial=min(self.step, o.max_iters), unit="step", dynamic_ncols=True,
                        disable=None if self.rt.master else True, file=sys.stderr)
        self.t_start = self.t_mark = time.time()
        try:
            with _StopRequest() as stop:
                status = self._loop(stop)
        finally:
            self.bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if status is None:
            self._finish()
        return status or 0

    def _loop(self, stop: _StopRequest) -> int | None:
        """The steps; an exit status when the run stops early, None when it reaches ``--max-iters``."""
        o = self.opts
        while self.step < o.max_iters:
            eval_due = self.step % o.eval_interval == 0 and self.last_eval_step != self.step
            if eval_due and (status := self.evaluate_and_save(stop)) is not None:
                return status
            snap = (self.train_batcher.state_dict(), rng_state())
            try:
                self.train_step()
            except KeyboardInterrupt:
                return self._interrupted(*snap)
            self.bar.update(1)
            if (status := self._after_step(stop)) is not None:
                return status
        self.bar.close()
        if self.last_eval_step != self.step:
            return self.evaluate_and_save(stop)
        if (status := self.sync(stop.requested)) is not None:
            return status
        self.save()
        return None

    def train_step(self) -> None:
        """One optimizer step over ``--grad-accum`` micro-batches. Reads nothing from the device: the loss and
        gradient norm join ``self.pending``."""
        o, rt = self.opts, self.rt
        lr = lr_at(self.step, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(o.grad_accum):
            x, y = self.train_batcher.next(rt.device)
            sync = not rt.ddp or micro == o.grad_accum - 1  # gradients are reduced on the last micro-step only
            with self._grad_sync(sync):
                with rt.autocast():
                    _, loss = self.model(x, y)
                loss = loss / o.grad_accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        norm = None
        if o.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), o.grad_clip)
            if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, already the norm of the whole gradient
                norm = norm.full_tensor()
        self.updating = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.add(self.step + 1, loss_sum, norm, lr, round(time.time() - self.t_start, 3))
        self.step += 1
        self.updating = False

    def _grad_sync(self, sync: bool):
        """The context of a micro-step's backward: without ``sync``, gradients accumulate locally (DDP: no
        all-reduce; FSDP: no reduce-scatter, whole gradients kept until the last micro-step)."""
        if self.opts.fsdp:
            self.raw_model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def _after_step(self, stop: _StopRequest) -> int | None:
        """The sync point after a step, when one is due: a log line, ``--stop-at``, or Ctrl-C (one process;
        under DDP the processes agree on Ctrl-C at the log lines)."""
        o, step = self.opts, self.step
        log = step % o.log_interval == 0 or step == 1 or step == o.max_iters
        stop_at = o.stop_at is not None and o.stop_at <= step < o.max_iters
        if not (log or stop_at or (stop.requested and not self.rt.ddp)):
            return None
        if (status := self.sync(stop.requested, log=log)) is not None:
            return status
        if stop_at:
            self.save()
            self.say_last(f"gpt2 train: stopped at step {step} (--stop-at); saved {self.ckpt_file} (continue with "
                          "--resume)")
            return 0
        return None

    def _interrupted(self, batcher_state: dict, rng: dict) -> int:
        """A KeyboardInterrupt inside a step (a second Ctrl-C): save the step before it, unless the optimizer
        had begun to update the weights (or under DDP, where the other processes cannot join a save)."""
        if self.updating or self.rt.ddp:
            self.say_last(f"gpt2 train: interrupted during step {self.step + 1}; the last checkpoint is kept")
            return 130
        self.train_batcher.load_state_dict(batcher_state)
        self.optimizer.zero_grad(set_to_none=True)
        if (status := self.sync(False)) is not None:
            return status
        self.save(rng)
        self.say_last(f"gpt2 train: interrupted; saved step {self.step} to {self.ckpt_file} (continue with --resume)")
        return 130

    # ------------------------------------------------------------------ sync points

    def sync(self, stop_requested: bool, log: bool = False) -> int | None:
        """Read the steps queued since the last sync point: record them (and print the log line); then stop on
        a non-finite loss (1, nothing saved) or an agreed stop request (save, 130). None: go on."""
        records, stop_now = self.pending.read(self.rt, stop_requested)
        self._record(records, log)
        bad = next((r for r in records if not math.isfinite(r.loss)), None)
        if bad is not None:
            last = self.last_eval_step if self.last_eval_step is not None else "-"
            self.say_last(f"gpt2 train: the loss is {bad.loss} at step {bad.step}; stopping. The last good "
                          f"checkpoint ({self.ckpt_file}, step {last}) is untouched; try a lower --lr or --dtype "
                          "float32")
            return 1
        if stop_now:
            self.save()
            self.say_last(f"gpt2 train: interrupted; saved step {self.step} to {self.ckpt_file} (continue with "
                          "--resume)")
            return 130
        return None

    def _record(self, records: list[StepRecord], log: bool) -> None:
        """Write the steps to metrics.jsonl, and the log line of the last one. Speed is the mean over the steps
        since the previous sync point (per-step times are not known without a sync per step)."""
        if not records:
            return
        now = time.time()
        dt, self.t_mark = (now - self.t_mark) / len(records), now
        tok_s = self.tokens_per_step / dt
        mfu = self.raw_model.estimate_mfu(self.opts.batch_size * self.opts.grad_accum, dt,
                                          peak=self.peak, seq_len=self.T)
        if self.rt.master:
            for r in records:
                self.metrics.log(step=r.step, loss=r.loss, lr=r.lr, tokens_per_s=tok_s, grad_norm=r.grad_norm,
                                 mfu=mfu, time_s=r.time_s)
        last = records[-1]
        self.bar.set_postfix(loss=f"{last.loss:.4f}", refresh=False)
        if log:
            self.say(f"step {last.step}/{self.opts.max_iters} | loss {last.loss:.4f} | lr {last.lr:.2e} | "
                     f"{tok_s:,.0f} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                     f"peak mem {runtime.peak_memory(self.rt.device)} | {dt * 1000:.0f} ms")

    def evaluate(self) -> float:
        """Mean validation loss over ``--eval-iters`` fixed batches (and the processes)."""
        rt, n = self.rt, self.opts.eval_iters
        self.raw_model.eval()
        self.val_batcher.load_state_dict(self.val_start)
        total = torch.zeros((), device=rt.device)
        with torch.no_grad():
            for _ in range(n):
                x, y = self.val_batcher.next(rt.device)
                with rt.autocast():
                    _, loss = self.raw_model(x, y)
                total += loss.float()
        self.raw_model.train()
        return float(rt.all_sum(total / n) / rt.world)

    def evaluate_hellaswag(self) -> dict:
        """``--eval-hellaswag``: ``hellaswag_acc`` and ``hellaswag_acc_norm`` over the whole file, each process
        scoring every world-th example, the counts summed; {} when off."""
        if self.hellaswag is None:
            return {}
        from gpt2.hellaswag import score_hellaswag

        rt = self.rt
        mine = self.hellaswag[rt.rank::rt.world]
        counts = [0, 0, 0]  # right, right when length-normalised, scored
        if mine:  # score_hellaswag runs the model in eval mode without gradients, and restores its mode
            r = score_hellaswag(self.raw_model, mine, device=rt.device, autocast=rt.autocast)
            counts = [round(r["accuracy"] * r["n"]), round(r["accuracy_norm"] * r["n"]), r["n"]]
        right, right_norm, n = rt.all_sum(torch.tensor(counts, dtype=torch.float64, device=rt.device)).tolist()
        return {"hellaswag_acc": right / max(n, 1), "hellaswag_acc_norm": right_norm / max(n, 1)}

    def evaluate_and_save(self, stop: _StopRequest) -> int | None:
        """A sync point, then evaluate, checkpoint, log and plot. An exit status if the run must stop."""
        if (status := self.sync(stop.requested)) is not None:
            return status
        val = self.evaluate()
        if not math.isfinite(val):
            last = self.last_eval_step if self.last_eval_step is not None else "-"
            self.say_last(f"gpt2 train: the validation loss is {val} at step {self.step}; stopping. The last good "
                          f"checkpoint ({self.ckpt_file}, step {last}) is untouched")
            return 1
        scores = self.evaluate_hellaswag()
        self.last_eval_step, self.best_val = self.step, min(self.best_val, val)
        self.save()
        if self.rt.master:
            self.metrics.log(step=self.step, val_loss=val, **scores)
            self.metrics.plot(self.out_dir / PLOT_NAME, self.title)
            hs = (f" | hellaswag {scores['hellaswag_acc']:.4f} (norm {scores['hellaswag_acc_norm']:.4f})"
                  if scores else "")
            self.say(f"eval step {self.step}: val loss {val:.4f} (best {self.best_val:.4f}){hs} | saved "
                     f"{self.ckpt_file}")
        self.t_mark = time.time()  # the next log line's speed leaves the evaluation out
        return None

    def save(self, rng: dict | None = None) -> None:
        """Write the checkpoint (rank 0; every rank's random state). Callers pass a sync point first."""
        rngs = self.rt.gather(rng or rng_state())
        model_state, optimizer_state = self.raw_model.state_dict(), self.optimizer.state_dict()
        if self.opts.fsdp:  # whole tensors: every process takes part in the gathers, rank 0 keeps them
            model_state = gather_full(self.raw_model.state_dict(keep_vars=True), self.rt.master)
            optimizer_state = gather_full(optimizer_state, self.rt.master)
        if not self.rt.master:
            return
        save_checkpoint(self.ckpt_file, {
            "model": model_state, "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(), "step": self.step, "last_eval_step": self.last_eval_step,
            "best_val_loss": self.best_val, "model_config": asdict(self.config), "train_args": self.opts.to_dict(),
            "rng": rngs, "world_size": self.rt.world,
            "data": {"train": self.train_batcher.state_dict(), "val": self.val_start},
        })

    # ------------------------------------------------------------------ before and after

    def _open_outputs(self) -> None:
        """Rank 0: the out dir, metrics.jsonl (cut back to the checkpoint's step on resume) and config.json."""
        if not self.rt.master:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(self.out_dir / METRICS_NAME, keep_until=self.step if self.resumed else None)
        text = json.dumps({"model": asdict(self.config), "train": self.opts.to_dict()}, indent=2).encode()
        atomic_write(self.out_dir / "config.json", lambda f: f.write(text))

    def _announce(self) -> None:
        o, rt, m, cfg = self.opts, self.rt, self.raw_model, self.config
        name = f"from {Path(o.init_from).name}" if o.init_from else o.preset
        self.title = f"{name} ({m.num_params() / 1e6:.1f}M params) on {o.data}, {self.tokens_per_step:,} tokens/step"
        self.say(f"gpt2 train: {model_origin(o)} ({m.num_params():,} parameters, {cfg.n_layer} layers, "
                 f"{cfg.n_head} heads, {cfg.n_embd} wide, context {cfg.block_size}) | data {self.ds.name}: "
                 f"{self.ds.num_tokens('train'):,} train / {self.ds.num_tokens('val'):,} val tokens")
        self.say(f"gpt2 train: device {rt.device} ({rt.world} process{'es' if rt.ddp else ''}"
                 f"{', FSDP' if o.fsdp else ''}), dtype "
                 f"{str(rt.dtype).replace('torch.', '')}, backend {m.ops}, batch {o.batch_size} x {self.T} x "
                 f"{o.grad_accum} accum x {rt.world} = {self.tokens_per_step:,} tokens/step, {o.max_iters} steps"
                 + (f", recompute {o.recompute}" if o.recompute != "none" else "")
                 + (f", resuming at step {self.step}" if self.resumed else ""))

    def _finish(self) -> None:
        """The closing line, then (rank 0) a sample of the trained model."""
        o = self.opts
        self.say(f"gpt2 train: done, {self.step} steps; best val loss {self.best_val:.4f}; "
                 f"{time.time() - self.t_start:.0f} s in the loop; wrote {self.ckpt_file}, "
                 f"{self.out_dir / METRICS_NAME}, {self.out_dir / PLOT_NAME}")
        if o.sample_tokens <= 0:
            return
        model = self._whole_model()
        if not self.rt.master:
            return
        from gpt2.sample import stream_text

        self.say(f"sample ({o.sample_tokens} tokens, temperature 0.8, top-k 200, seed {o.seed}):")
        gen = torch.Generator(device=self.rt.device).manual_seed(o.seed)
        with self.rt.autocast():
            stream_text(model, o.sample_prompt, o.sample_tokens, temperature=0.8, top_k=200,
                        generator=gen, out=sys.stdout)
        print(flush=True)

    def _whole_model(self) -> GPT | None:
        """The model to sample from: the trained one; under FSDP a whole copy on rank 0, gathered from the shards
        (every process takes part; the others get None)."""
        if not self.opts.fsdp:
            return self.raw_model
        state = gather_full(self.raw_model.state_dict(keep_vars=True), self.rt.master)
        if not self.rt.master:
            return None
        model = GPT(self.config).to(self.rt.device)
        model.load_state_dict(state)
        return model.set_backend(str(self.raw_model.ops))  # the trained model's backends, op by op: nothing to time
