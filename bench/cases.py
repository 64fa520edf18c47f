"""Turn the suite's command-line choices into benchmark cases, bad names into skips.

Every list option (``--bench-backends``, ``--bench-shapes``, ``--bench-dtypes``,
``--bench-modes``) is comma-separated. A name that is not understood never stops the run: it
becomes one skipped case whose reason names the bad value and what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.common import ALL_IMPL_NAMES, DTYPE_ALIASES, DTYPES, IMPL_NAMES, MODEL_PEERS, MODES, OpCase
from bench.shapes import select_shapes

# The registry backends a whole model runs on, then transformers' model with the same weights (bench.common).
MODEL_BACKENDS = ("torch", "triton", "ext", "native") + MODEL_PEERS


def parse_list(value: str | None) -> list[str] | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None or blank -> None (use the default)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def _canonical(backends: list[str] | None) -> list[str] | None:
    """Old backend names (``cuda`` for ``ext``) as the registry's current ones."""
    from gpt2_kernels.registry import canonical

    return None if backends is None else [canonical(b) for b in backends]


def default_dtypes(device_type: str, full: bool) -> list[str]:
    """The dtypes a run measures by default: the one ``--dtype auto`` trains in (``gpt2_kernels.runtime.default_dtype``:
    bf16 from sm_80, fp16 on Turing, whose bf16 is emulated), or with ``--full`` every dtype the GPU has."""
    if device_type == "cuda":
        import torch

        from gpt2_kernels.runtime import default_dtype, has_native_bf16

        dev = torch.device("cuda")
        if full:
            return (["bf16"] if has_native_bf16(dev) else []) + ["fp16", "fp32"]
        return [{torch.bfloat16: "bf16", torch.float16: "fp16"}[default_dtype(dev)]]
    return ["fp32"]  # the CPU's fp16 matmul is ~100x slower than fp32: ask for it explicitly


@dataclass(frozen=True)
class Choice:
    """One parametrisation entry: a case to run, or a bad value to skip with a reason."""

    id: str
    case: object | None
    skip: str | None = None


def _dtypes(requested: list[str] | None, device_type: str, full: bool) -> tuple[list[str], list[Choice]]:
    good, bad = [], []
    for name in requested or default_dtypes(device_type, full):
        canon = DTYPE_ALIASES.get(name, name)
        if canon in DTYPES:
            if canon not in good:
                good.append(canon)
        else:
            bad.append(Choice(f"dtype-{name}", None, f"--bench-dtypes: unknown dtype {name!r}; "
                                                       f"dtypes are {', '.join(DTYPES)}"))
    return good, bad


def _modes(requested: list[str] | None) -> tuple[list[str], list[Choice]]:
    good, bad = [], []
    for name in requested or MODES:
        canon = "fwd+bwd" if name in ("fwdbwd", "fwd_bwd", "both") else name
        if canon in MODES:
            if canon not in good:
                good.append(canon)
        else:
            bad.append(Choice(f"mode-{name}", None, f"--bench-modes: unknown mode {name!r}; modes are {', '.join(MODES)}"))
    return good, bad


def op_choices(op: str, grid: str, device_type: str, full: bool, backends: list[str] | None,
               shapes: list[str] | None, dtypes: list[str] | None, modes: list[str] | None) -> list[Choice]:
    """Every (shape, dtype, mode, implementation) of ``op`` to run, implementation varying fastest.

    Args:
        op: one of ``bench.common.OPS``.
        grid: ``cpu``, ``gpu`` or ``full`` (see bench/shapes.py).
        backends, shapes, dtypes, modes: the parsed options, None for the defaults.
    Returns:
        Choices in run order; bad names come first, as skips.
    """
    bad: list[Choice] = []
    backends = _canonical(backends)
    impls = list(IMPL_NAMES[op])
    if backends and backends != ["all"]:
        impls = []
        for name in backends:
            if name in IMPL_NAMES[op]:
                if name not in impls:
                    impls.append(name)
            elif name not in ALL_IMPL_NAMES and name != "all":
                bad.append(Choice(f"backend-{name}", None, f"--bench-backends: unknown backend {name!r}; "
                                                           f"backends are {', '.join(ALL_IMPL_NAMES)}"))
    dts, bad_dt = _dtypes(dtypes, device_type, full)
    mds, bad_md = _modes(modes)
    bad += bad_dt + bad_md
    out = list(bad)
    for shape_id, shape, why in select_shapes(op, grid, shapes):
        if shape is None:
            out.append(Choice(f"shape-{shape_id}", None, why))
            continue
        for dt in dts:
            for mode in mds:
                for impl in impls:
                    case = OpCase(op, impl, mode, dt, shape)
                    out.append(Choice(case.id, case))
    return out


@dataclass(frozen=True)
class ModelCase:
    """One whole-model benchmark: a registry backend and a compute dtype (autocast when not fp32)."""

    backend: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.dtype}"


def model_choices(device_type: str, full: bool, backends: list[str] | None,
                  dtypes: list[str] | None) -> list[Choice]:
    """The (backend, dtype) pairs for the train-step and generation benchmarks."""
    out: list[Choice] = []
    backends = _canonical(backends)
    chosen = list(MODEL_BACKENDS)
    if backends and backends != ["all"]:
        chosen = [b for b in MODEL_BACKENDS if b in backends]
        for name in backends:
            if name not in ALL_IMPL_NAMES + MODEL_PEERS and name != "all":
                out.append(Choice(f"backend-{name}", None, f"--bench-backends: unknown backend {name!r}; "
                                                           f"backends are {', '.join(ALL_IMPL_NAMES + MODEL_PEERS)}"))
    dts, bad_dt = _dtypes(dtypes, device_type, False)
    out += bad_dt
    out += [Choice(ModelCase(b, d).id, ModelCase(b, d)) for d in dts for b in chosen]
    return out
