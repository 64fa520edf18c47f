"""``gpt2 tune``: time every op on every backend at a preset's shapes, as ``--backend auto`` would, and print the table.

It is ``auto``'s measurement (``gpt2_kernels.auto``) run on its own, so a user sees the choice and the times behind it
before a long run; the results are stored in the same cache, so a run on those shapes afterwards decides at once.
"""

from __future__ import annotations

import argparse

from gpt2 import runtime


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``tune`` flags to ``parser``."""
    from gpt2.model import PRESETS

    parser.add_argument("--preset", default="shakespeare", choices=list(PRESETS), help="model shape (default "
                        "shakespeare)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default: the preset's "
                        "context); when decoding, the keys each new token attends to")
    parser.add_argument("--mode", default="train", choices=["train", "eval", "decode"],
                        help="train: forward + backward; eval: forward; decode: one new token per sequence "
                        "(default train)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the compute dtype of a run (autocast when not float32; default auto, as gpt2 train)")
    parser.add_argument("--cached", action="store_true", help="show what the cache holds for these shapes, "
                        "measuring only what it lacks (default: measure again and store)")


def run(args) -> int:
    """Run ``gpt2 tune``; returns the exit status."""
    import torch

    from gpt2.model import GPTConfig
    from gpt2_kernels.auto import Case, tune_table

    rt = runtime.start(args.device, args.dtype, distributed=False)
    config = GPTConfig.from_preset(args.preset)
    T = args.block_size or config.block_size
    if args.batch_size < 1 or T < 1:
        raise ValueError(f"--batch-size and --block-size must be positive, got {args.batch_size} and {T}")
    if args.mode != "decode" and T > config.block_size:
        raise ValueError(f"--block-size {T} is longer than the {args.preset} preset's context of {config.block_size}")
    decode = args.mode == "decode"
    case = Case(args.batch_size, 1 if decode else T, config.n_embd, config.n_head, config.vocab_size, rt.dtype,
                torch.float32, args.mode, T if decode else None, 0.0)
    print(tune_table(case, rt.device, fresh=not args.cached))
    return 0
