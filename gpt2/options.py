"""``gpt2 train``'s options: the flags, and their one resolution into a ``TrainOptions``.

Options come from four places, later ones winning: the defaults (``TrainOptions``' fields), the checkpoint's
options when resuming (``--resume``), a ``--config FILE.json`` whose keys are flag names, and the command line.
``load_options`` reads each place once, and also loads the checkpoint to resume (it holds options).

``--init-from DIR`` starts from the weights of a training out dir or a Hugging Face GPT-2 folder, with a fresh
optimizer and schedule; the model's shape is the source's, and a ``--preset`` of another shape is an error. Once the
fine-tune has a checkpoint of its own, ``--resume`` continues that: an ``--init-from`` given with ``--resume`` is
ignored (one notice line) and the checkpoint's record of its source (``train_args["init_from"]``) is kept. Before
that, ``--resume --init-from DIR`` starts the fine-tune, so the same command line starts and restarts it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from gpt2.checkpoint import (
    CKPT_NAME,
    check_same_shape,
    config_from_checkpoint,
    load_checkpoint,
    open_init_source,
    shape_differences,
)
from gpt2.model import PRESETS, RECOMPUTE_MODES, ConfigError, GPTConfig

__all__ = ["SESSION_ONLY", "TrainOptions", "add_args", "given_options", "load_options", "resolve_options"]


@dataclass(frozen=True)
class TrainOptions:
    """Every option of a training run. The defaults are the main job's: the shakespeare preset on the built-in
    corpus, tuned to reach a validation loss under 5.5 within minutes on a 2-core CPU (docs/main_job_output.txt).
    Invalid values raise ValueError naming the flag."""

    config: str | None = None
    preset: str = "shakespeare"
    data: str = "shakespeare"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | str = 8  # "auto": the largest micro-batch that fits the GPU (gpt2.plan), resolved by the trainer
    block_size: int | None = None  # None: the model's context
    grad_accum: int = 1
    # The main job's schedule, measured on the 2-core CPU (docs/performance.md): a peak of 6e-3 after 10 warm-up steps
    # threw the loss from about 7 to 16 near step 12 and ended at val 5.41 after 700 steps; 3e-3 after 100 reached
    # 4.96 by step 750, without a spike.
    max_iters: int = 1500
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_interval: int = 100
    eval_iters: int = 8
    log_interval: int = 25
    seed: int = 1337
    out_dir: str = "out"
    resume: bool = False
    overwrite: bool = False
    stop_at: int | None = None
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    recompute: str = "none"  # activation recompute: gpt2.model.RECOMPUTE_MODES
    sample_tokens: int = 200
    sample_prompt: str = "\n"
    init_from: str | None = None  # the fine-tune's source; kept on resume as the record of where it started
    eval_hellaswag: str | None = None  # a HellaSwag .jsonl file scored at every evaluation; None or "" = off

    def __post_init__(self):
        _validate(self)

    def to_dict(self) -> dict:
        """The options as a plain dict (the checkpoint's ``train_args``, ``config.json``'s ``train``)."""
        return asdict(self)


NAMES = tuple(f.name for f in fields(TrainOptions))
# Options a resumed run does not inherit from the checkpoint: they describe this session only.
SESSION_ONLY = ("config", "resume", "overwrite", "stop_at", "out_dir")


def _validate(o: TrainOptions) -> None:
    def need(cond, flag, what):
        if not cond:
            raise ValueError(f"--{flag.replace('_', '-')} {what}, got {getattr(o, flag)!r}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def integer(v, least):
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    need(o.batch_size == "auto" or integer(o.batch_size, 1), "batch_size", "must be an integer >= 1 or auto")
    for k in ("grad_accum", "eval_interval", "eval_iters", "log_interval"):
        need(integer(getattr(o, k), 1), k, "must be an integer >= 1")
    for k in ("max_iters", "warmup_iters", "seed", "sample_tokens"):
        need(integer(getattr(o, k), 0), k, "must be an integer >= 0")
    for k in ("block_size", "stop_at"):
        need(getattr(o, k) is None or integer(getattr(o, k), 1), k, "must be an integer >= 1")
    need(number(o.lr) and o.lr > 0, "lr", "must be > 0")
    need(number(o.min_lr) and 0 <= o.min_lr <= o.lr, "min_lr", "must be in [0, --lr]")
    need(number(o.weight_decay) and o.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(number(o.grad_clip) and o.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
    for k in ("beta1", "beta2", "dropout"):
        need(number(getattr(o, k)) and 0 <= getattr(o, k) < 1, k, "must be in [0, 1)")
    need(o.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
    need(o.recompute in RECOMPUTE_MODES, "recompute", f"must be one of {', '.join(RECOMPUTE_MODES)}")
    for k in ("init_from", "eval_hellaswag"):
        need(getattr(o, k) is None or isinstance(getattr(o, k), str), k, "must be a path")
    need(o.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    need(not (o.fsdp and o.eval_hellaswag), "eval_hellaswag", "is not supported with --fsdp (score the "
         "checkpoint with gpt2 eval --ckpt DIR --hellaswag FILE instead, or pass --eval-hellaswag '')")
    need(o.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "must be auto, float32, bfloat16 or float16")


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` flags to ``parser``. Flags left out are absent from the namespace, so a config file or
    the resumed checkpoint can fill them; see ``load_options``."""
    d = TrainOptions()

    def add(flag, help, **kw):
        parser.add_argument(flag, default=argparse.SUPPRESS, help=help, **kw)

    add("--config", "JSON file of options for a long run; keys are flag names (batch_size or batch-size); "
        "command-line flags override it", metavar="FILE.json")
    add("--preset", f"model preset: {', '.join(PRESETS)} (default {d.preset})")
    add("--data", f"'shakespeare', a .txt file or folder of them, or .bin token shards (a file or folder) "
        f"(default {d.data})")
    add("--backend", f"kernel backend spec, e.g. torch, triton, ext, auto, 'triton,attention=torch' "
        f"(default {d.backend})")
    add("--device", "auto (CUDA if present, else CPU), cpu or cuda (default auto)", choices=["auto", "cpu", "cuda"])
    add("--dtype", "auto (bf16 autocast on GPUs of compute capability 8.0 or newer and on CPUs with native bf16, fp16 "
        "with loss scaling on older GPUs, else float32; gpt2 info says which), float32, bfloat16 or float16 "
        "(default auto)",
        choices=["auto", "float32", "bfloat16", "float16"])
    add("--batch-size", f"sequences per micro-step per process, or auto: the largest that fits the GPU's memory "
        f"(gpt2 plan; a GPU only) (default {d.batch_size})", type=_batch_size)
    add("--block-size", "tokens per sequence, at most the model's context (default: the model's)", type=int)
    add("--grad-accum", f"micro-steps per optimizer step (default {d.grad_accum})", type=int)
    add("--max-iters", f"optimizer steps in the whole run (default {d.max_iters})", type=int)
    add("--lr", f"peak learning rate (default {d.lr})", type=float)
    add("--min-lr", f"learning rate at the end of the cosine decay (default {d.min_lr})", type=float)
    add("--warmup-iters", f"steps of linear warmup (default {d.warmup_iters})", type=int)
    add("--weight-decay", f"AdamW weight decay of 2-D weights (default {d.weight_decay})", type=float)
    add("--beta1", f"AdamW beta1 (default {d.beta1})", type=float)
    add("--beta2", f"AdamW beta2 (default {d.beta2})", type=float)
    add("--grad-clip", f"clip the gradient norm to this; 0 = off (default {d.grad_clip})", type=float)
    add("--dropout", f"dropout probability (default {d.dropout})", type=float)
    add("--eval-interval", f"evaluate, plot and checkpoint every this many steps (default {d.eval_interval})",
        type=int)
    add("--eval-iters", f"validation batches per evaluation (default {d.eval_iters})", type=int)
    add("--log-interval", f"print a log line every this many steps (default {d.log_interval})", type=int)
    add("--seed", f"random seed (default {d.seed})", type=int)
    add("--out-dir", f"folder for ckpt.pt, metrics.jsonl and loss.png (default {d.out_dir})")
    add("--resume", "continue the run whose checkpoint is in --out-dir", action="store_true")
    add("--overwrite", "start afresh even if --out-dir already holds a checkpoint", action="store_true")
    add("--stop-at", "save and stop after this step (the schedule still follows --max-iters); for splitting a "
        "run into sessions", type=int)
    add("--compile", "torch.compile the model", action="store_true")
    add("--fsdp", "under torchrun, shard the parameters, gradients and optimizer state over the processes (FSDP2) "
        "instead of replicating them (DDP); a resumed run keeps its checkpoint's choice unless --fsdp or --no-fsdp "
        "is given (checkpoints are whole either way)", action=argparse.BooleanOptionalAction)
    add("--recompute", "activation recompute, trading compute for memory: recompute each block's attention "
        "(attn), MLP (mlp) or all of it (block) in the backward instead of storing its activations; none, attn, "
        f"mlp or block (default {d.recompute})", metavar="MODE")
    add("--sample-tokens", f"tokens of text to generate at the end; 0 = none (default {d.sample_tokens})",
        type=int)
    add("--sample-prompt", "prompt of the final sample (default a newline)")
    add("--init-from", "start from these weights: a training out dir (ckpt.pt) or a Hugging Face GPT-2 folder "
        "(config.json + model.safetensors or pytorch_model.bin); the model's shape is theirs, the optimizer and "
        "schedule start at step 0. With --resume: ignored once --out-dir holds a checkpoint (that is continued)",
        metavar="DIR")
    add("--eval-hellaswag", "score the model on this HellaSwag .jsonl file at every evaluation (under DDP each "
        "process scores a slice); '' turns it off in a resumed run", metavar="FILE")


