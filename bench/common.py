"""Shared machinery of the benchmark suite: implementations, costs, ceilings and honest timing.

- ``IMPL_NAMES``: every implementation benchmarked per op, registry backends and peers alike.
  ``torch`` (the eager reference ``gpt2_kernels.ref``) is the baseline every speed-up is relative to.
- ``op_cost``: the FLOPs of the useful math and the fewest bytes an op must move (each input read
  once, each output written once), per mode.
- ``Ceilings``: the machine's copy bandwidth and matmul rate, measured once per session by the
  suite itself (a large tensor copy, a large matrix product in the bench dtype).
- ``run_op_benchmark``: times one (implementation, mode) on rotating input sets, synchronising
  the GPU inside the timed call, and fills ``extra_info`` with the rates and % of ceilings. Its first
  forward is compared with the fp32 reference by the rule of ``gpt2_kernels.testing`` (``check_forward``):
  a result outside the tolerance table fails the benchmark (``--bench-no-check`` skips the comparison).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from bench.shapes import Shape

OPS = ("attention", "layer_norm", "mlp", "linear_cross_entropy")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

# The registry's backends, the reference under torch.compile, and the peers each op is measured against.
REGISTRY_IMPLS = ("torch", "torch-compile", "triton", "ext", "native")
IMPL_NAMES = {
    "attention": REGISTRY_IMPLS + ("sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn", "flash-attn"),
    "layer_norm": REGISTRY_IMPLS + ("F.layer_norm", "liger"),
    "mlp": REGISTRY_IMPLS,
    "linear_cross_entropy": REGISTRY_IMPLS + ("liger",),
}
ALL_IMPL_NAMES = tuple(dict.fromkeys(n for names in IMPL_NAMES.values() for n in names))
BASELINE = "torch"


# torch >= 2.5 has torch.OutOfMemoryError; older builds only the CUDA one.
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_peer(impl: str) -> bool:
    """True for code this project did not write (torch.compile's output included)."""
    return impl not in ("torch", "triton", "ext")


class Unavailable(Exception):
    """An implementation cannot run here; the message says why (it becomes the skip reason)."""


def bench_device() -> torch.device:
    """The device the suite benchmarks on: the GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of a GPU, or the largest CPU cache level (for sizing input rotation)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or 32 * 2**20


# --------------------------------------------------------------------------------------------
# FLOPs and fewest bytes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """Useful floating-point operations and the fewest bytes moved through memory."""

    flops: float
    bytes: float


def op_cost(op: str, shape: Shape, mode: str, dtype: torch.dtype) -> Cost:
    """FLOPs and fewest bytes of one call of ``op`` at ``shape`` in ``mode``: the project's one cost model.

    The kernel modules' docstrings and docs/performance.md point here rather than repeat these numbers.
    FLOPs count the math the op needs (multiply-add = 2; a causal mask keeps T (T + 1) / 2 of the T^2
    query-key pairs; no recomputation). Bytes count every input read once and every output written
    once in ``dtype`` (fp32 statistics are not counted; a fused backward may recompute them).
    ``fwd+bwd`` is the sum of the two passes, except for the loss, whose upstream gradient is a
    known scalar, so one fused pass can read h and W once and write dh and dW. With N = B T, e bytes
    an element and H = 4 C:

        layer_norm  fwd 8 N C, (2 N C + 2 C) e              bwd 12 N C, (3 N C + 3 C) e
        add_layer_norm  fwd 9 N C, (4 N C + 2 C) e          bwd 13 N C, (4 N C + 3 C) e
        attention   fwd 2 B nh T (T + 1) hs, 4 B nh T hs e  bwd 2.5 x fwd FLOPs, 8 B nh T hs e
        mlp         fwd 4 N C H, (2 N C + 2 C H + H + C) e  bwd 8 N C H, (3 N C + 4 C H + H + C) e
        loss        fwd 2 N C V, (N C + V C) e + 8 N        bwd 4 N C V, 2 (N C + V C) e + 8 N

    Args:
        op: one of ``OPS``.
        shape: the GPT-2 shape (B, T and the model's C, n_head; V for the loss).
        mode: ``fwd``, ``bwd`` or ``fwd+bwd``.
        dtype: the element type of inputs and outputs (targets are int64).
    Returns:
        Cost(flops, bytes) of one call.
    """
    e = torch.tensor([], dtype=dtype).element_size()
    B, T, C = shape.B, shape.T, shape.C
    N = B * T
    if op == "attention":
        nh, hs = shape.n_head, shape.head_size
        size = B * nh * T * hs  # elements of one of q, k, v, o
        fwd = Cost(2.0 * B * nh * T * (T + 1) * hs, 4.0 * size * e)  # S = QK^T and O = PV over the causal half
        bwd = Cost(2.5 * fwd.flops, 8.0 * size * e)  # recompute S, dV, dP, dQ, dK; read q k v o do, write dq dk dv
        both = Cost(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes)
    elif op == "layer_norm":
        fwd = Cost(8.0 * N * C, (2.0 * N * C + 2.0 * C) * e)  # read x, w, b; write y
        bwd = Cost(12.0 * N * C, (3.0 * N * C + 3.0 * C) * e)  # read x, dy, w; write dx, dw, db
        both = Cost(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes)
    elif op == "add_layer_norm":
        fwd = Cost(9.0 * N * C, (4.0 * N * C + 2.0 * C) * e)  # read x, residual, w, b; write y, s
        bwd = Cost(13.0 * N * C, (4.0 * N * C + 3.0 * C) * e)  # read s, dy, ds, w; write dx (x's and residual's)
        both = Cost(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes)
    elif op == "mlp":
        H = 4 * C
        fwd = Cost(4.0 * N * C * H, (2.0 * N * C + 2.0 * C * H + H + C) * e)  # read x, weights; write y
        bwd = Cost(8.0 * N * C * H, (3.0 * N * C + 4.0 * C * H + H + C) * e)  # read x, dy, weights; write grads
        both = Cost(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes)
    elif op == "linear_cross_entropy":
        V = shape.vocab_size
        fwd = Cost(2.0 * N * C * V, (N * C + V * C) * e + 8.0 * N)  # read h, W, targets
        bwd = Cost(4.0 * N * C * V, 2.0 * (N * C + V * C) * e + 8.0 * N)  # read h, W, targets; write dh, dW
        both = Cost(fwd.flops + bwd.flops, bwd.bytes)
    else:
        raise ValueError(f"op_cost: unknown op {op!r}; ops are {', '.join(OPS + ('add_layer_norm',))}")
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[mode]


# --------------------------------------------------------------------------------------------
# Ceilings measured on this machine
# --------------------------------------------------------------------------------------------


def _times(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Seconds of ``reps`` timed calls of ``fn`` after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


class Ceilings:
    """Copy bandwidth and matmul rate of this machine, each measured once, on first use.

    A ceiling is the best rate the machine showed: the fastest of several timed calls (on a shared
    CPU the median would mix in other people's load).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._copy: dict | None = None
        self._matmul: dict = {}  # dtype (fastest) or ("median", dtype) -> rate

    def copy(self) -> dict:
        """``{"gbps": ..., "bytes": ..., "how": ...}`` of a large device-to-device copy."""
        if self._copy is None:
            if self.device.type == "cuda":
                nbytes = 2**30 if torch.cuda.mem_get_info(self.device)[0] > 8 * 2**30 else 2**28
                reps = 20
            else:
                nbytes = max(2**28, 8 * last_level_cache_bytes(self.device))
                reps = 5
            gen = torch.Generator(device=self.device).manual_seed(0)
            src = torch.randn(nbytes // 4, device=self.device, generator=gen)  # random, never zeros
            dst = torch.empty_like(src)
            t = min(_times(lambda: dst.copy_(src), self.device, reps))
            moved = 2 * src.numel() * src.element_size()  # read + write
            self._copy = {"gbps": moved / t / 1e9, "bytes": moved,
                          "how": f"fastest of {reps} copies of {nbytes / 2**20:.0f} MiB (bytes read + written)"}
            del src, dst
        return self._copy

    def matmul(self, dtype: torch.dtype) -> dict:
        """``{"tflops": ..., "n": ..., "how": ...}`` of a large square matrix product in ``dtype``: the fastest call."""
        if dtype not in self._matmul:
            # CPU: grow the product while the next size (8x the work) stays under ~2 s a call; the
            # CPU's fp16 path can be 100x slower than fp32. GPU: one size that fills the chip.
            sizes = (8192,) if self.device.type == "cuda" else (256, 512, 1024, 2048)
            reps = 10 if self.device.type == "cuda" else 3
            for n in sizes:
                rate = self._matmul_rate(dtype, n, reps, "fastest", seed=1)
                if 8 * 2.0 * n**3 / (rate["tflops"] * 1e12) > 2.0:
                    break
            self._matmul[dtype] = rate
        return self._matmul[dtype]

    def matmul_median(self, dtype: torch.dtype) -> dict:
        """``{"tflops": ..., "n": ..., "how": ...}``: the median rate of large square matrix products in ``dtype``,
        the rate a whole-model step's MFU is measured against (a sustained rate, where ``matmul`` is the best burst).

        CPU: 2048 x 2048 x 2048, 9 calls (about 0.1 s each in fp32 or bf16 on a 2-core AVX-512 machine); GPU:
        8192, 20 calls.
        """
        key = ("median", dtype)
        if key not in self._matmul:
            n, reps = (8192, 20) if self.device.type == "cuda" else (2048, 9)
            self._matmul[key] = self._matmul_rate(dtype, n, reps, "median", seed=2)
        return self._matmul[key]

    def _matmul_rate(self, dtype: torch.dtype, n: int, reps: int, stat: str, seed: int) -> dict:
        """The rate of ``reps`` n x n x n products of random ``dtype`` matrices, by their fastest or median call."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        a = torch.randn(n, n, device=self.device, generator=gen).to(dtype)  # random, never zeros
        b = torch.randn(n, n, device=self.device, generator=gen).to(dtype)
        times = sorted(_times(functools.partial(torch.matmul, a, b), self.device, reps))
        t = times[0] if stat == "fastest" else times[reps // 2]
        name = str(dtype).replace("torch.", "")
        return {"tflops": 2.0 * n**3 / t / 1e12, "n": n, "how": f"{stat} of {reps} matmuls {n}x{n}x{n} in {name}"}


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def reference(op: str) -> Callable:
    """The registry's ``torch`` backend of ``op``: ``gpt2_kernels.ref.<op>``, the baseline and the oracle."""
    import gpt2_kernels.registry
    return getattr(gpt2_kernels.registry.build_ops("torch"), op)


def registry_impl(op: str, backend: str, device: torch.device) -> Callable:
    """The registry's ``backend`` code for ``op`` on ``device``, or Unavailable with the reason."""
    import gpt2_kernels.registry
    if backend == "triton" and device.type == "cpu":
        raise Unavailable("triton runs on the CPU only under TRITON_INTERPRET=1, an interpreter far too slow "
                          "to benchmark; benchmark it on a GPU")
    try:
        ops = gpt2_kernels.registry.build_ops(backend, device)
    except (gpt2_kernels.registry.BackendError, gpt2_kernels.registry.SpecError) as e:
        raise Unavailable(str(e)) from None
    except ImportError as e:
        raise Unavailable(f"backend {backend!r} failed to import: {e}") from None
    return getattr(ops, op)


def load_impl(case, device: torch.device, peers: dict | None = None) -> Callable:
    """The function ``case.impl`` names: the reference under torch.compile, a peer (``peers`` maps a name to
    a loader called with the case and the device), or a registry backend. Raises Unavailable with the reason."""
    if case.impl == "torch-compile":
        return compiled_reference(case.op, (case.shape, case.dtype))
    if peers and case.impl in peers:
        return peers[case.impl](case, device)
    return registry_impl(case.op, case.impl, device)


def time_case(benchmark, case, make_inputs: Callable, device: torch.device, ceilings, settings,
             peers: dict | None = None) -> None:
    """Time one op case (see ``run_op_benchmark``), or skip it with the reason it cannot run here."""
    try:
        fn = load_impl(case, device, peers)
    except Unavailable as e:
        pytest.skip(str(e))
    run_op_benchmark(benchmark, case, make_inputs, fn, ceilings, settings, device, peer=is_peer(case.impl))


def liger(module: str, device: torch.device):
    """Import ``liger_kernel.<module>``, or raise Unavailable: not installed, or not a CUDA device."""
    import importlib

    try:
        mod = importlib.import_module(f"liger_kernel.{module}")
    except ImportError as e:
        raise Unavailable(f"Liger-Kernel is not importable here ({e})") from None
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel's Triton kernels need a CUDA GPU")
    return mod


# Peers of the whole-model benchmarks: transformers' GPT2LMHeadModel with the same weights, as it ships and
# patched onto this project's kernels (``gpt2_kernels.hf.patch_gpt2``, backend auto).
MODEL_PEERS = ("transformers", "transformers-patched")


def hf_twin(model, name: str):
    """transformers' ``GPT2LMHeadModel`` holding ``model``'s weights (through ``save_pretrained``), on its device
    and in its train/eval mode; patched onto our kernels for ``transformers-patched`` (in training without the
    logits beside the loss, as one would train it)."""
    import tempfile

    try:
        import transformers
    except ImportError as e:
        pytest.skip(f"transformers is not importable here ({e})")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        twin = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    twin = twin.to(model.transformer.wte.weight.device).train(model.training)
    if name == "transformers-patched":
        from gpt2_kernels.hf import patch_gpt2

        patch_gpt2(twin, "auto", logits_with_loss=not model.training)  # training: the fused loss, no logits
    return twin


class NanoGPTLike(torch.nn.Module):
    """A plain-PyTorch GPT-2 in the manner of nanoGPT's ``model.py``: the train-step benchmark's ``nanogpt-like`` peer.

    What a careful user writes without custom kernels: ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.GELU("tanh")``,
    ``F.scaled_dot_product_attention(is_causal=True)``, the output layer tied to the token embedding, and the loss
    as the full (B, T, V) logits into ``F.cross_entropy``. Parameter names are ours (which are OpenAI's), so it
    loads a ``gpt2.model.GPT``'s weights with ``from_gpt``; ``forward(idx, targets)`` returns ``(logits, loss)``.
    """

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, bias: bool = True):
        super().__init__()
        nn = torch.nn
        self.n_head, self.vocab_size = n_head, vocab_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab_size, n_embd),
            "wpe": nn.Embedding(block_size, n_embd),
            "h": nn.ModuleList([_NanoBlock(n_head, n_embd, bias) for _ in range(n_layer)]),
            "ln_f": nn.LayerNorm(n_embd, bias=bias),
        })
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2

    @classmethod
    def from_gpt(cls, model) -> NanoGPTLike:
        """A twin of ``model`` (a ``gpt2.model.GPT``) with a copy of its weights, on its device and in its mode.
        The token embedding keeps the real vocabulary's rows (ours pads it to a multiple of 64 and never scores
        the padding), so both compute the same loss over the same V classes."""
        cfg = model.config
        twin = cls(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.bias)
        state = {k: v[: cfg.vocab_size] if k in ("transformer.wte.weight", "lm_head.weight") else v
                 for k, v in model.state_dict().items()}
        twin.load_state_dict(state, strict=True)
        return twin.to(model.transformer.wte.weight.device).train(model.training)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V): every position's logits, kept for the loss
        loss = None
        if targets is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                                     ignore_index=-1)
        return logits, loss


