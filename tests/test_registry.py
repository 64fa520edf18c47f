"""The op registry: spec parsing, availability, lazy imports, its errors, and backends swapped in a model."""

import collections
import subprocess
import sys

import pytest
import torch

import gpt2_kernels.registry
from gpt2_kernels.registry import BackendError, SpecError, parse_spec
from gpt2_kernels.testing import assert_close


def test_parse_spec_forms():
    assert parse_spec("torch") == ("torch", {})
    assert parse_spec("triton,attention=torch") == ("triton", {"attention": "torch"})
    assert parse_spec("attention=torch") == ("auto", {"attention": "torch"})
    assert parse_spec(" auto , mlp = ext ") == ("auto", {"mlp": "ext"})


def test_cuda_is_the_extension_s_old_name():
    """``cuda`` names the extension backend (``ext``) in a spec, as a default and as an override."""
    assert parse_spec("cuda") == ("ext", {})
    assert parse_spec("torch,mlp=cuda") == ("torch", {"mlp": "ext"})
    assert gpt2_kernels.registry.unavailable_reason("cuda", "cpu") == gpt2_kernels.registry.unavailable_reason("ext", "cpu")


@pytest.mark.parametrize("spec,needle", [
    ("tpu", "unknown backend 'tpu'"),
    ("torch,softmax=torch", "unknown op 'softmax'"),
    ("torch,mlp=jax", "unknown backend 'jax' for op 'mlp'"),
    ("torch,triton", "two defaults"),
    ("torch,mlp=torch,mlp=triton", "given twice"),
    ("", "empty backend spec"),
    ("torch,", "empty entry"),
])
def test_bad_specs_name_the_problem(spec, needle):
    with pytest.raises(SpecError, match=needle):
        gpt2_kernels.registry.build_ops(spec)


def test_torch_backend_everywhere_and_ops_are_the_reference():
    from gpt2_kernels import ref

    ops = gpt2_kernels.registry.build_ops("torch", "cpu")
    assert ops.attention is ref.attention and ops.mlp is ref.mlp
    assert ops.backends == {op: "torch" for op in gpt2_kernels.registry.OPS}
    assert all("torch" in b for b in gpt2_kernels.registry.available("cpu").values())


def _other_backend() -> str:
    """A backend other than the reference that runs on the CPU here (the extension, else Triton under the
    interpreter): an override or a swap to it must change which functions run."""
    for backend in ("ext", "triton"):
        if gpt2_kernels.registry.unavailable_reason(backend, "cpu") is None:
            return backend
    pytest.skip("no backend but torch runs on the CPU here (no extension, no Triton interpreter)")


@pytest.mark.parametrize("op", gpt2_kernels.registry.OPS)
@pytest.mark.parametrize("direction", ["reference-default", "reference-override"])
def test_per_op_override_changes_that_op_and_only_it(op, direction):
    other = _other_backend()
    default, override = ("torch", other) if direction == "reference-default" else (other, "torch")
    ops = gpt2_kernels.registry.build_ops(f"{default},{op}={override}", "cpu")
    assert ops.backends == {o: override if o == op else default for o in gpt2_kernels.registry.OPS}
    whole = {b: gpt2_kernels.registry.build_ops(b, "cpu") for b in (default, override)}
    assert getattr(whole[default], op) is not getattr(whole[override], op)  # the two backends' code differs
    for o in gpt2_kernels.registry.OPS:
        want = override if o == op else default
        assert getattr(ops, o) is getattr(whole[want], o), f"{o}: not the {want} backend's function"


def _count_calls(monkeypatch, backend: str) -> collections.Counter:
    """Route every op of ``backend`` through a counting wrapper, where the registry loads it from."""
    calls = collections.Counter()
    ops = gpt2_kernels.registry.build_ops(backend, "cpu")
    for op in gpt2_kernels.registry.OPS:
        fn = getattr(ops, op)
        module = sys.modules[fn.__module__]
        assert getattr(module, fn.__name__) is fn

        def counted(*args, _fn=fn, _op=op, **kwargs):
            calls[_op] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, fn.__name__, counted)
    return calls


