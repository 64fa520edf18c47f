"""GPT-2, written from scratch, whose hot ops run through the kernel registry.

The module tree and parameter names follow OpenAI's / Hugging Face's GPT-2 (``wte``, ``wpe``,
``h.N.ln_1``, ``attn.c_attn``, ``mlp.c_fc``, ``ln_f``, ``lm_head``) so checkpoints map one to one.
Parameters live only here; the fused ops (``layer_norm``, ``add_layer_norm``, ``attention``, ``mlp``,
``linear_cross_entropy``) are stateless functions taken from ``gpt2_kernels.registry.build_ops``, so
``set_backend`` can swap them at any time and any checkpoint loads under any backend.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import gpt2_kernels.registry
from gpt2 import decode, sampling

PRESETS: dict[str, dict] = {
    # The four OpenAI GPT-2 sizes (124M, 350M, 774M, 1558M parameters).
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
    # For tests: small enough for the Triton interpreter, head size 32 (a size every backend takes).
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 512},
    # The main job's default: GPT-2's vocabulary, sized to train on a 2-core CPU in minutes.
    "shakespeare": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
}


# Activation recompute: which part of each block is recomputed in the backward instead of stored.
RECOMPUTE_MODES = ("none", "attn", "mlp", "block")


class ConfigError(ValueError):
    """A model configuration or checkpoint that cannot work."""


@dataclass
class GPTConfig:
    """Shape of a GPT-2. ``vocab_size`` is the real vocabulary; the embedding table is padded to a
    multiple of 64 rows for faster matmuls, and padded rows are never sampled nor in the loss."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A preset by name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``tiny``,
        ``shakespeare``), with keyword overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {', '.join(sorted(unknown))}")
        return cls(**{**PRESETS[name], **overrides})


# Peak dense bf16 tensor-core rates (FLOP/s) by device-name fragment, for MFU. Datasheet numbers.
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12,
               "A10": 125e12, "L4": 121e12, "3090": 71e12, "T4": 65e12}


def peak_flops(device) -> float | None:
    """The datasheet peak bf16/fp16 dense rate of a CUDA device, or None if unknown (or CPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for frag, flops in _PEAK_FLOPS.items():
        if frag in name:
            return flops
    return None


class KVCache:
    """Keys and values of every layer for cached decoding, preallocated to ``capacity`` positions.

    ``pos`` is how many positions are filled. Buffers are (n_layer, B, nh, capacity, hs); a layer's
    keys so far are a strided view, so no copy is made per step. A step past the capacity moves
    the cache into buffers twice as long (at most ``block_size``). The buffers start
    uninitialised, since positions from ``pos`` on are never read, and ``generate`` sizes them to
    the prompt plus the new tokens: zero-filling the 124M model's two full-context buffers (38 MB
    each) took 8.5 ms on the 2-core EPYC, and uninitialised ones cost 6.3 ms of page faults
    instead at the first write, which touches each layer's and head's 256 KB block; sized to a
    64-token prompt and 64 new tokens, 1.5 ms in all.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype, capacity: int | None = None):
        self.max_len = config.block_size
        self.capacity = min(capacity or config.block_size, config.block_size)
        shape = (config.n_layer, batch_size, config.n_head, self.capacity, config.head_size)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, nh, T, hs) at ``pos`` and return all keys/values so far."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.capacity:
            self._grow(end)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, pos+T, hs)

    def _grow(self, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"the KV cache holds at most block_size = {self.max_len} positions, not {end}")
        self.capacity = min(max(2 * self.capacity, end), self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:3], self.capacity, old.shape[4])
            new[:, :, :, :self.pos] = old[:, :, :, :self.pos]
            setattr(self, name, new)


