"""Generation speed with and without the key/value cache: tokens/s for 256 new tokens.

The ``shakespeare`` preset on the CPU (``gpt2`` on a GPU) with a 128-token prompt (the preset's
whole context) and the context widened to 384, so the 256 new tokens fit without sliding; greedy
decoding, so both paths choose the same tokens. The cache's gain depends on the prompt: each
recomputing step runs the whole sequence through the blocks, while both paths read the whole
output embedding (V x C) once per token, which dominates this small-bodied preset on a CPU. Rows of
a group differ only by ``use_cache``: the cached row records its speed-up over recomputation
(``speedup_vs_recompute``) and whether both produced the same tokens. Peers: transformers'
``GPT2LMHeadModel`` with the same weights and its own ``generate`` (``transformers``), and the same model patched
onto our kernels (``transformers-patched``); compare their ``tokens_per_s`` with our rows'.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.common import DTYPES, MODEL_PEERS, autocast, device_name, hf_twin, model_backend_or_skip, synchronize

NEW_TOKENS = 256
PROMPT = 128
CONTEXT = PROMPT + NEW_TOKENS
_RECOMPUTE: dict = {}  # (backend, dtype, device) -> (median seconds, tokens) of the no-cache row



def _hf_generate(twin, use_cache: bool):
    """transformers' greedy ``generate`` of exactly n new tokens, called like ``GPT.generate``."""

    def generate(prompt, n, use_cache=use_cache, greedy=True):
        with torch.no_grad():
            return twin.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                                 pad_token_id=0, attention_mask=torch.ones_like(prompt))

    return generate


@pytest.mark.parametrize("use_cache", [False, True], ids=["recompute", "kv-cache"])
def test_generate(benchmark, model_case, use_cache, device, settings):
    from gpt2.model import GPT, GPTConfig

    model_backend_or_skip(model_case.backend, device)
    dtype = DTYPES[model_case.dtype]
    preset = "gpt2" if device.type == "cuda" else "shakespeare"
    torch.manual_seed(0)
    peer = model_case.backend in MODEL_PEERS
    config = GPTConfig.from_preset(preset, block_size=CONTEXT)
    model = GPT(config, backend="torch" if peer else model_case.backend).to(device).eval()
    generate = _hf_generate(hf_twin(model, model_case.backend), use_cache) if peer else model.generate
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), device=device, generator=gen)
    out = {}

    def run(n=NEW_TOKENS):
        with autocast(device, dtype):
            out["tokens"] = generate(prompt, n, use_cache=use_cache, greedy=True)
        synchronize(device)  # inside the timed call

    try:
        run(8)  # warm-up: kernel compilation, allocator
        t0 = time.perf_counter()
        run()
        once = time.perf_counter() - t0
    except (NotImplementedError, ValueError, TypeError) as e:
        pytest.skip(f"backend {model_case.backend!r} refused {model_case.dtype} generation: {e}")
    # Each call takes seconds on a CPU: two rounds at least (their median is their mean).
    rounds = int(min(settings.max_rounds, max(2, settings.max_time / once)))
    benchmark.group = f"generate {preset} {NEW_TOKENS} new tokens {model_case.backend} {model_case.dtype}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)

    info = benchmark.extra_info
    info.update(op="generate", impl="kv-cache" if use_cache else "recompute", backend=model_case.backend,
                dtype=model_case.dtype, preset=preset, prompt_tokens=PROMPT, new_tokens=NEW_TOKENS,
                device=device_name(device), baseline="recompute")
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    t = stats.stats.median
    info.update(median_s=t, tokens_per_s=NEW_TOKENS / t)
    key = (model_case.backend, model_case.dtype, device.type)
    if not use_cache:
        _RECOMPUTE[key] = (t, out["tokens"].cpu())
        return
    if key not in _RECOMPUTE:
        info.update(speedup_vs_recompute=None, note="the recompute row did not run, so no ratio")
        return
    t_re, tokens_re = _RECOMPUTE[key]
    ratio = t_re / t
    info.update(speedup_vs_recompute=ratio, recompute_median_s=t_re,
                same_tokens_as_recompute=bool(torch.equal(tokens_re, out["tokens"].cpu())))
    if device.type == "cpu" and not peer:
        # The training issue's acceptance bar, measured here: the cache must pay for itself on the CPU.
        assert ratio >= 3.0, f"the KV cache is only {ratio:.2f}x faster than recomputation (needs >= 3x)"
