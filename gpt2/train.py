"""``gpt2 train``: the training loop, on one CPU or GPU or under ``torchrun`` with DDP.

With no arguments it trains the ``shakespeare`` preset on the built-in corpus on the best device
present, and prints a sample at the end. Options come from three places, later ones winning:
the defaults in ``DEFAULTS``, a ``--config FILE.json`` whose keys are flag names, and the command
line. ``--resume`` first takes the options the checkpoint was trained with.

The loop: AdamW (weight decay on 2-D weights only), linear warmup then cosine decay to
``--min-lr``, gradient accumulation (no DDP all-reduce on all but the last micro-step), gradient
clipping, bf16 autocast where the device has it or fp16 with a GradScaler where it does not (fp32
on the CPU unless asked), optional ``torch.compile``. The loss is the registry's fused
``linear_cross_entropy`` (the model calls it when given targets).

Out dir: ``ckpt.pt`` (see ``gpt2.checkpoint``), ``metrics.jsonl`` (one object per step and per
evaluation) and ``loss.png``, all replaced atomically as the run goes. Ctrl-C saves a checkpoint
and exits with status 130; a NaN or infinite loss stops the run without touching the last good
checkpoint; ``--resume`` continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gpt2.checkpoint import (
    CKPT_NAME,
    CheckpointError,
    atomic_write,
    check_same_shape,
    config_from_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gpt2.data import Batcher, DataError, load_dataset
from gpt2.model import GPT, PRESETS, GPTConfig, peak_flops

# The main job's settings: the shakespeare preset on the built-in corpus, tuned to reach a
# validation loss under 5.5 within minutes on a 2-core CPU (see docs/main_job_output.txt).
DEFAULTS: dict = {
    "config": None,
    "preset": "shakespeare",
    "data": "shakespeare",
    "backend": "auto",
    "device": "auto",
    "dtype": "auto",
    "batch_size": 8,
    "block_size": None,  # None: the model's context
    "grad_accum": 1,
    "max_iters": 700,
    "lr": 6e-3,
    "min_lr": 3e-4,
    "warmup_iters": 10,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,
    "dropout": 0.0,
    "eval_interval": 100,
    "eval_iters": 8,
    "log_interval": 25,
    "seed": 1337,
    "out_dir": "out",
    "resume": False,
    "overwrite": False,
    "stop_at": None,
    "compile": False,
    "sample_tokens": 200,
    "sample_prompt": "\n",
}

# Options a resumed run does not inherit from the checkpoint: they describe this session only.
_SESSION_ONLY = ("config", "resume", "overwrite", "stop_at", "out_dir")
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` flags to ``parser``. Flags left out are absent from the namespace, so a
    config file or the resumed checkpoint can fill them; see ``resolve_options``."""
    S = argparse.SUPPRESS
    d = DEFAULTS

    def add(flag, help, **kw):
        parser.add_argument(flag, default=S, help=help, **kw)

    add("--config", "JSON file of options for a long run; keys are flag names (batch_size or batch-size); "
        "command-line flags override it", metavar="FILE.json")
    add("--preset", f"model preset: {', '.join(PRESETS)} (default {d['preset']})")
    add("--data", "'shakespeare', a .txt file or folder of them, or .bin token shards (a file or folder) "
        f"(default {d['data']})")
    add("--backend", f"kernel backend spec, e.g. torch, triton, cuda, auto, 'triton,attention=torch' "
        f"(default {d['backend']})")
    add("--device", "auto (CUDA if present, else CPU), cpu or cuda (default auto)", choices=["auto", "cpu", "cuda"])
    add("--dtype", "auto (bf16 autocast on GPUs that have it, else fp16 with loss scaling; float32 on the CPU), "
        "float32, bfloat16 or float16 (default auto)", choices=["auto", "float32", "bfloat16", "float16"])
    add("--batch-size", f"sequences per micro-step per process (default {d['batch_size']})", type=int)
    add("--block-size", "tokens per sequence, at most the model's context (default: the model's)", type=int)
    add("--grad-accum", f"micro-steps per optimizer step (default {d['grad_accum']})", type=int)
    add("--max-iters", f"optimizer steps in the whole run (default {d['max_iters']})", type=int)
    add("--lr", f"peak learning rate (default {d['lr']})", type=float)
    add("--min-lr", f"learning rate at the end of the cosine decay (default {d['min_lr']})", type=float)
    add("--warmup-iters", f"steps of linear warmup (default {d['warmup_iters']})", type=int)
    add("--weight-decay", f"AdamW weight decay of 2-D weights (default {d['weight_decay']})", type=float)
    add("--beta1", f"AdamW beta1 (default {d['beta1']})", type=float)
    add("--beta2", f"AdamW beta2 (default {d['beta2']})", type=float)
    add("--grad-clip", f"clip the gradient norm to this; 0 = off (default {d['grad_clip']})", type=float)
    add("--dropout", f"dropout probability (default {d['dropout']})", type=float)
    add("--eval-interval", f"evaluate, plot and checkpoint every this many steps (default {d['eval_interval']})",
        type=int)
    add("--eval-iters", f"validation batches per evaluation (default {d['eval_iters']})", type=int)
    add("--log-interval", f"print a log line every this many steps (default {d['log_interval']})", type=int)
    add("--seed", f"random seed (default {d['seed']})", type=int)
    add("--out-dir", f"folder for ckpt.pt, metrics.jsonl and loss.png (default {d['out_dir']})")
    add("--resume", "continue the run whose checkpoint is in --out-dir", action="store_true")
    add("--overwrite", "start afresh even if --out-dir already holds a checkpoint", action="store_true")
    add("--stop-at", "save and stop after this step (the schedule still follows --max-iters); for splitting a "
        "run into sessions", type=int)
    add("--compile", "torch.compile the model", action="store_true")
    add("--sample-tokens", f"tokens of text to generate at the end; 0 = none (default {d['sample_tokens']})",
        type=int)
    add("--sample-prompt", "prompt of the final sample (default a newline)")


