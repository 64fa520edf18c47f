"""gpt2 eval: a model's language-model loss on a corpus, and its HellaSwag accuracy.

The loss follows Hugging Face's guide "Perplexity of fixed-length models", with windows of (input,
next-token target) pairs as in training. A stream of n tokens has n - 1 targets: token i+1 given the
tokens up to i. Windows of the model's context T start every --stride inputs (default T/2): the window
at begin feeds tokens[begin:end] and predicts tokens[begin+1:end+1], end = min(begin + T, n - 1), and
scores only its last end - prev_end targets, the ones no earlier window scored. So every token but the
first is scored exactly once, with as much left context as its window gives (at least T - stride tokens
after the first window); the last window is the one that reaches the end. --stride T gives disjoint
windows; a smaller stride costs T / stride times the compute for more context per token.
A window spans T + 1 tokens, its T inputs and their next tokens: the guide's loop with max_length = T + 1
(its max_length counts a window's tokens, fed as inputs and labels at once, and the model shifts the labels,
so a guide window of T tokens scores at most T - 1 targets, and with stride T the first token of every window
after the first goes unscored).

--data: 'shakespeare' (the default) is the built-in corpus's validation split, the very tokens
gpt2 train validates on (the last 10% of each play, plays joined by <|endoftext|>), as one stream.
A text file is its whole text, one stream; a folder of .txt files (searched recursively) is one stream
per file. A .bin shard (llm.c format) is all its tokens; a folder holding .bin files is every shard in
it, whole, val and train alike (pass one shard to score only it), one stream per shard.

Windows never cross files: each stream is scored on its own, its first token unscored, and the totals
are summed. bits_per_byte (text sources only) is the total loss in bits over the UTF-8 bytes of the text
the scored streams decode to, <|endoftext|> separators counting none; token shards carry no text, so
for them it is null.

--hellaswag FILE.jsonl scores HellaSwag (see gpt2.hellaswag); then the loss is computed only when
--data is given too. A context and ending longer than the model's context is cut from the left (a note
says how many). --json FILE writes the results, atomically, once everything is computed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2 import runtime
from gpt2.checkpoint import load_inference_model
from gpt2.data import DataError

__all__ = ["Stream", "add_args", "count_windows", "lm_loss", "load_streams", "run", "windows"]


class UsageError(ValueError):
    """A flag value that cannot work."""


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` flags (and its description) to ``parser``."""
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.usage = ("gpt2 eval (--pretrained DIR | --ckpt DIR) [--data SRC] [--stride N] [--hellaswag FILE]"
                    " [--json FILE] [--batch-size N] [--backend B] [--device D] [--dtype D]")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--ckpt", metavar="DIR", help="a training checkpoint: a run's out dir (holding ckpt.pt) or the .pt file")
    parser.add_argument("--pretrained", metavar="DIR", help="a Hugging Face GPT-2 folder (config.json + model.safetensors)")
    parser.add_argument("--data", default=None, metavar="SRC", help="'shakespeare' (its validation split), a .txt file or folder, "
                        "or .bin shards (a file or a folder); each file is scored as its own stream. Default: "
                        "shakespeare, unless --hellaswag is given (then no loss unless --data is given too)")
    parser.add_argument("--stride", type=int, default=None, metavar="N", help="start a window every N tokens, 1..context "
                        "(default: half the model's context)")
    parser.add_argument("--hellaswag", default=None, metavar="FILE.jsonl", help="also score HellaSwag: jsonl lines "
                        "with ctx, endings (4) and label (0..3); contexts too long for the model are cut from the left")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default 8)")
    parser.add_argument("--backend", default="auto", help="kernel backend spec (default auto)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 on GPUs of compute capability 8.0 or newer, fp16 on older ones; float32 "
                        "on the CPU")


# ----------------------------------------------------------------------------- data

@dataclass
class Stream:
    """One stream of tokens scored on its own; ``num_bytes`` is the UTF-8 size of its text (None for shards)."""

    name: str
    tokens: np.ndarray
    num_bytes: int | None