@functools.cache
def _onednn_linear() -> bool:
    """Whether torch has oneDNN's prepacked bf16 linear (``torch.ops.mkldnn._linear_pointwise``, the op Inductor's
    CPU freezing uses) and this CPU runs it: oneDNN's bf16 path needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and
    refuses other CPUs with a RuntimeError, so one tiny weight is prepacked to find out (once per process)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


class _DecodeLinear:
    """``x W^T + b`` of one linear layer for decoding on a CPU, its weight copied once into the fastest layout.

    A decoding step of batch 1 multiplies one row by each weight matrix: it reads every weight once and is bound
    by the rate the weights stream from memory; how near the CPU library comes to that rate depends on the layout.
    Measured on the 2-core EPYC (one thread, each weight cold in the cache, MKL; GB/s of weights read):

    - fp32, input width 768: against an (in, out) row-major copy 20-28 GB/s, against nn.Linear's (out, in)
      weight 10-14 GB/s; input width 3072 (the MLP's c_proj): the (out, in) weight is the faster, 18.6 against
      16.5 GB/s. So an (in, out) copy is made where out >= in, and ``weight`` is its transposed view: ``F.linear``
      and the backends' ``mlp`` (which call ``F.linear``) then run the row-major product, copying nothing per step.
    - bf16: torch's plain bf16 product streams 6-9 GB/s of bf16, slower per token than fp32; oneDNN's prepacked
      weight 16-18 GB/s, and a 124M decoding step took 0.74x the fp32 step's time (19.9 against 26.9 ms). ``gelu``
      fuses GPT-2's tanh GELU into the product.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, onednn: bool,
                 gelu: bool = False):
        w = weight.detach().to(dtype)  # (out, in)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.nbytes = w.numel() * w.element_size() + (0 if bias is None else self.bias.numel() * w.element_size())
        self.dtype, self.onednn, self.gelu = dtype, onednn, gelu
        if onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # oneDNN's blocked layout for 1 row
        else:
            self.weight = w.t().contiguous().t() if w.shape[0] >= w.shape[1] else w  # (out, in), maybe a view

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in the weight's dtype."""
        if self.onednn:
            act, how = ("gelu", "tanh") if self.gelu else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, act, [], how)
        return F.linear(x.to(self.dtype), self.weight, self.bias)


class DecodeWeights:
    """Every weight matrix of a GPT laid out once for cached decoding on a CPU (see ``_DecodeLinear``).

    The model keeps one and rebuilds it when a parameter changes (``key``). Under CPU autocast to bf16 (or for
    a bf16 model), where torch has oneDNN, every matrix is oneDNN's prepacked bf16 weight and c_fc carries the
    GELU: bf16 decoding is opt-in, as autocast is, since bf16 logits may choose other tokens than fp32's.
    Otherwise the matrices are in the compute dtype and the MLP runs as the backend's ``mlp`` op on the relaid
    weights. The layer norms and embeddings are the model's own.

    Attributes:
        layers: per block, the ``_DecodeLinear`` of c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj.
        head: the output layer, (V, C) without the padded rows.
        nbytes: bytes of weights one decoding step reads: every matrix and bias, the layer norms, and one row
            of each embedding table.
    """

    def __init__(self, model: GPT, dtype: torch.dtype):
        self.key = self.key_of(model, dtype)
        self.dtype = dtype
        self.onednn = dtype == torch.bfloat16 and _onednn_linear()
        self.layers = []
        for block in model.transformer.h:
            a, m = block.attn, block.mlp
            self.layers.append(tuple(_DecodeLinear(lin.weight, lin.bias, dtype, self.onednn, gelu)
                                     for lin, gelu in ((a.c_attn, False), (a.c_proj, False),
                                                       (m.c_fc, self.onednn), (m.c_proj, False))))
        head = model.lm_head.weight[: model.config.vocab_size]  # (V, C): padded rows are never sampled
        self.head = _DecodeLinear(head, None, dtype, self.onednn)
        norms = [p for b in model.transformer.h for p in (*b.ln_1.parameters(), *b.ln_2.parameters())]
        norms += list(model.transformer.ln_f.parameters())
        embeddings = 2 * model.config.n_embd * model.transformer.wte.weight.element_size()
        self.nbytes = (sum(lin.nbytes for layer in self.layers for lin in layer) + self.head.nbytes
                       + sum(p.numel() * p.element_size() for p in norms) + embeddings)

    @staticmethod
    def key_of(model: GPT, dtype: torch.dtype) -> tuple:
        """What the copies depend on: the dtype, and each parameter's storage and version (an in-place update
        such as an optimizer step or ``load_state_dict`` bumps the version)."""
        return (dtype, _onednn_linear(), tuple((p.data_ptr(), p._version) for p in model.parameters()))

    def mlp(self, layer: int, h: torch.Tensor, ops) -> torch.Tensor:
        """Block ``layer``'s MLP of h (B, T, C): oneDNN's two products (GELU fused into the first), or the
        backend's ``mlp`` op on the relaid weights."""
        _, _, fc, proj = self.layers[layer]
        if self.onednn:
            return proj(fc(h))
        return ops.mlp(h.to(self.dtype), fc.weight, fc.bias, proj.weight, proj.bias)


