"""Cached decoding on a CPU: the KV cache across its capacity, the decode weights (``GPT.decode_weights``) equal to the
model's own forward, rebuilt when a parameter changes and never copied with the model, and bf16 decoding (opt-in,
under CPU autocast) within the bf16 tolerance of the model's own bf16 forward."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import gpt2_kernels.registry
from gpt2.model import GPT, DecodeWeights, GPTConfig, KVCache
from gpt2_kernels.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

# The decode path runs on the CPU for every backend but Triton (there only under its interpreter: the model's forward).
BACKENDS = [b for b in ("torch", "ext") if gpt2_kernels.registry.unavailable_reason(b, "cpu") is None]


def tiny(backend="torch", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", **kw), backend=backend).eval()


def _decode_logits(model: GPT, idx: torch.Tensor, chunks: list[int], capacity: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) of idx fed through the decode path chunk by chunk, from the last position of each step of a
    one-token chunk, else of every position (the head on the decode weights, as ``generate_stream`` runs it)."""
    with torch.inference_mode():
        cache = model.new_kv_cache(idx.shape[0], capacity)
        dw = model.decode_weights()
        assert dw is not None
        out, start = [], 0
        for n in chunks:
            h = model._decode_hidden(idx[:, start:start + n], cache, dw)  # (B, n, C)
            out.append(torch.stack([model._last_logits(h[:, t], dw) for t in range(n)], dim=1))
            start += n
        assert cache.pos == idx.shape[1]
        return torch.cat(out, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_path_across_the_cache_capacity_equals_the_forward(backend):
    m = tiny(backend)
    idx = torch.randint(0, 512, (3, 23), generator=torch.Generator().manual_seed(1))
    full, _ = m(idx)
    # capacity 4 grows to 8, 16 and 32 on the way: a chunk crossing the boundary, single steps on both sides of it
    got = _decode_logits(m, idx, [3, 1, 1, 6, 1, 1, 9, 1], capacity=4)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_cache_grows_to_block_size_and_no_further():
    cfg = GPTConfig.from_preset("tiny")
    cache = KVCache(cfg, 2, "cpu", torch.float32, capacity=5)
    k = torch.randn(2, cfg.n_head, 5, cfg.head_size)
    cache.update(0, k, k)
    cache.pos = 5
    k2, _ = cache.update(0, k[:, :, :1], k[:, :, :1])
    assert cache.capacity == 10 and torch.equal(k2[:, :, :5], k) and torch.equal(k2[:, :, 5:], k[:, :, :1])
    cache.pos = 10
    cache.update(0, k.repeat(1, 1, 11, 1)[:, :, :54], k.repeat(1, 1, 11, 1)[:, :, :54])
    assert cache.capacity == cfg.block_size == 64
    cache.pos = 64
    with pytest.raises(ValueError, match="at most block_size = 64"):
        cache.update(0, k[:, :, :1], k[:, :, :1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_cached_equals_recompute_batch_sliding_and_sampling(backend):
    m = tiny(backend)
    prompt = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(2))
    cached = m.generate(prompt, 58, greedy=True)  # the whole context of 64
    assert torch.equal(cached, m.generate(prompt, 58, greedy=True, use_cache=False))
    assert torch.equal(cached[1:2], m.generate(prompt[1:2], 58, greedy=True))  # a row alone decodes as in a batch
    slid = m.generate(prompt, 70, greedy=True)  # past the context each step recomputes the last block_size tokens
    assert slid.shape == (3, 76) and torch.equal(slid[:, :64], cached)
    for kw in ({"top_k": 50}, {"top_p": 0.9}, {"top_k": 20, "top_p": 0.8, "temperature": 0.7}):
        a = m.generate(prompt, 20, generator=torch.Generator().manual_seed(3), **kw)
        b = m.generate(prompt, 20, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
        assert torch.equal(a, b), kw


def _generate_recording_logits(model: GPT, prompt: torch.Tensor, n: int, monkeypatch, **kw):
    """(tokens (B, T + n), the logits (B, n, V) each token was chosen from) of ``model.generate``."""
    import gpt2.sampling

    seen, choose = [], gpt2.sampling.choose_next

    def recording(logits, *args, **kwargs):
        seen.append(logits)
        return choose(logits, *args, **kwargs)

    monkeypatch.setattr(gpt2.sampling, "choose_next", recording)
    out = model.generate(prompt, n, **kw)
    monkeypatch.setattr(gpt2.sampling, "choose_next", choose)
    return out, torch.stack(seen, dim=1)


def _forward_logits(model: GPT, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The logits (B, n, V) the model's own forward gives each new token of ``seq`` from the block_size tokens before
    it (the crop to the last block_size tokens, written here once, without the cache)."""
    bs = model.config.block_size
    with torch.no_grad():
        return torch.stack([model(seq[:, max(0, t - bs):t])[0][:, -1] for t in range(prompt_len, seq.shape[1])], 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt_len", [5, 63, 64])
def test_cached_decoding_equals_recomputing_through_block_size_and_beyond(backend, prompt_len, monkeypatch):
    """Greedy decoding with the cache, without it, and the forward on the last block_size tokens: the same tokens and
    close logits at every step, through the step that fills the context (block_size 64) and 30 steps past it."""
    m = tiny(backend)
    with torch.no_grad():  # larger weights than init: clear margins between the likeliest tokens
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    prompt = torch.randint(0, 512, (2, prompt_len), generator=torch.Generator().manual_seed(6))
    n = 64 + 30 - prompt_len
    cached, cached_logits = _generate_recording_logits(m, prompt, n, monkeypatch, greedy=True)
    full, full_logits = _generate_recording_logits(m, prompt, n, monkeypatch, greedy=True, use_cache=False)
    want = _forward_logits(m, cached, prompt_len)
    assert torch.equal(cached[:, prompt_len:], want.argmax(-1)), "cached tokens differ from the forward's argmax"
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_logits, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full_logits, want, atol=1e-4, rtol=1e-4)
    for kw in ({"top_k": 20, "temperature": 0.8}, {"top_p": 0.9}):  # sampled: the same draws from the same logits
        a = m.generate(prompt, n, generator=torch.Generator().manual_seed(7), **kw)
        b = m.generate(prompt, n, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
        assert torch.equal(a, b), kw


def test_decode_weights_are_kept_rebuilt_when_a_parameter_changes_and_never_copied():
    m = tiny()
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(4))
    m.generate(prompt, 3, greedy=True)
    dw = m.decode_weights()
    assert isinstance(dw, DecodeWeights) and m.decode_weights() is dw  # kept while nothing changes
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    _, loss = m.train()(prompt, prompt)
    loss.backward()
    opt.step()  # every parameter changes in place
    m.eval()
    fresh = GPT(m.config, backend="torch").eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(m.generate(prompt, 30, greedy=True), fresh.generate(prompt, 30, greedy=True))
    assert m.decode_weights() is not dw
    with torch.no_grad():  # an in-place edit of one matrix alone (the tied head) is seen too
        m.transformer.wte.weight.mul_(-1.0)
        fresh.transformer.wte.weight.mul_(-1.0)
    assert torch.equal(m.generate(prompt, 30, greedy=True), fresh.generate(prompt, 30, greedy=True))
    # The copies are a cache: neither deep-copied nor pickled with the model.
    assert "_decode" not in copy.deepcopy(m).__dict__
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert "_decode" not in torch.load(buf, weights_only=False).__dict__


def test_decode_weights_only_on_the_cpu_off_triton_and_without_training_dropout():
    m = tiny()
    assert m.decode_weights() is not None
    assert tiny(dropout=0.1).train().decode_weights() is None  # dropout in training: the forward decodes
    assert tiny(dropout=0.1).eval().decode_weights() is not None
    if gpt2_kernels.registry.unavailable_reason("triton", "cpu") is None:
        assert tiny("triton").decode_weights() is None


def test_bytes_per_token():
    m = tiny()
    cfg = m.config
    per_block = [p for n, p in m.named_parameters() if not n.startswith(("transformer.wte", "transformer.wpe"))]
    fp32 = 4 * (sum(p.numel() for p in per_block) + cfg.vocab_size * cfg.n_embd + 2 * cfg.n_embd)
    assert m.decode_weights().nbytes == fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = m.decode_weights().nbytes
    norms = 4 * sum(p.numel() for n, p in m.named_parameters() if ".ln_" in n or "ln_f" in n)
    assert bf16 == (fp32 - norms - 4 * 2 * cfg.n_embd) // 2 + norms + 4 * 2 * cfg.n_embd


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_decoding_is_within_the_bf16_tolerance_of_the_model(backend):
    """Under CPU autocast to bf16 decoding reads bf16 copies of the weights (oneDNN's prepacked ones where torch has
    them): each step's logits are as close to the fp32 model's as the model's own bf16 forward is (the rule of
    ``gpt2_kernels.testing``)."""
    m = tiny(backend)
    with torch.no_grad():  # larger-than-init weights, so the logits are far from 0 and bf16 rounding shows
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref32, _ = m(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16, _ = m(idx)
            assert m.decode_weights().dtype == torch.bfloat16
            got = _decode_logits(m, idx, [8, 1, 1, 1, 4, 1, 1, 1, 1, 1])
    assert_close("bf16 decode logits", got, ref32, ref_bf16, dtype=torch.bfloat16)
    assert (got - ref32).abs().max() > 0  # the bf16 path really ran in bf16