def _text_bytes(tokens: np.ndarray) -> int:
    """UTF-8 bytes the tokens decode to, ``<|endoftext|>`` counting none."""
    from gpt2.tokenizer import EOT_ID, get_encoding

    return len(get_encoding().decode_bytes([int(t) for t in tokens if t != EOT_ID]))


def _text_stream(path: Path) -> Stream:
    from gpt2.tokenizer import encode

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from e
    toks = np.asarray(encode(text), dtype=np.int64)
    return Stream(str(path), toks, _text_bytes(toks))


def load_streams(source: str) -> list[Stream]:
    """The token streams of ``--data`` (see the module docstring); streams of fewer than two tokens are dropped.

    Raises:
        DataError: the source does not exist, holds nothing, or holds fewer than two tokens in every stream.
    """
    from gpt2.data import load_dataset, read_shard

    if source == "shakespeare":
        streams = [Stream("shakespeare (validation split)", a, _text_bytes(a))
                   for a in load_dataset("shakespeare").val]
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"--data {source!r} does not exist (use 'shakespeare', a .txt file or folder, or .bin "
                            "shards)")
        if path.is_file():
            streams = [Stream(str(path), read_shard(path), None) if path.suffix == ".bin" else _text_stream(path)]
        elif sorted(path.glob("*.bin")):
            streams = [Stream(str(p), read_shard(p), None) for p in sorted(path.glob("*.bin"))]
        else:
            texts = sorted(path.rglob("*.txt"))
            if not texts:
                raise DataError(f"--data folder {path} holds no .txt files and no .bin shards")
            streams = [_text_stream(p) for p in texts]
    kept = [s for s in streams if s.tokens.size >= 2]
    if not kept:
        where = "it" if len(streams) == 1 else f"any of its {len(streams)} files"
        raise DataError(f"--data {source}: fewer than two tokens in {where}; the loss needs a token and its successor")
    return kept


# ----------------------------------------------------------------------------- windows

def windows(num_tokens: int, context: int, stride: int):
    """Yield ``(begin, end, skip)`` per window of a stream of ``num_tokens`` tokens: inputs
    ``tokens[begin:end]``, targets ``tokens[begin+1:end+1]``, of which the first ``skip`` were scored by an
    earlier window. Over all windows the scored targets are tokens 1..num_tokens-1, each once."""
    last = num_tokens - 1  # inputs that have a target
    begin, prev_end = 0, 0
    while True:
        end = min(begin + context, last)
        yield begin, end, prev_end - begin
        if end == last:
            return
        prev_end, begin = end, begin + stride


