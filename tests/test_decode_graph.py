"""Static-shape decoding (``gpt2.decode``): the one-token step a CUDA graph captures, run eagerly on the CPU.

Everything but the capture is checked here: the static step's tokens equal the eager decoder's (greedy and seeded
sampling, batched, through the context's slide at ``block_size``), its attention over the whole static cache equals
the reference over the filled keys, positions live on the device and the step reads nothing on the host. The
capture itself runs only on a CUDA GPU (marked ``gpu``).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_host_reads import OURS, READS

import gpt2_kernels.registry
from gpt2 import decode, sampling
from gpt2.model import GPT, GPTConfig
from gpt2_kernels import ref

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = [b for b in ("torch", "ext") if gpt2_kernels.registry.unavailable_reason(b, "cpu") is None]
SAMPLING = ({"top_k": 50}, {"top_p": 0.9}, {"top_k": 20, "top_p": 0.8, "temperature": 0.7}, {})


def tiny(backend="torch", device="cpu") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny"), backend=backend).to(device).eval()


def static_generate(model, prompt, n, capture=False, **kw) -> torch.Tensor:
    return torch.cat([prompt] + list(decode.stream(model, prompt, n, capture=capture, **kw)), dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_step_decodes_the_eager_tokens_greedy_sampled_and_sliding(backend):
    m = tiny(backend)
    prompt = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(2))
    for n in (58, 70, 130):  # the whole context of 64; past it, one slide; two slides
        assert torch.equal(static_generate(m, prompt, n, greedy=True), m.generate(prompt, n, greedy=True)), n
    for kw in SAMPLING:
        got = static_generate(m, prompt, 70, generator=torch.Generator().manual_seed(3), **kw)
        want = m.generate(prompt, 70, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(got, want), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_the_gpus_step_on_the_models_own_weights_decodes_the_eager_tokens(dtype):
    """Off the CPU there are no decode weights: the step multiplies by the parameters cast once to the compute dtype
    (``decode._Weights``) with autocast off, where the eager path runs the model's modules under autocast."""
    m = tiny()
    with torch.no_grad():  # non-zero biases and norms: every parameter takes part
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    m.decode_weights = lambda: None  # what decode_weights answers on a GPU
    prompt = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(8))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for n in (58, 70):
            assert torch.equal(static_generate(m, prompt, n, greedy=True), m.generate(prompt, n, greedy=True)), n
        if dtype == torch.float32:  # in bf16 the eager attention's own rounding moves a draw now and then
            got = static_generate(m, prompt, 30, generator=torch.Generator().manual_seed(9), top_k=40)
            assert torch.equal(got, m.generate(prompt, 30, generator=torch.Generator().manual_seed(9), top_k=40))
    w = decode._Weights(m, torch.float32)
    assert w.layers[0][0] is not None and w.layers[0][0].data_ptr() == m.transformer.h[0].attn.c_attn.weight.data_ptr()


def test_what_uninitialised_cache_memory_holds_never_reaches_a_token(monkeypatch):
    """The static step attends over every position of its cache, filled or not: a NaN left in memory must not leak
    through the masked weights (0 x NaN is NaN)."""
    from gpt2 import model as model_module

    init = model_module.KVCache.__init__

    def poisoned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.k.fill_(float("nan"))
        self.v.fill_(float("nan"))

    monkeypatch.setattr(model_module.KVCache, "__init__", poisoned)
    m = tiny()
    prompt = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(static_generate(m, prompt, 20, greedy=True), m.generate(prompt, 20, greedy=True))


def test_draw_is_multinomials_draw():
    probs = torch.softmax(torch.randn(4, 300, generator=torch.Generator().manual_seed(0)), dim=-1)
    probs[:, 200:] = 0.0  # dropped tokens are never drawn
    for seed in range(50):
        a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
        b = sampling.draw(probs, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b), seed


def test_masked_attention_over_the_static_cache_is_the_reference_over_the_filled_keys():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 1, 16, generator=g)
    k, v = torch.randn(2, 3, 20, 16, generator=g), torch.randn(2, 3, 20, 16, generator=g)
    for pos in (0, 7, 19):
        valid = torch.arange(20) <= pos
        want = ref.attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1], causal=True)
        torch.testing.assert_close(decode._masked_attention(q, k, v, valid), want, rtol=1e-6, atol=1e-6)


@pytest.fixture()
def host_reads(monkeypatch) -> Counter:
    """Count host reads made from the project's files (the reads of tests/test_host_reads.py), by ``file:line``."""
    counts: Counter = Counter()

    def counted(fn, name):
        def wrapper(*args, **kwargs):
            frame = sys._getframe(1)
            if str(Path(frame.f_code.co_filename).resolve()).startswith(OURS):
                counts[f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}"] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), name))
    return counts


