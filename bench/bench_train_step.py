"""One whole training step (forward, backward, AdamW) of a GPT-2 preset: tokens/s, MFU and peak memory.

On a GPU: the ``gpt2`` preset (124M) on 16 x 1024 tokens, under bf16 autocast by default. On the
CPU: the small ``shakespeare`` preset on 4 x 128 tokens, in fp32. One row per registry backend, and two peers:
transformers' ``GPT2LMHeadModel`` with the same weights (``transformers``, SDPA attention) and the same model
patched onto our kernels (``transformers-patched``); rows of a group differ only by backend. MFU is reported twice: against the matmul rate this
session measured (``mfu_vs_measured``), and the model's own ``estimate_mfu`` against a datasheet
peak (``mfu_vs_datasheet``; None on a CPU).
"""

from __future__ import annotations

import math
import resource
import time

import pytest
import torch

from bench.common import DTYPES, MODEL_PEERS, OOM, autocast, device_name, hf_twin, model_backend_or_skip, synchronize


def _config(device):
    if device.type == "cuda":
        return "gpt2", 16, 1024
    return "shakespeare", 4, 128



def test_train_step(benchmark, model_case, device, ceilings, settings):
    from gpt2.model import GPT, GPTConfig

    model_backend_or_skip(model_case.backend, device)
    dtype = DTYPES[model_case.dtype]
    preset, B, T = _config(device)
    torch.manual_seed(0)
    config = GPTConfig.from_preset(preset)
    T = min(T, config.block_size)
    peer = model_case.backend in MODEL_PEERS
    try:
        model = GPT(config, backend="torch" if peer else model_case.backend).to(device).train()
        trained = hf_twin(model, model_case.backend) if peer else model
    except OOM:
        pytest.skip(f"the {preset} model does not fit in memory")
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (B, T), device=device, generator=gen),
                torch.randint(0, config.vocab_size, (B, T), device=device, generator=gen)) for _ in range(4)]
    state = {"i": 0, "loss": None}

    def step():
        idx, targets = batches[state["i"] % len(batches)]
        state["i"] += 1
        with autocast(device, dtype):
            # transformers shifts its labels itself (T - 1 scored positions): the same work, timed as it is used.
            loss = trained(idx, labels=idx).loss if peer else model(idx, targets)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss
        synchronize(device)  # inside the timed call

    try:
        for _ in range(2):  # warm-up: kernel compilation, autotuning, optimizer state
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        per_step = time.perf_counter() - t0
    except OOM:
        pytest.skip(f"a {preset} training step on {B}x{T} tokens does not fit in memory")
    except (NotImplementedError, ValueError, TypeError) as e:
        pytest.skip(f"backend {model_case.backend!r} refused a {model_case.dtype} training step: {e}")
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.max_time / per_step)))

    benchmark.group = f"train_step {preset} B{B} T{T} {model_case.dtype}"
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
    assert math.isfinite(state["loss"].item()), "the training loss is not finite"

    info = benchmark.extra_info
    mm = ceilings.matmul(dtype)
    tokens = B * T
    flops = model.flops_per_token(T) * tokens
    info.update(op="train_step", impl=model_case.backend, dtype=model_case.dtype, preset=preset, B=B, T=T,
                tokens=tokens, flops=flops, device=device_name(device), baseline="torch",
                params=model.num_params(), ceiling_tflops=mm["tflops"], ceiling_tflops_how=mm["how"])
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