# ----------------------------------------------------------------------------- options

def _read_config_file(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise TypeError(f"--config {path} must hold a JSON object of flag names to values")
    out = {}
    for k, v in raw.items():
        key = k.lstrip("-").replace("-", "_")
        if key not in DEFAULTS or key == "config":
            raise ValueError(f"--config {path}: unknown option {k!r}; options are "
                             f"{', '.join(x for x in DEFAULTS if x != 'config')}")
        out[key] = v
    return out


def resolve_options(args, ckpt_args: dict | None = None) -> dict:
    """Merge DEFAULTS < the checkpoint's options (when resuming) < --config file < command line."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    from_file = _read_config_file(given["config"]) if given.get("config") else {}
    opts = dict(DEFAULTS)
    if ckpt_args:
        opts.update({k: v for k, v in ckpt_args.items() if k in DEFAULTS and k not in _SESSION_ONLY})
    opts.update(from_file)
    opts.update(given)
    _validate(opts)
    return opts


def _validate(o: dict) -> None:
    def need(cond, flag, what):
        if not cond:
            raise ValueError(f"--{flag.replace('_', '-')} {what}, got {o[flag]!r}")

    for k in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        need(isinstance(o[k], int) and o[k] >= 1, k, "must be an integer >= 1")
    for k in ("max_iters", "warmup_iters", "seed", "sample_tokens"):
        need(isinstance(o[k], int) and o[k] >= 0, k, "must be an integer >= 0")
    if o["block_size"] is not None:
        need(isinstance(o["block_size"], int) and o["block_size"] >= 1, "block_size", "must be an integer >= 1")
    if o["stop_at"] is not None:
        need(isinstance(o["stop_at"], int) and o["stop_at"] >= 1, "stop_at", "must be an integer >= 1")
    need(isinstance(o["lr"], (int, float)) and o["lr"] > 0, "lr", "must be > 0")
    need(isinstance(o["min_lr"], (int, float)) and 0 <= o["min_lr"] <= o["lr"], "min_lr", "must be in [0, --lr]")
    need(isinstance(o["weight_decay"], (int, float)) and o["weight_decay"] >= 0, "weight_decay", "must be >= 0")
    need(isinstance(o["grad_clip"], (int, float)) and o["grad_clip"] >= 0, "grad_clip", "must be >= 0 (0 = off)")
    for k in ("beta1", "beta2"):
        need(isinstance(o[k], (int, float)) and 0 <= o[k] < 1, k, "must be in [0, 1)")
    need(isinstance(o["dropout"], (int, float)) and 0 <= o["dropout"] < 1, "dropout", "must be in [0, 1)")
    need(o["preset"] in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
    need(o["device"] in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    need(o["dtype"] in ("auto", "float32", "bfloat16", "float16"), "dtype",
         "must be auto, float32, bfloat16 or float16")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA if present else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__}); "
                             "use --device cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def dtype_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``device`` cannot compute in ``dtype`` natively, or None if it can."""
    if dtype == torch.float32:
        return None
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(device)} has no bfloat16; use --dtype float16 or float32"
        return None
    # CPU: autocast would emulate a dtype the processor lacks, many times slower than float32.
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        ok = bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        ok = False
    return None if ok else f"this CPU has no native {name} arithmetic; use --dtype float32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on GPUs that have it, else fp16; float32 on the CPU. An explicit dtype the
    device lacks is an error."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    why = dtype_unsupported(device, dtype)
    if why:
        raise ValueError(f"--dtype {name} on {device.type}: {why}")
    return dtype


