"""Causal flash attention in Triton: the ``triton`` backend of the registry op ``attention``.

Contract: ``attention(q, k, v, causal=True, dropout_p=0.0)`` has the signature and semantics of
``gpt2_kernels.ref.attention``: the Tq queries are the last Tq of Tk key positions (query i sits at Tk - Tq + i), the scale
is 1/sqrt(hs) (hs = 32, 64 or 128), the softmax is taken in fp32 and the result comes back in q.dtype. No Tq x Tk matrix
is ever stored. Limits: dropout needs Tq * Tk < 2**31 per head; B * nh must stay within the grid's 65535 on axis 1.

Algorithm. Forward (``_attn_fwd_kernel``, one program per (query block, batch*head)): online softmax over key blocks in
base-2 units, fp32 running max / sum / accumulator, the per-row log-sum-exp saved in fp32; blocks every row sees run
unmasked, the causal diagonal and the ragged end of Tk masked, blocks past the diagonal are skipped, the heaviest query
blocks launch first. Backward: ``_attn_bwd_preprocess_kernel`` (delta = rowsum(dO * O)), then ``_attn_bwd_dkdv_kernel``
(one program per key block) and ``_attn_bwd_dq_kernel`` (one per query block) recompute P from the log-sum-exp: every
gradient block has a single writer (deterministic, no atomics) at the price of recomputing QK^T and dO V^T for dQ.
Dropout: a Philox stream per (batch, head), counter row * Tk + col, redrawn by the backward; ``dropout_keep_mask``
materialises it for tests. Inputs are read by strides when the feature dimension is unit-stride and rows start 16-byte
aligned (the model's q/k/v views, KV-cache slices); other layouts are copied once. Cached decoding (``_decode_plan``):
Tq <= 16 without dropout runs one 16-row query tile and, inside a CUDA graph when B*nh programs leave SMs idle, splits
the keys over programs (flash-decoding: ``_attn_fwd_split_kernel``, then ``_attn_fwd_combine_kernel`` merges exactly,
same lse); called eagerly the combine's launch costs more host time than the split saves, so it does not split.

Tiles (``_TILES``, whose comments give each choice): one (BLOCK_M, BLOCK_N, warps, stages) per kernel, architecture,
head class and dropout, the largest that fits shared memory without spills, first of a short list (``_tile_list``:
``_SECOND`` adds one for head 32/64 without dropout on the tensor-core rows) among which a GPU picks by timing the
first time a shape bucket is met (``runtime.pick_tiles``; the interpreter runs the first); 16-row decode tiles; fp32 on IEEE FMA dots
(no TF32, so fp32 parity holds on a GPU); sm_75 has no tensor-core tl.dot. ``launch_configs`` lists every one and
``python -m gpt2_kernels.report`` compiles them for sm_75..sm_90 with no GPU.

Cost: ``bench.common.op_cost("attention", ...)`` gives the FLOPs and fewest bytes of a call; docs/performance.md holds
the measurements (H100 and CPU, each with its machine and date).
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from .aot import LaunchConfig
from .runtime import (
    LIBRARY,
    arch,
    capability,
    cdiv,
    check_dtype,
    interpreting,
    launch,
    pick_tiles,
    size_bucket,
    sm_count,
)

__all__ = ["AttentionFunction", "attention", "attention_bwd", "attention_fwd", "dropout_keep_mask", "launch_configs"]

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
HEAD_SIZES = (32, 64, 128)
# Philox counters are int32 element indices within one (batch, head): row * Tk + col, rows padded to a block.
_MAX_DROPOUT_ELEMS = 2**31 - 1
# Integers that change from call to call: Triton's JIT would turn each into a constexpr when it is 1 (seed = 1 then
# failed to compile: ``seed.to`` on a constant) and compile a variant per "divisible by 16" pattern, i.e. recompile as
# a decoding run's lengths grow. They are passed as plain i32 instead: one compiled kernel for every length and seed.
_VARYING = ("Tq", "Tk", "shift", "seed")


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, bh, idx, dropout_p):
    # One Philox stream per (batch, head): the key is (seed, bh) -- seed in the low 32 bits, bh in the high ones --
    # and the counter is the element's index row * Tk + col within that head. Every kernel calls this, so the
    # forward, both backward kernels and dropout_keep_mask draw the same bits for the same element.
    key = seed.to(tl.int64) + bh.to(tl.int64) * 4294967296
    return tl.rand(key, idx) >= dropout_p


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, end, offs_m, offs_n, shift, Tk, stride_kt, stride_vt,
                    qk_scale, seed, bh, dropout_p,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr):
    # Online softmax over the key blocks [start, end). Scores are kept in base-2 units (s * scale * log2 e) so exp2
    # does the exponentials; m_i is the running row max and l_i the running row sum of exp2(s - m_i).
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(tl.multiple_of(k_ptrs + start_n * stride_kt, [16, 16]), mask=(cols < Tk)[:, None], other=0.0)
        else:
            k = tl.load(tl.multiple_of(k_ptrs + start_n * stride_kt, [16, 16]))
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N) fp32
        if MASKED:
            # key j is visible to query row i iff j <= i + shift (shift = Tk - Tq causal, Tk otherwise) and j < Tk
            visible = (cols[None, :] <= offs_m[:, None] + shift) & (cols[None, :] < Tk)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped weights too
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None] * Tk + cols[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        if MASKED:
            v = tl.load(tl.multiple_of(v_ptrs + start_n * stride_vt, [16, 16]), mask=(cols < Tk)[:, None], other=0.0)
        else:
            v = tl.load(tl.multiple_of(v_ptrs + start_n * stride_vt, [16, 16]))
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_VARYING)
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # q (B, nh, Tq, HEAD), k and v (B, nh, Tk, HEAD), out o (B, nh, Tq, HEAD), out lse fp32 (B*nh, Tq)
    stride_qb, stride_qh, stride_qt,  # q strides in elements: batch, head, position (feature: 1)
    stride_kb, stride_kh, stride_kt,  # k strides
    stride_vb, stride_vh, stride_vt,  # v strides
    stride_ob, stride_oh, stride_ot,  # o strides
    nh, Tq, Tk,  # heads, query and key positions
    shift,  # query row i sees keys j <= i + shift: Tk - Tq when causal, Tk (everything) otherwise
    qk_scale,  # log2(e) / sqrt(HEAD): scores in base-2 units
    seed,  # dropout seed (unused without DROPOUT)
    dropout_p,  # drop probability
    keep_scale,  # 1 / (1 - dropout_p), the inverted-dropout scale (1 without dropout)
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
):
    # The heaviest causal query blocks (the last ones) start first, so the short ones fill the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD)
    row_ok = offs_m < Tq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    q = tl.load(tl.multiple_of(q_ptrs, [16, 16]), mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)

    # Keys [0, full_end) are visible to every row of this block and lie inside Tk: no mask. Keys [full_end, hi) hold
    # the causal diagonal and the ragged end of Tk: masked. Keys >= hi are invisible to the whole block: skipped.
    m0 = pid_m * BLOCK_M
    hi = tl.minimum(Tk, m0 + BLOCK_M + shift)
    full_end = tl.minimum((m0 + shift + 1) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, 0, full_end, offs_m, offs_n, shift, Tk,
                                    stride_kt, stride_vt, qk_scale, seed, bh, dropout_p,
                                    BLOCK_N, False, DROPOUT)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, full_end, hi, offs_m, offs_n, shift, Tk,
                                    stride_kt, stride_vt, qk_scale, seed, bh, dropout_p,
                                    BLOCK_N, True, DROPOUT)

    # Every row sees key 0, so l_i >= 1 and nothing here divides by zero.
    o = acc * (keep_scale / l_i)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(tl.multiple_of(o_ptrs, [16, 16]), o.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # times ln 2: the natural-log LSE of the scores
    tl.store(LSE + bh * Tq + offs_m, lse, mask=row_ok)


# Flash-decoding: with few queries (Tq <= BLOCK_M = 16) the grid above is only B*nh programs, each walking all Tk keys.
# The split kernel cuts the keys into chunks of ``chunk`` keys (a multiple of BLOCK_N), one program per (chunk,
# batch*head), each leaving the online softmax's state of its chunk: running max m_s (base 2), running sum l_s and the
# unnormalised accumulator acc_s = sum_j exp2(s_j - m_s) v_j. The combine kernel merges them exactly:
#   m = max_s m_s,   l = sum_s l_s exp2(m_s - m),   o = sum_s acc_s exp2(m_s - m) / l,   lse = (m + log2 l) ln 2.
# A row may see no key of a chunk (causal, a chunk past its diagonal): its state starts from the finite -1e30, not
# -inf, so that it stays (m_s, 0, 0) without a NaN and weighs exp2(-1e30 - m) = 0 in the merge.
_NO_KEY = tl.constexpr(-1.0e30)


@triton.jit(do_not_specialize=("Tq", "Tk", "shift", "chunk"))
def _attn_fwd_split_kernel(
    Q, K, V,  # q (B, nh, Tq, HEAD) with Tq <= BLOCK_M, k and v (B, nh, Tk, HEAD)
    PACC, PMAX, PSUM,  # out, per (batch*head, split, query row), fp32: the unnormalised accumulator
    # (B*nh, splits, Tq, HEAD), the running max in base-2 units and the running sum (B*nh, splits, Tq)
    stride_qb, stride_qh, stride_qt,  # q strides in elements: batch, head, position (feature: 1)
    stride_kb, stride_kh, stride_kt,  # k strides
    stride_vb, stride_vh, stride_vt,  # v strides
    nh, Tq, Tk,  # heads, query and key positions
    shift,  # query row i sees keys j <= i + shift: Tk - Tq when causal, Tk otherwise
    chunk,  # keys per split, a multiple of BLOCK_N; split s reads keys [s chunk, (s + 1) chunk)
    qk_scale,  # log2(e) / sqrt(HEAD)
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD)
    row_ok = offs_m < Tq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    q = tl.load(tl.multiple_of(q_ptrs, [16, 16]), mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], _NO_KEY, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    # The forward's key ranges (one query block at m0 = 0), cut to this split: [lo, mid) unmasked, [mid, end) masked.
    hi = tl.minimum(Tk, BLOCK_M + shift)
    full_end = tl.minimum((shift + 1) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N)
    lo = split * chunk
    end = tl.minimum(lo + chunk, hi)
    mid = tl.maximum(lo, tl.minimum(end, full_end))
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, lo, mid, offs_m, offs_n, shift, Tk,
                                    stride_kt, stride_vt, qk_scale, 0, bh, 0.0,
                                    BLOCK_N, False, False)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, mid, end, offs_m, offs_n, shift, Tk,
                                    stride_kt, stride_vt, qk_scale, 0, bh, 0.0,
                                    BLOCK_N, True, False)

    part = (bh.to(tl.int64) * tl.num_programs(0) + split) * Tq + offs_m  # (batch*head, split, row) index
    tl.store(PMAX + part, m_i, mask=row_ok)
    tl.store(PSUM + part, l_i, mask=row_ok)
    tl.store(PACC + part[:, None] * HEAD + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=("Tq", "splits"))
def _attn_fwd_combine_kernel(
    PACC, PMAX, PSUM,  # the split kernel's fp32 partials: (B*nh, splits, Tq, HEAD), (B*nh, splits, Tq) twice
    O, LSE,  # out o (B, nh, Tq, HEAD), out lse fp32 (B*nh, Tq)
    stride_ob, stride_oh, stride_ot,  # o strides in elements: batch, head, position (feature: 1)
    nh, Tq,  # heads, query positions (Tq <= BLOCK_M)
    splits,  # key splits to merge
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD)
    row_ok = offs_m < Tq

    m = tl.full([BLOCK_M], _NO_KEY, dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    for split in range(splits):
        part = (bh.to(tl.int64) * splits + split) * Tq + offs_m
        m_s = tl.load(PMAX + part, mask=row_ok, other=_NO_KEY)
        l_s = tl.load(PSUM + part, mask=row_ok, other=0.0)
        acc_s = tl.load(PACC + part[:, None] * HEAD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.math.exp2(m - m_new)
        beta = tl.math.exp2(m_s - m_new)
        l_sum = l_sum * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new

    # Split 0 holds key 0, which every row sees: l_sum >= 1 on every real row; padded rows divide by 1.
    l_sum = tl.where(row_ok, l_sum, 1.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(tl.multiple_of(o_ptrs, [16, 16]), (acc / l_sum[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * Tq + offs_m, (m + tl.math.log2(l_sum)) * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=("Tq",))
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,  # o and do (B, nh, Tq, HEAD), out delta fp32 (B*nh, Tq)
    stride_ob, stride_oh, stride_ot,  # o strides in elements: batch, head, position (feature: 1)
    stride_db, stride_dh, stride_dt,  # do strides
    nh, Tq,  # heads, query positions
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id O_id = sum_j dP_ij P_ij (see the backward derivation below), in fp32.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD)
    row_ok = offs_m < Tq
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    o = tl.load(tl.multiple_of(o_ptrs, [16, 16]), mask=row_ok[:, None], other=0.0)
    do_ptrs = DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :]
    do = tl.load(tl.multiple_of(do_ptrs, [16, 16]), mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Tq + offs_m, delta, mask=row_ok)


# Backward. With S = scale Q K^T, P = softmax(S) row-wise, Z = P * M / (1 - p) (M the dropout keep-mask; Z = P
# without dropout) and O = Z V, for an upstream gradient dO:
#   dV = Z^T dO
#   dZ = dO V^T,   dP = dZ * M / (1 - p)
#   dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_j Z_ij dZ_ij = sum_d dO_id O_id  (softmax Jacobian)
#   dQ = scale dS K,   dK = scale dS^T Q
# P is recomputed from the saved log-sum-exp: P_ij = exp(S_ij - lse_i), so no Tq x Tk matrix is ever stored. The
# dK/dV kernel walks the query blocks for one key block; the dQ kernel walks the key blocks for one query block.
# Each output block has exactly one writer: deterministic, no atomics.


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_bh, DELTA_bh, start, end, offs_m, offs_n, shift, Tq, Tk,
                         stride_qt, stride_dt, qk_scale, seed, bh, dropout_p, keep_scale,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr):
    # Transposed tiles (keys x queries) so that dK, dV accumulate as (BLOCK_N, HEAD) rows.
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Tq
        # Rows past Tq load q = dO = lse = delta = 0 and so add exactly zero to dK and dV.
        q = tl.load(tl.multiple_of(q_ptrs + start_m * stride_qt, [16, 16]), mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE_bh + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        sT = tl.dot(k, tl.trans(q), input_precision="ieee")  # (BLOCK_N, BLOCK_M) = S^T / scale
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= rows[None, :] + shift, pT, 0.0)
        do = tl.load(tl.multiple_of(do_ptrs + start_m * stride_dt, [16, 16]), mask=row_ok[:, None], other=0.0)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[None, :] * Tk + offs_n[:, None], dropout_p)
            zT = tl.where(keep, pT * keep_scale, 0.0)
        else:
            zT = pT
        dv = tl.dot(zT.to(do.dtype), do, dv, input_precision="ieee")
        delta = tl.load(DELTA_bh + rows, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BLOCK_N, BLOCK_M) = dZ^T
        if DROPOUT:
            dpT = tl.where(keep, dpT * keep_scale, 0.0)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision="ieee")
    return dk, dv


@triton.jit(do_not_specialize=_VARYING)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # q, do (B, nh, Tq, HEAD); k, v (B, nh, Tk, HEAD); lse, delta fp32 (B*nh, Tq);
    # out dk, dv contiguous (B, nh, Tk, HEAD)
    stride_qb, stride_qh, stride_qt,  # q strides in elements: batch, head, position (feature: 1)
    stride_kb, stride_kh, stride_kt,  # k strides
    stride_vb, stride_vh, stride_vt,  # v strides
    stride_db, stride_dh, stride_dt,  # do strides
    nh, Tq, Tk,  # heads, query and key positions
    shift,  # query row i sees keys j <= i + shift: Tk - Tq when causal, Tk otherwise
    qk_scale,  # log2(e) / sqrt(HEAD)
    sm_scale,  # 1 / sqrt(HEAD)
    seed,  # dropout seed (unused without DROPOUT)
    dropout_p,  # drop probability
    keep_scale,  # 1 / (1 - dropout_p)
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD)
    col_ok = offs_n < Tk

    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(tl.multiple_of(k_ptrs, [16, 16]), mask=col_ok[:, None], other=0.0)
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    v = tl.load(tl.multiple_of(v_ptrs, [16, 16]), mask=col_ok[:, None], other=0.0)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :]
    LSE_bh = LSE + bh * Tq
    DELTA_bh = DELTA + bh * Tq

    dk = tl.zeros([BLOCK_N, HEAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD], dtype=tl.float32)
    # Query rows [lo, mid) see only part of this key block (masked); rows [mid, Tq) see all of it; rows < lo none.
    last_key = tl.minimum(n0 + BLOCK_N, Tk) - 1
    lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
    end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    mid = tl.minimum(tl.cdiv(tl.maximum(last_key - shift, 0), BLOCK_M) * BLOCK_M, end)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_bh, DELTA_bh, lo, mid, offs_m, offs_n, shift,
                                  Tq, Tk, stride_qt, stride_dt, qk_scale, seed, bh, dropout_p, keep_scale,
                                  BLOCK_M, True, DROPOUT)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_bh, DELTA_bh, mid, end, offs_m, offs_n, shift,
                                  Tq, Tk, stride_qt, stride_dt, qk_scale, seed, bh, dropout_p, keep_scale,
                                  BLOCK_M, False, DROPOUT)

    out = bh.to(tl.int64) * Tk * HEAD + offs_n[:, None] * HEAD + offs_d[None, :]
    tl.store(tl.multiple_of(DK + out, [16, 16]), (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(tl.multiple_of(DV + out, [16, 16]), dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start, end, offs_m, offs_n, shift, Tk,
                       stride_kt, stride_vt, qk_scale, seed, bh, dropout_p, keep_scale,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(tl.multiple_of(k_ptrs + start_n * stride_kt, [16, 16]), mask=(cols < Tk)[:, None], other=0.0)
            v = tl.load(tl.multiple_of(v_ptrs + start_n * stride_vt, [16, 16]), mask=(cols < Tk)[:, None], other=0.0)
        else:
            k = tl.load(tl.multiple_of(k_ptrs + start_n * stride_kt, [16, 16]))
            v = tl.load(tl.multiple_of(v_ptrs + start_n * stride_vt, [16, 16]))
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N) = S / scale
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where((cols[None, :] <= offs_m[:, None] + shift) & (cols[None, :] < Tk), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # (BLOCK_M, BLOCK_N) = dZ
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None] * Tk + cols[None, :], dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit(do_not_specialize=_VARYING)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # q, do (B, nh, Tq, HEAD); k, v (B, nh, Tk, HEAD); lse, delta fp32 (B*nh, Tq);
    # out dq contiguous (B, nh, Tq, HEAD)
    stride_qb, stride_qh, stride_qt,  # q strides in elements: batch, head, position (feature: 1)
    stride_kb, stride_kh, stride_kt,  # k strides
    stride_vb, stride_vh, stride_vt,  # v strides
    stride_db, stride_dh, stride_dt,  # do strides
    nh, Tq, Tk,  # heads, query and key positions
    shift,  # query row i sees keys j <= i + shift: Tk - Tq when causal, Tk otherwise
    qk_scale,  # log2(e) / sqrt(HEAD)
    sm_scale,  # 1 / sqrt(HEAD)
    seed,  # dropout seed (unused without DROPOUT)
    dropout_p,  # drop probability
    keep_scale,  # 1 / (1 - dropout_p)
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest causal blocks first, as in the forward
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD)
    row_ok = offs_m < Tq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]

    q = tl.load(tl.multiple_of(q_ptrs, [16, 16]), mask=row_ok[:, None], other=0.0)
    do_ptrs = DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :]
    do = tl.load(tl.multiple_of(do_ptrs, [16, 16]), mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh * Tq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    # Same key ranges as the forward: [0, full_end) unmasked, [full_end, hi) masked, the rest skipped.
    hi = tl.minimum(Tk, m0 + BLOCK_M + shift)
    full_end = tl.minimum((m0 + shift + 1) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, 0, full_end, offs_m, offs_n, shift, Tk,
                            stride_kt, stride_vt, qk_scale, seed, bh, dropout_p, keep_scale,
                            BLOCK_N, False, DROPOUT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, full_end, hi, offs_m, offs_n, shift, Tk,
                            stride_kt, stride_vt, qk_scale, seed, bh, dropout_p, keep_scale,
                            BLOCK_N, True, DROPOUT)

    out = bh.to(tl.int64) * Tq * HEAD + offs_m[:, None] * HEAD + offs_d[None, :]
    tl.store(tl.multiple_of(DQ + out, [16, 16]), (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=("Tq", "Tk", "seed"))
def _dropout_mask_kernel(
    MASK,  # out int8 (B*nh, Tq, Tk), 1 where the attention weight is kept
    Tq, Tk,  # query and key positions
    seed,  # dropout seed
    dropout_p,  # drop probability
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = rows[:, None] * Tk + cols[None, :]
    keep = _dropout_keep(seed, bh, idx, dropout_p)
    tl.store(MASK + bh.to(tl.int64) * Tq * Tk + idx, keep.to(tl.int8), mask=(rows[:, None] < Tq) & (cols[None, :] < Tk))


# ----------------------------------------------------------------------------------------------------------------------
# Tiles and launchers
# ----------------------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and architecture class; fp16/bf16 keyed by (head class,
# dropout), where head sizes 32 and 64 share the "64" row; fp32 keyed by "fp32". BLOCK_M counts query rows and BLOCK_N
# key rows in every kernel. fp16/bf16 dots run on tensor cores with fp32 accumulation; fp32 dots are IEEE FMA loops
# whose operands live in registers, hence their small tiles. Dropout costs registers (Philox on every element of a
# score tile), so its tiles are smaller where the plain ones would spill. Every entry was compiled ahead of time for
# its architecture and checked for shared memory and spills (see launch_configs and the module docstring).
_FP32 = {"fwd": (32, 32, 8, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 8, 1)}
# sm_75's fp16/bf16 FMA dots hold operands and their fp32 conversions: 8 warps for the backward keep them in registers.
_SM75 = {"fwd": (32, 32, 8, 1), "dkdv": (16, 16, 8, 1), "dq": (16, 16, 8, 1)}
# Decode tiles ("decode": the forward and the split kernel for Tq <= 16 queries, no dropout): one 16-row query tile
# (the fewest rows of a tensor-core tl.dot) and a long key block. The kernels stream K and V, so each stage should
# carry a large load (BLOCK_N * HEAD * e bytes of K and as many of V) and several stages keep loads in flight.
_DECODE_BLOCK_M = 16
_DECODE_FP32 = (16, 32, 8, 1)  # ptxas spilled 16x64 with 4 warps (sm_80/86/89) and 2 stages with 8 (sm_80, hs=128)
_TILES = {
    "fwd": {
        90: {(64, False): (128, 128, 8, 3), (64, True): (128, 64, 8, 3),
             (128, False): (128, 64, 8, 3), (128, True): (128, 64, 8, 3), "fp32": _FP32["fwd"]},
        80: {(64, False): (128, 64, 4, 3), (64, True): (128, 64, 8, 3),
             (128, False): (128, 32, 8, 3), (128, True): (128, 32, 8, 3), "fp32": _FP32["fwd"]},
        86: {(64, False): (64, 64, 4, 2), (64, True): (64, 64, 4, 2),
             (128, False): (64, 32, 4, 2), (128, True): (64, 32, 4, 2), "fp32": _FP32["fwd"]},
        # Triton has no tensor-core path for tl.dot below sm_80: every dtype runs FMA dots, with small tiles.
        75: {(64, False): _SM75["fwd"], (64, True): _SM75["fwd"],
             (128, False): _SM75["fwd"], (128, True): _SM75["fwd"], "fp32": _FP32["fwd"]},
    },
    "dkdv": {
        90: {(64, False): (64, 128, 8, 2), (64, True): (32, 128, 8, 2),
             (128, False): (32, 128, 8, 2), (128, True): (32, 64, 8, 2), "fp32": _FP32["dkdv"]},
        80: {(64, False): (64, 128, 8, 2), (64, True): (32, 128, 8, 2),
             (128, False): (32, 64, 8, 2), (128, True): (32, 64, 8, 2), "fp32": _FP32["dkdv"]},
        86: {(64, False): (32, 128, 8, 2), (64, True): (32, 128, 8, 2),
             (128, False): (32, 64, 8, 2), (128, True): (32, 64, 8, 2), "fp32": _FP32["dkdv"]},
        75: {(64, False): _SM75["dkdv"], (64, True): _SM75["dkdv"],
             (128, False): _SM75["dkdv"], (128, True): _SM75["dkdv"], "fp32": _FP32["dkdv"]},
    },
    "dq": {
        90: {(64, False): (128, 64, 8, 2), (64, True): (128, 64, 8, 2),
             (128, False): (128, 32, 8, 2), (128, True): (128, 32, 8, 2), "fp32": _FP32["dq"]},
        80: {(64, False): (128, 32, 8, 2), (64, True): (128, 32, 8, 2),
             (128, False): (64, 32, 4, 2), (128, True): (64, 32, 4, 2), "fp32": _FP32["dq"]},
        86: {(64, False): (128, 32, 8, 2), (64, True): (128, 32, 8, 2),
             (128, False): (64, 32, 4, 2), (128, True): (64, 32, 4, 2), "fp32": _FP32["dq"]},
        75: {(64, False): _SM75["dq"], (64, True): _SM75["dq"],
             (128, False): _SM75["dq"], (128, True): _SM75["dq"], "fp32": _FP32["dq"]},
    },
    "decode": {
        90: {(64, False): (16, 128, 4, 3), (128, False): (16, 64, 4, 3), "fp32": _DECODE_FP32},
        80: {(64, False): (16, 128, 4, 3), (128, False): (16, 64, 4, 3), "fp32": _DECODE_FP32},
        86: {(64, False): (16, 64, 4, 3), (128, False): (16, 32, 4, 3), "fp32": _DECODE_FP32},
        75: {(64, False): (16, 32, 4, 1), (128, False): (16, 32, 4, 1), "fp32": _DECODE_FP32},
    },
}
# The second entry of the tile lists of GPT-2's case (head size 32 / 64, no dropout) on the tensor-core rows, which a
# GPU picks by timing against the first (runtime.pick_tiles): each is the table's own entry of a heavier case on the
# same row (dropout, or head 128), so it compiles there without spills. Every other list is its one entry.
_SECOND = {
    "fwd": {90: (128, 64, 8, 3), 80: (128, 64, 8, 3), 86: (64, 32, 4, 2)},
    "dkdv": {90: (32, 128, 8, 2), 80: (32, 128, 8, 2), 86: (32, 64, 8, 2)},
    "dq": {90: (128, 32, 8, 2), 80: (64, 32, 4, 2), 86: (64, 32, 4, 2)},
}
# Under the CPU interpreter: small, unequal tiles, so short test sequences still cross several blocks (full, diagonal
# and ragged) in every kernel. num_warps and num_stages mean nothing there.
_INTERPRETER_TILES = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "decode": (16, 16, 4, 1)}
_COMBINE_WARPS = 4
# Fewest keys per split (see _decode_plan and the module docstring): inside a CUDA graph, where the combine kernel
# costs ~3 us of GPU time, splits of 256 keys paid from Tk = 1024 on an H100; eagerly, where its launch costs ~65 us of
# host time, a split pays only once one program's walk over the keys outlasts the host (Tk >= 32768 at hs = 64).
_SPLIT_MIN_KEYS = 256
_SPLIT_MIN_KEYS_EAGER = 16384
_PREPROCESS_BLOCK_M = 32  # 64 rows of fp32 hs=128 spilled on sm_75
_MASK_BLOCK = (32, 64)
_CUDA = torch.device("cuda")
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _tile_list(kernel: str, dtype: torch.dtype, head: int, dropout: bool, device: torch.device,
               cc: int | None) -> tuple:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) entries one kernel picks among (``runtime.pick_tiles``): the
    table's, then ``_SECOND``'s where it has one; ``cc`` overrides the device's architecture."""
    if cc is None:
        if device.type != "cuda":
            return (_INTERPRETER_TILES[kernel],)
        cc = capability(device)
    row = arch(cc).tiles
    if dtype == torch.float32:
        return (_TILES[kernel][row]["fp32"],)
    key = (128 if head == 128 else 64, dropout)
    first = _TILES[kernel][row][key]
    second = _SECOND.get(kernel, {}).get(row) if key == (64, False) else None
    return (first, second) if second is not None and second != first else (first,)


