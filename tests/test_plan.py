"""``gpt2 plan``: the traced activation memory against the real CPU allocator, exact parameter bytes, the
micro-batch search, what it says when nothing fits, and one-line errors."""

import json

import pytest
import torch

from gpt2.cli import main
from gpt2.model import GPT, GPTConfig
from gpt2.plan import GIB, Request, activation_bytes, make_plan, static_bytes, trace_spec


def _real_peak_bytes(config: GPTConfig, batch: int, spec: str, recompute: str) -> int:
    """Peak bytes the CPU allocator held over its level at the start of a real fp32 forward + backward (the second
    micro-step: gradients already allocated), from the profiler's allocation and free events."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = GPT(config, backend=spec, recompute=recompute)
    model.check_inputs = False
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    idx = torch.randint(0, config.vocab_size, (batch, config.block_size))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _, loss = model(idx, idx)
        loss.backward()
        del loss
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("preset,recompute,backend", [("tiny", "none", "auto"), ("tiny", "none", "torch"),
                                                      ("shakespeare", "none", "auto"), ("shakespeare", "block", "auto")])
def test_traced_activations_match_the_real_cpu_allocator(preset, recompute, backend):
    """The plan traces B = 2 and 3 on fake tensors; B = 1 (and 4) are its extrapolation. Each within 10% of a real run
    (the fused ops where the extension is built; the torch reference, whose peak is in the backward)."""
    config = GPTConfig.from_preset(preset)
    spec, _ = trace_spec(backend, "cpu")
    for batch in (1, 2, 4) if preset == "tiny" else (1, 4):
        real = _real_peak_bytes(config, batch, spec, recompute)
        planned = activation_bytes(config, config.block_size, batch, torch.float32, recompute, spec, "cpu")
        assert abs(planned - real) <= 0.10 * real, (preset, recompute, batch, planned, real)


def test_parameter_gradient_and_adamw_bytes_are_exact_for_124m():
    C, L, V, T = 768, 12, 50304, 1024  # the padded vocabulary's rows are parameters too
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = V * C + T * C + L * per_block + 2 * C
    assert n == 124_475_904
    tensors = 2 + 12 * L + 2  # wte, wpe; 12 per block; ln_f weight and bias
    s = static_bytes(GPTConfig.from_preset("gpt2"))
    assert (s["params"], s["grads"], s["optimizer"]) == (4 * n, 4 * n, 8 * n + 4 * tensors)
    assert s["fsdp_gathered"] == s["ddp_buckets"] == 0
    ddp = static_bytes(GPTConfig.from_preset("gpt2"), world_size=4)
    assert ddp["ddp_buckets"] == 4 * n and ddp["params"] == 4 * n
    fsdp = static_bytes(GPTConfig.from_preset("gpt2"), world_size=4, fsdp=True, accumulating=False)
    assert fsdp["params"] == -(-4 * n // 4) and fsdp["grads"] == -(-4 * n // 4) and fsdp["fsdp_gathered"] > 0


def _plan(memory, recompute=None, **kw):
    req = Request(GPTConfig.from_preset("gpt2"), "gpt2", memory, 1024, torch.bfloat16, **kw)
    return make_plan(req, recompute)


def test_124m_on_24gib_fits_and_more_memory_or_recompute_never_shrinks_the_batch():
    plans = {m: {mem: _plan(mem, m) for mem in (12, 24, 40, 80)} for m in ("none", "block")}
    assert plans["none"][24].fits and plans["none"][24].chosen.batch > 1
    for mode, by_memory in plans.items():
        batches = [p.modes[mode].max_micro_batch for p in by_memory.values()]
        assert batches == sorted(batches), (mode, batches)
        assert all(p.modes[mode].peak_gib <= mem for mem, p in by_memory.items())
    for mem in (12, 24, 40, 80):
        assert plans["block"][mem].modes["block"].max_micro_batch >= plans["none"][mem].modes["none"].max_micro_batch


def test_xl_on_8gib_fits_nothing_and_says_what_would(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--preset", "gpt2-xl", "--gpu-memory", "8", "--recompute", "block", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "nothing fits" in err and "--fsdp --world-size" in err
    doc = json.loads(out.read_text())
    assert doc["fits"] is False and doc["micro_batch"] == 0 and doc["recompute"] == "block"
    assert doc["peak_gib"] > 8 and "--fsdp --world-size" in doc["suggestion"]
    n = int(doc["suggestion"].split("--fsdp --world-size ")[1].split()[0])
    smaller = Request(GPTConfig.from_preset("gpt2-xl"), "gpt2-xl", 8, 1024, torch.bfloat16, n - 1, True)
    larger = Request(GPTConfig.from_preset("gpt2-xl"), "gpt2-xl", 8, 1024, torch.bfloat16, n, True)
    assert not make_plan(smaller, "block").fits and make_plan(larger, "block").fits  # n is the smallest


@pytest.mark.parametrize("args,words", [
    (["--gpu-memory", "0"], "--gpu-memory"), (["--gpu-memory", "-3"], "--gpu-memory"),
    (["--gpu-memory", "24", "--preset", "gpt5"], "unknown preset"),
    (["--gpu-memory", "24", "--block-size", "2048"], "--block-size"),
    (["--gpu-memory", "24", "--world-size", "0"], "--world-size"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and "Traceback" not in err


def test_train_batch_size_auto_on_a_cpu_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--batch-size", "auto", "--device", "cpu", "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--batch-size auto" in err[-1] and "GPU" in err[-1]


def test_the_plan_counts_gigabytes_not_bytes():
    p = _plan(24, "none")
    parts = p.modes["none"].parts
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k not in ("loss_head", "total")))
    assert 0 < parts["activations"] / GIB < 24 and p.to_dict()["peak_gib"] == pytest.approx(parts["total"] / GIB,
                                                                                             abs=1e-3)