def lr_at(step: int, o: dict) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_iters`` steps, then cosine decay to ``min_lr`` at ``max_iters``."""
    lr, min_lr, warmup, total = o["lr"], o["min_lr"], o["warmup_iters"], o["max_iters"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= total:
        return min_lr
    frac = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, o: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on biases or
    LayerNorm gains; fused kernels on CUDA, foreach on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), **kw)


# ----------------------------------------------------------------------------- distributed

def _dist_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when launched by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])


def _all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / world
    return x


# ----------------------------------------------------------------------------- metrics and plot

class Metrics:
    """``metrics.jsonl``: one JSON object per line, appended as the run goes.

    On resume, lines with a step past the checkpoint's are dropped (they belong to work the
    checkpoint does not hold) by rewriting the file atomically; everything else is kept.
    """

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
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
        elif "loss" in rec:
            self.train.append((rec["step"], rec["loss"]))

    def log(self, **rec) -> None:
        self._remember(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def plot(self, path: Path, title: str) -> None:
        """Write train and validation loss curves to ``path`` (PNG, replaced atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if self.train:
            s, v = zip(*self.train)
            ax.plot(s, v, color="tab:blue", alpha=0.3, lw=0.8)
            ax.plot(s, _ema(v, 0.9), color="tab:blue", lw=1.5, label="train (EMA 0.9)")
        if self.val:
            s, v = zip(*self.val)
            ax.plot(s, v, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if self.train or self.val:
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write(path, lambda f: f.write(buf.getvalue()))


def _ema(values, beta: float) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return f"{rss_bytes / 2**30:.2f} GiB rss"


# ----------------------------------------------------------------------------- the run

class _StopRequest:
    """SIGINT sets a flag that the loop reads between steps; a second Ctrl-C interrupts at once."""

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


def run(args) -> int:
    """Run ``gpt2 train`` with parsed ``args``; returns the exit status (0 done, 130 interrupted
    and saved, 1 stopped on a non-finite loss). Bad input raises ValueError (and subclasses),
    FileNotFoundError or TypeError with a one-line message, before anything is written."""
    env = _dist_env()
    if env is None:
        return _run(args, 0, 0, 1)
    import torch.distributed as dist

    rank, local_rank, world = env
    use_nccl = resolve_options(args)["device"] != "cpu" and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    try:
        return _run(args, rank, local_rank, world)
    finally:
        dist.destroy_process_group()


def _run(args, rank: int, local_rank: int, world: int) -> int:
    master = rank == 0
    ddp = world > 1

    def say(msg: str) -> None:
        if master:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    # ---- options, checkpoint and data: everything that can fail on bad input, before any write
    first = resolve_options(args)
    out_dir = Path(first["out_dir"])
    ckpt_file = out_dir / CKPT_NAME
    ckpt = None
    if first["resume"]:
        ckpt = load_checkpoint(ckpt_file)
        opts = resolve_options(args, ckpt.get("train_args"))
    else:
        opts = first
        if ckpt_file.exists() and not opts["overwrite"]:
            raise ValueError(f"{out_dir} already holds a checkpoint ({CKPT_NAME}); pass --resume to continue it, "
                             "--overwrite to start afresh, or another --out-dir")
    device = resolve_device(opts["device"], local_rank)
    dtype = resolve_dtype(opts["dtype"], device)

    wanted_preset = "preset" in vars(args) or (opts.get("config") and "preset" in _read_config_file(opts["config"]))
    config = GPTConfig.from_preset(opts["preset"], dropout=float(opts["dropout"]))
    if ckpt is not None:
        saved = config_from_checkpoint(ckpt, ckpt_file)
        if wanted_preset:
            check_same_shape(saved, config, ckpt_file)
        config = GPTConfig(**{**asdict(saved), "dropout": float(opts["dropout"])})
    T = opts["block_size"] or config.block_size
    if T > config.block_size:
        raise ValueError(f"--block-size {T} is larger than the model's context of {config.block_size} tokens "
                         f"(preset {opts['preset']})")

    ds = load_dataset(opts["data"])
    ids_checked = True  # every token id was range-checked here, so the model need not check each batch
    for split in ("train", "val"):
        arrays = [a for a in ds.split(split) if a.size]
        if not arrays:
            raise DataError(f"data {opts['data']!r} has no {split} tokens")
        small = sum(a.size for a in arrays) <= 100_000_000
        ids_checked = ids_checked and small
        if small:
            top = max(int(a.max()) for a in arrays)
            if top >= config.vocab_size:
                raise DataError(f"data {opts['data']!r} holds token id {top}, outside the model's vocabulary of "
                                f"{config.vocab_size} (preset {opts['preset']})")
    rows = opts["batch_size"] * world
    n_train = ds.num_tokens("train")
    if rows * T > n_train:
        raise DataError(f"a batch of {rows} x {T} tokens does not fit the {n_train:,}-token training split of "
                        f"{opts['data']!r}; use a smaller --batch-size or --block-size")
    seed = opts["seed"]
    train_batcher = Batcher(ds.split("train"), opts["batch_size"], T, seed=seed, rank=rank, world_size=world)
    val_batcher = Batcher(ds.split("val"), opts["batch_size"], T, seed=seed + 1, rank=rank, world_size=world)
    val_start = val_batcher.state_dict()  # every evaluation sees the same batches

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = GPT(config, backend=opts["backend"]).to(device)
    # The per-forward id check costs a host sync (and a graph break under --compile): skip it when the
    # whole corpus was checked above.
    model.check_inputs = not ids_checked
    model.set_backend(opts["backend"])  # resolve now: an unavailable backend fails before training
    optimizer = make_optimizer(model, opts, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    step, last_eval_step, best_val = 0, None, float("inf")
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ckpt_file} does not fit this model or optimizer "
                                  f"({str(e).splitlines()[0]})") from e
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        last_eval_step = ckpt.get("last_eval_step")
        best_val = float(ckpt.get("best_val_loss", float("inf")))
        train_batcher.load_state_dict(ckpt["data"]["train"])
        rngs = ckpt.get("rng") or []
        if ckpt.get("world_size", 1) != world and master:
            print(f"warning: the checkpoint was written by {ckpt.get('world_size', 1)} processes, this run has "
                  f"{world}; the data order stays the same, but random streams differ", file=sys.stderr)
        if rngs:
            set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    else:
        torch.manual_seed(seed + rank)  # dropout masks differ between ranks; the weights were drawn above

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model = model
    if opts["compile"]:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    # ---- from here on the out dir is written (rank 0 only)
    metrics = None
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = Metrics(out_dir / METRICS_NAME, keep_until=step if ckpt is not None else None)
        atomic_write(out_dir / "config.json",
                     lambda f: f.write(json.dumps({"model": asdict(config), "train": opts}, indent=2).encode()))
    tokens_per_step = opts["batch_size"] * T * opts["grad_accum"] * world
    peak = peak_flops(device)
    title = (f"{opts['preset']} ({raw_model.num_params() / 1e6:.1f}M params) on {opts['data']}, "
             f"{tokens_per_step:,} tokens/step")
    say(f"gpt2 train: preset {opts['preset']} ({raw_model.num_params():,} parameters, {config.n_layer} layers, "
        f"{config.n_head} heads, {config.n_embd} wide, context {config.block_size}) | data {ds.name}: "
        f"{ds.num_tokens('train'):,} train / {ds.num_tokens('val'):,} val tokens")
    say(f"gpt2 train: device {device} ({world} process{'es' if ddp else ''}), dtype {str(dtype).replace('torch.', '')}, backend {raw_model.ops}, batch {opts['batch_size']} x {T} x "
        f"{opts['grad_accum']} accum x {world} = {tokens_per_step:,} tokens/step, {opts['max_iters']} steps"
        + (f", resuming at step {step}" if ckpt is not None else ""))

    def evaluate() -> float:
        raw_model.eval()
        val_batcher.load_state_dict(val_start)
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for _ in range(opts["eval_iters"]):
                x, y = val_batcher.next(device)
                with autocast:
                    _, loss = raw_model(x, y)
                total += loss.float()
        raw_model.train()
        return float(_all_mean(total / opts["eval_iters"], world))

    def checkpoint(rng_override=None) -> None:
        rngs = [rng_override or rng_state()]
        if ddp:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not master:
            return
        save_checkpoint(ckpt_file, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "last_eval_step": last_eval_step, "best_val_loss": best_val,
            "model_config": asdict(config), "train_args": opts, "rng": rngs, "world_size": world,
            "data": {"train": train_batcher.state_dict(), "val": val_start},
        })

    def eval_and_save() -> bool:
        nonlocal last_eval_step, best_val
        val = evaluate()
        if not math.isfinite(val):
            say(f"gpt2 train: the validation loss is {val} at step {step}; stopping. The last good checkpoint "
                f"({ckpt_file}, step {last_eval_step if last_eval_step is not None else '-'}) is untouched")
            return False
        last_eval_step = step
        best_val = min(best_val, val)
        checkpoint()
        if master:
            metrics.log(step=step, val_loss=val)
            metrics.plot(out_dir / PLOT_NAME, title)
            say(f"eval step {step}: val loss {val:.4f} (best {best_val:.4f}) | saved {ckpt_file}")
        return True

    from tqdm import tqdm

    bar = tqdm(total=opts["max_iters"], initial=min(step, opts["max_iters"]), disable=None if master else True,
               unit="step", dynamic_ncols=True, file=sys.stderr)
    model.train()
    status = 0
    t_start = time.time()
    try:
        with _StopRequest() as stop:
            while step < opts["max_iters"]:
                if step % opts["eval_interval"] == 0 and last_eval_step != step and not eval_and_save():
                    return 1
                snap = (train_batcher.state_dict(), rng_state())
                updating = False
                try:
                    t0 = time.time()
                    lr = lr_at(step, opts)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss_sum = torch.zeros((), device=device)
                    for micro in range(opts["grad_accum"]):
                        x, y = train_batcher.next(device)
                        sync = not ddp or micro == opts["grad_accum"] - 1
                        with (contextlib.nullcontext() if sync else model.no_sync()):
                            with autocast:
                                _, loss = model(x, y)
                            loss = loss / opts["grad_accum"]
                            scaler.scale(loss).backward()
                        loss_sum += loss.detach().float()
                    loss_val = float(_all_mean(loss_sum, world))
                    if not math.isfinite(loss_val):
                        bar.close()
                        say(f"gpt2 train: the loss is {loss_val} at step {step + 1}; stopping. The last good "
                            f"checkpoint ({ckpt_file}, step {last_eval_step if last_eval_step is not None else '-'}"
                            ") is untouched; try a lower --lr or --dtype float32")
                        return 1
                    if opts["grad_clip"] > 0:
                        scaler.unscale_(optimizer)
                        norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), opts["grad_clip"]))
                    else:
                        norm = float("nan")
                    updating = True
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    updating = False
                except KeyboardInterrupt:
                    bar.close()
                    if updating or ddp:
                        say(f"gpt2 train: interrupted during step {step + 1}; the last checkpoint is kept")
                        return 130
                    train_batcher.load_state_dict(snap[0])
                    optimizer.zero_grad(set_to_none=True)
                    checkpoint(rng_override=snap[1])
                    say(f"gpt2 train: interrupted; saved step {step} to {ckpt_file} (continue with --resume)")
                    return 130
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.time() - t0
                tok_s = tokens_per_step / dt
                mfu = raw_model.estimate_mfu(opts["batch_size"] * opts["grad_accum"], dt, peak=peak, seq_len=T)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", refresh=False)
                if master:
                    metrics.log(step=step, loss=loss_val, lr=lr, tokens_per_s=tok_s, grad_norm=norm,
                                mfu=mfu, time_s=round(time.time() - t_start, 3))
                    if step % opts["log_interval"] == 0 or step == 1 or step == opts["max_iters"]:
                        say(f"step {step}/{opts['max_iters']} | loss {loss_val:.4f} | lr {lr:.2e} | "
                            f"{tok_s:,.0f} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                            f"peak mem {_peak_memory(device)} | {dt * 1000:.0f} ms")
                stop_now = stop.requested
                if ddp:
                    import torch.distributed as dist

                    flag = torch.tensor([1.0 if stop_now else 0.0], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop_now = bool(flag.item())
                if stop_now:
                    bar.close()
                    checkpoint()
                    say(f"gpt2 train: interrupted; saved step {step} to {ckpt_file} (continue with --resume)")
                    return 130
                if opts["stop_at"] is not None and step >= opts["stop_at"] and step < opts["max_iters"]:
                    bar.close()
                    checkpoint()
                    say(f"gpt2 train: stopped at step {step} (--stop-at); saved {ckpt_file} (continue with --resume)")
                    return 0
            bar.close()
            if last_eval_step != step:
                if not eval_and_save():
                    return 1
            else:
                checkpoint()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    elapsed = time.time() - t_start
    say(f"gpt2 train: done, {step} steps; best val loss {best_val:.4f}; {elapsed:.0f} s in the loop; "
        f"wrote {ckpt_file}, {out_dir / METRICS_NAME}, {out_dir / PLOT_NAME}")
    if master and opts["sample_tokens"] > 0:
        say(f"sample ({opts['sample_tokens']} tokens, temperature 0.8, top-k 200, seed {seed}):")
        from gpt2.sample import stream_text

        gen = torch.Generator(device=device).manual_seed(seed)
        with autocast:
            stream_text(raw_model, opts["sample_prompt"], opts["sample_tokens"], temperature=0.8, top_k=200,
                        generator=gen, out=sys.stdout)
        print(flush=True)
    return status