class _NanoBlock(torch.nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_head: int, n_embd: int, bias: bool):
        super().__init__()
        nn = torch.nn
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp.gelu = nn.GELU(approximate="tanh")
        self.mlp.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)
        return x + self.mlp.c_proj(self.mlp.gelu(self.mlp.c_fc(self.ln_2(x))))


def model_backend_or_skip(backend: str, device: torch.device) -> None:
    """Skip a whole-model benchmark whose backend cannot run (or only crawls) on ``device``."""
    import gpt2_kernels.registry
    if backend in MODEL_PEERS:
        return
    if backend == "triton" and device.type == "cpu":
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1, an interpreter far too slow to benchmark")
    why = gpt2_kernels.registry.unavailable_reason(backend, device)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run on {device.type}: {why}")


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context of a whole-model benchmark in ``dtype`` (none for fp32)."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_COMPILED: dict = {}


def compiled_reference(op: str, key) -> Callable:
    """``gpt2_kernels.ref.<op>`` under ``torch.compile`` (static shapes), compiled once per ``key``.

    Only the latest key is kept: when it changes, dynamo's caches are reset, so no shape ever
    meets dynamo's recompile limit (past which it would silently run eager code). Donated
    buffers are turned off, as the bwd mode replays a retained graph (they only save memory).
    """
    if _COMPILED.get("key") != (op, key):
        import torch._dynamo

        torch._dynamo.reset()
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 64)
        # The bwd mode replays one retained graph; compiled backwards that donate buffers refuse that.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        _COMPILED.clear()
        _COMPILED["key"] = (op, key)
        _COMPILED["fn"] = torch.compile(reference(op), dynamic=False)
    return _COMPILED["fn"]


