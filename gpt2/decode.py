"""Static-shape cached decoding, and its CUDA graph.

An eager decoding step of a small model is mostly host time: the 124M model's step launches some 150 kernels,
each through Python. ``StaticDecoder`` writes the one-token step as a function of fixed-shape device tensors only
-- the last token ``tok`` (B, 1), its position ``pos`` (a 0-d int64 tensor), a KV cache of fixed capacity -- so a
CUDA graph captures it once and replays it per token, with nothing read on the host in between:

- the new key and value are written at ``pos`` by ``index_copy_`` (a device index, not a Python slice);
- attention runs over the whole static cache with the keys after ``pos`` masked out (``_masked_attention``: the
  reference op's math, softmax in fp32, over a length given by a device tensor; the registry's attention ops take
  the keys so far as a shorter tensor, a shape that changes every step);
- the next token is chosen on the device: the argmax, or ``gpt2.sampling.draw``, the same draw as
  ``torch.multinomial`` without its host-side checks;
- ``tok`` and ``pos`` are updated in place by the step itself, so a replay needs no input.

Everything else is the model's own: the layer norms, MLP and products of ``GPT._hidden`` (or of
``GPT._decode_hidden`` on the decode weights of a CPU), so the tokens equal the eager path's. The prompt's prefill,
and the refill after the context slides at ``block_size``, run eagerly into the same cache, exactly as
``GPT.generate_stream`` runs them.

On a CPU the step runs eagerly (``capture=False``): that is how the tests check everything but the capture itself.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from gpt2 import sampling


class _Weights:
    """The weight matrices a step multiplies by, in the dtype decoding computes in: autocast's, cast once, where the
    eager path's autocast casts them at every step (and keeps them in its cache while its region lasts). The static
    step runs with autocast off, on these: a CUDA graph must not hold an autocast cache entry, which the caller's
    region frees when it ends, and the masked attention keeps the reference's fp32 math. In the weights' own dtype
    they are the parameters themselves (no copy).

    Attributes:
        layers: per block, (c_attn.weight, c_attn.bias, attn.c_proj.weight, attn.c_proj.bias, mlp.c_fc.weight,
            mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias); a bias is None without biases.
        head: the output layer (V, C) without the padded rows.
    """

    def __init__(self, model, dtype: torch.dtype):
        def cast(t):
            return None if t is None else t.detach().to(dtype)

        self.layers = [tuple(cast(t) for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
                             for t in (lin.weight, lin.bias)) for b in model.transformer.h]
        self.head = cast(model.lm_head.weight[: model.config.vocab_size])


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention of one query position over a static cache: ``gpt2_kernels.ref.attention``'s math (fp32 scores and
    softmax, output in q's dtype) with the keys where ``valid`` is False masked out.

    Args:
        q: (B, nh, 1, hs).
        k, v: (B, nh, capacity, hs).
        valid: (capacity,) bool, True for the positions filled so far (the query's own included).
    Returns:
        (B, nh, 1, hs) in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, nh, 1, capacity)
    att = torch.softmax(att.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.matmul(att, v.float()).to(q.dtype)  # (B, nh, 1, hs)


class StaticDecoder:
    """Cached decoding of ``batch`` sequences with a KV cache of fixed ``capacity`` and a static one-token step.

    Args:
        model: a ``gpt2.model.GPT`` in eval mode (or without dropout).
        batch: sequences decoded together.
        capacity: positions the cache holds (at most ``block_size``); a sequence longer than the context slides
            as ``GPT.generate_stream`` slides it, which needs ``capacity == block_size``.
        temperature, top_k, top_p, greedy, generator: the sampling options (``gpt2.sampling``).
        capture: capture the step in a CUDA graph on first use (CUDA only); else run it eagerly.
    """

    def __init__(self, model, batch: int, capacity: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
                 capture: bool = False):
        device = model.transformer.wte.weight.device
        if capture and device.type != "cuda":
            raise ValueError(f"a CUDA graph captures CUDA work only; the model is on {device.type}")
        self.model, self.capture = model, capture
        self.sampling = (temperature, top_k, top_p, greedy)
        self.generator = generator
        self.dw = model.decode_weights()
        self.cache = model.new_kv_cache(batch, capacity)
        self.weights = None if self.dw is not None else _Weights(model, self.cache.k.dtype)
        # Masked positions get weight 0, but 0 times an uninitialised value can be NaN: the buffers start zeroed.
        self.cache.k.zero_()
        self.cache.v.zero_()
        self.ptrs = (self.cache.k.data_ptr(), self.cache.v.data_ptr())
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the token the next step feeds
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # its position
        self.kpos = torch.arange(self.cache.capacity, device=device)  # (capacity,)
        self.graph = None

    @property
    def filled(self) -> int:
        """Positions of the cache filled so far (kept on the host: the host decides when the context slides)."""
        return self.cache.pos

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row of fp32 logits (B, V), on the device: (B, 1) int64."""
        temperature, top_k, top_p, greedy = self.sampling
        if greedy:
            return logits.argmax(dim=-1, keepdim=True)
        return sampling.draw(sampling.next_token_probs(logits, temperature, top_k, top_p), self.generator)

    def prefill(self, feed: torch.Tensor, start: int) -> None:
        """Run ``feed`` (B, T), the tokens at positions ``start ..``, eagerly into the cache; the next token chosen
        from the last position becomes ``tok``."""
        model, cache = self.model, self.cache
        cache.pos = start
        if self.dw is not None:
            h = model._decode_hidden(feed, cache, self.dw)
        else:
            h, _ = model._hidden(feed, cache)
        self._check_buffers()
        self.tok.copy_(self.choose(model._last_logits(h[:, -1, :], self.dw)))
        self.pos.fill_(cache.pos)  # a write to the device, not a read

    def step(self) -> None:
        """One token: replay the graph (captured on first use), or run the static step eagerly."""
        if self.cache.pos >= self.cache.capacity:
            raise ValueError(f"the static KV cache is full ({self.cache.capacity} positions); prefill to slide")
        if self.capture:
            if self.graph is None:
                self.graph = self._capture()
            self.graph.replay()
        else:
            self._step()
        self.cache.pos += 1

    def _step(self) -> None:
        """The static-shape step: reads ``tok`` and ``pos``, writes the cache at ``pos``, the next token to ``tok``,
        and ``pos + 1`` to ``pos``. No Python value depends on a device value; nothing is read on the host."""
        with torch.autocast(self.tok.device.type, enabled=False):  # the dtypes are explicit (see _Weights)
            self._blocks()
        self.pos.add_(1)

    def _blocks(self) -> None:
        model, cache = self.model, self.cache
        ops = model._ops_for(self.tok.device)
        B = self.tok.shape[0]
        C, nh = model.config.n_embd, model.config.n_head
        at = self.pos.view(1)  # (1,)
        x = model.transformer.wte(self.tok) + model.transformer.wpe(at)  # (B, 1, C)
        valid = self.kpos <= self.pos  # (capacity,)
        blocks = model.transformer.h
        h = blocks[0].ln_1(x, ops)
        next_norms = [b.ln_1 for b in blocks[1:]] + [model.transformer.ln_f]
        for i, (block, next_ln) in enumerate(zip(blocks, next_norms)):
            q, k, v = self._product(i, 0, h).split(C, dim=2)  # each (B, 1, C)
            q, k, v = (t.view(B, 1, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, 1, hs)
            cache.k[i].index_copy_(2, at, k.to(cache.k.dtype))
            cache.v[i].index_copy_(2, at, v.to(cache.v.dtype))
            y = _masked_attention(q, cache.k[i], cache.v[i], valid).transpose(1, 2).reshape(B, 1, C)
            h, x = block.ln_2.add(x, self._product(i, 1, y), ops)  # x = x + attn(ln_1(x)); h = ln_2(x)
            h, x = next_ln.add(x, self._mlp(i, h, ops), ops)  # x = x + mlp(ln_2(x)); h = next_ln(x)
        self.tok.copy_(self.choose(self._logits(h[:, -1, :])))

    def _product(self, layer: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s c_attn (``which`` 0) or attn.c_proj (1) of x, on the decode weights or ``_Weights``."""
        if self.dw is not None:
            return self.dw.layers[layer][which](x)
        w, b = self.weights.layers[layer][2 * which:2 * which + 2]
        return F.linear(x.to(w.dtype), w, b)

    def _mlp(self, layer: int, h: torch.Tensor, ops) -> torch.Tensor:
        if self.dw is not None:
            return self.dw.mlp(layer, h, ops)
        w_fc, b_fc, w_proj, b_proj = self.weights.layers[layer][4:]
        return ops.mlp(h.to(w_fc.dtype), w_fc, b_fc, w_proj, b_proj)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, V) of the last position's hidden states h (B, C)."""
        if self.dw is not None:
            return self.model._last_logits(h, self.dw)
        return F.linear(h.to(self.weights.head.dtype), self.weights.head).float()

    def _check_buffers(self) -> None:
        if (self.cache.k.data_ptr(), self.cache.v.data_ptr()) != self.ptrs:
            raise RuntimeError("the static KV cache was reallocated; a captured step would read the old buffers")

    def _capture(self) -> torch.cuda.CUDAGraph:
        """The step captured in a CUDA graph. Two eager runs on a side stream first (Triton compiles and tunes on
        first use, which a capture cannot hold); their writes are undone: ``tok``, ``pos`` and the generator's
        state are restored, and the cache entry they wrote at ``pos`` is written again by the first replay."""
        saved = (self.tok.clone(), self.pos.clone())
        device = self.tok.device
        rng = self.generator
        if rng is None:  # the default generator of the device
            rng = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        gen_state = rng.get_state()  # host-side (seed and offset): no device read
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
                self.tok.copy_(saved[0])
                self.pos.copy_(saved[1])
        torch.cuda.current_stream(device).wait_stream(side)
        rng.set_state(gen_state)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)  # each replay draws new numbers from it
        with torch.cuda.graph(graph):
            self._step()
        return graph


# One captured decoder per model, reused while nothing it was built from changes: a capture (two eager steps, the
# capture, the graph's instantiation) costs milliseconds, as much as several tokens of the 124M model. Weak: it
# goes with the model.
_CAPTURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoder(model, batch: int, capacity: int, options: tuple, generator, capture: bool) -> StaticDecoder:
    """A ``StaticDecoder`` for these arguments: a new one, or when ``capture`` the model's last one if it was built
    for the same shapes, sampling options, generator, autocast state, backend ops and parameter versions."""
    if not capture:
        return StaticDecoder(model, batch, capacity, *options, generator=generator, capture=False)
    device = model.transformer.wte.weight.device
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    key = (batch, capacity, options, id(generator), autocast, model.backend_spec, id(model._ops_for(device)), params)
    held = _CAPTURED.get(model)
    if held is not None and held[0] == key and held[1].generator is generator:
        return held[1]
    _CAPTURED.pop(model, None)  # free the old graph and cache first
    dec = StaticDecoder(model, batch, capacity, *options, generator=generator, capture=True)
    _CAPTURED[model] = (key, dec)
    return dec


def stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None, greedy: bool = False,
           capture: bool = False):
    """Yield each new (B, 1) token of ``idx`` (B, T) continued by ``max_new_tokens``, decoded by a
    ``StaticDecoder``: the prefill eagerly, each later token by the static step (a graph replay when ``capture``).
    The context slides at ``block_size`` as ``GPT.generate_stream``'s does. The caller checks the arguments."""
    bs = model.config.block_size
    with torch.inference_mode():
        dec = _decoder(model, idx.shape[0], min(bs, idx.shape[1] + max_new_tokens),
                       (temperature, top_k, top_p, greedy), generator, capture)
        dec.prefill(idx, 0)
    new = []
    for i in range(max_new_tokens):
        with torch.inference_mode():
            if i > 0:
                if dec.filled + 1 > bs:
                    # Slide as the eager path does: recompute the last block_size tokens.
                    seq = torch.cat([idx] + new, dim=1)
                    dec.prefill(seq[:, -bs:], 0)
                else:
                    dec.step()
        tok = dec.tok.clone()  # an ordinary tensor (an inference tensor is not usable everywhere), kept by the caller
        new.append(tok)
        yield tok
