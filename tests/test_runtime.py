"""gpt2_kernels.runtime: the one launch path (device guard + recorder), the architecture table and the dtype choice.

What a real GPU does that the interpreter hides, made to fail on the CPU:

- every Triton launch of the package goes through ``runtime.launch`` (statically: no ``kernel[grid](...)`` anywhere
  else; dynamically: the interpreter runs exactly as many kernels as ``launch`` recorded), and ``launch`` runs the
  kernel under the tensors' CUDA device, not the current one;
- one architecture table (the op modules used to disagree about cc 12.x);
- bf16 only from compute capability 8.0 (``torch.cuda.is_bf16_supported()`` says True on Turing).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from gpt2_kernels import runtime

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def test_no_launch_bypasses_runtime_launch():
    """``kernel[grid](...)`` appears nowhere in kernels/ but in runtime.launch itself."""
    offenders = []
    for path in sorted(KERNELS.glob("*.py")):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}(...)")
    assert not offenders, "Triton launches that bypass gpt2_kernels.runtime.launch:\n" + "\n".join(offenders)


def _workload():
    from gpt2.model import GPT, GPTConfig
    from gpt2_kernels import attention as A

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"), backend="triton")
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    model.eval().generate(x[:1, :4], 2, greedy=True)
    A.dropout_keep_mask(1, 1, 1, 3, 5, 0.1, "cpu")


@pytest.mark.skipif(not runtime.interpreting(), reason="counts the CPU interpreter's kernel runs (TRITON_INTERPRET=1)")
def test_every_kernel_run_is_a_recorded_launch(monkeypatch):
    """The interpreter runs exactly the kernels ``launch`` saw: nothing is launched another way at run time."""
    from triton.runtime.interpreter import InterpretedFunction

    runs = []
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        runs.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    with runtime.record_launches() as records:
        _workload()
    assert runs, "the workload launched no Triton kernel"
    assert sorted(runs) == sorted(r.name for r in records)


class _FakeGuard:
    """Stands in for torch.cuda.device: records the device it was entered with."""

    current = None

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.saved, _FakeGuard.current = _FakeGuard.current, self.device

    def __exit__(self, *exc):
        _FakeGuard.current = self.saved


def test_launch_runs_under_the_tensors_device(monkeypatch):
    ran_on = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: ran_on.append(_FakeGuard.current)

    monkeypatch.setattr(torch.cuda, "device", _FakeGuard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(runtime, "_device_of", lambda args, kwargs: torch.device("cuda", 1))
    runtime.launch(Kernel(), (1,), torch.zeros(1))
    assert ran_on == [torch.device("cuda", 1)]
    monkeypatch.setattr(runtime, "_device_of", lambda args, kwargs: torch.device("cuda", 0))
    runtime.launch(Kernel(), (1,), torch.zeros(1))
    assert ran_on[-1] is None  # already the current device: no guard entered (host time a decode step would pay)
    monkeypatch.setattr(runtime, "_device_of", lambda args, kwargs: torch.device("cpu"))
    runtime.launch(Kernel(), (1,), torch.zeros(1))
    assert ran_on[-1] is None  # no CUDA guard for CPU tensors (the interpreter)


def test_launch_needs_a_tensor():
    with pytest.raises(ValueError, match="no tensor argument"):
        runtime.launch(object(), (1,), 3, 4.0)


@pytest.mark.parametrize("cc, tiles, shared_kb", [
    (75, 75, 64), (80, 80, 163), (86, 86, 99), (87, 80, 163), (89, 86, 99), (90, 90, 227), (100, 90, 227),
    (120, 86, 99), (121, 86, 99), (95, 90, 227),
])
def test_one_architecture_table(cc, tiles, shared_kb):
    a = runtime.arch(cc)
    assert (a.tiles, a.shared) == (tiles, shared_kb * 1024)


def test_architectures_below_turing_are_refused():
    with pytest.raises(ValueError, match="7.5"):
        runtime.arch(70)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, as far as gpt2_kernels.runtime asks; is_bf16_supported() says
    True everywhere, as the real one does on Turing (it counts emulation)."""
    def use(cc):
        monkeypatch.setattr(runtime, "capability", lambda device: cc)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return use


@pytest.mark.parametrize("cc, want", [(75, torch.float16), (80, torch.bfloat16), (86, torch.bfloat16),
                                      (89, torch.bfloat16), (90, torch.bfloat16)])
def test_default_dtype_per_capability(fake_gpu, cc, want):
    fake_gpu(cc)
    assert runtime.default_dtype(torch.device("cuda", 0)) == want
    assert runtime.has_native_bf16(torch.device("cuda", 0)) == (cc >= 80)


def test_default_dtype_on_the_cpu():
    assert runtime.default_dtype(torch.device("cpu")) == torch.float32


def test_check_dtype_refuses_bf16_where_it_is_emulated(fake_gpu):
    fake_gpu(75)
    with pytest.raises(TypeError, match="8.0 or newer.*7.5.*float16"):
        runtime.check_dtype("layer_norm", torch.device("cuda", 0), torch.bfloat16)
    runtime.check_dtype("layer_norm", torch.device("cuda", 0), torch.float16)
    fake_gpu(80)
    runtime.check_dtype("layer_norm", torch.device("cuda", 0), torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter"):
        runtime.check_dtype("mlp", torch.device("cpu"), torch.bfloat16)


def test_record_launches_nests():
    from gpt2_kernels import layer_norm as LN

    x = torch.randn(2, 8, device="cuda" if torch.cuda.is_available() else "cpu")
    with runtime.record_launches() as outer:
        LN.layer_norm_fwd(x, None, None)
        with runtime.record_launches() as inner:
            LN.layer_norm_fwd(x, None, None)
        assert len(inner) == 1
    assert len(outer) == 2