# --------------------------------------------------------------------------------------------
# Test cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """One benchmark: an op's implementation, mode and dtype at one shape."""

    op: str
    impl: str
    mode: str
    dtype: str
    shape: Shape

    @property
    def group(self) -> str:
        # Rows of one group differ only by implementation.
        return f"{self.op} {self.mode} {self.dtype} {self.shape.name}"

    @property
    def id(self) -> str:
        return f"{self.shape.name}-{self.dtype}-{self.mode}-{self.impl}"


@dataclass
class InputSet:
    """Arguments of one call, the tensors to differentiate and the upstream gradient."""

    args: tuple
    kwargs: dict
    grad_inputs: tuple
    grad_out: torch.Tensor | None = None  # None: a scalar output, differentiated with ones


@dataclass
class BenchSettings:
    """Per-run knobs, from the command line (see bench/conftest.py)."""

    max_time: float = 0.5  # seconds of timed rounds per benchmark
    min_rounds: int = 3
    max_rounds: int = 1000
    min_round_s: float = 0.0  # GPU: launch a round of >= this many seconds before syncing
    memory_budget: int = 2**30  # bytes of rotated input sets
    check: bool = True  # compare each implementation's forward with the fp32 reference


_REF_CACHE: dict = {}


def _reference_outputs(case: OpCase, inputs: InputSet, ref_fn: Callable):
    """The fp32 reference of the first input set and the reference in the bench dtype (cached per case)."""
    key = (case.op, case.shape, case.dtype)
    if _REF_CACHE.get("key") != key:
        _REF_CACHE.clear()
        with torch.no_grad():
            up = tuple(a.detach().float() if torch.is_tensor(a) and a.is_floating_point() else a for a in inputs.args)
            ref32 = ref_fn(*up, **inputs.kwargs)
            lowp = None
            if DTYPES[case.dtype] != torch.float32:
                lowp = ref_fn(*(a.detach() if torch.is_tensor(a) else a for a in inputs.args), **inputs.kwargs)
        _REF_CACHE.update(key=key, ref32=ref32, lowp=lowp)
    return _REF_CACHE["ref32"], _REF_CACHE["lowp"]


