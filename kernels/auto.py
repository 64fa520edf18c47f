"""``auto`` by measurement: per op, the backend that is fastest here on the shapes a model runs, remembered on disk.

The first time a (device, op, shape, dtype, mode) is met, every usable backend runs that op a few times on inputs of
that shape (forward and backward when training, the forward alone when evaluating or decoding), timed with
``gpt2_kernels.tuning.measure``; the fastest is taken and stored in ``DiskCache("auto.json")`` under a key that
also holds the versions of torch, Triton and this package (``tuning.versions``), so a new install measures again.
A later run reads the choice and decides at once. One line says what was chosen and the times behind it::

    gpt2_kernels: auto on NVIDIA H100 80GB HBM3: attention=native (0.42 ms) over triton (0.92 ms), ...

Rules:

- Candidates are the backends that can run on the device (``registry.unavailable_reason``), Triton never on a CPU
  (only its interpreter runs there). A candidate that raises while timed is skipped, its reason in the line.
- The timing budget is bounded: ``GPT2_KERNELS_AUTO_BUDGET`` seconds (default 3) shared by every (op, backend)
  pair; each pair runs once to learn its cost (on a GPU that first call also pays one-time costs such as a JIT
  compile), then as many timed calls as its share of the budget allows, at least 1 and at most 9. On a CPU the
  kernels' lazy start (0.45 s for the reference layer norm's first forward and backward, measured on one EPYC core)
  is paid first on tiny shapes, after which a first call is within 10% of the next for the big ops, so one that
  spends more than twice the share is the measurement. An op slower than the budget's share still exceeds it: the
  loss head of GPT-2's vocabulary on a CPU, 0.7 to 2 s a call at the shakespeare preset's 8 x 128; the line says how
  long the timing took.
- ``GPT2_KERNELS_AUTO=fixed`` decides by the registry's fixed order instead, without timing (reproducible tests and
  CI; tests/conftest.py sets it). So does a choice asked for while torch.compile traces, or without shapes.
- Under torch.distributed every rank takes rank 0's choice (rank 0 decides, the names are broadcast), so no two
  ranks run different code.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import registry, tuning

__all__ = ["MODES", "Case", "Choice", "candidates", "choose", "decide", "mode", "tune_table"]

MODES = ("train", "eval", "decode")
_CACHE = "auto.json"
_DEFAULT_BUDGET_S = 3.0
_MAX_REPS = 9


def mode() -> str:
    """``measure`` (the default) or ``fixed``, from ``GPT2_KERNELS_AUTO``.

    Raises:
        registry.SpecError: another value.
    """
    value = os.environ.get("GPT2_KERNELS_AUTO", "measure").strip().lower() or "measure"
    if value not in ("measure", "fixed"):
        raise registry.SpecError(f"GPT2_KERNELS_AUTO must be 'measure' or 'fixed', got {value!r}")
    return value


def budget_s() -> float:
    """The timing budget in seconds (``GPT2_KERNELS_AUTO_BUDGET``, default 3)."""
    raw = os.environ.get("GPT2_KERNELS_AUTO_BUDGET", "")
    try:
        value = float(raw) if raw.strip() else _DEFAULT_BUDGET_S
    except ValueError:
        raise registry.SpecError(f"GPT2_KERNELS_AUTO_BUDGET must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise registry.SpecError(f"GPT2_KERNELS_AUTO_BUDGET must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class Case:
    """The shapes a model runs its ops on, from which each op's inputs are made.

    Args:
        batch: B sequences.
        seq: T tokens per sequence (per call; 1 when decoding).
        n_embd, n_head, vocab: C, nh and V (the real vocabulary, as the loss head sees it).
        dtype: what attention, the MLP and the loss head compute in (autocast's dtype, else the weights').
        norm_dtype: the residual stream's dtype, which the layer norms see (the weights' dtype).
        mode: ``train`` (forward + backward), ``eval`` (forward) or ``decode`` (forward of T new tokens over
            ``context`` keys; the loss head is not timed, decoding does not run it).
        context: keys attention sees when decoding (default ``seq``).
        dropout: the attention dropout probability when training.
    """

    batch: int
    seq: int
    n_embd: int
    n_head: int
    vocab: int
    dtype: torch.dtype = torch.float32
    norm_dtype: torch.dtype = torch.float32
    mode: str = "train"
    context: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"auto: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("batch", "seq", "n_embd", "n_head", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"auto: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"auto: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def keys(self) -> int:
        return (self.context or self.seq) if self.mode == "decode" else self.seq

    def shape_of(self, op: str) -> str:
        """The part of the cache key that says what ``op`` runs on."""
        N, C = self.batch * self.seq, self.n_embd
        if op in ("layer_norm", "add_layer_norm"):
            return f"N={N} C={C} {_name(self.norm_dtype)}"
        if op == "attention":
            p = self.dropout if self.mode == "train" else 0.0
            return (f"B={self.batch} nh={self.n_head} Tq={self.seq} Tk={self.keys} hs={C // self.n_head} p={p:g} "
                    f"{_name(self.dtype)}")
        if op == "mlp":
            return f"N={N} C={C} H={4 * C} {_name(self.dtype)}"
        return f"N={N} C={C} V={self.vocab} {_name(self.dtype)}"


@dataclass
class Choice:
    """What ``decide`` found for one op: the pick, each candidate's seconds, each skipped one's reason."""

    op: str
    pick: str
    seconds: dict
    skipped: dict
    cached: bool = False
    timed: bool = True  # False: not measured (decoding never runs the loss head), the fixed order's pick

    def to_json(self) -> dict:
        return {"pick": self.pick, "seconds": self.seconds, "skipped": self.skipped}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def candidates(device) -> list[str]:
    """The backends ``auto`` may time on ``device``: those that can run there, Triton only on a GPU."""
    dev = torch.device(device)
    return [b for b in registry.BACKENDS
            if not (b == "triton" and dev.type == "cpu") and registry.unavailable_reason(b, dev) is None]


def _key(op: str, case: Case, device) -> str:
    return f"{tuning.device_name(device)} | {op} | {case.shape_of(op)} | {case.mode} | {tuning.versions()}"


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and the timed call of each op


def _inputs(op: str, case: Case, device) -> tuple[tuple, dict]:
    """The positional arguments of ``op`` at ``case``'s shapes, and its keyword arguments."""
    g = torch.Generator().manual_seed(0)
    N, C, train = case.batch * case.seq, case.n_embd, case.mode == "train"

    def rand(*shape, dtype, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device, dtype)
        return t.requires_grad_(train)

    if op == "layer_norm":
        return (rand(N, C, dtype=case.norm_dtype), rand(C, dtype=case.norm_dtype), rand(C, dtype=case.norm_dtype)), {}
    if op == "add_layer_norm":
        d = case.norm_dtype
        return (rand(N, C, dtype=d), rand(N, C, dtype=d), rand(C, dtype=d), rand(C, dtype=d)), {}
    if op == "attention":
        return _attention_inputs(case, device, rand), {"causal": True,
                                                       "dropout_p": case.dropout if train else 0.0}
    if op == "mlp":
        d = case.dtype
        return (rand(N, C, dtype=d), rand(4 * C, C, dtype=d, scale=C ** -0.5), rand(4 * C, dtype=d),
                rand(C, 4 * C, dtype=d, scale=(4 * C) ** -0.5), rand(C, dtype=d)), {}
    targets = torch.randint(0, case.vocab, (N,), generator=g).to(device)
    return (rand(N, C, dtype=case.dtype), rand(case.vocab, C, dtype=case.dtype, scale=C ** -0.5), targets, -1), {}


