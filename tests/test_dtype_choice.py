"""Device and dtype choice of ``gpt2 train``, ``gpt2 sample`` and ``gpt2 eval``, on GPUs and CPUs faked on this one.

``--dtype auto`` is bfloat16 only from compute capability 8.0, float16 with a GradScaler below (Turing, where
``torch.cuda.is_bf16_supported()`` says True because it counts emulation, and every Triton op refuses bf16); on the
CPU bfloat16 autocast where ``/proc/cpuinfo`` lists avx512_bf16 or amx_bf16, float32 otherwise or where the flags are
unknown; ``gpt2 info`` says which and why. An explicit bfloat16 on Turing, or a torchrun process without a GPU of its
own, is a one-line error (exit 2) before anything runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed

from gpt2 import runtime
from gpt2.cli import main
from gpt2_kernels import runtime as kernels_runtime

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


@pytest.fixture()
def fake_cpu_flags(monkeypatch):
    """``fake_cpu_flags(flags)`` makes ``gpt2.runtime.cpu_flags`` report ``flags`` (None: unknown)."""
    def install(flags):
        monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": None if flags is None
                            else frozenset(flags))

    return install


COMMANDS = {
    "train": ["train", "--out-dir", "{tmp}/out", "--data", "{tmp}/no-such-data"],  # a run that got past the
    # choice would stop at the data, not train
    "sample": ["sample", "--pretrained", "{tmp}/no-such-folder"],
    "eval": ["eval", "--pretrained", "{tmp}/no-such-folder", "--data", "{tmp}/in/text.txt"],  # eval reads its text
    # before it chooses
}


def _argv(command: str, tmp_path) -> list[str]:
    """The command's arguments; eval's text file is written (the only file a test may find afterwards)."""
    if command == "eval":
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / "text.txt").write_text("To be, or not to be, that is the question.\n" * 4)
    return [a.format(tmp=tmp_path) for a in COMMANDS[command]]


def _written(tmp_path) -> list:
    return [p for p in tmp_path.iterdir() if p.name != "in"]


AVX512 = ("sse2", "avx2", "avx512f", "avx512bw", "avx512vl")  # AVX-512 without its bf16 extension


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("cc,want", [(75, torch.float16), (80, torch.bfloat16), (86, torch.bfloat16),
                                     (89, torch.bfloat16), (90, torch.bfloat16), (None, torch.float32)],
                         ids=["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "cpu"])
def test_auto_dtype_per_capability(fake_cuda, fake_cpu_flags, chosen, tmp_path, command, cc, want):
    fake_cuda(cc)
    fake_cpu_flags(AVX512)  # the GPU's capability decides, whatever the CPU; on the CPU, one without bf16
    with pytest.raises(_Reached):
        main(_argv(command, tmp_path))  # --device auto --dtype auto, the defaults
    (rt,) = chosen
    assert rt.device == (torch.device("cuda", 0) if cc else torch.device("cpu"))
    assert rt.dtype == want, f"{command} on {GPUS.get(cc, 'the CPU')} chose {rt.dtype}"
    assert rt.grad_scaler().is_enabled() == (want == torch.float16)  # loss scaling exactly for fp16
    assert not _written(tmp_path)  # nothing written


CPUS = {
    "avx512_bf16": (AVX512 + ("avx512_bf16",), torch.bfloat16),  # Zen 4, Cooper Lake
    "amx_bf16": (AVX512 + ("avx512_bf16", "amx_bf16", "amx_tile"), torch.bfloat16),  # Sapphire Rapids
    "avx512": (AVX512, torch.float32),  # Skylake-SP, Ice Lake: bf16 only emulated
    "avx2": (("sse2", "avx2", "fma"), torch.float32),
    "unknown": (None, torch.float32),  # no /proc/cpuinfo flags: macOS, Windows, Arm
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("cpu", CPUS)
def test_auto_dtype_on_the_cpu_follows_its_flags(fake_cuda, fake_cpu_flags, chosen, tmp_path, command, cpu):
    flags, want = CPUS[cpu]
    fake_cuda(None)
    fake_cpu_flags(flags)
    with pytest.raises(_Reached):
        main(_argv(command, tmp_path))
    (rt,) = chosen
    assert rt.device == torch.device("cpu")
    assert rt.dtype == want, f"{command} on a CPU with {cpu} chose {rt.dtype}"
    assert not rt.grad_scaler().is_enabled()  # bf16 has fp32's range: no loss scaling
    with rt.autocast():  # bf16 autocast over fp32 weights: the parameters are never cast
        w = torch.nn.Linear(4, 4)
        y = w(torch.randn(2, 4))
    assert w.weight.dtype == torch.float32 and y.dtype == want
    assert not _written(tmp_path)


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx512f avx512_bf16\n"
                    "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert runtime.cpu_flags(str(info)) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert runtime.cpu_flags(str(arm)) is None  # Arm lists "Features": unknown here, so float32
    assert runtime.cpu_flags(str(tmp_path / "missing")) is None


def _info_lines(capsys) -> list[str]:
    """``gpt2 info``'s output lines."""
    assert main(["info"]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("cpu,needles", [("avx512_bf16", ("bfloat16 autocast", "float32 weights", "avx512_bf16")),
                                         ("avx512", ("float32", "no native bf16 on this CPU")),
                                         ("unknown", ("float32", "unknown"))])
def test_info_says_what_auto_picks(fake_cuda, fake_cpu_flags, capsys, cpu, needles):
    fake_cuda(None)
    fake_cpu_flags(CPUS[cpu][0])
    lines = [ln for ln in _info_lines(capsys) if ln.startswith("dtype ")]
    assert len(lines) == 1 and lines[0].split()[:4] == ["dtype", "auto", "on", "cpu:"], lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert ("autocast" in lines[0]) == (CPUS[cpu][1] == torch.bfloat16), lines[0]


def test_info_on_a_gpu_names_its_capability(fake_cuda, capsys):
    fake_cuda(75)
    (line,) = [ln for ln in _info_lines(capsys) if ln.startswith("dtype ")]
    assert "cuda:0" in line and "float16 autocast and a GradScaler" in line and "7.5" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_explicit_bf16_on_turing_is_a_clear_error(fake_cuda, tmp_path, capsys, command):
    fake_cuda(75)
    assert main(_argv(command, tmp_path) + ["--device", "cuda", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"gpt2 {command}: error: --dtype bfloat16"), err
    for needle in ("Tesla T4", "7.5", "8.0", "--dtype float16"):
        assert needle in err, err
    assert not _written(tmp_path)


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
