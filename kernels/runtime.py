"""What every Triton op module shares: the interpreter switch, the architecture table, device facts, dtype
checks, and the one launch path.

Every Triton launch of this package goes through ``launch(kernel, grid, *args, **kwargs)``, which

- runs the kernel on the device of its tensor arguments and that device's current stream (Triton launches on
  the *current* CUDA device; ``launch`` makes it the tensors' one, as flash-attention's ``CUDAGuard`` does), and
- when ``record_launches()`` is active, records the launch as Triton's JIT would specialise it: each integer
  argument equal to 1 becomes a constexpr, each integer or pointer divisible by 16 is marked aligned, unless
  the kernel says ``do_not_specialize`` for it. ``gpt2_kernels.report`` compiles those records ahead of time, so the
  specialisations real launches produce are compiled on every CI run, not only the tidy ones.

``tests/test_runtime.py`` fails if a kernel module launches anything another way.

Tiles: each launcher passes ``pick_tiles`` its short list for the device's architecture row (first entry first);
the interpreter and the CPU run the first, a GPU times the list once per shape bucket and remembers the fastest
(``gpt2_kernels.tuning``: ``tiles.json``). ``tests/test_tiles.py`` drives it with a stub timer.

Every op module also registers its launchers as ``torch.library`` custom ops in the ``LIBRARY`` namespace (fake
kernels and autograd included), which its public function calls while ``torch.compile`` traces, so a model on the
Triton backend compiles with ``fullgraph=True``; eagerly it calls the launchers directly: called eagerly, the custom
ops cost 6-17 us more host time per forward call and 73-114 us more per forward + backward than the direct path
(2-core EPYC, torch 2.13, the Triton launch stubbed out), which decoding and small batches would feel.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import tuning
from .tuning import DiskCache

__all__ = [
    "ARCHS", "LIBRARY", "Arch", "LaunchRecord", "arch", "capability", "cdiv", "check_dtype", "default_dtype",
    "has_native_bf16", "interpreting", "launch", "next_power_of_2", "pick_tiles", "record_launches", "size_bucket",
    "sm_count",
]


# The torch.library namespace of the Triton ops (torch.ops.gpt2k_triton.*); the extension's ops are torch.ops.gpt2k.*.
LIBRARY = "gpt2k_triton"


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------------------------
# The one architecture table


@dataclass(frozen=True)
class Arch:
    """What the tile tables of the op modules key on.

    ``tiles`` is the row of every op's tile table (75, 80, 86 or 90); ``shared`` the per-block opt-in shared
    memory in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin; CUDA C++ Programming Guide, "Technical
    Specifications per Compute Capability").
    """

    cc: int
    tiles: int
    shared: int


_KB = 1024
# Compute capability -> (tile row, shared memory per block). Tile rows group architectures by shared memory and
# matrix instructions: 90 = 227 KB (Hopper, datacenter Blackwell), 80 = 163 KB (A100, Orin), 86 = 99 KB (Ampere
# and Ada consumer cards, consumer Blackwell sm_120/121), 75 = 64 KB (Turing: no tensor-core tl.dot in Triton).
ARCHS = {
    75: Arch(75, 75, 64 * _KB),
    80: Arch(80, 80, 163 * _KB),
    86: Arch(86, 86, 99 * _KB),
    87: Arch(87, 80, 163 * _KB),
    89: Arch(89, 86, 99 * _KB),
    90: Arch(90, 90, 227 * _KB),
    100: Arch(100, 90, 227 * _KB),
    103: Arch(103, 90, 227 * _KB),
    120: Arch(120, 86, 99 * _KB),
    121: Arch(121, 86, 99 * _KB),
}


def arch(cc: int) -> Arch:
    """The table entry for compute capability ``cc`` (e.g. 86); an unknown newer one takes its nearest lower
    known one. Raises ValueError below sm_75."""
    if cc < 75:
        raise ValueError(f"compute capability {cc // 10}.{cc % 10} is not supported; the Triton kernels need 7.5 "
                         "(Turing) or newer")
    return ARCHS[max(c for c in ARCHS if c <= cc)]


@functools.cache
def _props(index: int):
    return torch.cuda.get_device_properties(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as one number (sm_86 -> 86)."""
    p = _props(_index(device))
    return p.major * 10 + p.minor


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None for a CPU tensor (the interpreter)."""
    return _props(_index(device)).multi_processor_count if device.type == "cuda" else None


def check_dtype(op: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise TypeError when the Triton kernels cannot compute in ``dtype`` on ``device``.

    bfloat16 needs compute capability 8.0 (the interpreter has none at all: Triton issue 11584).
    """
    if dtype != torch.bfloat16:
        return
    if device.type == "cpu":
        raise TypeError(f"{op}: bfloat16 is not supported by Triton's CPU interpreter; use float32 or float16 on "
                        "the CPU, or a CUDA device")
    if device.type == "cuda" and not has_native_bf16(device):
        cc = capability(device)
        raise TypeError(f"{op}: bfloat16 needs compute capability 8.0 or newer and {device} is {cc // 10}.{cc % 10}; "
                        "use float16")