def _attention_inputs(case: Case, device, rand) -> tuple:
    """q, k, v laid out as the model makes them: strided (B, nh, T, hs) views of one (B, T, 3C) projection when
    training or evaluating; when decoding, one new query over the first ``keys`` positions of a KV-cache buffer."""
    B, T, C, nh = case.batch, case.seq, case.n_embd, case.n_head
    hs = C // nh
    if case.mode != "decode":
        qkv = rand(B, T, 3 * C, dtype=case.dtype)
        return tuple(t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(C, dim=2))  # each (B, nh, T, hs)
    cache = rand(2, B, nh, case.keys, hs, dtype=case.dtype)
    return rand(B, nh, T, hs, dtype=case.dtype), cache[0], cache[1]


def _tiny(case: Case) -> Case:
    """``case`` on a few rows and a small vocabulary: the same kernels, for a call that only warms them up."""
    return replace(case, batch=1, seq=min(case.seq, 4), vocab=min(case.vocab, 256),
                   context=None if case.context is None else min(case.context, 8))


def _timed_call(fn: Callable, args: tuple, kwargs: dict, train: bool) -> Callable[[], None]:
    """One call of ``fn(*args, **kwargs)``: forward and the gradients of every input (``torch.autograd.grad``, so
    nothing accumulates) when training; the forward under inference mode otherwise."""
    if not train:
        def forward():
            with torch.inference_mode():
                fn(*args, **kwargs)
        return forward
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads: list = []

    def step():
        out = fn(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        if not grads:  # fixed upstream gradients, made once: ones for a loss, noise for activations
            grads.extend(torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs)
        torch.autograd.grad(outs, leaves, grads)
    return step


def _time_one(op: str, backend: str, case: Case, device, share_s: float, clock) -> float:
    """Median seconds of ``op`` on ``backend`` at ``case``: one call to learn its cost, then as many as
    ``share_s`` allows (1 to ``_MAX_REPS``). On a CPU a call on tiny shapes first pays the kernels' lazy start, and
    a first call longer than twice the share is the measurement."""
    fn, train, cpu = registry._load(op, backend), case.mode == "train", torch.device(device).type == "cpu"
    kw = {} if clock is None else {"clock": clock}
    with warnings.catch_warnings(), torch.autocast(torch.device(device).type, enabled=False):
        warnings.simplefilter("ignore")  # e.g. the extension's dropout fallback: said when the model runs it
        if cpu:
            _timed_call(fn, *_inputs(op, _tiny(case), device), train)()
        call = _timed_call(fn, *_inputs(op, case, device), train)
        first = tuning.measure(call, device, warmup=0, reps=1, **kw)
        if cpu and first > 2 * share_s:
            return first
        reps = max(1, min(_MAX_REPS, int(share_s / first))) if first > 0 else _MAX_REPS
        return tuning.measure(call, device, warmup=0, reps=reps, **kw)


def _measure_op(op: str, case: Case, device, cands: list[str], share_s: float, clock) -> Choice:
    seconds, skipped = {}, {}
    for backend in cands:
        try:
            seconds[backend] = _time_one(op, backend, case, device, share_s, clock)
        except Exception as e:  # noqa: BLE001 - any failure of a candidate skips it, saying why
            first = (str(e).strip().splitlines() or [""])[0][:160]
            skipped[backend] = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if not seconds:
        raise registry.BackendError(f"auto: every backend failed on {op} ({_skips(skipped)})")
    return Choice(op, min(seconds, key=seconds.get), seconds, skipped)


# ---------------------------------------------------------------------------------------------------------------------
# The decision


def _valid(entry, cands: list[str]) -> bool:
    return (isinstance(entry, dict) and entry.get("pick") in cands and isinstance(entry.get("seconds"), dict)
            and isinstance(entry.get("skipped", {}), dict))


def decide(ops, case: Case, device, *, fresh: bool = False, clock=None) -> dict[str, Choice]:
    """``{op: Choice}`` for each op of ``ops`` on ``device``: from the cache where it holds a usable answer (unless
    ``fresh``), else measured now and stored. No collective calls: ``choose`` is what every rank calls."""
    cands = candidates(device)
    cache = tuning.DiskCache(_CACHE)
    stored = {} if fresh else cache.load()
    timed_ops = [op for op in ops if not (op == "linear_cross_entropy" and case.mode == "decode")]
    todo = [op for op in timed_ops if not _valid(stored.get(_key(op, case, device)), cands)]
    share = budget_s() / max(1, len(todo) * len(cands))
    out = {}
    for op in ops:
        if op not in timed_ops:
            out[op] = Choice(op, registry.fixed_auto(device), {}, {}, timed=False)
        elif op in todo:
            out[op] = _measure_op(op, case, device, cands, share, clock)
            cache.put(_key(op, case, device), out[op].to_json())
        else:
            e = stored[_key(op, case, device)]
            out[op] = Choice(op, e["pick"], e["seconds"], e.get("skipped", {}), cached=True)
    return out


def choose(ops, case: Case, device, *, clock=None) -> dict[str, str]:
    """``{op: backend}`` for the ``ops`` a spec leaves to ``auto``, by measurement (``decide``); says once what it
    chose. Under torch.distributed (initialised, more than one rank), rank 0 decides and every rank gets its names.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    picks = None
    if not distributed or dist.get_rank() == 0:
        t0 = time.perf_counter()
        choices = decide(ops, case, device, clock=clock)
        picks = {op: c.pick for op, c in choices.items()}
        registry._announce(_line(choices, device, time.perf_counter() - t0))
    if distributed:
        box = [picks]
        dist.broadcast_object_list(box, src=0)
        picks = box[0]
    return picks


# ---------------------------------------------------------------------------------------------------------------------
# What it says


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def _skips(skipped: dict) -> str:
    return ", ".join(f"{b} skipped: {why}" for b, why in skipped.items())


def _describe(c: Choice) -> str:
    if not c.timed:
        return f"{c.op}={c.pick} (not timed: decoding does not run it)"
    text = f"{c.op}={c.pick} ({_ms(c.seconds[c.pick])})"
    others = sorted((b for b in c.seconds if b != c.pick), key=c.seconds.get)
    if others:
        text += " over " + ", ".join(f"{b} ({_ms(c.seconds[b])})" for b in others)
    if c.skipped:
        text += "; " + _skips(c.skipped)
    return text


def _line(choices: dict[str, Choice], device, elapsed_s: float) -> str:
    timed = [c for c in choices.values() if c.timed]
    if timed and all(c.cached for c in timed):
        how = f"from the cache {tuning.DiskCache(_CACHE).path}"
    else:
        how = f"timing took {elapsed_s:.1f} s (budget {budget_s():g} s, GPT2_KERNELS_AUTO_BUDGET)"
    return (f"gpt2_kernels: auto on {tuning.device_name(device)}: " + "; ".join(map(_describe, choices.values()))
            + f" [{how}]")


def tune_table(case: Case, device, *, fresh: bool = True) -> str:
    """The table of every op x candidate backend at ``case`` on ``device``, times in ms and the pick marked;
    measured now (``fresh``) and stored, or read from the cache."""
    t0 = time.perf_counter()
    choices = decide(registry.OPS, case, device, fresh=fresh)
    elapsed = time.perf_counter() - t0
    cands = candidates(device)
    rows = [f"  {'op':<22}" + "".join(f"{b:>12}" for b in cands) + "   pick"]
    for op, c in choices.items():
        cells = []
        for b in cands:
            if b in c.seconds:
                cells.append(f"{c.seconds[b] * 1e3:>11.3f}{'*' if b == c.pick else ' '}")
            else:
                cells.append(f"{'-' if not c.timed else 'failed':>11} ")
        rows.append(f"  {op:<22}" + "".join(cells) + f"   {c.pick}")
    skipped = [f"  {c.op} {b}: {why}" for c in choices.values() for b, why in c.skipped.items()]
    head = (f"auto on {tuning.device_name(device)}, {case.mode} B={case.batch} T={case.seq} C={case.n_embd} "
            f"nh={case.n_head} V={case.vocab} {_name(case.dtype)} (norms {_name(case.norm_dtype)}): ms per call"
            f"{' (forward + backward)' if case.mode == 'train' else ' (forward)'}, * = fastest; "
            f"{elapsed:.1f} s")
    return "\n".join([head, *rows, *skipped])
