"""The one op registry: which code implements each (op, backend), and which of those can run here.

Every backend implements the same five functions with the same signatures as ``gpt2_kernels.ref``:

- ``layer_norm(x, weight, bias, eps=1e-5) -> y``
- ``add_layer_norm(x, residual, weight, bias, eps=1e-5) -> (y, s)``: s = x + residual in x's dtype
  (residual has x's shape and dtype), y = layer_norm(s); the residual add and the next norm of a
  pre-norm block in one op
- ``attention(q, k, v, causal=True, dropout_p=0.0)``
- ``mlp(x, w_fc, b_fc, w_proj, b_proj)``
- ``linear_cross_entropy(h, weight, targets, ignore_index=-1)``

A backend *spec* is a string: a default backend optionally followed by per-op overrides, e.g.
``"triton"``, ``"triton,attention=torch"``, ``"auto"`` or ``"auto,mlp=ext"``. The backends: ``torch``
(``gpt2_kernels.ref``, the oracle), ``triton`` (the Triton kernels), ``ext`` (the C++ extension: CPU kernels, and CUDA
kernels when built with a CUDA toolkit; ``cuda`` is accepted as its old name) and ``native`` (PyTorch's fastest
built-ins, ``gpt2_kernels.native``). ``auto`` picks per op, and says once what it picked: given the shapes a model
runs (a ``gpt2_kernels.auto.Case``), by timing every usable backend on them on this device (``gpt2_kernels.auto``);
without shapes, under torch.compile's tracing, or with ``GPT2_KERNELS_AUTO=fixed``, by the fixed order
``_AUTO_ORDER``. An explicit backend, default or per op, is never replaced.

Imports are lazy: nothing here imports Triton or the C++ extension until a backend that needs
it is asked for, so ``build_ops("torch")`` works on a machine without either.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

OPS = ("layer_norm", "add_layer_norm", "attention", "mlp", "linear_cross_entropy")
BACKENDS = ("torch", "triton", "ext", "native")
# Older names still accepted in a spec. The extension serves CPU tensors too, so "cuda" was not true on a CPU.
ALIASES = {"cuda": "ext"}


def canonical(name: str) -> str:
    """A backend name as the registry knows it now (an old alias replaced; anything else unchanged)."""
    return ALIASES.get(name, name)

# (op, backend) -> "module:function". The single source of truth for where code lives.
_TABLE: dict[tuple[str, str], str] = {
    ("layer_norm", "torch"): ".ref:layer_norm",
    ("add_layer_norm", "torch"): ".ref:add_layer_norm",
    ("attention", "torch"): ".ref:attention",
    ("mlp", "torch"): ".ref:mlp",
    ("linear_cross_entropy", "torch"): ".ref:linear_cross_entropy",
    ("layer_norm", "triton"): ".layer_norm:layer_norm",
    ("add_layer_norm", "triton"): ".layer_norm:add_layer_norm",
    ("attention", "triton"): ".attention:attention",
    ("mlp", "triton"): ".mlp:mlp",
    ("linear_cross_entropy", "triton"): ".linear_cross_entropy:linear_cross_entropy",
    ("layer_norm", "ext"): ".ext:layer_norm",
    ("add_layer_norm", "ext"): ".ext:add_layer_norm",
    ("attention", "ext"): ".ext:attention",
    ("mlp", "ext"): ".ext:mlp",
    ("linear_cross_entropy", "ext"): ".ext:linear_cross_entropy",
    ("layer_norm", "native"): ".native:layer_norm",
    ("add_layer_norm", "native"): ".native:add_layer_norm",
    ("attention", "native"): ".native:attention",
    ("mlp", "native"): ".native:mlp",
    ("linear_cross_entropy", "native"): ".native:linear_cross_entropy",
}

# The fixed order of ``auto`` per device type (GPT2_KERNELS_AUTO=fixed, or no shapes to time yet): the order before
# ``auto`` measured, kept as it was so that fixed runs stay reproducible. On the CPU, Triton only runs under its
# (slow) interpreter, so ``auto`` never picks it there.
_AUTO_ORDER = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}


class BackendError(RuntimeError):
    """A backend was asked for explicitly and cannot run here."""


class SpecError(ValueError):
    """A backend spec names an unknown op or backend, or is malformed."""


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device="cpu") -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None if it can.

    Imports the backend's dependencies (Triton, the extension) to find out, so call it only when
    that is wanted.
    """
    backend = canonical(backend)
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend {backend!r}; backends are {', '.join(BACKENDS)}")
    dev = _device_type(device)
    if backend in ("torch", "native"):
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the 'triton' package is not installed"
        if dev == "cpu" and not interpreter_enabled():
            return "Triton needs a GPU; on the CPU it runs only under its interpreter (set TRITON_INTERPRET=1)"
        if dev == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device is available"
        if dev not in ("cpu", "cuda"):
            return f"Triton kernels do not run on device type {dev!r}"
        return None
    # backend == "ext": the C++/CUDA extension.
    try:
        from . import ext
    except ImportError as e:  # pragma: no cover - depends on the build
        return f"the C++/CUDA extension module is missing ({e})"
    why = ext.unavailable_reason()
    if why is not None:
        return why
    if dev == "cuda" and not ext.has_cuda_kernels():
        return "the extension was built without CUDA kernels (a CPU-only torch or no CUDA toolkit at build time)"
    if dev not in ("cpu", "cuda"):
        return f"the extension has no kernels for device type {dev!r}"
    return None


