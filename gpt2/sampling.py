"""The sampling rules, in one place for the model (``GPT.generate_stream``) and the CLI (``gpt2 sample``).

- ``check_sampling``: which options are valid (one rule, spelt as Python arguments or as flags).
- ``next_token_probs``: the distribution the next token is drawn from. The logits are divided by the
  temperature; top-k keeps the k likeliest tokens (ties with the k-th are kept); the survivors are renormalised;
  top-p then keeps the smallest prefix of them, sorted by probability, whose mass reaches ``top_p``.
  A token the rules drop has probability 0.
- ``choose_next``: draws the next token from that distribution, or takes the argmax when greedy.
"""

from __future__ import annotations

import torch

__all__ = ["check_sampling", "choose_next", "draw", "next_token_probs", "top_p_keep"]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, greedy: bool = False,
                   max_new_tokens: int = 0, flags: bool = False) -> None:
    """Raise ValueError for sampling options that cannot work.

    Args:
        temperature: > 0 unless ``greedy``.
        top_k: None or 0 = no limit, else the number of likeliest tokens to sample among.
        top_p: None = off, else in (0, 1].
        greedy: argmax decoding (temperature, top_k and top_p are then unused).
        max_new_tokens: >= 0.
        flags: name the options as command-line flags (``--top-k``) instead of arguments (``top_k``).
    """
    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if flags else arg

    if not greedy and not temperature > 0:
        hint = "--greedy" if flags else "greedy=True"
        raise ValueError(f"{name('temperature')} must be > 0, got {temperature} (for argmax decoding pass {hint})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"{name('top_k')} must be >= 0 (0 = no limit), got {top_k!r}")
    if max_new_tokens < 0:
        raise ValueError(f"{name('max_new_tokens')} must be >= 0, got {max_new_tokens}")


def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens top-p keeps: the smallest prefix of the tokens sorted by probability (ties in token order)
    whose mass reaches ``top_p``.

    Args:
        probs: (B, V) probabilities.
        top_p: in (0, 1].
    Returns:
        (B, V) bool, True for the kept tokens.
    """
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    # m = 1 + how many prefix sums fall short of top_p: the first prefix that reaches it has m tokens.
    # (Prefix sums of non-negative numbers never decrease, also in floating point.)
    short = (torch.cumsum(sorted_p, dim=-1) < top_p).sum(dim=-1, keepdim=True)  # (B, 1)
    m = torch.clamp(short + 1, max=probs.shape[-1])
    rank = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)  # (B, V)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, rank < m)


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution of the next token (see the module docstring for the rules).

    Args:
        logits: (B, V).
        temperature: > 0.
        top_k: None or 0 = no limit.
        top_p: None or 1.0 = off.
    Returns:
        (B, V) fp32 probabilities, 0 for every token the rules drop (not renormalised after top-p:
        ``torch.multinomial`` needs no normalisation).
    """
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = probs.masked_fill(~top_p_keep(probs, top_p), 0.0)
    return probs


def choose_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                greedy: bool = False) -> torch.Tensor:
    """The next token of each row: the argmax when ``greedy``, else a draw from ``next_token_probs``.

    Args:
        logits: (B, V) logits of the last position.
    Returns:
        (B, 1) int64 token ids.
    """
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(next_token_probs(logits, temperature, top_k, top_p), 1, generator=generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row drawn from ``probs`` (B, V), as ``torch.multinomial(probs, 1, generator=generator)`` draws
    it (the same exponential race, so the same tokens from the same generator state), without multinomial's checks
    that read the probabilities on the host: nothing here waits for the device, so a CUDA graph can capture it.

    Returns:
        (B, 1) int64 token ids.
    """
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / race, dim=-1, keepdim=True)
