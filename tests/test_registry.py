"""The op registry: spec parsing, availability, lazy imports, and its errors."""

import subprocess
import sys

import pytest

import kernels
from kernels.registry import BackendError, SpecError, parse_spec


def test_parse_spec_forms():
    assert parse_spec("torch") == ("torch", {})
    assert parse_spec("triton,attention=torch") == ("triton", {"attention": "torch"})
    assert parse_spec("attention=torch") == ("auto", {"attention": "torch"})
    assert parse_spec(" auto , mlp = cuda ") == ("auto", {"mlp": "cuda"})


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
        kernels.build_ops(spec)


def test_torch_backend_everywhere_and_ops_are_the_reference():
    from kernels import ref

    ops = kernels.build_ops("torch", "cpu")
    assert ops.attention is ref.attention and ops.mlp is ref.mlp
    assert ops.backends == {op: "torch" for op in kernels.OPS}
    assert all("torch" in b for b in kernels.available("cpu").values())


def test_per_op_override():
    ops = kernels.build_ops("torch,attention=torch", "cpu")
    assert set(ops.backends.values()) == {"torch"}


def test_explicit_unavailable_backend_says_why_and_what_is_available():
    # Triton on a CPU tensor needs the interpreter; with it switched off the request must fail loudly.
    code = (
        "import os; os.environ['TRITON_INTERPRET']='0'\n"
        "import kernels\n"
        "try:\n    kernels.build_ops('triton', 'cpu')\nexcept kernels.BackendError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ERR backend 'triton' for op 'layer_norm' cannot run on cpu" in out
    assert "Available here:" in out and "torch" in out.split("Available here:")[1]


def test_cuda_device_without_gpu_is_refused_for_triton():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal only happens without one")
    with pytest.raises(BackendError, match="no CUDA device"):
        kernels.build_ops("triton", "cuda")


def test_auto_resolves_and_states_its_choice_once(capsys):
    from kernels.registry import _announce

    _announce.cache_clear()
    a = kernels.resolve("auto", "cpu")
    kernels.resolve("auto", "cpu")
    err = capsys.readouterr().err
    assert err.count("backend 'auto' on cpu chose") == 1
    assert set(a) == set(kernels.OPS)
    assert all(b in ("cuda", "torch") for b in a.values())  # never the slow interpreter on CPU


def test_torch_backend_never_imports_triton():
    code = ("import sys, kernels, gpt2\n"
            "from gpt2.model import GPT, GPTConfig\n"
            "import torch\n"
            "m = GPT(GPTConfig.from_preset('tiny'), backend='torch')\n"
            "m(torch.zeros(1, 4, dtype=torch.long))\n"
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