def count_windows(num_tokens: int, context: int, stride: int) -> int:
    """How many windows ``windows`` yields."""
    return 1 + max(0, -(-(num_tokens - 1 - context) // stride))


def _batch(tokens: np.ndarray, group: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y, scored) of a group of windows: right-padded inputs, targets with -1 where not scored."""
    L = max(end - begin for begin, end, _ in group)
    x = np.zeros((len(group), L), dtype=np.int64)
    y = np.full((len(group), L), -1, dtype=np.int64)
    scored = 0
    for r, (begin, end, skip) in enumerate(group):
        x[r, :end - begin] = tokens[begin:end]
        y[r, skip:end - begin] = tokens[begin + 1 + skip:end + 1]
        scored += end - begin - skip
    return torch.from_numpy(x), torch.from_numpy(y), scored


def _check_vocab(streams: list[Stream], vocab_size: int) -> None:
    for s in streams:
        top = int(s.tokens.max())
        if top >= vocab_size:
            raise DataError(f"{s.name} holds token id {top}, outside the model's vocabulary of {vocab_size}")


def _batches(tokens: np.ndarray, context: int, stride: int, batch_size: int):
    """Yield ``(x, y, scored, windows)`` batches of one stream: ``batch_size`` windows at most, never crossing
    the stream's end."""
    group = []
    for w in windows(tokens.size, context, stride):
        group.append(w)
        if len(group) == batch_size or w[1] == tokens.size - 1:
            yield (*_batch(tokens, group), len(group))
            group = []


def lm_loss(model, streams: list[Stream], stride: int, batch_size: int = 8, autocast=None,
            progress: bool = False) -> dict:
    """The loss of ``model`` over ``streams``, windowed as the module docstring says.

    Args:
        model: a ``GPT``; run in eval mode under ``torch.no_grad``, its training mode restored afterwards.
        streams: from ``load_streams``.
        stride: 1..block_size.
        batch_size: windows per forward pass.
        autocast: a context-manager factory (``Runtime.autocast``), or None.
        progress: show a tqdm bar on stderr (when it is a terminal).
    Returns:
        ``{"loss", "perplexity", "tokens", "bits_per_byte"}``: mean nats per scored token, its exponential,
        the number of scored tokens, and bits per UTF-8 byte of text (None for token shards).
    """
    from tqdm import tqdm

    T = model.config.block_size
    _check_vocab(streams, model.config.vocab_size)
    autocast = autocast or contextlib.nullcontext
    device = model.transformer.wte.weight.device
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed nats, read once at the end
    scored = 0
    bar = tqdm(total=sum(count_windows(s.tokens.size, T, stride) for s in streams), unit="window",
               disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in streams:
                for x, y, n, num_windows in _batches(s.tokens, T, stride, batch_size):
                    with autocast():
                        _, loss = model(x.to(device), y.to(device))  # the mean over the scored targets
                    total += loss.double() * n
                    scored += n
                    bar.update(num_windows)
    finally:
        model.train(was_training)
        bar.close()
    nats = float(total)
    num_bytes = [s.num_bytes for s in streams]
    bpb = None if None in num_bytes else nats / math.log(2) / max(sum(num_bytes), 1)
    loss = nats / scored
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": scored, "bits_per_byte": bpb}


# ----------------------------------------------------------------------------- the command

def _check_flags(args) -> None:
    if (args.ckpt is None) == (args.pretrained is None):
        raise UsageError("give exactly one of --pretrained DIR and --ckpt DIR" +
                         (" (both were given)" if args.ckpt else ""))
    if args.stride is not None and args.stride < 1:
        raise UsageError(f"--stride must be >= 1, got {args.stride}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: its folder does not exist")


def _report(result: dict) -> None:
    if "loss" in result:
        bpb = result["bits_per_byte"]
        print(f"data {result['data']}: {result['tokens']:,} tokens scored, context {result['context']}, stride "
              f"{result['stride']}")
        print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | bits per byte "
              + (f"{bpb:.4f}" if bpb is not None else "n/a (token shards)"))
    if "accuracy" in result:
        print(f"hellaswag: accuracy {result['accuracy']:.4f} | accuracy_norm {result['accuracy_norm']:.4f} | "
              f"{result['n']:,} examples")


def _score_hellaswag(model, examples, rt) -> dict:
    from tqdm import tqdm

    from gpt2.hellaswag import score_hellaswag

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bar = tqdm(examples, unit="example", disable=None, file=sys.stderr, dynamic_ncols=True, leave=False)
        result = score_hellaswag(model, bar, device=rt.device, autocast=rt.autocast)
    for w in caught:
        print(f"gpt2 eval: note: {w.message}", file=sys.stderr)
    return result


def run(args) -> int:
    """Run ``gpt2 eval``; returns the exit status."""
    from gpt2.checkpoint import atomic_write
    from gpt2.hellaswag import load_hellaswag

    _check_flags(args)
    examples = load_hellaswag(args.hellaswag) if args.hellaswag else None
    source = args.data if args.data is not None else (None if examples is not None else "shakespeare")
    streams = load_streams(source) if source is not None else None
    rt = runtime.start(args.device, args.dtype, distributed=False)
    model = load_inference_model(args.ckpt, args.pretrained, args.backend, rt.device)
    T = model.config.block_size
    stride = args.stride if args.stride is not None else max(1, T // 2)
    if stride > T:
        raise UsageError(f"--stride {stride} is more than the model's context of {T} tokens; windows would skip "
                         "tokens")
    result = {}
    if streams is not None:
        result.update(data=source, context=T, stride=stride)
        result.update(lm_loss(model, streams, stride, args.batch_size, rt.autocast, progress=True))
    if examples is not None:
        result.update(_score_hellaswag(model, examples, rt))
    _report(result)
    if args.json is not None:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
    return 0
