"""Attention with more keys than queries (cached decoding, chunked prefill) at every offset Tk - Tq modulo the key
tile (issue 22).

The causal diagonal sits Tk - Tq keys to the right; a kernel that places it, or masks the last key tile, from the
wrong end is right for Tq == Tk and wrong for some offsets only. Under the CPU interpreter the Triton kernels run
tiles of 16 keys (forward, dq, decode) and 32 (dk/dv), so offsets 0..31 cover every residue of both; the query counts
are 19 (training tiles, ending mid-block) and 1, 5 and 16 (the decode tiles). Forward output, lse and dq, dk, dv
against ``gpt2_kernels.ref``, through the one tolerance table; every other backend that runs here gets the same
offsets through the registry.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpt2_kernels import ref, registry
from gpt2_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OFFSETS = range(32)
HS = 32

pytestmark = pytest.mark.usefixtures("highest_fp32_matmul", "one_thread")


def _qkv(Tq: int, Tk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, t, HS, generator=g).to(DEVICE) for t in (Tq, Tk, Tk))
    do = torch.randn(1, 2, Tq, HS, generator=g).to(DEVICE)
    return q, k, v, do


def _reference(q, k, v, do):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    y = ref.attention(*leaves, causal=True)
    y.backward(do)
    s = q @ k.transpose(-2, -1) / math.sqrt(HS)  # (B, nh, Tq, Tk)
    Tq, Tk = q.shape[2], k.shape[2]
    s = s.masked_fill(torch.arange(Tk, device=s.device) > torch.arange(Tk - Tq, Tk, device=s.device)[:, None],
                      float("-inf"))
    return y.detach(), torch.logsumexp(s, dim=-1), *(t.grad for t in leaves)


def _check(name, got: dict, want: tuple) -> None:
    for label, r in zip(("out", "lse", "dq", "dk", "dv"), want):
        if label in got:
            assert_close(f"{name} {label}", got[label], r)


def _triton_cases():
    return [(Tq, d) for Tq in (19, 1, 5, 16) for d in OFFSETS if Tq == 19 or d < 16 or Tq == 1]


@pytest.mark.parametrize("Tq,offset", _triton_cases(), ids=[f"Tq{t}-d{d}" for t, d in _triton_cases()])
def test_triton_at_every_offset(Tq, offset):
    if registry.unavailable_reason("triton", DEVICE) is not None:
        pytest.skip(registry.unavailable_reason("triton", DEVICE))
    from gpt2_kernels import attention as attn

    Tk = Tq + offset
    q, k, v, do = _qkv(Tq, Tk, seed=100 * Tq + offset)
    o, lse = attn.attention_fwd(q, k, v, True)
    dq, dk, dv = attn.attention_bwd(do, q, k, v, o, lse, True)
    name = f"triton Tq={Tq} Tk={Tk}" + (" (decode tiles)" if Tq <= attn._DECODE_BLOCK_M else "")
    _check(name, {"out": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, _reference(q, k, v, do))
    if Tq <= attn._DECODE_BLOCK_M and Tk > 16:  # split over keys (flash-decoding): the last split ends mid-tile
        o2, lse2 = attn.attention_fwd(q, k, v, True, splits=2)
        _check(f"{name}, 2 splits", {"out": o2, "lse": lse2}, _reference(q, k, v, do))


OTHERS = [b for b in registry.BACKENDS if b not in ("torch", "triton")]


@pytest.mark.parametrize("backend", OTHERS)
def test_other_backends_at_every_offset(backend):
    if registry.unavailable_reason(backend, DEVICE) is not None:
        pytest.skip(registry.unavailable_reason(backend, DEVICE))
    fn = registry.build_ops(f"torch,attention={backend}", DEVICE).attention
    for Tq in (1, 5, 19):
        for offset in OFFSETS:
            q, k, v, do = _qkv(Tq, Tq + offset, seed=100 * Tq + offset)
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            y = fn(*leaves, causal=True)
            y.backward(do)
            got = {"out": y.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
            _check(f"{backend} Tq={Tq} Tk={Tq + offset}", got, _reference(q, k, v, do))
