"""``gpt2 plan``: the peak GPU memory of one training step, and the largest micro-batch that fits.

The step's peak, per GPU, is the sum of

- **parameters, gradients and AdamW state**, counted from the model: fp32 master weights (4 bytes a parameter, the
  tied embedding once, the padded vocabulary rows included), fp32 gradients (4), ``exp_avg`` and ``exp_avg_sq``
  (8) and one fp32 ``step`` per parameter tensor (fused AdamW keeps it on the device). Under ``--fsdp`` (FSDP2,
  as ``gpt2.runtime.Runtime.shard`` sets it up: each block's attention and MLP a unit gathered in the compute
  dtype, the rest the fp32 root) parameters and AdamW state are sharded over the world size, and what is whole at a
  time is added back: the root's parameters and gradients (FSDP2 keeps the root gathered from forward to the end of
  backward) and ``FSDP_UNITS_IN_FLIGHT`` units (the one running and the one prefetched). Gradients are sharded
  only with one micro-step per optimizer step: ``gpt2.train`` skips the reduce-scatter on all but the last
  micro-step, so with gradient accumulation every process holds whole fp32 gradients. Under DDP
  (``--world-size`` > 1 without ``--fsdp``) DDP's gradient buckets are a second copy of the gradients. The traced
  autocast copies of the weights are counted under FSDP too, where the gathered bf16 weights stand in for them
  (FSDP frees those after each unit): an overestimate of 2 bytes a parameter at most.
- **activations and temporaries**, measured by tracing the real model: ``GPT`` built inside
  ``torch._subclasses.fake_tensor.FakeTensorMode`` (so nothing is allocated: gpt2-xl traces on a 2-core CPU),
  one forward with targets and one ``backward()``, under the autocast the trainer uses, with the gradients already
  allocated (a second micro-step, the worst case: their accumulation is in place, the incoming gradient a
  temporary). A ``TorchDispatchMode`` above the fake mode sees every op: each new storage an op returns adds its
  bytes to a live count and a ``weakref`` callback subtracts them when the storage dies, exactly as the CPU
  allocator would see it (``tests/test_plan.py`` checks the count against the real allocator's, read with the
  profiler). The live count after each op is one point of a timeline; the peak is its maximum.
  Every tensor of a step is either proportional to the micro-batch B or independent of it, and the op sequence
  does not depend on B, so each timeline point is a + b B: two traces (B = 2, 3) give every point's line, and the
  peak at any B is the maximum of those lines, exact without tracing at B. Not B = 1: there a (1, ...) tensor can
  count as contiguous where a (2, ...) one does not, and a ``.contiguous()`` copy disappears, so B = 1 is
  extrapolated too (at most an overestimate of such copies).
- **the loss head's chunk**: the fused head's buffers depend on the row count through ``gpt2_kernels.chunked_loss``'s
  policy (chunk rows, vocabulary padding), which is not linear in B and differs between the CPU and a GPU (the
  chunk rows, and how the fp32 dW accumulates: the CPU upcasts each bf16 chunk to fp32). The trace therefore skips
  the timeline inside the head's forward and records the live bytes at its entrance; ``loss_head_bytes`` adds the
  head's own buffers from that policy for the target device: the padded weight copy, dh, the fp32 dW, the
  per-row losses, one (rows, Vp) chunk of logits and the accumulation's temporary. (The ``torch`` reference head
  holds the whole logits, linear in B: it is traced with the rest.)
- **the allocator's slack**: ``ALLOCATOR_SLACK`` of the above, plus ``CUDA_CONTEXT_GIB`` (and ``NCCL_GIB`` with
  more than one process), which ``torch.cuda.max_memory_allocated`` never shows but the device's memory must hold.

Tracing on the CPU: fake CUDA tensors need a CUDA build of torch, so the trace runs on fake CPU tensors under CPU
autocast. bfloat16 and float16 are traced as bfloat16: both are 2 bytes, and autocast casts the same ops to either.
The Triton kernels cannot run on fake tensors; ops whose backend is ``triton`` (or ``auto``, which picks Triton
on a GPU) are traced with the extension (``ext``) instead, whose fake kernels return what its real ones do and
whose autograd saves the same tensors as Triton's (attention: q, k, v, the output and the log-sum-exp; layer norm:
the input, mean and rstd; the MLP: its input, the pre-activation and the activation; the loss head: the same
chunked driver). Without the extension built, those ops are traced with the ``torch`` reference, which holds the
(T, T) attention matrix: an overestimate, said in the output. Not modelled: ``torch.compile``, dropout masks
(the presets train without dropout), the optimizer step's transients (fused AdamW has none worth counting, and it
runs after the activations are gone), cuBLAS workspaces (in the slack).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import weakref
from dataclasses import dataclass

import numpy as np
import torch

import gpt2_kernels.registry
from gpt2.model import GPT, PRESETS, RECOMPUTE_MODES, GPTConfig
from gpt2.runtime import DTYPES
from gpt2_kernels.chunked_loss import chunk_plan

__all__ = ["ALLOCATOR_SLACK", "CUDA_CONTEXT_GIB", "DEFAULT_TOKENS_PER_STEP", "Plan", "activation_bytes",
           "add_args", "auto_batch_size", "loss_head_bytes", "make_plan", "run", "static_bytes"]

GIB = 2**30
# The caching allocator rounds blocks up and fragments: reserved memory runs some 5-15% above the allocated peak
# in GPT-2 training; take 10% of the step's peak.
ALLOCATOR_SLACK = 0.10
# The CUDA context with torch's kernels loaded (not in max_memory_allocated): about 0.5 GiB on an H100.
CUDA_CONTEXT_GIB = 0.5
# NCCL's buffers with more than one process: 4 MiB per channel and direction by default, up to 32 channels.
NCCL_GIB = 0.25
# FSDP2 gathers the next unit's parameters while one runs (implicit prefetch): two units gathered at a time.
FSDP_UNITS_IN_FLIGHT = 2
# GPT-2's optimizer step: 2^19 tokens (0.5M).
DEFAULT_TOKENS_PER_STEP = 524288
# A micro-step of this many tokens keeps a GPU's matmuls busy: recompute more only to reach it.
BUSY_TOKENS = 8192
_MAX_MICRO_BATCH = 1 << 16


class PlanError(ValueError):
    """A plan request that cannot work (bad preset, memory, block size or world size)."""


# ----------------------------------------------------------------------------- static memory


def static_bytes(config: GPTConfig, world_size: int = 1, fsdp: bool = False, accumulating: bool = True,
                 dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes per GPU of parameters, gradients, AdamW state and what data parallelism adds (module docstring).

    Args:
        config: the model.
        world_size, fsdp: the processes, and whether FSDP2 shards over them (else DDP when world_size > 1).
        accumulating: more than one micro-step per optimizer step (FSDP then keeps whole gradients, as
            ``gpt2.train`` skips the reduce-scatter on all but the last micro-step).
        dtype: compute dtype (FSDP gathers the attention and MLP units in it).
    Returns:
        ``{"params", "grads", "optimizer", "fsdp_gathered", "ddp_buckets"}`` in bytes, each per GPU.
    """
    n, n_unit, n_root, n_tensors = _param_counts(_key(config))
    out = {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * n_tensors, "fsdp_gathered": 0, "ddp_buckets": 0}
    if fsdp:
        e = torch.finfo(dtype).bits // 8
        out = {k: v if k == "grads" and accumulating else -(-v // world_size) for k, v in out.items()}
        # The root group (embeddings, LayerNorms, tied head) whole in fp32 with its gradient, and the units in flight.
        out["fsdp_gathered"] = 8 * n_root + FSDP_UNITS_IN_FLIGHT * e * n_unit + (0 if accumulating else 4 * n_unit)
    elif world_size > 1:
        out["ddp_buckets"] = 4 * n
    return out


def _key(config: GPTConfig) -> tuple:
    """A hashable stand-in for a config (GPTConfig is a mutable dataclass), for the caches below."""
    return tuple(dataclasses.astuple(config))


@functools.lru_cache(maxsize=16)
def _param_counts(key: tuple) -> tuple[int, int, int, int]:
    """(parameters, parameters of the largest FSDP unit (a block's MLP), of the root group (all but the blocks'
    attention and MLP), parameter tensors), counted on a meta-device model."""
    with torch.device("meta"):
        model = GPT(GPTConfig(*key), backend="torch")
    params = list(model.parameters())  # the tied head appears once
    n = sum(p.numel() for p in params)
    units = [sum(p.numel() for p in m.parameters()) for b in model.transformer.h for m in (b.attn, b.mlp)]
    return n, max(units), n - sum(units), len(params)


# ----------------------------------------------------------------------------- the loss head


def loss_head_bytes(n_rows: int, config: GPTConfig, dtype: torch.dtype, device_type: str) -> int:
    """Peak bytes the fused loss head's forward allocates over its inputs, by ``gpt2_kernels.chunked_loss``'s policy.

    Args:
        n_rows: N = B T rows of hidden states.
        config: the model (C, V).
        dtype: compute dtype.
        device_type: ``"cuda"`` or ``"cpu"``: the chunk policy and the dW accumulation differ.
    Returns:
        Bytes: padded weight copy + dh + fp32 dW + losses + one logits chunk + the accumulation's temporary.
    """
    C, V = config.n_embd, config.vocab_size
    plan = chunk_plan(n_rows, C, V, dtype, torch.device(device_type))
    e = torch.finfo(dtype).bits // 8
    rows = min(plan.rows, n_rows)
    weight_copy = plan.vocab * C * e if plan.vocab != V else 0  # the model hands it the head in the compute dtype
    held = n_rows * C * e + plan.vocab * C * 4 + n_rows * 4  # dh, dW, per-row losses
    temp = 0
    if dtype != torch.float32 and device_type == "cpu":
        temp = rows * plan.vocab * 4 + rows * C * 4  # both chunk operands upcast to fp32
    elif dtype != torch.float32 and n_rows > rows:
        temp = plan.vocab * C * 4  # torch >= 2.8 without the fp32 addmm: an fp32 product per later chunk
    return weight_copy + held + rows * plan.vocab * e + temp


# ----------------------------------------------------------------------------- the trace


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of live storages created by ops, and records the count after every op.

    Storages that existed before (``known``: parameters, gradients) or that an op returns from its inputs
    (in-place and ``out=`` ops, views) are not new. Host reads of fake values return what a training step reads:
    False (no target out of range), 1.0 (the seed of ``loss.backward()``), 0.
    """

    def __init__(self, known):
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in known}
        self.live: dict[int, weakref.ref] = {}
        self.now = 0
        self.timeline: list[int] = []
        self.recording = True

    def _free(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dt = args[0].dtype
            return False if dt == torch.bool else (1.0 if dt.is_floating_point else 0)
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {id(t.untyped_storage()) for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in inputs or key in self.live or key in self.known:
                continue
            n = st.nbytes()
            self.live[key] = weakref.ref(st, lambda _r, key=key, n=n: self._free(key, n))
            self.now += n
        if self.recording:
            self.timeline.append(self.now)
        return out


@functools.lru_cache(maxsize=2)
def _fake_model(key: tuple, spec: str):
    """A GPT of fake tensors (with fake gradients) and its fake mode, on the CPU ops of ``spec``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        model = GPT(GPTConfig(*key), backend=spec)
        model.check_inputs = False  # a host read of fake ids; the trainer turns it off too
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    model.set_backend(spec)
    return mode, model


@functools.lru_cache(maxsize=64)
def _timeline(key: tuple, T: int, batch: int, low_precision: bool, recompute: str, spec: str):
    """One traced step: (live bytes after each op outside the loss head's forward, live bytes at its entrance)."""
    mode, model = _fake_model(key, spec)
    model.set_recompute(recompute)
    known = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    live = _LiveBytes(known)
    head = model.ops.linear_cross_entropy
    entry = []

    def traced_head(*args):
        entry.append(live.now)
        live.recording = False
        try:
            return head(*args)
        finally:
            live.recording = True

    if model.ops.backends["linear_cross_entropy"] != "torch":  # the reference head is not chunked: traced as is
        model.ops = dataclasses.replace(model.ops, linear_cross_entropy=traced_head)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if low_precision else contextlib.nullcontext()
    try:
        with mode, live:
            idx = torch.zeros((batch, T), dtype=torch.long)
            with amp:
                _, loss = model(idx, idx)
            loss.backward()
            del loss
    finally:
        model.ops = dataclasses.replace(model.ops, linear_cross_entropy=head)
    return np.array(live.timeline, dtype=np.float64), (float(entry[0]) if entry else None)


@dataclass(frozen=True)
class ActivationLines:
    """Each timeline point as a + b B, and the loss head's entrance as a + b B, for one recompute mode."""

    a: np.ndarray
    b: np.ndarray
    head_a: float
    head_b: float
    chunked_head: bool = True  # False: the torch reference head, traced with the rest

    def peak(self, batch: int, head_bytes: int) -> float:
        """Peak activation and temporary bytes at micro-batch ``batch``, the chunked head's buffers ``head_bytes``."""
        body = float((self.a + self.b * batch).max())
        return max(body, self.head_a + self.head_b * batch + head_bytes) if self.chunked_head else body


def activation_lines(config: GPTConfig, T: int, dtype: torch.dtype, recompute: str, spec: str) -> ActivationLines:
    """Trace the step at B = 2 and 3 and fit every timeline point's line (module docstring)."""
    low = dtype != torch.float32
    t2, h2 = _timeline(_key(config), T, 2, low, recompute, spec)
    t3, h3 = _timeline(_key(config), T, 3, low, recompute, spec)
    if t2.shape != t3.shape:
        raise RuntimeError(f"gpt2 plan: the traces at micro-batch 2 and 3 differ in length ({len(t2)} and {len(t3)} "
                           "ops); the linear model of the activations does not hold")
    if h2 is None:
        return ActivationLines(3 * t2 - 2 * t3, t3 - t2, 0.0, 0.0, chunked_head=False)
    return ActivationLines(3 * t2 - 2 * t3, t3 - t2, 3 * h2 - 2 * h3, h3 - h2)


def activation_bytes(config: GPTConfig, T: int, batch: int, dtype: torch.dtype, recompute: str = "none",
                     spec: str = "torch", device_type: str = "cuda") -> float:
    """Peak bytes of activations and temporaries of a step at micro-batch ``batch`` (traced ops ``spec``)."""
    lines = activation_lines(config, T, dtype, recompute, spec)
    return lines.peak(batch, loss_head_bytes(batch * T, config, dtype, device_type))


def trace_spec(backend: str, device_type: str = "cuda") -> tuple[str, str | None]:
    """The backend spec to trace on the CPU for a run with ``backend`` on ``device_type``, and a note if it is
    not the run's own (module docstring)."""
    default, overrides = gpt2_kernels.registry.parse_spec(backend)
    if device_type == "cpu":
        return _spec_of(gpt2_kernels.registry.resolve(backend, "cpu")), None
    has_ext = gpt2_kernels.registry.unavailable_reason("ext", "cpu") is None
    chosen, note = {}, None
    for op in gpt2_kernels.registry.OPS:
        b = overrides.get(op, default)
        if b in ("auto", "triton"):
            b = "ext" if has_ext else "torch"
            note = ("Triton ops traced as the extension's (same saved tensors)" if has_ext else
                    "the extension is not built here: fused ops traced with the torch reference (an overestimate)")
        elif b == "ext" and not has_ext:
            b, note = "torch", "the extension is not built here: its ops traced with the torch reference"
        chosen[op] = b
    return _spec_of(chosen), note


def _spec_of(chosen: dict[str, str]) -> str:
    """The shortest spec string for ``{op: backend}``: one name when every op has it."""
    names = set(chosen.values())
    return names.pop() if len(names) == 1 else ",".join(f"{op}={b}" for op, b in chosen.items())


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Request:
    """What ``gpt2 plan`` is asked: a model, a sequence length, a dtype, the GPUs and how the run shards."""

    config: GPTConfig
    preset: str
    gpu_memory_gib: float
    block_size: int
    dtype: torch.dtype
    world_size: int = 1
    fsdp: bool = False
    backend: str = "auto"
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP
    device_type: str = "cuda"


@dataclass(frozen=True)
class ModeResult:
    """One recompute mode: the largest micro-batch that fits (0: none) and the step's memory at it (at 1 if none)."""

    recompute: str
    max_micro_batch: int
    batch: int
    parts: dict  # bytes per GPU: static parts, activations, loss_head, slack, context, total

    @property
    def peak_gib(self) -> float:
        return self.parts["total"] / GIB


def _parts(req: Request, lines: ActivationLines, batch: int) -> dict:
    """The step's memory per GPU at micro-batch ``batch``, part by part (bytes)."""
    accumulating = grad_accum(req, batch) > 1
    parts = dict(static_bytes(req.config, req.world_size, req.fsdp, accumulating, req.dtype))
    head = loss_head_bytes(batch * req.block_size, req.config, req.dtype, req.device_type)
    parts["activations"] = lines.peak(batch, head)
    parts["loss_head"] = head if lines.chunked_head else 0
    step = sum(v for k, v in parts.items() if k != "loss_head")
    parts["slack"] = ALLOCATOR_SLACK * step
    parts["context"] = (CUDA_CONTEXT_GIB + (NCCL_GIB if req.world_size > 1 else 0.0)) * GIB
    parts["total"] = step + parts["slack"] + parts["context"]
    return parts


def _fits(req: Request, lines: ActivationLines, batch: int) -> bool:
    return _parts(req, lines, batch)["total"] <= req.gpu_memory_gib * GIB


def _largest_batch(req: Request, lines: ActivationLines) -> int:
    """The largest micro-batch that fits, 0 if even 1 does not. Memory grows with the batch, except that under
    FSDP one micro-step per optimizer step (the batch at ``_batch_cap``) keeps only sharded gradients: searched
    with the accumulating figure below the cap, the cap checked on its own."""
    cap = _batch_cap(req)
    if cap > 1 and _fits(req, lines, cap):
        return cap
    if not _fits(req, lines, 1):
        return 0
    lo, hi = 1, 2
    while hi < cap and _fits(req, lines, hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(req, lines, mid) else (lo, mid)
    return lo


def _batch_cap(req: Request) -> int:
    """The micro-batch that makes the whole ``tokens_per_step`` in one micro-step: no point going beyond."""
    return max(1, min(_MAX_MICRO_BATCH, req.tokens_per_step // (req.block_size * req.world_size)))


def _mode_result(req: Request, spec: str, mode: str) -> ModeResult:
    lines = activation_lines(req.config, req.block_size, req.dtype, mode, spec)
    best = _largest_batch(req, lines)
    return ModeResult(mode, best, max(best, 1), _parts(req, lines, max(best, 1)))


def grad_accum(req: Request, micro_batch: int) -> int:
    """Micro-steps per optimizer step to reach ``tokens_per_step``: ceil(tokens / (micro_batch T world))."""
    return max(1, math.ceil(req.tokens_per_step / (micro_batch * req.block_size * req.world_size)))


def _choose(results: dict[str, ModeResult], block_size: int) -> ModeResult | None:
    """The least recompute (``RECOMPUTE_MODES`` order) whose micro-batch keeps a GPU busy (``BUSY_TOKENS`` a
    micro-step) or is the largest any mode reaches; None when nothing fits."""
    fitting = [r for r in results.values() if r.max_micro_batch > 0]
    if not fitting:
        return None
    best = max(r.batch for r in fitting)
    return next(r for r in fitting if r.batch >= best or r.batch * block_size >= BUSY_TOKENS)


@dataclass(frozen=True)
class Plan:
    """The answer: every mode's result, the chosen one (None: nothing fits), and what would fit otherwise."""

    request: Request
    modes: dict[str, ModeResult]
    chosen: ModeResult | None
    trace_backend: str
    note: str | None
    suggestion: str | None

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict:
        """The plan as JSON-ready data: ``micro_batch``, ``recompute``, ``peak_gib``, ``fits``, ``modes``, ..."""
        req, pick = self.request, self.chosen
        shown = pick or self.modes.get("block") or next(iter(self.modes.values()))
        return {
            "preset": req.preset, "gpu_memory_gib": req.gpu_memory_gib, "block_size": req.block_size,
            "dtype": str(req.dtype).replace("torch.", ""), "world_size": req.world_size, "fsdp": req.fsdp,
            "backend": req.backend, "traced_backend": self.trace_backend, "note": self.note,
            "tokens_per_step": req.tokens_per_step, "fits": self.fits,
            "recompute": shown.recompute, "micro_batch": pick.batch if pick else 0,
            "grad_accum": grad_accum(req, pick.batch) if pick else None, "peak_gib": round(shown.peak_gib, 3),
            "breakdown_gib": {k: round(v / GIB, 3) for k, v in shown.parts.items()},
            "modes": {m: {"max_micro_batch": r.max_micro_batch, "micro_batch": r.batch if r.max_micro_batch else 0,
                          "fits": r.max_micro_batch > 0, "peak_gib": round(r.peak_gib, 3),
                          "activations_gib": round(r.parts["activations"] / GIB, 3),
                          "grad_accum": grad_accum(req, r.batch) if r.max_micro_batch else None}
                      for m, r in self.modes.items()},
            "suggestion": self.suggestion,
        }


def make_plan(req: Request, recompute: str | None = None) -> Plan:
    """Plan ``req`` for one recompute mode, or every mode (``None``), and choose.

    Raises:
        PlanError: a request that cannot work (see ``check_request``).
    """
    check_request(req)
    spec, note = trace_spec(req.backend, req.device_type)
    modes = RECOMPUTE_MODES if recompute is None else (recompute,)
    results = {m: _mode_result(req, spec, m) for m in modes}
    chosen = _choose(results, req.block_size)
    suggestion = None if chosen else _suggest(req, spec, results)
    return Plan(req, results, chosen, spec, note, suggestion)


def check_request(req: Request) -> None:
    """Raise PlanError for memory <= 0, a block size outside the model's context, a world size < 1, and so on."""
    if not (isinstance(req.gpu_memory_gib, (int, float)) and math.isfinite(req.gpu_memory_gib)
            and req.gpu_memory_gib > 0):
        raise PlanError(f"--gpu-memory must be a number of GiB > 0, got {req.gpu_memory_gib}")
    if not 1 <= req.block_size <= req.config.block_size:
        raise PlanError(f"--block-size must be in [1, {req.config.block_size}] (the context of {req.preset}), "
                        f"got {req.block_size}")
    if req.world_size < 1:
        raise PlanError(f"--world-size must be >= 1, got {req.world_size}")
    if req.tokens_per_step < 1:
        raise PlanError(f"--tokens-per-step must be >= 1, got {req.tokens_per_step}")


def _suggest(req: Request, spec: str, results: dict[str, ModeResult]) -> str:
    """What would fit when nothing does: another recompute mode, or FSDP over the fewest GPUs."""
    lines = activation_lines(req.config, req.block_size, req.dtype, "block", spec)
    need = _parts(req, lines, 1)["total"] / GIB
    tips = []
    if "block" not in results:  # block recompute keeps the fewest activations: the one other mode worth a trace
        r = _mode_result(req, spec, "block")
        if r.max_micro_batch > 0:
            tips.append(f"--recompute block fits micro-batch {r.max_micro_batch}")
    start = req.world_size + 1 if req.fsdp else 2
    n = next((w for w in range(start, 4097)
              if _largest_batch(dataclasses.replace(req, world_size=w, fsdp=True), lines) > 0), None)
    if n is not None:
        mb = _largest_batch(dataclasses.replace(req, world_size=n, fsdp=True), lines)
        tips.append(f"--fsdp --world-size {n} (FSDP over {n} GPUs) with --recompute block fits micro-batch {mb}")
    else:
        tips.append("no number of FSDP GPUs fits it (the activations at micro-batch 1 with block recompute alone are "
                    f"{lines.peak(1, 0) / GIB:.2f} GiB); shorten --block-size")
    return (f"nothing fits: even micro-batch 1 with --recompute block needs {need:.2f} GiB per GPU, the GPU has "
            f"{req.gpu_memory_gib:g} GiB; would fit: " + "; ".join(tips))


# ----------------------------------------------------------------------------- output


def format_plan(plan: Plan) -> str:
    """A readable table of the plan."""
    req, cfg = plan.request, plan.request.config
    n = _param_counts(_key(cfg))[0]
    gpus = f"{req.world_size} GPU{'s' if req.world_size > 1 else ''}" + (" (FSDP)" if req.fsdp else "")
    dtype = str(req.dtype).replace("torch.", "")
    out = [(f"gpt2 plan: {req.preset} ({n:,} parameters), T {req.block_size}, {dtype}, {gpus} of "
            f"{req.gpu_memory_gib:g} GiB, backend {req.backend} (traced: {plan.trace_backend}), "
            f"{req.tokens_per_step:,} tokens/step")]
    if plan.note:
        out.append(f"note: {plan.note}")
    out.append(f"  {'recompute':<10}{'micro-batch':>12}{'grad-accum':>12}{'activations':>13}{'peak GiB':>10}  fits")
    for m, r in plan.modes.items():
        mb = r.batch if r.max_micro_batch else 0
        acc = grad_accum(req, r.batch) if mb else "-"
        out.append(f"  {m:<10}{mb:>12}{acc:>12}{r.parts['activations'] / GIB:>13.2f}{r.peak_gib:>10.2f}  "
                   f"{'yes' if mb else 'no (at micro-batch 1)'}")
    shown = plan.chosen or plan.modes.get("block") or next(iter(plan.modes.values()))
    out.append(f"breakdown (GiB per GPU, recompute {shown.recompute}, micro-batch {shown.batch}): "
               + ", ".join(f"{k} {v / GIB:.2f}" for k, v in shown.parts.items() if k != "loss_head" and (v or k == "total"))
               + f" (of which loss head {shown.parts['loss_head'] / GIB:.2f} is inside activations)")
    if plan.chosen:
        c = plan.chosen
        out.append(f"plan: --recompute {c.recompute} --batch-size {c.batch} --grad-accum {grad_accum(req, c.batch)} "
                   f"({c.batch * req.block_size * req.world_size * grad_accum(req, c.batch):,} tokens/step), "
                   f"peak {c.peak_gib:.2f} of {req.gpu_memory_gib:g} GiB")
    else:
        out.append(plan.suggestion)
    return "\n".join(out)


# ----------------------------------------------------------------------------- the command and the trainer


def add_args(parser) -> None:
    """The ``gpt2 plan`` flags."""
    parser.add_argument("--preset", default="gpt2", help=f"model preset: {', '.join(PRESETS)} (default gpt2)")
    parser.add_argument("--gpu-memory", type=float, required=True, metavar="GiB", help="memory of one GPU, in GiB")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default: the context)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype; auto = bfloat16 (a GPU of compute capability 8.0+; float16 on older "
                        "ones costs the same memory)")
    parser.add_argument("--world-size", type=int, default=1, help="GPUs (processes) of the run (default 1)")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    parser.add_argument("--recompute", default=None, choices=RECOMPUTE_MODES,
                        help="plan this activation recompute mode only (default: every mode, and choose)")
    parser.add_argument("--backend", default="auto", help="kernel backend spec of the run (default auto)")
    parser.add_argument("--tokens-per-step", type=int, default=DEFAULT_TOKENS_PER_STEP,
                        help=f"tokens per optimizer step, for --grad-accum (default {DEFAULT_TOKENS_PER_STEP:,})")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON here")


def request_from_args(args) -> tuple[Request, str | None]:
    """The ``Request`` and the recompute mode (None: every mode) of parsed ``gpt2 plan`` flags."""
    if args.preset not in PRESETS:
        raise PlanError(f"--preset: unknown preset {args.preset!r}; presets are {', '.join(PRESETS)}")
    config = GPTConfig.from_preset(args.preset)
    dtype = torch.bfloat16 if args.dtype == "auto" else DTYPES[args.dtype]
    T = config.block_size if args.block_size is None else args.block_size
    req = Request(config, args.preset, args.gpu_memory, T, dtype, args.world_size, args.fsdp, args.backend,
                  args.tokens_per_step)
    return req, args.recompute


def run(args) -> int:
    """``gpt2 plan``: print the table (and write --json); 0 when something fits, 1 when nothing does."""
    req, recompute = request_from_args(args)
    plan = make_plan(req, recompute)
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=2)
    if not plan.fits:
        print(f"gpt2 plan: {plan.suggestion}", file=sys.stderr)
        return 1
    return 0


def auto_batch_size(config: GPTConfig, T: int, dtype: torch.dtype, device: torch.device, world_size: int = 1,
                    fsdp: bool = False, recompute: str = "none", backend: str = "auto") -> int:
    """``gpt2 train --batch-size auto``: the largest micro-batch whose step fits ``device``'s memory.

    Raises:
        ValueError: on a CPU (there is no memory budget to size to), or when even micro-batch 1 does not fit.
    """
    if device.type != "cuda":
        raise ValueError("--batch-size auto sizes the micro-batch to a GPU's memory; on the CPU give a number "
                         "(the default is 8)")
    memory = torch.cuda.get_device_properties(device).total_memory / GIB
    req = Request(config, "the model", memory, T, dtype, world_size, fsdp, backend, DEFAULT_TOKENS_PER_STEP)
    check_request(req)
    spec, _ = trace_spec(backend, "cuda")
    result = _mode_result(req, spec, recompute)
    if result.max_micro_batch == 0:
        raise ValueError(f"--batch-size auto: even micro-batch 1 needs {result.peak_gib:.2f} GiB with --recompute "
                         f"{recompute}, more than the {memory:.1f} GiB of {device}; see `gpt2 plan`")
    return result.max_micro_batch