class LayerNorm(nn.Module):
    """LayerNorm parameters (bias optional); the math is the registry's ``layer_norm`` / ``add_layer_norm``."""

    def __init__(self, n: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x, ops):
        return ops.layer_norm(x, self.weight, self.bias, 1e-5)

    def add(self, x, residual, ops):
        """``(self(x + residual), x + residual)`` in one op. The sum keeps x's dtype (the residual stream's,
        fp32 under autocast), as ``x + residual`` would for a low-precision residual."""
        return ops.add_layer_norm(x, residual.to(x.dtype), self.weight, self.bias, 1e-5)


def _act_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmul-like ops should run in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, ops, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): strided views; backends take strides or copy as they need.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, pos+T, hs)
        # The queries are the last T of the keys' positions, so causal masking is right with a cache.
        y = ops.attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, ops):
        # One fused op: c_proj(gelu_tanh(c_fc(x))). Under autocast the op sees low-precision inputs,
        # as nn.Linear would.
        dt = _act_dtype(x)

        def cast(t):
            return None if t is None else t.to(dt)

        y = ops.mlp(x.to(dt), cast(self.c_fc.weight), cast(self.c_fc.bias), cast(self.c_proj.weight),
                    cast(self.c_proj.bias))
        return self.dropout(y)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, h, next_ln, ops, kv_cache=None, layer=0, recompute="none"):
        """A pre-norm block on the residual stream x (B, T, C), given h = ln_1(x).

        Each residual add runs fused with the norm after it: ln_2 here, then ``next_ln`` (the next
        block's ln_1, or ln_f after the last block). Returns the new stream and ``next_ln`` of it.

        ``recompute`` (one of ``RECOMPUTE_MODES``; the caller passes ``"none"`` unless training with
        grad enabled) drops a part's activations and recomputes them in the backward. Because the
        pre-norm of each sub-block is fused with the residual add before it, a part runs from the
        normed input h it is given to the fused add + norm after it: ``attn`` is attention's qkv
        projection, attention, out projection and the add + ln_2; ``mlp`` is the MLP and the add +
        ``next_ln``; ``block`` is both. Only (x, h) at the part's entrance are kept.
        """
        if recompute == "block":
            return _checkpoint(self._forward, x, h, next_ln, ops)
        attn_part = _checkpoint if recompute == "attn" else _call
        mlp_part = _checkpoint if recompute == "mlp" else _call
        h, x = attn_part(self._attn_part, x, h, ops, kv_cache, layer)  # x = x + attn(ln_1(x)); h = ln_2(x)
        h, x = mlp_part(self._mlp_part, x, h, next_ln, ops)  # x = x + mlp(ln_2(x)); h = next_ln(x)
        return x, h

    def _forward(self, x, h, next_ln, ops):
        h, x = self._attn_part(x, h, ops)
        h, x = self._mlp_part(x, h, next_ln, ops)
        return x, h

    def _attn_part(self, x, h, ops, kv_cache=None, layer=0):
        return self.ln_2.add(x, self.attn(h, ops, kv_cache, layer), ops)

    def _mlp_part(self, x, h, next_ln, ops):
        return next_ln.add(x, self.mlp(h, ops), ops)


def _call(fn, *args):
    return fn(*args)