def _batch_size(text: str) -> int | str:
    """``--batch-size``: an integer, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or auto, got {text!r}") from None


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
        if key not in NAMES or key == "config":
            raise ValueError(f"--config {path}: unknown option {k!r}; options are "
                             f"{', '.join(x for x in NAMES if x != 'config')}")
        out[key] = v
    return out


def given_options(args: argparse.Namespace) -> dict:
    """The options the user gave: the ``--config`` file's (read here, once), overridden by the command line's."""
    cli = {k: v for k, v in vars(args).items() if k in NAMES}
    from_file = _read_config_file(cli["config"]) if cli.get("config") else {}
    return {**from_file, **cli}


def resolve_options(given: dict, ckpt_args: dict | None = None) -> TrainOptions:
    """The defaults < the checkpoint's options (when resuming) < ``given`` (see ``given_options``)."""
    inherited = {k: v for k, v in (ckpt_args or {}).items() if k in NAMES and k not in SESSION_ONLY}
    return TrainOptions(**{**inherited, **given})


def load_options(args: argparse.Namespace) -> tuple[TrainOptions, dict | None]:
    """Resolve the options of ``gpt2 train`` once, loading the checkpoint to resume if ``--resume``.

    Returns:
        ``(options, checkpoint dict or None)``.
    ``--resume`` with ``--init-from`` continues the out dir's checkpoint if there is one (``--init-from`` ignored,
    with a notice), else starts the fine-tune: one command line serves the first session and every later one.

    Raises:
        ValueError (and subclasses), FileNotFoundError, TypeError: bad options; no, a corrupt or another shape's
        checkpoint with ``--resume``; an out dir that already holds a checkpoint without ``--resume`` or
        ``--overwrite``; an unreadable ``--init-from`` source or a ``--preset`` of another shape than it.
    """
    given = given_options(args)
    out_dir = Path(given.get("out_dir", TrainOptions.out_dir))
    ckpt_file = out_dir / CKPT_NAME
    resume = given.get("resume")
    if resume and given.get("init_from") and not ckpt_file.exists():
        _notice(f"gpt2 train: --resume: no checkpoint in {out_dir} yet; starting from --init-from "
                f"{given['init_from']}")
        resume = False
    if not resume:
        opts = resolve_options(given)
        if ckpt_file.exists() and not opts.overwrite:
            raise ValueError(f"{out_dir} already holds a checkpoint ({CKPT_NAME}); pass --resume to continue it, "
                             "--overwrite to start afresh, or another --out-dir")
        if opts.init_from:
            _check_init_shape(opts, given)
        return opts, None
    ckpt = load_checkpoint(ckpt_file)
    if given.get("init_from") is not None:
        given = {k: v for k, v in given.items() if k != "init_from"}
        origin = (ckpt.get("train_args") or {}).get("init_from")
        _notice(f"gpt2 train: --resume continues {ckpt_file} (step {ckpt['step']}); --init-from is ignored (the "
                + (f"run started from {origin})" if origin else "run did not start from --init-from)"))
    opts = resolve_options(given, ckpt.get("train_args"))
    if "preset" in given:  # a preset asked for explicitly must be the checkpoint's shape
        check_same_shape(config_from_checkpoint(ckpt, ckpt_file), GPTConfig.from_preset(opts.preset), ckpt_file)
    return opts, ckpt


def _check_init_shape(opts: TrainOptions, given: dict) -> None:
    """``--init-from``: the source must be readable, and a ``--preset`` asked for must be its shape."""
    source = open_init_source(opts.init_from)
    if "preset" in given:
        diff = shape_differences(source.config, GPTConfig.from_preset(opts.preset))
        if diff:
            raise ConfigError(f"--preset {opts.preset} is not the shape of the model in --init-from "
                              f"{opts.init_from}: {', '.join(diff)}; leave --preset out (--init-from sets the shape)")


def _notice(msg: str) -> None:
    """A line on stderr from the first process only (under torchrun every process resolves the options)."""
    from gpt2.runtime import dist_env

    if (dist_env() or (0,))[0] == 0:
        print(msg, file=sys.stderr)