def check_forward(case: OpCase, out: torch.Tensor, inputs: InputSet, ref_fn: Callable) -> tuple:
    """Compare one forward result with the fp32 reference by the tolerance table's rule for the bench dtype
    (``gpt2_kernels.testing.assert_close``); fail the benchmark, naming the first element over its bound, if it is off.

    Returns:
        (max abs error against the fp32 reference, the reference's own max abs error in the bench dtype or None);
        (None, None) when the fp32 reference does not fit in memory (the timing does not need it).
    """
    from gpt2_kernels.testing import assert_close

    try:
        ref32, lowp = _reference_outputs(case, inputs, ref_fn)
    except OOM:
        _REF_CACHE.clear()
        return None, None
    max_err = (out.detach().float() - ref32.float()).abs().max().item()
    lowp_err = None if lowp is None else (lowp.float() - ref32.float()).abs().max().item()
    try:
        assert_close(f"{case.impl} {case.op} {case.mode} {case.shape.name} {case.dtype}", out, ref32, lowp,
                     dtype=DTYPES[case.dtype])
    except AssertionError as e:
        pytest.fail(f"{e}\n(the forward is outside the tolerance of kernels/testing.py; --bench-no-check skips "
                    "this comparison)", pytrace=False)
    return max_err, lowp_err


