"""Device and dtype choice of ``gpt2 train`` and ``gpt2 sample``, on GPUs faked on the CPU.

``--dtype auto`` is bfloat16 only from compute capability 8.0, float16 with a GradScaler below (Turing, where
``torch.cuda.is_bf16_supported()`` says True because it counts emulation, and every Triton op refuses bf16),
float32 on the CPU. An explicit bfloat16 on Turing, or a torchrun process without a GPU of its own, is a one-line
error (exit 2) before anything runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed

from gpt2 import runtime
from gpt2.cli import main
from kernels import runtime as kernels_runtime

GPUS = {75: "Tesla T4", 80: "NVIDIA A100-SXM4-80GB", 86: "NVIDIA GeForce RTX 3090", 89: "NVIDIA L4",
        90: "NVIDIA H100 80GB HBM3"}


@pytest.fixture()
def fake_cuda(monkeypatch):
    """``fake_cuda(cc, count)`` makes torch report ``count`` GPUs of compute capability ``cc`` (None: no GPU)."""
    def install(cc: int | None, count: int = 1):
        major, minor = divmod(cc or 0, 10)
        name = GPUS.get(cc, "a GPU")
        props = SimpleNamespace(major=major, minor=minor, name=name, multi_processor_count=40, total_memory=16 << 30)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cc is not None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if cc is not None else 0)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        # As the real one says on Turing too: it counts emulated bf16.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cc is not None)
        kernels_runtime._props.cache_clear()

    yield install
    kernels_runtime._props.cache_clear()


class _Reached(Exception):
    """Raised by the spy once a command has chosen its runtime, before it touches the (fake) GPU."""


@pytest.fixture()
def chosen(monkeypatch) -> list:
    """Every ``Runtime`` a command builds; the command stops right after building it."""
    seen = []
    real = runtime.start

    def spy(*args, **kwargs):
        rt = real(*args, **kwargs)
        seen.append(rt)
        raise _Reached

    monkeypatch.setattr(runtime, "start", spy)
    return seen


COMMANDS = {
    "train": ["train", "--out-dir", "{tmp}/out", "--data", "{tmp}/no-such-data"],  # a run that got past the
    # choice would stop at the data, not train
    "sample": ["sample", "--pretrained", "{tmp}/no-such-folder"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("cc,want", [(75, torch.float16), (80, torch.bfloat16), (86, torch.bfloat16),
                                     (89, torch.bfloat16), (90, torch.bfloat16), (None, torch.float32)],
                         ids=["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "cpu"])
def test_auto_dtype_per_capability(fake_cuda, chosen, tmp_path, command, cc, want):
    fake_cuda(cc)
    argv = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    with pytest.raises(_Reached):
        main(argv)  # --device auto --dtype auto, the defaults
    (rt,) = chosen
    assert rt.device == (torch.device("cuda", 0) if cc else torch.device("cpu"))
    assert rt.dtype == want, f"{command} on {GPUS.get(cc, 'the CPU')} chose {rt.dtype}"
    assert rt.grad_scaler().is_enabled() == (want == torch.float16)  # loss scaling exactly for fp16
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", COMMANDS)
def test_explicit_bf16_on_turing_is_a_clear_error(fake_cuda, tmp_path, capsys, command):
    fake_cuda(75)
    argv = [a.format(tmp=tmp_path) for a in COMMANDS[command]] + ["--device", "cuda", "--dtype", "bfloat16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"gpt2 {command}: error: --dtype bfloat16"), err
    for needle in ("Tesla T4", "7.5", "8.0", "--dtype float16"):
        assert needle in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cc", [80, 90])
def test_explicit_dtypes_on_ampere_and_newer(fake_cuda, cc):
    fake_cuda(cc)
    dev = runtime.resolve_device("cuda")
    assert [runtime.resolve_dtype(n, dev) for n in ("bfloat16", "float16", "float32")] == \
        [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_torchrun_rank_without_a_gpu_of_its_own(fake_cuda, tmp_path, capsys, monkeypatch, device):
    """torchrun --nproc_per_node=2 on a 1-GPU machine: rank 1 would land on cuda:1 ("invalid device ordinal")."""
    fake_cuda(86, count=1)
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)

    def join(*args, **kwargs):  # rank 0 never comes: joining would wait for it for half an hour
        raise AssertionError("joined the process group before checking that this rank has a GPU")

    monkeypatch.setattr(torch.distributed, "init_process_group", join)
    out = tmp_path / "out"
    assert main(["train", "--out-dir", str(out), "--device", device]) == 2  # before joining the process group
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for needle in ("local rank 1", "1 GPU", "--nproc_per_node <= 1", "--device cpu"):
        assert needle in err, err
    assert not out.exists()