def _real(t: torch.Tensor) -> bool:
    """Not a fake or meta tensor (``gpt2 plan`` traces the model on FakeTensors: nothing there may be timed)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def _checkpoint(fn, *args):
    """``fn(*args)`` whose activations are recomputed in the backward instead of stored.

    Non-reentrant checkpointing (works under DDP, FSDP2 and torch.compile). ``preserve_rng_state``
    replays the dropout masks: it restores the CPU generator, from which the Triton attention draws
    its dropout seed, and the generators of the inputs' devices, which ``nn.Dropout`` and the
    reference attention use.

    For later, inside the kernels (not done here): the Triton MLP saves x, pre and act = gelu(pre),
    two (B, T, 4C) tensors; saving x and pre only and recomputing GELU in its backward epilogue would
    halve that at no matmul cost, where ``mlp`` mode reruns both matmuls. The Triton attention already
    recomputes P from q, k, v and the log-sum-exp, so ``attn`` mode buys back q, k, v, the output and
    the projections' inputs at the cost of a second qkv and out projection.
    """
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


class GPT(nn.Module):
    """GPT-2 language model.

    Args:
        config: the model's shape.
        backend: kernel backend spec for ``gpt2_kernels.registry.build_ops`` (``"auto"``, ``"torch"``,
            ``"triton"``, ``"ext"``, or per op such as ``"triton,attention=torch"``).
        recompute: activation recompute, one of ``RECOMPUTE_MODES`` (see ``set_recompute``).
    """

    def __init__(self, config: GPTConfig, backend: str = "auto", recompute: str = "none"):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
            "wpe": nn.Embedding(config.block_size, config.n_embd),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            "ln_f": LayerNorm(config.n_embd, config.bias),
        })
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        # Residual projections scaled by 1/sqrt(2 n_layer): each block adds two of them.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.check_inputs = True
        gpt2_kernels.registry.parse_spec(backend)  # a malformed spec fails here; availability is checked per device
        self.backend_spec = backend
        self.ops = None
        self._ops_device = None
        self._auto_pending = gpt2_kernels.registry.measures(backend)  # ops left to auto, not timed yet
        self.set_recompute(recompute)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ backends

    def set_backend(self, spec: str) -> GPT:
        """Swap the kernel backend (parameters untouched). Returns self.

        Explicit backends are checked now. Ops left to ``auto`` run the registry's fixed order until they are timed:
        on the shapes of the first eager forward, or of ``choose_backends`` (which a model to be compiled must call
        first: nothing is timed, nor said, while torch.compile traces).
        """
        self._build_ops(self.transformer.wte.weight.device, spec)
        return self

    def _build_ops(self, device: torch.device, spec: str, case=None) -> None:
        self._auto_pending = case is None and gpt2_kernels.registry.measures(spec)
        self.ops = gpt2_kernels.registry.build_ops(spec, device, case, quiet=self._auto_pending)
        self.backend_spec, self._ops_device = spec, device.type

    def choose_backends(self, batch_size: int, seq_len: int, dtype: torch.dtype | None = None, mode: str = "train",
                        context: int | None = None) -> dict[str, str]:
        """Time the ops the backend spec leaves to ``auto`` on these shapes (``gpt2_kernels.auto``), take the fastest
        of each, and use them from now on; under torch.distributed, rank 0's choice. Explicit backends stay.

        Args:
            batch_size, seq_len: B and T of each forward (T new tokens per step when decoding).
            dtype: what the matmul-like ops compute in: autocast's dtype (default: autocast's when it is on now,
                else the weights').
            mode: ``train`` (forward + backward timed), ``eval`` or ``decode`` (forward).
            context: when decoding, the keys attention sees (default ``block_size``).
        Returns:
            ``{op: backend}``.
        """
        from gpt2_kernels.auto import Case

        device = self.transformer.wte.weight.device
        wdtype = self.transformer.wte.weight.dtype
        dtype = dtype or (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else wdtype)
        cfg = self.config
        case = Case(batch_size, seq_len, cfg.n_embd, cfg.n_head, cfg.vocab_size, dtype, wdtype, mode,
                    context or cfg.block_size if mode == "decode" else None, cfg.dropout)
        self._build_ops(device, self.backend_spec, case)
        return dict(self.ops.backends)

    def set_recompute(self, mode: str) -> GPT:
        """Choose which activations each block recomputes in the backward instead of storing: ``"none"``,
        ``"attn"`` (the attention sub-block), ``"mlp"`` (the MLP sub-block) or ``"block"`` (the whole block);
        see ``Block.forward``. It applies only in training mode with grad enabled: evaluation, generation and
        cached decoding never recompute. Returns self.

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute mode {mode!r}; modes are {', '.join(RECOMPUTE_MODES)}")
        self.recompute = mode
        return self

    def _ops_for(self, device: torch.device, idx: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        # The spec is resolved per device type (``auto`` differs on CPU and GPU): re-resolve after .to(). Ops left
        # to a measured ``auto`` are timed once, on the first eager call's shapes (never while compiling).
        if self.ops is None or device.type != self._ops_device:
            self._build_ops(device, self.backend_spec)
        if self._auto_pending and idx is not None and not torch.compiler.is_compiling() and _real(idx):
            mode = "decode" if kv_cache is not None else "train" if self.training and torch.is_grad_enabled() else "eval"
            self.choose_backends(idx.shape[0], 1 if kv_cache is not None else idx.shape[1], mode=mode,
                                 context=None if kv_cache is None else kv_cache.capacity)
        return self.ops

    # ------------------------------------------------------------------ forward

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (the token embeddings are
        counted once, as the tied output layer's weights)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _check_idx(self, idx: torch.Tensor, start: int) -> None:
        """Shape, dtype and length checks, and (with ``check_inputs``) every id inside the vocabulary: eagerly one
        host read and a ValueError naming the id; under ``torch.compile`` a device-side assert in the graph, so a
        model compiled with ``fullgraph=True`` traces as one graph with the same protection."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold int64 or int32 token ids, got {idx.dtype}")
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        if not self.check_inputs or not idx.numel():
            return
        V = self.config.vocab_size
        if torch.compiler.is_compiling():
            # A host read of the ids cannot be traced (a data-dependent guard): the compiled graph asserts on the
            # device instead, with no sync (a RuntimeError on the CPU, a device-side assert on a GPU).
            torch._assert_async(((idx >= 0) & (idx < V)).all(), f"a token id is outside the vocabulary [0, {V})")
            return
        lo, hi = (int(v) for v in torch.aminmax(idx))  # one pass, one sync
        if lo < 0 or hi >= V:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {V})")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                last_only: bool = False):
        """Run the model.

        Args:
            idx: (B, T) token ids.
            targets: (B, T) next-token ids (``-1`` = ignored), or None.
            kv_cache: a ``KVCache`` for cached decoding: idx holds the T tokens after ``kv_cache.pos``.
            last_only: without targets, return logits of the last position only (B, 1, V).
        Returns:
            ``(logits, loss)``: with targets, ``(None, loss)`` -- the loss is fused with the output
            layer, so the (B, T, V) logits are never built; without, ``(logits, None)`` with logits
            (B, T, vocab_size) in fp32.
        """
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match idx shape {tuple(idx.shape)}")
        x, ops = self._hidden(idx, kv_cache)
        head = self.lm_head.weight[: self.config.vocab_size]  # (V, C): padded rows never count
        if targets is not None:
            dt = _act_dtype(x)
            loss = ops.linear_cross_entropy(x.to(dt), head.to(dt), targets, -1)
            return None, loss
        if last_only:
            x = x[:, -1:, :]
        logits = F.linear(x, head).float()  # (B, T, V)
        return logits, None

    def _hidden(self, idx: torch.Tensor, kv_cache: KVCache | None):
        """The final layer-normed hidden states (B, T, C) of idx, and the ops that computed them."""
        start = kv_cache.pos if kv_cache is not None else 0
        self._check_idx(idx, start)
        ops = self._ops_for(idx.device, idx, kv_cache)
        T = idx.shape[1]
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        blocks = self.transformer.h
        h = blocks[0].ln_1(x, ops)
        next_norms = [b.ln_1 for b in blocks[1:]] + [self.transformer.ln_f]
        recompute = self.recompute if self.training and torch.is_grad_enabled() and kv_cache is None else "none"
        for i, (block, next_ln) in enumerate(zip(blocks, next_norms)):
            x, h = block(x, h, next_ln, ops, kv_cache, i, recompute)  # h = next_ln(x): ln_f(x) after the last block
        if kv_cache is not None:
            kv_cache.pos += T
        return h, ops

    # ------------------------------------------------------------------ accounting

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus the attention scores' 12 L C T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak: float | None = None,
                     seq_len: int | None = None) -> float | None:
        """Model FLOPs utilisation: achieved FLOP/s over ``peak`` (default: the device's datasheet
        bf16 peak). ``fwdbwd_per_iter`` sequences of ``seq_len`` tokens took ``dt`` seconds.
        Returns None when the peak is unknown (e.g. on a CPU)."""
        peak = peak or peak_flops(self.transformer.wte.weight.device)
        if not peak or dt <= 0:
            return None
        T = seq_len or self.config.block_size
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak

    # ------------------------------------------------------------------ generation

    def new_kv_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty ``KVCache`` for ``batch_size`` sequences, room for ``capacity`` positions (default
        ``block_size``; it grows as needed), in the dtype decoding computes in."""
        return KVCache(self.config, batch_size, self.transformer.wte.weight.device, self._decode_dtype(), capacity)

    def _decode_dtype(self) -> torch.dtype:
        """The dtype decoding computes in: autocast's when it is on, else the weights'."""
        device = self.transformer.wte.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.transformer.wte.weight.dtype

    def decode_weights(self) -> DecodeWeights | None:
        """The weights laid out for cached decoding on a CPU (``DecodeWeights``), made on first use and kept until a
        parameter changes; None where decoding runs the model's forward instead: off the CPU, on the Triton backend
        (which a CPU runs only under its interpreter, in tests that record the launches a GPU makes), and in training
        mode with dropout. The copies take memory: in fp32 about three quarters of the model's (the head, c_attn,
        attn.c_proj and mlp.c_fc, 380 MB for the 124M model), in bf16 half of it."""
        device = self.transformer.wte.weight.device
        if (device.type != "cpu" or (self.training and self.config.dropout > 0)
                or "triton" in self._ops_for(device).backends.values()):
            self.__dict__.pop("_decode", None)
            return None
        dtype = self._decode_dtype()
        dw = self.__dict__.get("_decode")
        if dw is None or dw.key != DecodeWeights.key_of(self, dtype):
            self.__dict__.pop("_decode", None)  # free the stale copies before making new ones
            self.__dict__["_decode"] = dw = DecodeWeights(self, dtype)
        return dw

    def __getstate__(self):
        # The decode weights are a cache: never pickled nor deep-copied (a copy makes its own on first use).
        state = self.__dict__.copy()
        state.pop("_decode", None)
        return state

    def _decode_hidden(self, idx: torch.Tensor, cache: KVCache, dw: DecodeWeights) -> torch.Tensor:
        """``_hidden`` of a cached step on the decode weights ``dw``: the final normed hidden states (B, T, C).

        The blocks' math as ``Block.forward`` in eval mode, with the layer norms, attention and MLP from the
        backend; only the products run on ``dw``'s copies, and nothing of the training path's checks is repeated.
        """
        start = cache.pos
        self._check_idx(idx, start)
        ops = self._ops_for(idx.device, idx, cache)
        B, T = idx.shape
        C, nh = self.config.n_embd, self.config.n_head
        x = self.transformer.wte(idx) + self.transformer.wpe.weight[start:start + T]  # (B, T, C)
        blocks = self.transformer.h
        h = blocks[0].ln_1(x, ops)
        next_norms = [b.ln_1 for b in blocks[1:]] + [self.transformer.ln_f]
        for i, (block, next_ln, (c_attn, c_proj, _, _)) in enumerate(zip(blocks, next_norms, dw.layers)):
            q, k, v = c_attn(h).split(C, dim=2)  # each (B, T, C)
            # (B, T, C) -> (B, nh, T, hs)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
            k, v = cache.update(i, k, v)  # (B, nh, pos+T, hs)
            y = ops.attention(q, k, v, causal=True).transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
            h, x = block.ln_2.add(x, c_proj(y), ops)  # x = x + attn(ln_1(x)); h = ln_2(x)
            h, x = next_ln.add(x, dw.mlp(i, h, ops), ops)  # x = x + mlp(ln_2(x)); h = next_ln(x)
        cache.pos += T
        return h

    def _last_logits(self, h: torch.Tensor, dw: DecodeWeights | None) -> torch.Tensor:
        """fp32 logits (B, V) of last-position hidden states h (B, C), on the decode weights where there are some."""
        if dw is not None:
            return dw.head(h).float()
        return F.linear(h, self.lm_head.weight[: self.config.vocab_size]).float()

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                        generator: torch.Generator | None = None, greedy: bool = False, graph: bool | None = None):
        """Yield each new (B, 1) token as it is chosen. Arguments as ``generate``."""
        sampling.check_sampling(temperature, top_k, top_p, greedy, max_new_tokens)
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"the prompt must be (batch, time) with at least one token, got {tuple(idx.shape)}")
        bs = self.config.block_size
        if idx.shape[1] > bs:
            raise ValueError(f"the prompt has {idx.shape[1]} tokens, longer than the context of {bs}")
        if max_new_tokens == 0:
            return
        if self._decode_graph(graph, use_cache):
            yield from decode.stream(self, idx, max_new_tokens, temperature, top_k, top_p, generator, greedy,
                                     capture=True)
            return
        seq = idx
        feed = idx
        # Each step runs under inference mode, which skips autograd's dispatch (and the custom ops'
        # Python autograd wrappers): a cached step of a small model is mostly such overhead. The mode
        # is entered per step, never across a yield, so the caller's code between tokens runs as
        # it would anyway; the cache lives only inside those steps, and each token is handed out
        # as an ordinary tensor.
        with torch.inference_mode():
            cache = self.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
            dw = self.decode_weights()
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                if cache is not None:
                    if cache.pos + feed.shape[1] > bs:
                        # Past the context the window slides a token per step and every position embedding moves
                        # with it: nothing cached still holds. Recompute the last block_size tokens, as without the
                        # cache (a restart on a shorter window would give other tokens than use_cache=False).
                        cache.pos = 0
                        feed = seq[:, -bs:]
                    x = self._decode_hidden(feed, cache, dw) if dw is not None else self._hidden(feed, cache)[0]
                else:
                    x, _ = self._hidden(seq[:, -bs:], None)
                logits = self._last_logits(x[:, -1, :], dw)  # (B, V) fp32
                nxt = sampling.choose_next(logits, temperature, top_k, top_p, generator, greedy)  # (B, 1)
            nxt = nxt.clone()  # an ordinary tensor, usable anywhere (an inference tensor is not)
            seq = torch.cat([seq, nxt], dim=1)
            feed = nxt
            yield nxt

    def _decode_graph(self, graph: bool | None, use_cache: bool) -> bool:
        """Whether cached decoding replays the step as a CUDA graph (``gpt2.decode``): asked for, or by default on a
        GPU without training dropout; never without the cache, never off CUDA."""
        device = self.transformer.wte.weight.device
        if graph is None:
            return use_cache and device.type == "cuda" and not (self.training and self.config.dropout > 0)
        if graph and (not use_cache or device.type != "cuda" or (self.training and self.config.dropout > 0)):
            raise ValueError("graph=True needs use_cache, a model on a CUDA device and no training dropout (the model "
                             f"is on {device.type}, use_cache={use_cache}, training={self.training})")
        return graph

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 greedy: bool = False, graph: bool | None = None) -> torch.Tensor:
        """Continue ``idx`` (B, T) by ``max_new_tokens`` tokens.

        Args:
            temperature: > 0; logits are divided by it before sampling.
            top_k: sample among the k most likely tokens only (None or 0: no limit).
            top_p: nucleus sampling: among the smallest prefix of the tokens sorted by probability whose mass
                reaches top_p. The rules are ``gpt2.sampling``'s.
            use_cache: decode with a key/value cache (one token per step) instead of recomputing.
            generator: a torch.Generator for reproducible sampling.
            greedy: take the most likely token every step (temperature, top_k, top_p unused).
            graph: replay the cached one-token step as a CUDA graph (``gpt2.decode``; the tokens equal the eager
                path's). None: on a CUDA device when ``use_cache`` and no training dropout; eager elsewhere.
        Returns:
            (B, T + max_new_tokens) token ids. Beyond ``block_size`` the context slides: each token is chosen from
            the last ``block_size`` tokens, cached or not (past it a cached step recomputes them).
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                                        greedy, graph))
        return torch.cat([idx] + new, dim=1)

    # ------------------------------------------------------------------ Hugging Face interop

    # Hugging Face GPT-2 stores these as Conv1D, i.e. transposed relative to nn.Linear.
    _TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_dir: str, backend: str = "auto", dropout: float = 0.0) -> GPT:
        """Load a Hugging Face GPT-2 checkpoint folder (config.json with model.safetensors or
        pytorch_model.bin), or a hub name such as ``gpt2`` when the network and huggingface_hub allow.

        Raises:
            ConfigError: the folder is missing, incomplete, not a GPT-2, or its tensors do not fit.
        """
        path = Path(name_or_dir)
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(name_or_dir, allow_patterns=["config.json", "*.safetensors"]))
            except Exception as e:
                raise ConfigError(f"{name_or_dir!r} is not a checkpoint folder, and fetching it from the hub failed "
                                  f"({type(e).__name__}: {e})") from e
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON ({e})") from e
        if hf.get("model_type") != "gpt2":
            raise ConfigError(f"{path} holds a {hf.get('model_type')!r} model, not a GPT-2")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{path} uses activation {act!r}; only GPT-2's tanh GELU (gelu_new) is supported")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ConfigError(f"{path} uses attention options this model does not implement")
        if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
            raise ConfigError(f"{path} uses layer_norm_epsilon {hf['layer_norm_epsilon']}; only 1e-5 is supported")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True)
        sd = _read_hf_tensors(path)
        model = cls(config, backend=backend)
        ours = model.state_dict()
        want = [k for k in ours if k != "lm_head.weight"]
        loaded = {}
        for k in want:
            hf_key = "transformer." + k[len("transformer."):] if k.startswith("transformer.") else k
            t = sd.get(hf_key, sd.get(hf_key[len("transformer."):]))
            if t is None:
                raise ConfigError(f"{path}: tensor {hf_key!r} is missing from the checkpoint")
            if any(k.endswith(s) for s in cls._TRANSPOSED):
                t = t.t()
            if k == "transformer.wte.weight" and t.shape[0] < ours[k].shape[0]:
                t = torch.cat([t, torch.zeros(ours[k].shape[0] - t.shape[0], t.shape[1], dtype=t.dtype)])
            if t.shape != ours[k].shape:
                raise ConfigError(f"{path}: tensor {hf_key!r} has shape {tuple(t.shape)}, expected "
                                  f"{tuple(ours[k].shape)}")
            loaded[k] = t
        loaded["lm_head.weight"] = loaded["transformer.wte.weight"]
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(loaded[k])
        return model

    def save_pretrained(self, directory) -> None:
        """Write a folder ``transformers.GPT2LMHeadModel.from_pretrained`` loads (config.json +
        model.safetensors). Files are written under temporary names and renamed into place."""
        from safetensors.torch import save_file

        cfg = self.config
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = {}
        for k, t in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to wte; transformers re-ties it
            t = t.detach().cpu()
            if k == "transformer.wte.weight":
                t = t[: cfg.vocab_size]
            if any(k.endswith(s) for s in self._TRANSPOSED):
                t = t.t()
            sd[k] = t.contiguous().float()
        if not cfg.bias:  # GPT-2 checkpoints always carry biases: write the zeros this model implies
            for k, t in list(sd.items()):
                if k.endswith(".weight") and ("ln_" in k or ".c_" in k):
                    bias_k = k[: -len("weight")] + "bias"
                    n = t.shape[1] if any(k.endswith(s) for s in self._TRANSPOSED) else t.shape[0]
                    sd.setdefault(bias_k, torch.zeros(n))
        hf = {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02, "tie_word_embeddings": True,
            "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
            "eos_token_id": 50256 if cfg.vocab_size > 50256 else None,
            "scale_attn_weights": True, "use_cache": True,
        }
        tmp = d / "model.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, d / "model.safetensors")
        tmp = d / "config.json.tmp"
        tmp.write_text(json.dumps(hf, indent=2))
        os.replace(tmp, d / "config.json")


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: the weights file is corrupt or truncated ({type(e).__name__}: {e})") from e
    raise ConfigError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def config_dict(config: GPTConfig) -> dict:
    return asdict(config)