def _tiles(kernel: str, dtype: torch.dtype, head: int, dropout: bool, device: torch.device, cc: int | None):
    """The first entry of ``_tile_list``: what the interpreter runs, and a GPU before (or without) timing."""
    return _tile_list(kernel, dtype, head, dropout, device, cc)[0]


def _decode_plan(B: int, nh: int, Tq: int, Tk: int, sms: int | None, dropout: bool = False,
                 graph: bool = False) -> tuple[bool, int]:
    """(decode, splits): whether the forward runs the decode tiles, and over how many key splits.

    Decode tiles serve Tq <= 16 queries without dropout (dropout keeps the training tiles). The keys are split when
    the B*nh programs leave SMs idle: S = min(sms // (B*nh), Tk // min_keys), so that B*nh*S programs fit the ``sms``
    streaming multiprocessors and each split keeps at least min_keys keys; S = 1 (no split, no combine launch) when
    that gives less than 2, and always under the interpreter (``sms`` None). min_keys prices the combine launch: under
    CUDA-graph capture (``graph``) it costs GPU time only (_SPLIT_MIN_KEYS); called eagerly it costs host time that a
    host-bound decoding step pays in full (_SPLIT_MIN_KEYS_EAGER). The module docstring has the numbers.
    """
    if Tq > _DECODE_BLOCK_M or dropout:
        return False, 1
    if sms is None:
        return True, 1
    min_keys = _SPLIT_MIN_KEYS if graph else _SPLIT_MIN_KEYS_EAGER
    return True, max(1, min(sms // (B * nh), Tk // min_keys))


def _split_keys(Tk: int, splits: int, block_n: int) -> tuple[int, int]:
    """(chunk, splits): keys per split, a whole number of key blocks, and the splits that then hold keys."""
    chunk = cdiv(cdiv(Tk, splits), block_n) * block_n
    return chunk, cdiv(Tk, chunk)


def _kernel_args(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of each argument of a ``@triton.jit`` kernel, compiled or interpreted alike."""
    params = inspect.signature(kernel.fn).parameters.values()
    return [(p.name, "constexpr" in str(p.annotation)) for p in params]


def _signature(kernel, types: dict) -> dict:
    # Every non-constexpr argument of ``kernel``, in order -> its Triton type; the unnamed ones are i32 strides/sizes.
    return {name: types.get(name, "i32") for name, const in _kernel_args(kernel) if not const}


def launch_configs(cc: int) -> list[LaunchConfig]:
    """Every (kernel, dtype, constexprs, num_warps, num_stages) the launchers can launch on compute capability ``cc``.

    For the static GPU-readiness report (``kernels/aot.py``): it compiles each entry for ``cc`` without a GPU.
    """
    configs = []
    for dtype, dt in _DTYPES.items():
        if dtype == torch.bfloat16 and cc < 80:
            continue  # refused by _check_inputs: no bf16 before sm_80
        io = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        fp32 = {n: "fp32" for n in ("qk_scale", "sm_scale", "dropout_p", "keep_scale")}
        types = {**io, **fp32, **{n: "*fp32" for n in ("LSE", "DELTA", "PACC", "PMAX", "PSUM")}}
        for head in HEAD_SIZES:
            configs.append(LaunchConfig(
                label=f"attention bwd_preprocess {dt} HEAD={head} BLOCK_M={_PREPROCESS_BLOCK_M}",
                kernel=_attn_bwd_preprocess_kernel, signature=_signature(_attn_bwd_preprocess_kernel, types),
                constexprs={"HEAD": head, "BLOCK_M": _PREPROCESS_BLOCK_M}, num_warps=4, num_stages=1))
            for kernel, fn in (("fwd", _attn_fwd_kernel), ("dkdv", _attn_bwd_dkdv_kernel), ("dq", _attn_bwd_dq_kernel)):
                for dropout, (block_m, block_n, warps, stages) in (
                        (d, t) for d in (False, True) for t in _tile_list(kernel, dtype, head, d, _CUDA, cc)):
                    configs.append(LaunchConfig(
                        label=f"attention {kernel} {dt} HEAD={head} BLOCK_M={block_m} BLOCK_N={block_n} "
                              f"DROPOUT={int(dropout)} warps={warps} stages={stages}",
                        kernel=fn, signature=_signature(fn, types),
                        constexprs={"HEAD": head, "BLOCK_M": block_m, "BLOCK_N": block_n, "DROPOUT": dropout},
                        num_warps=warps, num_stages=stages))
            configs += _decode_configs(dtype, head, types, cc)
    bm, bn = _MASK_BLOCK
    configs.append(LaunchConfig(
        label=f"attention dropout_mask BLOCK_M={bm} BLOCK_N={bn}", kernel=_dropout_mask_kernel,
        signature=_signature(_dropout_mask_kernel, {"MASK": "*i8", "dropout_p": "fp32"}),
        constexprs={"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1))
    return configs


def _decode_configs(dtype: torch.dtype, head: int, types: dict, cc: int) -> list[LaunchConfig]:
    """The decode forward (Tq <= 16, no dropout) at its tiles, the split kernel and the combine kernel."""
    bm, bn, warps, stages = _tiles("decode", dtype, head, False, _CUDA, cc)
    tiles = f"{_DTYPES[dtype]} HEAD={head} BLOCK_M={bm} BLOCK_N={bn}"
    return [
        LaunchConfig(label=f"attention decode fwd {tiles} DROPOUT=0 warps={warps} stages={stages}",
                     kernel=_attn_fwd_kernel, signature=_signature(_attn_fwd_kernel, types),
                     constexprs={"HEAD": head, "BLOCK_M": bm, "BLOCK_N": bn, "DROPOUT": False},
                     num_warps=warps, num_stages=stages),
        LaunchConfig(label=f"attention decode split {tiles} warps={warps} stages={stages}",
                     kernel=_attn_fwd_split_kernel, signature=_signature(_attn_fwd_split_kernel, types),
                     constexprs={"HEAD": head, "BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages),
        LaunchConfig(label=f"attention decode combine {_DTYPES[dtype]} HEAD={head} BLOCK_M={bm} "
                           f"warps={_COMBINE_WARPS} stages=1",
                     kernel=_attn_fwd_combine_kernel, signature=_signature(_attn_fwd_combine_kernel, types),
                     constexprs={"HEAD": head, "BLOCK_M": bm}, num_warps=_COMBINE_WARPS, num_stages=1),
    ]


def _check_inputs(q, k, v, causal, dropout_p) -> None:
    """Raise a TypeError/ValueError naming ``attention`` and the argument for anything the kernels do not support."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, nh, T, hs), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, nh, Tq, hs = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != nh or k.shape[3] != hs:
        raise ValueError(f"attention: k and v must be (B, nh, Tk, hs) = ({B}, {nh}, Tk, {hs}) to match q, "
                         f"got {tuple(k.shape)}")
    Tk = k.shape[2]
    if hs not in HEAD_SIZES:
        raise ValueError(f"attention: head size (q.shape[-1]) {hs} is not supported; supported: "
                         f"{', '.join(map(str, HEAD_SIZES))}")
    if Tq < 1 or B < 1 or nh < 1:
        raise ValueError(f"attention: q must have at least one batch, head and position, got {tuple(q.shape)}")
    if Tk < Tq:
        raise ValueError(f"attention: k has {Tk} positions, fewer than q's {Tq} (need Tq <= Tk)")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0.0 and (Tq + 128) * Tk > _MAX_DROPOUT_ELEMS:
        raise ValueError(f"attention: dropout indexes each head's (Tq + 128) x Tk weights in int32; Tq={Tq}, Tk={Tk} "
                         "is too long")
    if q.device.type == "cpu":
        if not interpreting():
            raise ValueError("attention: q is a CPU tensor but the Triton interpreter is off; "
                             "set TRITON_INTERPRET=1 or use a CUDA tensor")
        if q.dtype == torch.bfloat16:
            raise TypeError("attention: bfloat16 is not supported by the Triton CPU interpreter; "
                            "use float16/float32 or a CUDA tensor")
    elif q.device.type == "cuda":
        check_dtype("attention", q.device, q.dtype)
    elif q.device.type != "cuda":
        raise ValueError(f"attention: tensors on device type {q.device.type!r} are not supported; use CUDA "
                         "(or CPU with TRITON_INTERPRET=1)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Offsets within one (batch, head) are int32 in the kernels; the batch and head offsets are int64.
        if (t.shape[2] + 128) * t.stride(2) + hs >= 2**31:
            raise ValueError(f"attention: {name}'s strides {t.stride()} put one head's positions more than 2**31 "
                             "elements apart, which the kernels do not support")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if the kernels can read it by strides, else a fresh contiguous copy.

    The kernels tell the compiler (``tl.multiple_of``) that every row of a (B, nh, T, hs) operand starts on a 16-byte
    boundary and that the feature dimension is unit-stride, so that loads vectorise and pipeline the same way on every
    launch, whatever Triton's runtime specialisation sees. The model's q/k/v views of the fused c_attn output and its
    KV-cache slices satisfy this and are read in place; anything else (a non-unit feature stride, an odd offset) is
    copied once.
    """
    size, stride = t.shape, t.stride()
    row = 16 // t.element_size()  # elements in 16 bytes
    ok = (stride[3] == 1 and t.data_ptr() % 16 == 0 and (size[0] == 1 or stride[0] % row == 0)
          and (size[1] == 1 or stride[1] % row == 0) and (size[2] == 1 or stride[2] % row == 0))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    # Batch, head and position strides; 0 for a dimension of size 1 (its stride is never used, and may be odd).
    size, stride = t.shape, t.stride()
    return (stride[0] if size[0] > 1 else 0, stride[1] if size[1] > 1 else 0, stride[2] if size[2] > 1 else 0)


def _shift(Tq: int, Tk: int, causal: bool) -> int:
    # Query row i sees keys j <= i + shift: its absolute position Tk - Tq + i when causal; every key otherwise.
    return Tk - Tq if causal else Tk


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, dropout_p: float = 0.0,
                  seed: int = 0, *, cc: int | None = None,
                  splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: attention output and per-row log-sum-exp.

    Args:
        q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs), Tq <= Tk, any strides.
        causal: query i (absolute position Tk - Tq + i) sees keys 0 .. Tk - Tq + i only.
        dropout_p: attention-weight drop probability (inverted dropout).
        seed: the dropout seed (0 <= seed < 2**31); the same seed gives the same mask as ``dropout_keep_mask``.
        cc: use the tile table of this compute capability (e.g. 90) instead of the device's; for tests.
        splits: for a decode call (Tq <= 16, no dropout), split the keys into this many chunks instead of the number
            ``_decode_plan`` picks from the SM count (at most one per key block); for tests.
    Returns:
        o: (B, nh, Tq, hs) in q.dtype (a transposed view of a (B, Tq, nh, hs) buffer, so that the model's
            ``o.transpose(1, 2).contiguous()`` costs nothing); lse: (B, nh, Tq) fp32, the natural-log log-sum-exp of
            each row of scaled scores.
    """
    _check_inputs(q, k, v, causal, dropout_p)
    return _fwd(q, k, v, causal, dropout_p, seed, cc, splits)[:2]


def _bucket(B: int, nh: int, Tq: int, Tk: int, hs: int, causal: bool, dropout: bool) -> tuple:
    """The shape class a tile choice is timed for (``runtime.pick_tiles``)."""
    return ("hs", hs, "causal", causal, "dropout", dropout, "Tq", size_bucket(Tq), "Tk", size_bucket(Tk),
            "bh", size_bucket(B * nh))


def _fwd(q, k, v, causal: bool, dropout_p: float, seed: int, cc: int | None = None, splits: int | None = None):
    """``attention_fwd`` on checked inputs: (o, lse, q, k, v), the last three as the kernels read them (aligned)."""
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    dropout = dropout_p > 0.0
    graph = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    decode, planned = _decode_plan(B, nh, Tq, Tk, sm_count(q.device), dropout, graph)
    if splits is not None:
        if not decode or not isinstance(splits, int) or splits < 1:
            raise ValueError(f"attention: splits={splits!r} needs a decode call (Tq <= {_DECODE_BLOCK_M}, no dropout; "
                             f"got Tq={Tq}, dropout_p={dropout_p}) and a positive int")
        planned = splits
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    o = torch.empty(B, Tq, nh, hs, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, nh, Tq, hs)
    lse = torch.empty(B, nh, Tq, dtype=torch.float32, device=q.device)
    if decode:  # one entry: decode tiles are never timed (a CUDA graph captures this path)
        tiles = _tiles("decode", q.dtype, hs, dropout, q.device, cc)
        chunk, planned = _split_keys(Tk, planned, tiles[1])
        if planned > 1:
            _fwd_split(q, k, v, o, lse, _shift(Tq, Tk, causal), chunk, planned, tiles)
            return o, lse, q, k, v
    args = (q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), nh, Tq, Tk,
            _shift(Tq, Tk, causal), LOG2E / math.sqrt(hs), int(seed), float(dropout_p), 1.0 / (1.0 - float(dropout_p)))

    def run(tiles):
        block_m, block_n, warps, stages = tiles
        launch(_attn_fwd_kernel, (cdiv(Tq, block_m), B * nh), *args,
               HEAD=hs, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=dropout, num_warps=warps, num_stages=stages)

    if decode:
        run(tiles)
    else:
        run(pick_tiles("attention fwd", _tile_list("fwd", q.dtype, hs, dropout, q.device, cc), q.device,
                       _bucket(B, nh, Tq, Tk, hs, causal, dropout), q.dtype, run))
    return o, lse, q, k, v


def _fwd_split(q, k, v, o, lse, shift: int, chunk: int, splits: int, tiles: tuple) -> None:
    """Flash-decoding into ``o`` and ``lse``: each of ``splits`` chunks of ``chunk`` keys leaves its softmax state, a
    second launch merges them."""
    B, nh, Tq, hs = q.shape
    block_m, block_n, warps, stages = tiles
    # One fp32 buffer holds the three partials, each section starting on a 16-byte boundary: n (rows) x hs
    # accumulators, then n running maxima, then n running sums.
    n = B * nh * splits * Tq
    n16 = cdiv(n, 4) * 4
    part = torch.empty(n16 * (hs + 2), dtype=torch.float32, device=q.device)
    pacc, pmax, psum = part[: n * hs], part[n16 * hs: n16 * hs + n], part[n16 * (hs + 1): n16 * (hs + 1) + n]
    launch(_attn_fwd_split_kernel, (splits, B * nh), q, k, v, pacc, pmax, psum,
           *_strides(q), *_strides(k), *_strides(v), nh, Tq, k.shape[2], shift, chunk, LOG2E / math.sqrt(hs),
           HEAD=hs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    launch(_attn_fwd_combine_kernel, (B * nh,), pacc, pmax, psum, o, lse, *_strides(o), nh, Tq, splits,
           HEAD=hs, BLOCK_M=block_m, num_warps=_COMBINE_WARPS, num_stages=1)


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, causal: bool = True, dropout_p: float = 0.0, seed: int = 0, *,
                  cc: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: gradients of the attention output with respect to q, k and v.

    Args:
        do: (B, nh, Tq, hs) upstream gradient, any strides.
        q, k, v, causal, dropout_p, seed: as given to ``attention_fwd``.
        o, lse: what ``attention_fwd`` returned for them.
        cc: use the tile table of this compute capability instead of the device's; for tests.
    Returns:
        dq (B, nh, Tq, hs), dk (B, nh, Tk, hs), dv (B, nh, Tk, hs), contiguous, in q.dtype.
    """
    _check_inputs(q, k, v, causal, dropout_p)
    return _bwd(do, _aligned(q), _aligned(k), _aligned(v), o, lse, causal, dropout_p, seed, cc)


def _bwd(do, q, k, v, o, lse, causal: bool, dropout_p: float, seed: int, cc: int | None = None):
    """``attention_bwd`` on checked, aligned q, k, v (what ``_fwd`` returns); do, o and lse are checked here."""
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(f"attention: do and o must have q's shape {tuple(q.shape)}, got {tuple(do.shape)} and "
                         f"{tuple(o.shape)}")
    if lse.shape != (B, nh, Tq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"attention: lse must be a contiguous float32 ({B}, {nh}, {Tq}) tensor")
    o, do = _aligned(o), _aligned(do if do.dtype == q.dtype else do.to(q.dtype))
    delta = torch.empty(B, nh, Tq, dtype=torch.float32, device=q.device)
    launch(_attn_bwd_preprocess_kernel, (cdiv(Tq, _PREPROCESS_BLOCK_M), B * nh), o, do, delta,
           *_strides(o), *_strides(do), nh, Tq, HEAD=hs, BLOCK_M=_PREPROCESS_BLOCK_M, num_warps=4, num_stages=1)
    dq = torch.empty(B, nh, Tq, hs, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, nh, Tk, hs, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, nh, Tk, hs, dtype=q.dtype, device=q.device)
    sm_scale = 1.0 / math.sqrt(hs)
    dropout = dropout_p > 0.0
    inputs = (q, k, v, do, lse, delta)
    rest = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), nh, Tq, Tk, _shift(Tq, Tk, causal),
            LOG2E * sm_scale, sm_scale, int(seed), float(dropout_p), 1.0 / (1.0 - float(dropout_p)))
    bucket = _bucket(B, nh, Tq, Tk, hs, causal, dropout)

    def run_dkdv(tiles):
        block_m, block_n, warps, stages = tiles
        launch(_attn_bwd_dkdv_kernel, (cdiv(Tk, block_n), B * nh), *inputs, dk, dv, *rest,
               HEAD=hs, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=dropout, num_warps=warps, num_stages=stages)

    def run_dq(tiles):
        block_m, block_n, warps, stages = tiles
        launch(_attn_bwd_dq_kernel, (cdiv(Tq, block_m), B * nh), *inputs, dq, *rest,
               HEAD=hs, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=dropout, num_warps=warps, num_stages=stages)

    run_dkdv(pick_tiles("attention dkdv", _tile_list("dkdv", q.dtype, hs, dropout, q.device, cc), q.device, bucket,
                        q.dtype, run_dkdv))
    run_dq(pick_tiles("attention dq", _tile_list("dq", q.dtype, hs, dropout, q.device, cc), q.device, bucket,
                      q.dtype, run_dq))
    return dq, dk, dv


def dropout_keep_mask(seed: int, B: int, nh: int, Tq: int, Tk: int, dropout_p: float,
                      device: torch.device | str = "cuda") -> torch.Tensor:
    """The dropout keep-mask the attention kernels draw for ``seed``, for replay through ``gpt2_kernels.ref.attention``.

    Args:
        seed: as passed to ``attention_fwd`` / ``attention_bwd``.
        B, nh, Tq, Tk: the attention's batch, heads, query and key positions.
        dropout_p: the drop probability.
        device: where to generate it (CPU only under TRITON_INTERPRET=1).
    Returns:
        (B, nh, Tq, Tk) bool, True where the attention weight is kept.
    """
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    mask = torch.empty(B, nh, Tq, Tk, dtype=torch.int8, device=device)
    if mask.device.type == "cpu" and not interpreting():
        raise ValueError("attention: dropout_keep_mask on the CPU needs the Triton interpreter; "
                         "set TRITON_INTERPRET=1 or use a CUDA device")
    bm, bn = _MASK_BLOCK
    launch(_dropout_mask_kernel, (cdiv(Tq, bm), cdiv(Tk, bn), B * nh), mask, Tq, Tk, int(seed),
           float(dropout_p), BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)
    return mask.bool()


# ----------------------------------------------------------------------------------------------------------------------
# The registered ops (what torch.compile sees), autograd and the public op
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{LIBRARY}::attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, bool causal, float dropout_p, Tensor seed) "
                                "-> (Tensor o, Tensor lse)")
def _attention_fwd_op(q, k, v, causal, dropout_p, seed):
    # seed: a 0-dim int64 CPU tensor (an int drawn under torch.compile would be a host read, a graph break); read
    # here, on the host, for free.
    return attention_fwd(q, k, v, causal, dropout_p, int(seed))


@_attention_fwd_op.register_fake
def _(q, k, v, causal, dropout_p, seed):
    B, nh, Tq, hs = q.shape
    o = q.new_empty((B, Tq, nh, hs)).transpose(1, 2)  # the launcher's layout (see attention_fwd)
    return o, q.new_empty((B, nh, Tq), dtype=torch.float32)


@torch.library.custom_op(f"{LIBRARY}::attention_bwd", mutates_args=(),
                         schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, "
                                "float dropout_p, Tensor seed) -> (Tensor dq, Tensor dk, Tensor dv)")
def _attention_bwd_op(do, q, k, v, o, lse, causal, dropout_p, seed):
    return attention_bwd(do, q, k, v, o, lse, causal, dropout_p, int(seed))


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, causal, dropout_p, seed = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p = causal, dropout_p


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


class AttentionFunction(torch.autograd.Function):
    """Flash attention with the backward recomputing probabilities from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, dropout_p: float, seed: int):
        # The inputs were checked by ``attention``; the backward reads q, k, v as the forward did (aligned).
        o, lse, qa, ka, va = _fwd(q, k, v, causal, dropout_p, seed)
        ctx.save_for_backward(qa, ka, va, o, lse)
        ctx.causal, ctx.dropout_p, ctx.seed = causal, dropout_p, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention as one fused Triton kernel (softmax in fp32), differentiable.

    Same signature and semantics as ``gpt2_kernels.ref.attention``: the queries are the last Tq of the Tk key positions.
    The dropout seed is drawn from torch's default generator, so ``torch.manual_seed`` makes a run reproducible.

    Args:
        q: (B, nh, Tq, hs), hs in {32, 64, 128}, fp16/bf16/fp32, any strides.
        k, v: (B, nh, Tk, hs) with Tk >= Tq, same dtype and device as q, any strides (e.g. a KV-cache slice).
        causal: query i (absolute position Tk - Tq + i) sees keys 0 .. Tk - Tq + i only.
        dropout_p: probability of dropping an attention weight (inverted dropout, 1/(1-p) scale).
    Returns:
        (B, nh, Tq, hs) in q.dtype.
    """
    if torch.compiler.is_compiling():  # the registered op (it checks the inputs when it runs)
        seed = torch.randint(0, 2**31 - 1, (), device="cpu") if dropout_p > 0.0 else torch.zeros((), dtype=torch.long)
        return _attention_fwd_op(q, k, v, causal, float(dropout_p), seed)[0]
    _check_inputs(q, k, v, causal, dropout_p)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0
    return AttentionFunction.apply(q, k, v, causal, float(dropout_p), seed)
