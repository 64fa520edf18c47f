"""One whole training step (forward, backward, fused AdamW) of a GPT-2 preset: ms per step, tokens/s, MFU and peak memory.

Shapes: on a GPU the ``gpt2`` preset (124M) on 16 x 1024 tokens; on the CPU the ``shakespeare`` preset on 8 x 128
tokens (the main job's step) and the ``gpt2`` preset on 4 x 64. Dtypes: fp32 and the one ``--dtype auto`` picks
(``gpt2.runtime.auto_dtype``: bf16 autocast on a CPU with avx512_bf16 or amx_bf16, the GPU's own choice on a GPU; on a
GPU only that one by default). A group is one (shape, dtype); its rows differ only by implementation: every registry
backend, ``auto`` (``--backend auto`` as a user runs it: each op timed on this step's shapes in the first warm-up step, or
read from the user's cache; marked ``auto_backend``, its per-op choice in ``chosen``), and three peers holding the
same weights:

- ``transformers``: transformers' ``GPT2LMHeadModel`` (SDPA attention), trained as its users do (``labels=``);
- ``transformers-patched``: that model on our kernels (``gpt2_kernels.hf.patch_gpt2``, backend auto);
- ``nanogpt-like``: ``bench.common.NanoGPTLike``, plain PyTorch as nanoGPT's ``model.py`` writes it (nn.Linear,
  nn.LayerNorm, tanh GELU, causal SDPA, full logits into ``F.cross_entropy``).

MFU is the model's FLOPs per step (``GPT.flops_per_token``: 6 N + 12 L C T per token, as nanoGPT counts them; the
same count for every row of a group) over the step's median time over the machine's matmul rate in the step's
dtype, measured by the suite (``Ceilings.matmul_median``: the median of large square matmuls, fp32 and bf16);
``mfu_vs_datasheet`` is ``GPT.estimate_mfu`` against a datasheet peak (None on a CPU).

Options: ``--bench-backends`` takes the peers' names too (``ext,transformers,nanogpt-like``); ``--bench-shapes`` takes
``shakespeare``, ``gpt2`` (or ``124M``); ``--bench-dtypes`` as elsewhere.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import pytest
import torch

from bench import cases, common
from bench.common import (
    DTYPE_ALIASES,
    DTYPES,
    MODEL_PEERS,
    OOM,
    NanoGPTLike,
    autocast,
    device_name,
    hf_twin,
    model_backend_or_skip,
    synchronize,
)

# Peers of this benchmark: transformers' model as shipped and patched, and a plain nanoGPT-style model.
TRAIN_PEERS = MODEL_PEERS + ("nanogpt-like",)
# "auto": the model on --backend auto as a user runs it (its choice timed on the first, warm-up, step, or read from
# the user's cache), against every single backend in the same group.
TRAIN_BACKENDS = tuple(b for b in cases.MODEL_BACKENDS if b not in MODEL_PEERS) + ("auto",) + TRAIN_PEERS
# (preset, B, T) per device type.
SHAPES = {"cuda": (("gpt2", 16, 1024),), "cpu": (("shakespeare", 8, 128), ("gpt2", 4, 64))}
_SHAPE_ALIASES = {"124M": "gpt2"}


@dataclass(frozen=True)
class TrainCase:
    """One row: an implementation training one preset on B x T tokens in one dtype (autocast when not fp32)."""

    backend: str
    dtype: str
    preset: str
    B: int
    T: int
    dtype_auto: bool = False  # the dtype is the one --dtype auto picks here

    @property
    def id(self) -> str:
        return f"{self.preset}-B{self.B}-T{self.T}-{self.dtype}-{self.backend}"

    @property
    def group(self) -> str:
        return f"train_step {self.preset} B{self.B} T{self.T} {self.dtype}{' (dtype auto)' if self.dtype_auto else ''}"


def auto_dtype_name(device_type: str) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what ``--dtype auto`` computes in on this machine's ``device_type``."""
    from gpt2.runtime import auto_dtype

    dtype, _ = auto_dtype(torch.device(device_type))
    return {v: k for k, v in DTYPES.items()}[dtype]


def default_dtypes(device_type: str) -> list[str]:
    """fp32 and auto's dtype on the CPU; on a GPU the suite's default (auto's dtype)."""
    if device_type == "cuda":
        return cases.default_dtypes("cuda", False)
    return list(dict.fromkeys(["fp32", auto_dtype_name("cpu")]))


def train_choices(device_type: str, backends: list[str] | None, dtypes: list[str] | None,
                  shapes: list[str] | None) -> list[cases.Choice]:
    """Every (shape, dtype, implementation) to time, implementation fastest; bad names become named skips."""
    bad: list[cases.Choice] = []
    chosen = list(TRAIN_BACKENDS)
    if backends and backends != ["all"]:
        from gpt2_kernels.registry import canonical

        names = [b if b in TRAIN_PEERS else canonical(b) for b in backends]
        chosen = [b for b in TRAIN_BACKENDS if b in names]
        bad += [cases.Choice(f"backend-{n}", None, f"--bench-backends: unknown backend {n!r}; the train step runs "
                                                   f"{', '.join(TRAIN_BACKENDS)}")
                for n in names if n not in TRAIN_BACKENDS and n not in cases.ALL_IMPL_NAMES and n != "all"]
    dts: list[str] = []
    for name in dtypes or default_dtypes(device_type):
        canon = DTYPE_ALIASES.get(name, name)
        if canon in DTYPES:
            dts += [] if canon in dts else [canon]
        else:
            bad.append(cases.Choice(f"dtype-{name}", None, f"--bench-dtypes: unknown dtype {name!r}; dtypes are "
                                                           f"{', '.join(DTYPES)}"))
    table = SHAPES[device_type]
    picked = list(table)
    if shapes:
        wanted = [_SHAPE_ALIASES.get(s, s) for s in shapes]
        picked = [s for s in table if s[0] in wanted or f"{s[0]}-B{s[1]}-T{s[2]}" in wanted]
        if not picked:  # names for the op benchmarks (124M-B16-T1024...): run this benchmark's own shapes
            picked = list(table)
    auto = auto_dtype_name(device_type)
    out = list(bad)
    for preset, B, T in picked:
        for dt in dts:
            for b in chosen:
                case = TrainCase(b, dt, preset, B, T, dtype_auto=dt == auto)
                out.append(cases.Choice(case.id, case))
    return out


