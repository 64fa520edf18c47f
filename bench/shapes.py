"""The one table of GPT-2 sizes every benchmark draws its shapes from.

A *shape* is a model width (124M, 350M, 774M or 1.5B: its ``n_embd`` C, ``n_head`` and layer
count) together with a batch size B and a sequence length T, named ``"<model>-B<B>-T<T>"`` (for
example ``"124M-B16-T1024"``). Every op benchmark derives its tensor sizes from such a shape:

- layer_norm: x of (B, T, C);
- attention: q, k, v of (B, n_head, T, C / n_head), causal;
- mlp: x of (B, T, C), c_fc (4C, C), c_proj (C, 4C);
- linear_cross_entropy: h of (B, T, C), wte (V, C) with V = 50257, targets (B, T).

Three grids choose among them: ``cpu`` (the default without a GPU: small enough that the whole
suite runs in minutes on a 2-core CPU), ``gpu`` (the default with a GPU) and ``full`` (every model
at every T from 128 to 4096 with B * T = 16384 tokens, for ``--full`` on a GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VOCAB_SIZE = 50257  # GPT-2's BPE vocabulary
SEQ_LENS = (128, 256, 512, 1024, 2048, 4096)
TOKENS_PER_BATCH = 16 * 1024  # GPT-2 124M's training batch, B=16 x T=1024


@dataclass(frozen=True)
class ModelSize:
    """The widths of one GPT-2 model."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


MODELS = {
    m.name: m
    for m in (
        ModelSize("124M", n_layer=12, n_head=12, n_embd=768),
        ModelSize("350M", n_layer=24, n_head=16, n_embd=1024),
        ModelSize("774M", n_layer=36, n_head=20, n_embd=1280),
        ModelSize("1.5B", n_layer=48, n_head=25, n_embd=1600),
    )
}


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: a model width, a batch size and a sequence length."""

    model: ModelSize
    B: int
    T: int

    @property
    def name(self) -> str:
        return f"{self.model.name}-B{self.B}-T{self.T}"

    @property
    def C(self) -> int:
        return self.model.n_embd

    @property
    def n_head(self) -> int:
        return self.model.n_head

    @property
    def head_size(self) -> int:
        return self.model.head_size

    @property
    def tokens(self) -> int:
        return self.B * self.T

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE


_SHAPE_RE = re.compile(r"^(?P<model>[0-9.]+[MB])-B(?P<B>[0-9]+)-T(?P<T>[0-9]+)$")


class ShapeError(ValueError):
    """A shape name that cannot be understood."""


def parse_shape(name: str) -> Shape:
    """Turn ``"124M-B16-T1024"`` into a Shape.

    Raises:
        ShapeError: the name is malformed, names an unknown model, or a zero size.
    """
    m = _SHAPE_RE.match(name.strip())
    if m is None:
        raise ShapeError(f"shape {name!r} is not of the form '<model>-B<batch>-T<seq>', e.g. '124M-B16-T1024'; "
                         f"models are {', '.join(MODELS)}")
    if m["model"] not in MODELS:
        raise ShapeError(f"shape {name!r} names unknown model {m['model']!r}; models are {', '.join(MODELS)}")
    B, T = int(m["B"]), int(m["T"])
    if B < 1 or T < 1:
        raise ShapeError(f"shape {name!r} needs B >= 1 and T >= 1")
    return Shape(MODELS[m["model"]], B, T)


def _sweep(model: str, seq_lens=SEQ_LENS) -> list[Shape]:
    # Constant tokens per batch, so rows of a T sweep do comparable work per token.
    return [Shape(MODELS[model], max(1, TOKENS_PER_BATCH // T), T) for T in seq_lens]


# op -> shapes, per grid. Attention sweeps T (its cost grows as T^2); the other ops depend only
# on B*T and C, so one T per model is enough outside the full grid.
GRIDS: dict[str, dict[str, list[Shape]]] = {
    "cpu": {
        "attention": [Shape(MODELS["124M"], 1, 128), Shape(MODELS["124M"], 1, 256)],
        "layer_norm": [Shape(MODELS["124M"], 4, 256)],
        "mlp": [Shape(MODELS["124M"], 1, 128)],
        "linear_cross_entropy": [Shape(MODELS["124M"], 1, 64)],
    },
    "gpu": {
        # T = 256, 1024, 4096 keep the default GPU run within minutes; --full sweeps every T.
        "attention": _sweep("124M", (256, 1024, 4096)) + [Shape(MODELS["1.5B"], 16, 1024)],
        "layer_norm": [Shape(MODELS["124M"], 16, 1024), Shape(MODELS["1.5B"], 16, 1024)],
        "mlp": [Shape(MODELS["124M"], 16, 1024), Shape(MODELS["1.5B"], 16, 1024)],
        "linear_cross_entropy": [Shape(MODELS["124M"], 16, 1024), Shape(MODELS["1.5B"], 16, 1024)],
    },
    "full": {
        op: [s for name in MODELS for s in _sweep(name)]
        for op in ("attention", "layer_norm", "mlp", "linear_cross_entropy")
    },
}


def grid_name(device_type: str, full: bool) -> str:
    """Which grid a run uses: ``full`` on request, else ``gpu`` or ``cpu`` by device."""
    if full:
        return "full"
    return "gpu" if device_type == "cuda" else "cpu"


def select_shapes(op: str, grid: str, requested: list[str] | None) -> list[tuple[str, Shape | None, str | None]]:
    """The shapes to run for ``op``: ``[(id, Shape or None, skip reason or None)]``.

    Without a request, the grid's shapes. A request is a list of shape names (any
    ``<model>-B<B>-T<T>``, in the grid or not) and model names (``124M``: that model's shapes in
    the grid). A name that cannot be understood comes back with a None shape and the reason, so
    the run skips it rather than stopping.
    """
    shapes = GRIDS[grid][op]
    if not requested:
        return [(s.name, s, None) for s in shapes]
    out: list[tuple[str, Shape | None, str | None]] = []
    for name in requested:
        if name in MODELS:
            picked = [s for s in shapes if s.model.name == name]
            if not picked:
                why = f"model {name!r} has no {op} shapes in the {grid!r} grid; name a shape such as '{name}-B1-T128'"
                out.append((name, None, why))
            out.extend((s.name, s, None) for s in picked)
            continue
        try:
            s = parse_shape(name)
        except ShapeError as e:
            out.append((name, None, f"--bench-shapes: {e}"))
        else:
            out.append((s.name, s, None))
    # Drop repeats, keeping the first.
    seen, unique = set(), []
    for entry in out:
        if entry[0] not in seen:
            seen.add(entry[0])
            unique.append(entry)
    return unique