def test_set_backend_runs_the_new_backend(monkeypatch):
    # A model built on the reference, swapped to another backend: its ops are that backend's functions, the
    # forward calls them (counted through wrappers), the loss matches, and swapping back stops the calls.
    from gpt2.model import GPT, GPTConfig

    other = _other_backend()
    calls = _count_calls(monkeypatch, other)
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny"), backend="torch")
    idx = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    loss_ref = m(idx, idx)[1]
    assert not calls, f"the torch backend called {other}'s ops: {dict(calls)}"
    assert m.set_backend(other) is m
    assert m.ops.backends == {op: other for op in gpt2_kernels.registry.OPS}
    for op in gpt2_kernels.registry.OPS:
        assert getattr(m.ops, op) is getattr(gpt2_kernels.registry.build_ops(other, "cpu"), op), op
    loss = m(idx, idx)[1]
    n_layer = m.config.n_layer
    assert (calls["attention"], calls["mlp"], calls["linear_cross_entropy"]) == (n_layer, n_layer, 1), dict(calls)
    assert calls["layer_norm"] + calls["add_layer_norm"] == 2 * n_layer + 1, dict(calls)  # ln_1, ln_2 per block, ln_f
    assert_close(f"loss under {other}", loss.detach(), loss_ref.detach())
    calls.clear()
    m.set_backend("torch")
    m(idx, idx)
    assert not calls, f"back on torch, {other}'s ops still ran: {dict(calls)}"


def test_explicit_unavailable_backend_says_why_and_what_is_available():
    # Triton on a CPU tensor needs the interpreter; with it switched off the request must fail loudly.
    code = (
        "import os; os.environ['TRITON_INTERPRET']='0'\n"
        "import gpt2_kernels.registry\n"
        "try:\n    gpt2_kernels.registry.build_ops('triton', 'cpu')\nexcept gpt2_kernels.registry.BackendError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ERR backend 'triton' for op 'layer_norm' cannot run on cpu" in out
    assert "Available here:" in out and "torch" in out.split("Available here:")[1]


def test_cuda_device_without_gpu_is_refused_for_triton():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal only happens without one")
    with pytest.raises(BackendError, match="no CUDA device"):
        gpt2_kernels.registry.build_ops("triton", "cuda")


def test_auto_resolves_and_states_its_choice_once(capsys):
    from gpt2_kernels.registry import _announce

    _announce.cache_clear()
    a = gpt2_kernels.registry.resolve("auto", "cpu")
    gpt2_kernels.registry.resolve("auto", "cpu")
    err = capsys.readouterr().err
    assert err.count("backend 'auto' on cpu chose") == 1
    assert set(a) == set(gpt2_kernels.registry.OPS)
    assert all(b in ("ext", "torch") for b in a.values())  # never the slow interpreter on CPU


def test_torch_backend_never_imports_triton():
    model = "GPT(GPTConfig.from_preset('tiny'), backend='torch')"
    code = f"import sys, torch; from gpt2.model import GPT, GPTConfig; {model}(torch.zeros(1, 4, dtype=torch.long))"
    out = subprocess.run([sys.executable, "-c", code + "; print('triton' in sys.modules)"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_extension_is_available_wherever_a_cxx_compiler_is():
    """Not a skip: where a C++ compiler is on PATH (CI, every developer machine here), the ext backend must load,
    from the install's build or built on first use, or every test of tests/test_ext.py would skip unseen."""
    import os
    import shutil

    from gpt2_kernels import ext

    if os.environ.get("GPT2_KERNELS_NO_EXT", "0") not in ("", "0"):
        pytest.skip("GPT2_KERNELS_NO_EXT is set")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH")
    assert ext.unavailable_reason() is None, ext.unavailable_reason()