def has_native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device computes in bfloat16 natively: compute capability 8.0 or newer.

    ``torch.cuda.is_bf16_supported()`` also says True on Turing (sm_75), where bf16 is emulated; the Triton
    kernels refuse bf16 there, so every dtype choice of this project asks this instead.
    """
    return device.type == "cuda" and capability(device) >= 80


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype the kernels' own checks and per-op benchmarks default to on ``device``: bfloat16 on GPUs that have
    it natively, float16 (with a GradScaler) on older GPUs, float32 on the CPU (Triton's interpreter has no
    bfloat16). ``--dtype auto`` of gpt2 train / sample / eval is ``gpt2.runtime.auto_dtype``: this on GPUs, and
    bfloat16 autocast on CPUs with native bf16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


# ---------------------------------------------------------------------------------------------------------------------
# The one launch path


@dataclass(frozen=True)
class LaunchRecord:
    """One launch as Triton's JIT specialises it.

    ``signature`` maps each runtime argument to its Triton type with an alignment hint: ``"*fp16:16"`` (pointer
    divisible by 16 bytes), ``"i32:16"`` (integer divisible by 16), ``"i32:1"`` (no assumption; also every
    ``do_not_specialize`` argument). ``constexprs`` holds the kernel's constexpr arguments and every integer the
    JIT turned into the constant 1.
    """

    kernel: object
    signature: tuple  # ((name, type), ...) in argument order
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


_RECORDS: list | None = None
_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
             torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
             torch.bool: "i1"}


@contextlib.contextmanager
def record_launches():
    """Record every ``launch`` inside the block; yields the list of ``LaunchRecord`` it fills."""
    global _RECORDS
    outer, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        recorded, _RECORDS = _RECORDS, outer
        if outer is not None:
            outer.extend(recorded)


@functools.cache
def _params(kernel) -> tuple:
    """(name, is_constexpr, do_not_specialize, do_not_specialize_on_alignment) per argument of a jit function,
    read from the function itself so that it is the same under the interpreter and the JIT."""
    import triton.language as tl

    fn = kernel.fn
    jit_kwargs = getattr(kernel, "kwargs", None) or {}  # the interpreter keeps @triton.jit's arguments here
    names = list(inspect.signature(fn).parameters)

    def listed(attr):
        given = getattr(kernel, attr, None)
        given = jit_kwargs.get(attr) if given is None else given
        return {names[g] if isinstance(g, int) else g for g in (given or ())}

    no_spec, no_align = listed("do_not_specialize"), listed("do_not_specialize_on_alignment")
    out = []
    for name, param in inspect.signature(fn).parameters.items():
        const = param.annotation is tl.constexpr or "constexpr" in str(param.annotation)
        out.append((name, const, name in no_spec, name in no_align))
    return tuple(out)


def _spec(value, no_spec: bool, no_align: bool):
    """(type string, or None for the constant 1) of one runtime argument, as the JIT specialises it."""
    try:  # Triton's own rule (Triton >= 3.4): ("i32", "D") for divisible by 16, ("constexpr", 1) for the value 1
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        ty, key = native_specialize_impl(BaseBackend, value, False, not no_spec, not no_align)[:2]
    except ImportError:
        ty, key = _spec_fallback(value, no_spec, no_align)
    if ty == "constexpr":
        return None
    if ty.startswith("*") or ty[:1] in ("i", "u"):
        return f"{ty}:{16 if key == 'D' else 1}"
    return ty


def _spec_fallback(value, no_spec: bool, no_align: bool) -> tuple:
    """The same rule written out, for a Triton without ``native_specialize_impl``."""
    if isinstance(value, torch.Tensor):
        return f"*{_TL_TYPES[value.dtype]}", "D" if value.data_ptr() % 16 == 0 and not no_align else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1 and not no_spec:
            return "constexpr", 1
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), ("D" if value % 16 == 0 and not no_spec else "")
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"launch: cannot record an argument of type {type(value).__name__}")


def _record(kernel, args, kwargs, num_warps, num_stages) -> None:
    params = _params(kernel)
    values = dict(zip((p[0] for p in params), args))
    values.update({k: v for k, v in kwargs.items() if k in {p[0] for p in params}})
    sig, const = [], []
    for name, is_const, no_spec, no_align in params:
        value = values[name]
        if is_const:
            const.append((name, value))
            continue
        ty = _spec(value, no_spec, no_align)
        if ty is None:
            const.append((name, 1))
        else:
            sig.append((name, ty))
    _RECORDS.append(LaunchRecord(kernel, tuple(sig), tuple(const), num_warps, num_stages))


def _device_of(args, kwargs) -> torch.device | None:
    for v in args:  # the first argument of every kernel here is a tensor: one isinstance test
        if isinstance(v, torch.Tensor):
            return v.device
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def launch(kernel, grid, *args, num_warps: int = 4, num_stages: int = 2, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` on the device of its tensor arguments (and that device's current
    stream), recording it when ``record_launches`` is active. The one way this package launches a Triton kernel.

    The device guard is entered only when the tensors' CUDA device is not the current one (entering it costs a few
    microseconds of host time per launch, which a decode step pays a hundred times).
    """
    device = _device_of(args, kwargs)
    if device is None:
        raise ValueError(f"launch: {getattr(kernel, '__name__', kernel)} has no tensor argument to place it")
    if _RECORDS is not None and hasattr(kernel, "fn"):  # (a test may stand in a plain object for the kernel)
        _record(kernel, args, kwargs, num_warps, num_stages)
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **kwargs)
    return kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **kwargs)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers: ``triton.cdiv`` without its constexpr unwrapping (a few microseconds a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------------------------------------------------
# Tile lists: the first entry under the interpreter, the fastest on the device at hand


_TILE_CACHE = DiskCache("tiles.json")
_CHOSEN: dict = {}  # (device, kernel, bucket, dtype) -> the chosen entry, for this process


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def pick_tiles(kernel: str, tiles: Sequence, device: torch.device, bucket: tuple, dtype: torch.dtype,
               run: Callable[[object], object]):
    """The entry of ``tiles`` (one op kernel's list for the device's architecture row) that ``kernel`` launches.

    Under the interpreter, on the CPU, for a list of one, or while a CUDA graph is being captured (no timing may
    run then) it is ``tiles[0]``, untimed. On a GPU the first call for a case (device, ``kernel``, shape ``bucket``,
    ``dtype``) times ``run(entry)`` for every entry with ``gpt2_kernels.tuning.measure`` and keeps the fastest, in
    memory and in ``tiles.json`` (``gpt2_kernels.tuning.DiskCache``, keyed by the device's name, the versions of
    torch, Triton and this package, and the case), so a later process decides at once. ``run`` launches the kernel
    with one entry on the call's own tensors; it must only write outputs (every kernel here does), since it runs
    several times. Entries are matched to the cache by ``str``, so a list whose entries changed is timed again.
    ``bucket`` is a flat tuple such as ``("C", 768, "rows", 8192)``: cheap to build on every call, spelled out only
    for the disk.
    """
    if len(tiles) == 1 or device.type != "cuda" or interpreting():
        return tiles[0]
    memo = (_cuda_index(device), kernel, bucket, dtype)
    chosen = _CHOSEN.get(memo)
    if chosen is not None:
        return chosen
    if torch.cuda.is_current_stream_capturing():
        return tiles[0]
    case = " ".join(map(str, bucket))
    key = f"{tuning.device_name(device)} | {tuning.versions()} | {kernel} | {case} | {_TL_TYPES.get(dtype, dtype)}"
    names = [str(t) for t in tiles]
    stored = _TILE_CACHE.get(key)
    if isinstance(stored, dict) and stored.get("tiles") in names:
        chosen = tiles[names.index(stored["tiles"])]
    else:
        seconds = [_time_entry(kernel, run, t, i == 0, device) for i, t in enumerate(tiles)]
        best = min(range(len(tiles)), key=seconds.__getitem__)
        chosen = tiles[best]
        us = {n: round(s * 1e6, 2) if math.isfinite(s) else None for n, s in zip(names, seconds)}  # None: refused
        _TILE_CACHE.put(key, {"tiles": names[best], "us": us})
    _CHOSEN[memo] = chosen
    return chosen


def _refusals() -> tuple:
    """What Triton raises when a kernel cannot be built or launched on this GPU (too much shared memory, a ptxas or
    front-end error), before anything runs."""
    from triton.compiler import errors as compiler_errors
    from triton.runtime import errors as runtime_errors

    names = ((runtime_errors, "OutOfResources"), (runtime_errors, "PTXASError"), (compiler_errors, "CompilationError"))
    return tuple(getattr(mod, name) for mod, name in names if hasattr(mod, name))


def _time_entry(kernel: str, run: Callable, tiles, first: bool, device: torch.device) -> float:
    """Seconds of ``run(tiles)``; an entry after the first that Triton refuses on this GPU is left out (infinitely
    slow) with a warning, since the suite compiles only first entries for every architecture (tests/test_report.py).
    The first entry, the one every untimed launch takes, must run."""
    try:
        return tuning.measure(functools.partial(run, tiles), device)
    except _refusals() as e:
        if first:
            raise
        why = " ".join(str(e).split())[:300]
        warnings.warn(f"gpt2_kernels: {kernel} tiles {tiles} cannot run on {tuning.device_name(device)} "
                      f"({type(e).__name__}: {why}); timing the other entries", RuntimeWarning, stacklevel=3)
        return math.inf


def size_bucket(n: int) -> int:
    """The power of two >= n that tile choices key on (a run meets few buckets: decoding's lengths grow by one)."""
    return next_power_of_2(n)
