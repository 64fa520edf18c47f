"""HellaSwag: pick the likeliest of four endings of a context, by the language model's loss.

The file is HellaSwag's jsonl: one JSON object a line with ``ctx`` (a string), ``endings`` (a list of
four strings) and ``label`` (the index of the right ending, an int 0..3); other keys are ignored, blank
lines skipped. ``load_hellaswag`` checks every line before anything is scored.

Scoring an ending: the tokens of ``ctx``, then the tokens of ``" " + ending`` (tokenized apart, as
written), and the cross-entropy of the ending's tokens given everything before them. ``predictions``
take the ending of least summed loss, ``predictions_norm`` the ending of least mean loss per ending
token. The four endings of an example run as one right-padded batch: the model is causal, so padding
after a sequence cannot change its scores, and the padded targets are masked out.

Context plus ending longer than the model can see (``block_size + 1`` tokens: ``block_size`` inputs,
each predicting the next) is cut from the left, dropping the start of the context, with one warning per
call saying how many endings were cut; an ending that alone needs more than ``block_size`` predictions
is an error.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2.data import DataError

__all__ = ["Example", "load_hellaswag", "score_hellaswag"]

NUM_ENDINGS = 4


@dataclass(frozen=True)
class Example:
    """One HellaSwag item: a context, its four candidate endings and the index of the right one."""

    ctx: str
    endings: tuple[str, ...]
    label: int


# ----------------------------------------------------------------------------- loading

def _example(obj, where: str) -> Example:
    """Check one parsed line; ``where`` is ``file:line`` for the messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with ctx, endings and label, got a {type(obj).__name__}")
    missing = [k for k in ("ctx", "endings", "label") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str) or not ctx:
        raise DataError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r}")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        got = f"{len(endings)} items" if isinstance(endings, list) else f"a {type(endings).__name__}"
        raise DataError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings, got {got}")
    for i, e in enumerate(endings):
        if not isinstance(e, str):
            raise DataError(f"{where}: endings[{i}] must be a string, got a {type(e).__name__}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: 'label' must be an integer 0..{NUM_ENDINGS - 1}, got {label!r} "
                        f"(a {type(label).__name__})")
    if not 0 <= label < NUM_ENDINGS:
        raise DataError(f"{where}: 'label' must be an integer 0..{NUM_ENDINGS - 1}, got {label}")
    return Example(ctx, tuple(endings), label)


def load_hellaswag(path) -> list[Example]:
    """Read and check a HellaSwag jsonl file (see the module docstring).

    Args:
        path: the ``.jsonl`` file.
    Returns:
        The examples, in file order.
    Raises:
        DataError: the file is missing, not UTF-8, holds no example, or a line is not valid JSON, lacks a key,
            has other than four endings or a label that is not an int in 0..3. The message is one line naming
            ``file:line`` and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"HellaSwag file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"HellaSwag file {path} is not UTF-8 text ({e})") from e
    examples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
        examples.append(_example(obj, f"{path}:{n}"))
    if not examples:
        raise DataError(f"HellaSwag file {path} holds no examples (it is empty)")
    return examples


# ----------------------------------------------------------------------------- scoring

def _encoder(tokenizer):
    """A function text -> token ids: ``tokenizer`` itself if callable, its ``.encode`` otherwise, or GPT-2's."""
    if tokenizer is None:
        from gpt2.tokenizer import encode

        return encode
    return tokenizer if callable(tokenizer) else tokenizer.encode


def _rows(example: Example, encode, block_size: int, vocab_size: int, where: str = "a HellaSwag example"
          ) -> tuple[list, int]:
    """Token rows of one example's endings: per ending (ids, index of its first token), cut from the left to
    ``block_size + 1`` tokens; and how many were cut. ``where`` names the example in errors."""
    ctx = list(encode(example.ctx))
    rows, cut = [], 0
    for ending in example.endings:
        end = list(encode(" " + ending))
        if len(end) > block_size:
            raise DataError(f"{where}: an ending is {len(end)} tokens long, and the model predicts at most "
                            f"{block_size} tokens at once")
        ids = ctx + end
        if len(ids) > block_size + 1:
            ids, cut = ids[-(block_size + 1):], cut + 1
        top = max(ids)
        if top >= vocab_size:
            raise DataError(f"{where} tokenizes to id {top}, outside the model's vocabulary of {vocab_size}")
        rows.append((ids, len(ids) - len(end)))
    return rows, cut


def _ending_losses(model, rows: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean cross-entropy of each row's ending tokens, (4,) and (4,), fp32."""
    L = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), L, dtype=torch.long)  # right-padded with token 0; causal, so harmless
    y = torch.full((len(rows), L), -1, dtype=torch.long)  # -1: not an ending token, or padding
    for r, (ids, first) in enumerate(rows):
        t = torch.tensor(ids)
        x[r, :len(ids) - 1] = t[:-1]
        y[r, first - 1:len(ids) - 1] = t[first:]  # target j is token j+1: the ending's tokens
    x, y = x.to(device), y.to(device)
    logits, _ = model(x)  # (4, L, V) fp32
    nll = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")  # (4, L)
    mask = (y >= 0).float()
    total = (nll * mask).sum(dim=1)
    return total, total / mask.sum(dim=1)


def score_hellaswag(model, examples, tokenizer=None, device=None, autocast=None) -> dict:
    """Score HellaSwag examples with a ``GPT``.

    The model runs in eval mode under ``torch.no_grad``; its training mode is restored afterwards.

    Args:
        model: a ``gpt2.model.GPT``.
        examples: ``Example`` s (from ``load_hellaswag``), any iterable (a progress bar wrapping the list works).
        tokenizer: a function text -> token ids, or an object with ``.encode``; default GPT-2's BPE.
        device: where the tokens go; default the model's device.
        autocast: a context-manager factory (``Runtime.autocast``) to run the model under; default none.
    Returns:
        ``{"accuracy", "accuracy_norm", "n", "predictions", "predictions_norm"}``: the fraction right by summed
        and by per-token mean loss, the number of examples, and the chosen ending of each.
    Raises:
        DataError: no examples; an ending longer than the model's context; a token outside its vocabulary.
    """
    encode = _encoder(tokenizer)
    device = torch.device(device) if device is not None else model.transformer.wte.weight.device
    autocast = autocast or contextlib.nullcontext
    T, V = model.config.block_size, model.config.vocab_size
    preds, preds_norm, labels, cut = [], [], [], 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, ex in enumerate(examples):
                rows, c = _rows(ex, encode, T, V, f"HellaSwag example {i + 1}")
                with autocast():
                    total, mean = _ending_losses(model, rows, device)
                preds.append(int(total.argmin()))
                preds_norm.append(int(mean.argmin()))
                labels.append(ex.label)
                cut += c
    finally:
        model.train(was_training)
    if not labels:
        raise DataError("no HellaSwag examples to score")
    if cut:
        warnings.warn(f"{cut} HellaSwag ending(s) did not fit the model's context of {T} tokens with their "
                      "context; the context was cut from the left", stacklevel=2)
    n = len(labels)
    return {
        "accuracy": sum(p == lab for p, lab in zip(preds, labels)) / n,
        "accuracy_norm": sum(p == lab for p, lab in zip(preds_norm, labels)) / n,
        "n": n,
        "predictions": preds,
        "predictions_norm": preds_norm,
    }