@pytest.mark.parametrize("kw", [{"greedy": True}, {"top_k": 20, "top_p": 0.8}], ids=["greedy", "sampled"])
def test_the_step_reads_nothing_on_the_host_and_its_position_lives_on_the_device(host_reads, kw):
    m = tiny()
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        dec = decode.StaticDecoder(m, 2, 32, generator=torch.Generator().manual_seed(5), **kw)
        dec.prefill(prompt, 0)
        host_reads.clear()  # the prefill checks its tokens on the host, as the eager path does
        for _ in range(10):
            dec.step()
    assert sum(host_reads.values()) == 0, dict(host_reads)
    assert dec.pos.device == m.transformer.wte.weight.device and dec.pos.dim() == 0
    assert dec.filled == 15 and int(dec.pos) == 15
    # The raw step, with the host's count frozen at the prefill's, as a graph replays it: the same tokens.
    with torch.inference_mode():
        raw = decode.StaticDecoder(m, 2, 32, generator=torch.Generator().manual_seed(5), **kw)
        raw.prefill(prompt, 0)
        dec.generator = torch.Generator().manual_seed(5)
        dec.prefill(prompt, 0)
        for _ in range(10):
            dec.step()
            raw._step()
            assert torch.equal(raw.tok, dec.tok)
    assert raw.filled == 5 and int(raw.pos) == 15  # the step itself moved the device position


def test_a_full_static_cache_and_a_graph_off_cuda_are_refused():
    m = tiny()
    prompt = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        dec = decode.StaticDecoder(m, 1, 5, greedy=True)
        dec.prefill(prompt, 0)
        dec.step()
        with pytest.raises(ValueError, match="static KV cache is full"):
            dec.step()
    with pytest.raises(ValueError, match="CUDA graph captures CUDA work only"):
        decode.StaticDecoder(m, 1, 8, capture=True)
    with pytest.raises(ValueError, match="graph=True needs use_cache, a model on a CUDA device"):
        m.generate(prompt, 3, greedy=True, graph=True)


@pytest.mark.parametrize("kw", [{"greedy": True}, {"top_k": 30, "top_p": 0.9}], ids=["greedy", "sampled"])
def test_the_capture_undoes_its_warm_up_with_a_stand_in_graph(monkeypatch, kw):
    """``StaticDecoder._capture`` on the CPU, torch.cuda's graph and streams stood in for: a capture records the step
    and a replay runs it. The two warm-up steps before the capture must leave no trace (token, position, the
    generator's state, the cache entry they wrote): the replayed tokens equal the eager step's."""
    capturing = {}

    class Graph:
        def register_generator_state(self, gen):
            self.generator = gen

        def replay(self):
            self.step()

    @contextlib.contextmanager
    def graph(g):
        capturing["graph"] = g
        yield
        capturing.pop("graph")

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    m = tiny()
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        eager = decode.StaticDecoder(m, 2, 40, generator=torch.Generator().manual_seed(11), **kw)
        graphed = decode.StaticDecoder(m, 2, 40, generator=torch.Generator().manual_seed(11), **kw)
        run = graphed._step

        def step():  # recorded while capturing, run otherwise
            if "graph" in capturing:
                capturing["graph"].step = run
            else:
                run()

        graphed._step, graphed.capture = step, True
        for dec in (eager, graphed):
            dec.prefill(prompt, 0)
        for _ in range(12):
            eager.step()
            graphed.step()
            assert torch.equal(graphed.tok, eager.tok)
    assert graphed.graph.generator is graphed.generator and int(graphed.pos) == graphed.filled == 17
    assert torch.equal(graphed.cache.k, eager.cache.k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA GPU")
def test_the_cuda_graph_decodes_the_eager_tokens_in_fp32_and_the_auto_dtype():
    from gpt2.runtime import auto_dtype

    m = tiny("auto", "cuda")
    prompt = torch.randint(0, 512, (3, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    dtype, _ = auto_dtype(torch.device("cuda"))
    for dt in (torch.float32, dtype):
        with torch.autocast("cuda", dtype=dt, enabled=dt != torch.float32):
            for n in (58, 130):
                eager = m.generate(prompt, n, greedy=True, graph=False)
                assert torch.equal(m.generate(prompt, n, greedy=True), eager), (dt, n)  # the default on a GPU
        with torch.inference_mode():
            dec = decode.StaticDecoder(m, 3, 64, greedy=True, capture=True)
            dec.prefill(prompt, 0)
            dec.step()
        assert dec.graph is not None
    m.generate(prompt, 20, greedy=True)
    held = decode._CAPTURED[m][1]
    m.generate(prompt, 20, greedy=True)
    assert decode._CAPTURED[m][1] is held  # the same shapes and options replay the same graph
    with torch.no_grad():
        m.transformer.wte.weight.mul_(-1.0)
    assert torch.equal(m.generate(prompt, 20, greedy=True), m.generate(prompt, 20, greedy=True, graph=False))
    assert decode._CAPTURED[m][1] is not held  # a changed parameter captures anew
    for kw in SAMPLING:  # sampled on the device: reproducible from the generator's seed, inside the vocabulary
        a, b = (m.generate(prompt, 40, generator=torch.Generator("cuda").manual_seed(3), **kw) for _ in range(2))
        assert torch.equal(a, b) and int(a.max()) < 512, kw