def _input_bytes(s: InputSet) -> int:
    total = sum(a.numel() * a.element_size() for a in s.args if torch.is_tensor(a))
    if s.grad_out is not None:
        total += s.grad_out.numel() * s.grad_out.element_size()
    return total


def rotation_count(set_bytes: int, device: torch.device, budget: int) -> int:
    """How many input sets to cycle through so that repeated calls do not run out of cache."""
    want = math.ceil(2 * last_level_cache_bytes(device) / max(set_bytes, 1))
    return max(1, min(want, budget // max(set_bytes, 1), 64))


def host_and_device_seconds(call: Callable[[int], object], n_sets: int, device: torch.device,
                            reps: int = 5) -> tuple:
    """(host, device) median seconds of one ``call(i)``: host from the call to its return with the device's queue
    empty at the start and no synchronize inside (its launches are queued, not waited for); device between CUDA
    events around it (None on the CPU, where the two are one). A row whose host time reaches its device time is
    host-bound: the GPU waits for Python."""
    host, dev = [], []
    for i in range(reps):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        call(i % n_sets)
        host.append(time.perf_counter() - t0)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end) / 1e3)
    synchronize(device)
    return statistics.median(host), (statistics.median(dev) if dev else None)


def run_op_benchmark(benchmark, case: OpCase, make_inputs: Callable, fn: Callable, ceilings: Ceilings,
                     settings: BenchSettings, device: torch.device, peer: bool) -> None:
    """Time ``fn`` (one implementation of ``case.op``) in ``case.mode`` and record rates and ceilings.

    Args:
        make_inputs: ``(shape, dtype, device, generator) -> InputSet``.
        fn: the implementation, with the signature of ``gpt2_kernels.ref.<op>``.
        peer: True for code outside this project (SDPA, Liger, flash-attn): a RuntimeError on its
            first call means it cannot run here and becomes a skip; for our own backends only
            NotImplementedError / ValueError / TypeError (a documented refusal) does.
    """
    dtype = DTYPES[case.dtype]
    copy, mm = ceilings.copy(), ceilings.matmul(dtype)  # measured once per session, before any inputs exist
    gen = torch.Generator(device=device).manual_seed(1234)
    ref_fn = reference(case.op)
    try:
        first = make_inputs(case.shape, dtype, device, gen)
        n_sets = rotation_count(_input_bytes(first), device, settings.memory_budget)
        sets = [first] + [make_inputs(case.shape, dtype, device, gen) for _ in range(n_sets - 1)]
    except OOM:
        pytest.skip(f"{case.op} {case.shape.name} {case.dtype}: inputs do not fit in memory")

    refusals = (NotImplementedError, ValueError, TypeError) + ((RuntimeError,) if peer else ())

    # First call: does it run here at all? Then compare its forward with the fp32 reference.
    try:
        out0 = fn(*first.args, **first.kwargs)
    except OOM:
        pytest.skip(f"{case.impl} {case.op} {case.shape.name} {case.dtype}: out of memory")
    except refusals as e:
        pytest.skip(f"{case.impl} cannot run {case.op} {case.dtype} on {device.type}: "
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    max_err, lowp_err = check_forward(case, out0, first, ref_fn) if settings.check else (None, None)
    del out0

    def grads(out, s: InputSet, retain: bool):
        g = s.grad_out if s.grad_out is not None else torch.ones_like(out)
        return torch.autograd.grad(out, s.grad_inputs, g, retain_graph=retain)

    if case.mode == "fwd":
        # The training forward: inputs require grad, so the op saves what its backward needs.
        def call(i):
            s = sets[i]
            return fn(*s.args, **s.kwargs)
    elif case.mode == "bwd":
        # One graph per input set, kept alive; each timed call runs the backward only.
        try:
            outs = [fn(*s.args, **s.kwargs) for s in sets]
        except OOM:
            pytest.skip(f"{case.impl} {case.op} {case.shape.name} {case.dtype}: out of memory")

        def call(i):
            return grads(outs[i], sets[i], retain=True)
    else:
        def call(i):
            s = sets[i]
            return grads(fn(*s.args, **s.kwargs), s, retain=False)

    # Warm-up: every input set once (compilation, autotuning, allocator), then a probe of the speed.
    try:
        for i in range(max(2, len(sets))):
            call(i % len(sets))
        synchronize(device)
        probe_calls = 3
        t0 = time.perf_counter()
        for i in range(probe_calls):
            call(i % len(sets))
        synchronize(device)
        per_call = max((time.perf_counter() - t0) / probe_calls, 1e-7)
        host_s, device_s = host_and_device_seconds(call, len(sets), device)
    except OOM:
        pytest.skip(f"{case.impl} {case.op} {case.mode} {case.shape.name} {case.dtype}: out of memory")

    # A GPU round is `iterations` back-to-back calls and one synchronize inside the timed call;
    # pytest-benchmark divides the round by `iterations`.
    iterations = max(1, math.ceil(settings.min_round_s / per_call)) if device.type == "cuda" else 1
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.max_time / (per_call * iterations))))
    state = {"i": 0}

    def target():
        i = state["i"]
        state["i"] = i + 1
        call(i % len(sets))
        if (i + 1) % iterations == 0:
            synchronize(device)

    cost = op_cost(case.op, case.shape, case.mode, dtype)
    benchmark.group = case.group
    info = benchmark.extra_info
    info.update(op=case.op, impl=case.impl, mode=case.mode, dtype=case.dtype, shape=case.shape.name,
                model=case.shape.model.name, B=case.shape.B, T=case.shape.T, C=case.shape.C,
                n_head=case.shape.n_head, device=device_name(device), baseline=BASELINE,
                flops=cost.flops, bytes=cost.bytes,
                ceiling_gbps=copy["gbps"], ceiling_gbps_how=copy["how"],
                ceiling_tflops=mm["tflops"], ceiling_tflops_how=mm["how"],
                input_sets=len(sets), iterations_per_round=iterations, host_s=host_s, device_s=device_s,
                host_bound=device_s is not None and host_s >= device_s,
                max_abs_err_vs_fp32_ref=max_err, ref_own_err_in_dtype=lowp_err)
    try:
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, iterations=iterations)
    except OOM:
        pytest.skip(f"{case.impl} {case.op} {case.mode} {case.shape.name} {case.dtype}: out of memory")
    record_rates(benchmark, cost.flops, cost.bytes, mm["tflops"], copy["gbps"])


def record_rates(benchmark, flops: float, nbytes: float, peak_tflops: float, peak_gbps: float) -> None:
    """Add TFLOP/s, GB/s, % of each measured ceiling and % of the roofline floor to extra_info."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: nothing was timed
        return
    t = stats.stats.median
    info = benchmark.extra_info
    tflops, gbps = flops / t / 1e12, nbytes / t / 1e9
    floor = max(flops / (peak_tflops * 1e12), nbytes / (peak_gbps * 1e9))
    info.update(median_s=t, tflops=tflops, gbps=gbps,
                pct_of_peak_flops=100.0 * tflops / peak_tflops, pct_of_peak_bw=100.0 * gbps / peak_gbps,
                floor_s=floor, pct_of_floor=100.0 * floor / t,
                bound="compute" if flops / (peak_tflops * 1e12) >= nbytes / (peak_gbps * 1e9) else "memory")
