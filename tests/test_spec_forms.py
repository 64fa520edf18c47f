"""Every form of a backend spec against the op table it must produce and the model output it must change (issue 22).

Forms: ``auto``, ``auto,op=X``, ``op=X`` (default auto), ``X``, ``X,op=Y`` for every default and every op, several
overrides, every op overridden, and an override back to ``auto``. The table is written here from the form's parts,
not from ``parse_spec``. ``auto`` resolves by the registry's fixed order (tests/conftest.py sets
``GPT2_KERNELS_AUTO=fixed``), except in the test that stubs the measurement.

To show that a table entry reaches the model, one (op, backend) function is replaced through the registry by one
whose output is off by a known amount: the model's output must move when the spec sends that op there, and stay
bit-identical when it does not.
"""

from __future__ import annotations

import pytest
import torch

from gpt2.model import GPT, GPTConfig
from gpt2_kernels import registry

pytestmark = pytest.mark.usefixtures("one_thread")

OPS = registry.OPS
USABLE = [b for b in registry.BACKENDS if registry.unavailable_reason(b, "cpu") is None]
AUTO = registry.fixed_auto("cpu")


def _table(default: str, overrides: dict[str, str]) -> dict[str, str]:
    """The op table a spec of ``default`` and ``overrides`` must give on the CPU."""
    table = {op: overrides.get(op, default) for op in OPS}
    return {op: AUTO if b == "auto" else b for op, b in table.items()}


def _spec(default: str | None, overrides: dict[str, str]) -> str:
    return ",".join(([default] if default else []) + [f"{op}={b}" for op, b in overrides.items()])


def _forms() -> list[tuple[str, dict[str, str]]]:
    forms = [("auto", _table("auto", {}))]
    for op in OPS:
        for b in USABLE:
            forms += [(_spec("auto", {op: b}), _table("auto", {op: b})),
                      (_spec(None, {op: b}), _table("auto", {op: b}))]
    for d in USABLE:
        forms.append((d, _table(d, {})))
        for op in OPS:
            forms.append((_spec(d, {op: "auto"}), _table(d, {op: "auto"})))
            for b in USABLE:
                if b != d:
                    forms.append((_spec(d, {op: b}), _table(d, {op: b})))
        others = [b for b in USABLE if b != d]
        two = {"attention": others[0], "mlp": others[-1]}
        forms.append((_spec(d, two), _table(d, two)))
        every = {op: others[i % len(others)] for i, op in enumerate(OPS)}
        forms.append((_spec(d, every), _table(d, every)))
    return forms


FORMS = _forms()


def test_the_forms_cover_every_default_and_op():
    assert len(USABLE) >= 2 and AUTO in USABLE
    assert {"auto", *USABLE} <= {s.split(",")[0] for s, _ in FORMS}
    overridden = {(op, b) for s, t in FORMS for op, b in t.items() if f"{op}={b}" in s}
    assert overridden == {(op, b) for op in OPS for b in USABLE}


@pytest.mark.parametrize("spec,table", FORMS, ids=[s for s, _ in FORMS])
def test_spec_gives_its_op_table(spec, table):
    assert registry.resolve(spec, "cpu") == table
    ops = registry.build_ops(spec, "cpu")
    assert ops.backends == table
    for op, b in table.items():  # each function is the one the registry holds for (op, backend)
        assert getattr(ops, op) is registry._load(op, b), (spec, op, b)


def test_measured_auto_times_only_the_ops_left_to_it(monkeypatch):
    """With a stub measurement, ``auto,mlp=X``: mlp goes to X and is not even timed; the rest get the stub's pick."""
    from gpt2_kernels import auto

    asked = []

    def stub(ops, case, device, *, clock=None):
        asked.append(tuple(ops))
        return {op: "torch" for op in ops}

    monkeypatch.setenv("GPT2_KERNELS_AUTO", "measure")
    monkeypatch.setattr(auto, "choose", stub)
    other = next(b for b in USABLE if b != "torch")
    got = registry.resolve(f"auto,mlp={other},attention=torch", "cpu", case=object())
    assert got == {**{op: "torch" for op in OPS}, "mlp": other}
    assert asked == [("layer_norm", "add_layer_norm", "linear_cross_entropy")]


# ----------------------------------------------------------------------------- the model sees the table

def _off(fn, op):
    """``fn`` with its output moved by a known amount: the loss by exactly 1, a tensor (..., C) by a ramp over its
    channels (a constant would vanish in the next layer norm)."""
    def ramp(y):
        return y + torch.linspace(0.0, 1.0, y.shape[-1], dtype=y.dtype)

    if op == "add_layer_norm":
        def moved(*args, **kwargs):
            y, s = fn(*args, **kwargs)
            return ramp(y), s
        return moved
    if op == "linear_cross_entropy":
        return lambda *args, **kwargs: fn(*args, **kwargs) + 1.0
    return lambda *args, **kwargs: ramp(fn(*args, **kwargs))


def _outputs(spec: str, marked: tuple[str, str] | None, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one tiny model under ``spec``, with the ``marked`` (op, backend) function moved."""
    load = registry._load
    if marked is not None:
        monkeypatch.setattr(registry, "_load", lambda op, b: _off(load(op, b), op) if (op, b) == marked else load(op, b))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=2), backend=spec).eval()
    idx = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(idx)[0], model(idx, idx)[1]
    monkeypatch.setattr(registry, "_load", load)
    return out


FAST = [b for b in USABLE if b != "triton"]  # the model's forward under the Triton interpreter is slow: tables only
MODEL_FORMS = [(op, d, b) for op in OPS for d in ["auto", *FAST] for b in FAST if b != (AUTO if d == "auto" else d)]


@pytest.mark.parametrize("op,default,backend", MODEL_FORMS, ids=[f"{d},{op}={b}" for op, d, b in MODEL_FORMS])
def test_an_override_reaches_the_model_and_the_default_no_longer_does(op, default, backend, monkeypatch):
    spec = f"{default},{op}={backend}"
    plain = _outputs(spec, None, monkeypatch)
    moved = _outputs(spec, (op, backend), monkeypatch)  # the override's function is off: the output moves
    if op == "linear_cross_entropy":
        assert torch.equal(moved[0], plain[0])
        torch.testing.assert_close(moved[1], plain[1] + 1.0, atol=1e-5, rtol=0)
    else:
        assert (moved[0] - plain[0]).abs().max() > 1e-3, f"{spec}: {op} from {backend} does not reach the logits"
    # The default's function for that op is off: nothing moves, since the spec sends the op elsewhere.
    untouched = _outputs(spec, (op, AUTO if default == "auto" else default), monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(untouched, plain)), f"{spec}: {op} still runs the default"