def pytest_generate_tests(metafunc):
    if "train_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    opts = {k: cases.parse_list(config.getoption(f"--bench-{k}")) for k in ("backends", "dtypes", "shapes")}
    choices = train_choices(common.bench_device().type, **opts)
    metafunc.parametrize("train_case", [pytest.param(c.case, id=c.id, marks=[pytest.mark.skip(reason=c.skip)]
                                                     if c.skip else []) for c in choices])


def _trainee(case: TrainCase, model):
    """(module to optimise, step's loss function) of ``case``'s implementation; ``model`` holds the weights."""
    if case.backend in MODEL_PEERS:
        twin = hf_twin(model, case.backend)
        # transformers shifts its labels itself (T - 1 scored positions): the same work, timed as it is used.
        return twin, lambda idx, targets: twin(idx, labels=idx).loss
    if case.backend == "nanogpt-like":
        twin = NanoGPTLike.from_gpt(model)
        return twin, lambda idx, targets: twin(idx, targets)[1]
    return model, lambda idx, targets: model(idx, targets)[1]


def _is_auto_backend(backend: str) -> bool:
    """Whether the row is ``--backend auto`` (its per-op choice, measured, in the record's ``chosen``)."""
    return backend == "auto"


def test_train_step(benchmark, train_case, device, ceilings, settings):
    from gpt2.model import GPT, GPTConfig

    case = train_case
    ours = case.backend not in TRAIN_PEERS
    if ours and case.backend != "auto":
        model_backend_or_skip(case.backend, device)
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    config = GPTConfig.from_preset(case.preset)
    B, T = case.B, min(case.T, config.block_size)
    try:
        model = GPT(config, backend=case.backend if ours else "torch").to(device).train()
        trained, loss_of = _trainee(case, model)
    except OOM:
        pytest.skip(f"the {case.preset} model does not fit in memory")
    # Fused AdamW on the CPU too (torch >= 2.4): the same optimizer for every row, and the fastest; the 124M model's
    # step took 0.3 s fused against 0.9 to 1.5 s with the default and foreach updates on the 2-core EPYC.
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (B, T), device=device, generator=gen),
                torch.randint(0, config.vocab_size, (B, T), device=device, generator=gen)) for _ in range(4)]
    state = {"i": 0, "loss": None}

    def step():
        idx, targets = batches[state["i"] % len(batches)]
        state["i"] += 1
        with autocast(device, dtype):
            loss = loss_of(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss
        synchronize(device)  # inside the timed call

    mm = ceilings.matmul_median(dtype)  # before the model's step allocates: the rate of a quiet machine
    try:
        for _ in range(2):  # warm-up: kernel compilation, autotuning, optimizer state
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        per_step = time.perf_counter() - t0
    except OOM:
        pytest.skip(f"a {case.preset} training step on {B}x{T} tokens does not fit in memory")
    except (NotImplementedError, ValueError, TypeError) as e:
        pytest.skip(f"backend {case.backend!r} refused a {case.dtype} training step: {e}")
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.max_time / per_step)))

    benchmark.group = case.group
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
    assert math.isfinite(state["loss"].item()), "the training loss is not finite"
    _record(benchmark, case, model, device, mm, ceilings.matmul_median(torch.float32), B, T)


def _record(benchmark, case: TrainCase, model, device, mm: dict, mm32: dict, B: int, T: int) -> None:
    info = benchmark.extra_info
    tokens = B * T
    flops = model.flops_per_token(T) * tokens
    info.update(op="train_step", impl=case.backend, dtype=case.dtype, dtype_auto=case.dtype_auto,
                auto_backend=_is_auto_backend(case.backend),
                chosen=str(model.ops) if case.backend == "auto" else None, preset=case.preset, B=B, T=T,
                tokens=tokens, flops=flops, flops_how="GPT.flops_per_token(T) x tokens: 6 N + 12 L C T per token",
                device=device_name(device), baseline="torch", params=model.num_params(),
                ceiling_tflops=mm["tflops"], ceiling_tflops_how=mm["how"],
                matmul_fp32_tflops=mm32["tflops"], matmul_fp32_how=mm32["how"])
    if device.type == "cuda":
        info.update(peak_mem_bytes=torch.cuda.max_memory_allocated(device),
                    peak_mem_how="torch.cuda.max_memory_allocated over the timed steps")
    else:
        info.update(peak_mem_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    peak_mem_how="peak resident set size of the whole pytest process so far (ru_maxrss)")
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        t = stats.stats.median
        info.update(median_s=t, tokens_per_s=tokens / t, tflops=flops / t / 1e12,
                    mfu_vs_measured=flops / t / (mm["tflops"] * 1e12),
                    mfu_vs_datasheet=model.estimate_mfu(B, t, seq_len=T))
