"""Causal self-attention: our backends against the reference, torch.compile, SDPA's backends and flash-attn.

q, k, v are (B, n_head, T, head_size) from the GPT-2 table in bench/shapes.py. SDPA runs each of
its backends (math, efficient, flash, cudnn) pinned with ``torch.nn.attention.sdpa_kernel``; a
backend that cannot run this device, dtype or shape is skipped with PyTorch's own reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import DTYPES, InputSet, Unavailable, time_case

OP = "attention"
_SDPA = {"sdpa-math": "MATH", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
         "sdpa-cudnn": "CUDNN_ATTENTION"}


def make_inputs(shape, dtype, device, gen) -> InputSet:
    """q, k, v of (B, nh, T, hs) with gradients, and an upstream gradient of the same shape."""
    size = (shape.B, shape.n_head, shape.T, shape.head_size)
    q, k, v = (torch.randn(size, device=device, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    dy = torch.randn(size, device=device, generator=gen).to(dtype)
    return InputSet((q, k, v), {"causal": True}, (q, k, v), dy)


def _sdpa(name: str, device: torch.device, dtype: torch.dtype):
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.sdpa_kernel is missing in torch {torch.__version__}: {e}") from None
    backend = getattr(SDPBackend, _SDPA[name], None)
    if backend is None:
        raise Unavailable(f"torch {torch.__version__} has no SDPA backend {_SDPA[name]}")

    def attention(q, k, v, causal=True):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attention


def _flash_attn(device: torch.device, dtype: torch.dtype):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise Unavailable(f"flash-attn is not importable here ({e})") from None
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable("flash-attn runs only on CUDA GPUs in fp16/bf16")

    def attention(q, k, v, causal=True):
        # flash-attn wants (B, T, nh, hs); a transposed view with a contiguous last dim needs no copy.
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return y.transpose(1, 2)  # (B, nh, T, hs)

    return attention


PEERS = {name: (lambda case, device: _sdpa(case.impl, device, DTYPES[case.dtype])) for name in _SDPA}
PEERS["flash-attn"] = lambda case, device: _flash_attn(device, DTYPES[case.dtype])


def test_attention(benchmark, op_case, device, ceilings, settings):
    time_case(benchmark, op_case, make_inputs, device, ceilings, settings, peers=PEERS)