def available(device="cpu") -> dict[str, list[str]]:
    """``{op: [backends usable on device here]}``."""
    usable = [b for b in BACKENDS if unavailable_reason(b, device) is None]
    return {op: list(usable) for op in OPS}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Parse ``"default,op=backend,..."`` into (default, {op: backend}).

    The default may be omitted (``"attention=torch"``), in which case it is ``auto``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty backend spec {spec!r}; use e.g. 'torch', 'triton', 'auto' or 'triton,attention=torch'")
    default = None
    overrides: dict[str, str] = {}
    names = BACKENDS + ("auto",)
    for part in (canonical(p.strip()) for p in spec.split(",")):
        if not part:
            raise SpecError(f"backend spec {spec!r} has an empty entry")
        if "=" in part:
            op, _, backend = (s.strip() for s in part.partition("="))
            backend = canonical(backend)
            if op not in OPS:
                raise SpecError(f"unknown op {op!r} in backend spec {spec!r}; ops are {', '.join(OPS)}")
            if backend not in names:
                raise SpecError(f"unknown backend {backend!r} for op {op!r}; backends are {', '.join(names)}")
            if op in overrides:
                raise SpecError(f"op {op!r} is given twice in backend spec {spec!r}")
            overrides[op] = backend
        else:
            if part not in names:
                raise SpecError(f"unknown backend {part!r} in spec {spec!r}; backends are {', '.join(names)}")
            if default is not None:
                raise SpecError(f"backend spec {spec!r} names two defaults ({default!r} and {part!r})")
            default = part
    return default or "auto", overrides


@functools.cache
def _announce(message: str) -> None:
    # Said once per distinct choice, however many models are built.
    print(message, file=sys.stderr)


def _load(op: str, backend: str) -> Callable:
    module, _, fn = _TABLE[(op, backend)].partition(":")
    return getattr(importlib.import_module(module, __package__), fn)


def fixed_auto(device="cpu") -> str:
    """The backend the fixed order gives ``auto`` on ``device``: the first of ``_AUTO_ORDER`` that can run there."""
    dev = _device_type(device)
    for cand in _AUTO_ORDER.get(dev, ("torch",)):
        if unavailable_reason(cand, dev) is None:
            return cand
    return "torch"


def measures(spec: str) -> bool:
    """Whether ``resolve(spec, device, case)`` would time backends: some op is left to ``auto`` and
    ``GPT2_KERNELS_AUTO`` is not ``fixed``."""
    from . import auto

    default, overrides = parse_spec(spec)
    return "auto" in {overrides.get(op, default) for op in OPS} and auto.mode() == "measure"


def resolve(spec: str = "auto", device="cpu", case=None, quiet: bool = False) -> dict[str, str]:
    """Map each op to the concrete backend ``spec`` chooses on ``device``, checking availability.

    Args:
        spec: a backend spec (module docstring).
        device: where the ops will run.
        case: the shapes the ops will run on (``gpt2_kernels.auto.Case``); with one, the ops left to ``auto`` are
            chosen by measurement (``gpt2_kernels.auto.choose``), unless ``GPT2_KERNELS_AUTO=fixed`` or
            torch.compile is tracing. Without, by the fixed order.
        quiet: do not announce a fixed-order choice (a provisional one, to be measured once the shapes are known).
    Raises:
        SpecError: the spec is malformed or names something unknown.
        BackendError: an explicitly requested backend cannot run here; the message says why and
            what can.
    """
    import torch

    from . import auto

    default, overrides = parse_spec(spec)
    dev = _device_type(device)
    chosen: dict[str, str] = {}
    for op in OPS:
        want = overrides.get(op, default)
        if want == "auto":
            continue
        why = unavailable_reason(want, dev)
        if why is not None:
            usable = [b for b in BACKENDS if unavailable_reason(b, dev) is None]
            raise BackendError(
                f"backend {want!r} for op {op!r} cannot run on {dev}: {why}. Available here: {', '.join(usable)}"
            )
        chosen[op] = want
    left = [op for op in OPS if op not in chosen]
    if left and case is not None and auto.mode() == "measure" and not torch.compiler.is_compiling():
        chosen.update(auto.choose(left, case, device))
    elif left:
        pick = fixed_auto(dev)
        chosen.update({op: pick for op in left})
        if not quiet:
            why = "GPT2_KERNELS_AUTO=fixed" if auto.mode() == "fixed" else "fixed order, no shapes timed"
            _announce(f"gpt2_kernels: backend 'auto' on {dev} chose " + ", ".join(f"{op}={pick}" for op in left)
                      + f" ({why})")
    return {op: chosen[op] for op in OPS}


@dataclass(frozen=True)
class Ops:
    """The op functions a model calls, and which backend each came from."""

    layer_norm: Callable
    add_layer_norm: Callable
    attention: Callable
    mlp: Callable
    linear_cross_entropy: Callable
    backends: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return ",".join(f"{op}={b}" for op, b in self.backends.items())


def build_ops(spec: str = "auto", device="cpu", case=None, quiet: bool = False) -> Ops:
    """Return the op functions ``spec`` selects on ``device`` (see ``resolve``)."""
    chosen = resolve(spec, device, case, quiet)
    return Ops(**{op: _load(op, b) for op, b in chosen.items()}, backends=chosen)
