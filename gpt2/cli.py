"""The ``gpt2`` command: ``info``, ``prepare``, ``train``, ``sample``, ``eval``, ``plan`` and ``tune``.

Errors a user can cause (a bad flag value, a missing file, a backend that cannot run) end the
command with one line on stderr and a non-zero exit status, not a traceback (set ``GPT2_DEBUG=1``
to see the traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys


class UsageError(ValueError):
    """A command-line value that cannot work."""


def _info(args) -> int:
    import platform

    import torch

    import gpt2
    import gpt2_kernels.registry
    from gpt2_kernels.registry import BACKENDS, OPS, unavailable_reason

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        triton_version = f"not importable ({type(e).__name__}: {e})"
    print(f"python  {platform.python_version()}")
    print(f"torch   {torch.__version__}")
    print(f"triton  {triton_version}")
    # The import names this project installs (Hugging Face's `kernels`, which transformers needs, is another package).
    print(f"package gpt2 and gpt2_kernels ({os.path.dirname(gpt2.__file__)}, {gpt2_kernels.__path__[0]})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"device  cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print(f"device  cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
              "no CUDA device")
    # What --dtype auto picks where train, sample and eval would run (--device auto), by the rule they share.
    from gpt2.runtime import describe_auto_dtype, resolve_device

    dev = resolve_device("auto")
    print(f"dtype   auto on {dev}: {describe_auto_dtype(dev)}")
    sys.stdout.flush()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        reasons = {b: unavailable_reason(b, dev) for b in BACKENDS}
        chosen = gpt2_kernels.registry.resolve("auto", dev, quiet=True)
        print(f"\nops x backends on {dev} (yes = usable here; auto = the fixed order: a run times each op on its "
              "shapes unless GPT2_KERNELS_AUTO=fixed, see gpt2 tune)")
        print(f"  {'op':<22}" + "".join(f"{b:<8}" for b in BACKENDS) + "auto")
        for op in OPS:
            cells = "".join(f"{'yes' if reasons[b] is None else 'no':<8}" for b in BACKENDS)
            print(f"  {op:<22}{cells}{chosen[op]}")
        for b, why in reasons.items():
            if why is not None:
                print(f"  {b}: {why}")
        if dev == "cpu" and reasons["ext"] is None:
            from gpt2_kernels.ext import cpu_simd_level

            print(f"  ext: the extension's CPU kernels run their {cpu_simd_level()} build here")
    return 0


def _prepare(args) -> int:
    from pathlib import Path

    import numpy as np

    from gpt2.data import load_dataset, write_shard

    if args.source.endswith(".bin"):
        raise UsageError(f"{args.source} is already a token shard; prepare reads text")
    ds = load_dataset(args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("shakespeare" if args.source == "shakespeare" else Path(args.source).stem)
    written = []
    for split in ("val", "train"):
        toks = np.concatenate(ds.split(split))
        for i, start in enumerate(range(0, max(len(toks), 1), args.shard_size)):
            path = out / f"{name}_{split}_{i:06d}.bin"
            write_shard(path, toks[start:start + args.shard_size])
            written.append((path, min(args.shard_size, len(toks) - start)))
    for path, n in written:
        print(f"wrote {path} ({n:,} tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2", description="GPT-2 on fused Triton / C++ / CUDA kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, device, and which kernel backend can run each op here")
    p.set_defaults(func=_info)

    p = sub.add_parser("prepare", help="tokenize text into llm.c-format .bin shards")
    p.add_argument("source", nargs="?", default="shakespeare", help="'shakespeare', a .txt file or a folder of .txt")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--name", default=None, help="shard name prefix (default: from the source)")
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard")
    p.set_defaults(func=_prepare)

    from gpt2 import evaluate, sample, train

    p = sub.add_parser("train", help="train a GPT-2 (default: the shakespeare preset on the built-in corpus)")
    train.add_args(p)
    p.set_defaults(func=train.run)

    p = sub.add_parser("sample", help="generate text from a checkpoint or a pretrained folder")
    sample.add_args(p)
    p.set_defaults(func=sample.run)

    p = sub.add_parser("eval", help="a model's loss and perplexity on a corpus (windowed), and its HellaSwag accuracy")
    evaluate.add_args(p)
    p.set_defaults(func=evaluate.run)

    from gpt2 import plan

    p = sub.add_parser("plan", help="peak GPU memory of a training step, and the largest micro-batch that fits "
                       "(exit 1 when nothing does)")
    plan.add_args(p)
    p.set_defaults(func=plan.run)

    from gpt2 import tune

    p = sub.add_parser("tune", help="time every op on every backend at a preset's shapes and show what "
                       "--backend auto picks (stored for later runs)")
    tune.add_args(p)
    p.set_defaults(func=tune.run)
    return parser


def allocator_defaults() -> None:
    # Large CPU tensors (the loss head's (V, C) gradient, activations) are mmap'd fresh on every
    # allocation, and first-touching them 4 KiB page by page took about a third of a training step
    # on the 2-core test machine. With transparent huge pages (torch's THP_MEM_ALLOC_ENABLE) the
    # shakespeare-preset step went from 348 to 248 ms (torch backend) and 187 to 170 ms (ext
    # backend). torch reads the variable once, at its first allocation, so this runs before torch
    # is imported; a value the user set wins.
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    allocator_defaults()
    from gpt2.data import DataError
    from gpt2.model import ConfigError
    from gpt2_kernels.registry import BackendError, SpecError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, DataError, ConfigError, BackendError, SpecError, FileNotFoundError, ValueError,
            TypeError) as e:
        if os.environ.get("GPT2_DEBUG"):
            raise
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("GPT2_DEBUG"):
            raise
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130
