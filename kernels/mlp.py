"""GPT-2's MLP, ``c_proj(gelu_tanh(c_fc(x)))``, on one tiled Triton matmul with fused epilogues.

Contract: ``mlp(x, w_fc, b_fc, w_proj, b_proj)`` is ``gpt2_kernels.ref.mlp`` (nn.Linear weight layout, either bias may be
None; fp32, fp16 or bf16, bf16 only on a GPU); weight gradients come back in each weight's own dtype.

Algorithm. Every product runs through ``_matmul_kernel`` (C = A @ B for operands of any strides, so a transposed weight
or activation is read in place, never copied), with the elementwise work folded into its epilogue:

    forward   pre = x @ w_fc^T + b_fc ; act = gelu(pre)    epilogue "gelu"   (bias, GELU, store pre)
              y   = act @ w_proj^T + b_proj                epilogue "none"   + bias
    backward  dpre = (dy @ w_proj) * gelu'(pre)            epilogue "gelu_grad" (+ partial column sums = db_fc)
              dw_proj = dy^T @ act ; dw_fc = dpre^T @ x    epilogue "none"   (split-K when the tile grid is small)
              dx = dpre @ w_fc                             epilogue "none";  db_proj = dy summed over rows in fp32

The forward saves x, pre and act: act has to be written anyway (it is c_proj's input), so keeping it costs activation
memory but no bytes or FLOPs, where saving pre alone would recompute gelu(pre) for dw_proj. db_fc sums each fp32 dpre
tile over its rows into a per-row-block partial that torch adds up: no re-read of dpre, no atomics, deterministic.
Weight gradients have a small output and a long K (= rows): K is split over a second grid axis into an fp32 workspace
that torch sums, by the smallest split that fills the last wave of programs >= 85% (``_auto_split_k``).

Tiles (``_TILES``, whose comments give each choice, first of a list ``_row_tiles`` that ``_SECOND`` extends on the
tensor-core rows and a GPU picks among by timing, ``runtime.pick_tiles``; ``launch_configs`` lists every entry,
compiled for sm_75..sm_90 by ``python -m gpt2_kernels.report``): the plain and bias epilogues take the largest tile whose fp32
accumulator leaves room for the loop (128 x 256 x 64 on sm_80 / sm_90), the GELU epilogues one that does not spill
(128 x 128 x 64), sm_86 / sm_89 and sm_75 smaller ones, calls of at most ``SMALL_M`` rows (decoding) 64 x 64 x 64;
fp32 runs IEEE dots on the CUDA cores (no TF32, so fp32 parity holds on a GPU). Program ids are grouped GROUP_M row
blocks at a time so that a wave shares A and B panels in L2.

Cost: ``bench.common.op_cost("mlp", ...)`` gives the FLOPs and fewest bytes of a call; docs/performance.md holds the
measurements (H100 and CPU, each with its machine and date) and what was predicted before them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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

__all__ = ["MLPFunction", "launch_configs", "matmul", "mlp", "mlp_bwd", "mlp_fwd"]

EPILOGUES = ("none", "gelu", "gelu_grad")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
#
# GELU (tanh form) and its derivative, written with s = sigmoid(2u) since 0.5 (1 + tanh(u)) = s:
#
#     u        = c (z + a z^3)                     c = sqrt(2 / pi), a = 0.044715
#     gelu(z)  = 0.5 z (1 + tanh u) = z s
#     gelu'(z) = 0.5 (1 + tanh u) + 0.5 z (1 - tanh^2 u) c (1 + 3 a z^2)
#              = s + 2 z s (1 - s) c (1 + 3 a z^2)      using 1 - tanh^2 u = 4 s (1 - s)
#
#
# Backward of y = gelu(x W_fc^T + b_fc) W_proj^T + b_proj for rows x (M, C), with dy = dL/dy (M, C):
#
#     dact    = dy W_proj                     (M, H)
#     dpre    = dact * gelu'(pre)             (M, H)   fused: the epilogue of the dact product
#     dW_proj = dy^T act                      (C, H)
#     db_proj = sum_rows dy                   (C,)
#     dW_fc   = dpre^T x                      (H, C)
#     db_fc   = sum_rows dpre                 (H,)     fused: per-tile partial sums of the epilogue
#     dx      = dpre W_fc                     (M, C)


@triton.jit
def _gelu_sigmoid(z):
    # s = sigmoid(2 u) = 0.5 (1 + tanh u) for u = c (z + a z^3); z in fp32.
    # exp(-2u) = exp2(z (k0 + k1 z^2)) with k0 = -2 c log2(e), k1 = k0 a. The exponent is capped
    # at 126 so exp2 stays finite: for z < -7.9 s is then 2^-126 instead of ~0, a change of z * 1e-38.
    e = tl.exp2(tl.minimum(z * (-2.302208198144325 - 0.1029432395800235 * z * z), 126.0))
    return 1.0 / (1.0 + e)


@triton.jit
def _matmul_kernel(
    a_ptr,  # A (M, K): the left operand, any strides
    b_ptr,  # B (K, N): the right operand, any strides
    c_ptr,  # C (M, N) result, or (SPLIT_K, M, N) fp32 partial products when K is split
    bias_ptr,  # (N,) bias, read only when HAS_BIAS
    pre_ptr,  # (M, N) pre-activation laid out like C: written by "gelu" if STORE_PRE, read by "gelu_grad"
    colsum_ptr,  # (cdiv(M, BLOCK_M), N) fp32 contiguous: per-row-block column sums of C, written if COL_SUM
    M, N, K,  # problem sizes
    k_split,  # K elements per program along grid axis 1, a multiple of BLOCK_K (>= K when not split)
    stride_am, stride_ak,  # A strides (row, reduction)
    stride_bk, stride_bn,  # B strides (reduction, column)
    stride_cs, stride_cm, stride_cn,  # C strides (split slice, row, column); pre shares the row/column ones
    EPILOGUE: tl.constexpr,  # "none", "gelu" (C = gelu(acc + bias)) or "gelu_grad" (C = acc * gelu'(pre))
    HAS_BIAS: tl.constexpr,  # add bias_ptr[col] to the product (before the GELU for "gelu")
    STORE_PRE: tl.constexpr,  # "gelu": also store acc + bias to pre_ptr for the backward
    COL_SUM: tl.constexpr,  # store the fp32 column sums of this tile's output rows to colsum_ptr
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks per group of the L2-friendly program order
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: consecutive programs walk down GROUP_M row blocks before moving one column
    # block right, so the B panels (and A panels) a wave touches are few and stay in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_split
    k_len = tl.minimum(K - k_start, k_split)  # this program's share of K
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit row/column offsets: M * H can pass 2^31 elements at long sequence x batch.
    a_ptrs = (a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
              + (k_start + offs_k).to(tl.int64)[None, :] * stride_ak)
    b_ptrs = (b_ptr + (k_start + offs_k).to(tl.int64)[:, None] * stride_bk
              + offs_n.to(tl.int64)[None, :] * stride_bn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(k_len, BLOCK_K)):
        mask_k = offs_k < k_len - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if a_ptr.dtype.element_ty == tl.float32:
            # IEEE fp32 products, not TF32: fp32 results must match the fp32 reference.
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            # fp16 / bf16 on the tensor cores, fp32 accumulation.
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # ---- epilogue, in fp32 registers
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    mask_c = mask_m[:, None] & mask_n[None, :]
    # 64-bit row offsets (M * N may pass 2^31) but 32-bit column offsets: the (BLOCK_M, BLOCK_N)
    # offset tensor stays in 32-bit registers, which keeps the epilogue from spilling.
    row_c = offs_m.to(tl.int64) * stride_cm  # (BLOCK_M,)
    col_c = offs_n * stride_cn  # (BLOCK_N,)
    if EPILOGUE == "gelu":
        if STORE_PRE:
            tl.store((pre_ptr + row_c)[:, None] + col_c[None, :], acc.to(pre_ptr.dtype.element_ty), mask=mask_c)
        acc = acc * _gelu_sigmoid(acc)
    elif EPILOGUE == "gelu_grad":
        z = tl.load((pre_ptr + row_c)[:, None] + col_c[None, :], mask=mask_c, other=0.0).to(tl.float32)
        s = _gelu_sigmoid(z)
        # c = sqrt(2 / pi) = 0.7978845608028654, 3 a = 0.134145 (gpt2_kernels.ref.GELU_C, GELU_A)
        acc = acc * (s + 2.0 * z * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * z * z))
    if COL_SUM:
        # Rows past M hold zeros (their A rows were loaded as 0 and pre as 0), but mask anyway.
        part = tl.sum(tl.where(mask_c, acc, 0.0), axis=0)  # (BLOCK_N,)
        tl.store(colsum_ptr + pid_m.to(tl.int64) * N + offs_n, part, mask=mask_n)
    c_rows = c_ptr + pid_k.to(tl.int64) * stride_cs + row_c  # (BLOCK_M,) row starts in this K slice
    tl.store(c_rows[:, None] + col_c[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask_c)


# --------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """One launch shape of ``_matmul_kernel``."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


# arch -> operand class ("lowp" = fp16 / bf16, "fp32") -> role -> tiles. Roles: "main" for the
# plain and bias epilogues (c_proj forward, dx, the weight gradients), "epilogue" for the GELU
# and GELU-gradient epilogues, "small" for every launch of a call with at most SMALL_M rows (decoding,
# tiny batches: the large tiles spread few rows over few programs, and spilled with one row). Shared memory per block:
# sm_75 64 KB, sm_80 163 KB, sm_86 / sm_89 99 KB, sm_90 227 KB.
#  - 128 x 256 x 64, 8 warps: the largest tile whose fp32 accumulator (128 registers a thread)
#    leaves room for the loop; the GELU epilogues spill at that size (fp32 acc + the pre tile or
#    the pre store pass 255 registers), so they use 128 x 128 x 64 with 8 warps (64 acc regs).
#  - sm_86 / sm_89: 128 x 128 x 64, 3 stages (64 KB of 99 KB; 4 stages would leave no margin).
#  - sm_75: Triton >= 3.3 has no mma for cc < 80 and runs every dot on the CUDA cores; 64 x 64 x 16
#    is the tile that does not spill there for fp16 and fp32 alike (x 32 spills on fp16).
#  - fp32 runs on the CUDA cores (IEEE dots): 32 x 64 x 32, 4 warps (16 accumulators a thread); 64 x 64
#    spilled on sm_80 for the weight-gradient layout once M is not known to be a multiple of 16 (M is not
#    specialised: the batch changes call to call), as compiling recorded launches showed.
_LOWP_90 = {"main": Tiles(128, 256, 64, 8, 8, 3), "epilogue": Tiles(128, 128, 64, 8, 8, 4),
            "small": Tiles(64, 64, 64, 8, 4, 4)}
_FP32 = {role: Tiles(32, 64, 32, 8, 4, 3) for role in ("main", "epilogue", "small")}
_SM75 = {role: Tiles(64, 64, 16, 8, 4, 2) for role in ("main", "epilogue", "small")}
_TILES = {
    90: {"lowp": _LOWP_90, "fp32": _FP32},
    80: {"lowp": _LOWP_90, "fp32": _FP32},
    86: {"lowp": {"main": Tiles(128, 128, 64, 8, 8, 3), "epilogue": Tiles(128, 128, 64, 8, 8, 3),
                  "small": Tiles(64, 64, 64, 8, 4, 3)},
         "fp32": _FP32},
    75: {"lowp": _SM75, "fp32": _SM75},
}
# The second entries of the low-precision lists on the tensor-core rows, which a GPU picks by timing against the
# table's (runtime.pick_tiles). sm_80 / sm_90: "main" takes the GELU tile (128 x 128, 4 stages), "epilogue" half its
# rows at 4 warps (as many accumulators a thread). sm_86 / sm_89: "main" takes its own "small" tile (64 x 64 x 64:
# 64 x 128 spilled 4 bytes in the weight-gradient layout there), "epilogue" 64 x 128 at 4 warps. The report compiles
# each for its rows without spills.
_SECOND = {
    90: {"main": Tiles(128, 128, 64, 8, 8, 4), "epilogue": Tiles(64, 128, 64, 8, 4, 4)},
    80: {"main": Tiles(128, 128, 64, 8, 8, 4), "epilogue": Tiles(64, 128, 64, 8, 4, 4)},
    86: {"main": Tiles(64, 64, 64, 8, 4, 3), "epilogue": Tiles(64, 128, 64, 8, 4, 3)},
}
# Under the CPU interpreter the block shape only sets how much numpy work each program does.
_INTERPRETER_TILES = Tiles(32, 32, 32, 4, 4, 1)
SMALL_M = 64
_MAX_SPLIT_K = 8
_MIN_K_PER_SPLIT = 512


def _default_role(epilogue: str) -> str:
    return "main" if epilogue == "none" else "epilogue"


def _row_tiles(row: int, dtype: torch.dtype, role: str) -> tuple:
    """The tiles of one role that a launch on architecture row ``row`` picks among: the table's, then ``_SECOND``'s
    (fp16 / bf16 only)."""
    first = _TILES[row]["fp32" if dtype == torch.float32 else "lowp"][role]
    second = _SECOND.get(row, {}).get(role) if dtype != torch.float32 else None
    return (first, second) if second is not None and second != first else (first,)


@functools.cache
def _tile_list(device: torch.device, dtype: torch.dtype, role: str) -> tuple:
    """``_row_tiles`` for ``device``'s architecture; the interpreter's one tile on the CPU."""
    if device.type != "cuda":
        return (_INTERPRETER_TILES,)
    return _row_tiles(arch(capability(device)).tiles, dtype, role)


def _auto_split_k(tiles: int, K: int, sms: int) -> int:
    """Split of K that fills the SMs with whole waves of programs.

    The smallest split whose last wave is at least 85% full, among splits that leave each program
    >= _MIN_K_PER_SPLIT of K; otherwise the best-filled one. 1 when the grid already has many waves.
    """
    if tiles >= 4 * sms:
        return 1
    best, best_eff = 1, 0.0
    for s in range(1, _MAX_SPLIT_K + 1):
        if s > 1 and K < s * _MIN_K_PER_SPLIT:
            break
        programs = tiles * s
        eff = programs / (math.ceil(programs / sms) * sms)
        if eff >= 0.85:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


# The launches ``mlp_fwd`` / ``mlp_bwd`` make: (site, the strides that are 1 there, epilogue, HAS_BIAS,
# STORE_PRE, COL_SUM, output in fp32, tile roles, the size that is the row count: M, or K for the weight
# gradients). Up to SMALL_M rows (decoding, tiny batches) every launch takes the small tiles; one row makes that
# size a constexpr 1 as well. Triton's JIT turns an integer argument equal to 1
# into a constexpr, so each operand layout is its own compiled kernel. To keep that list short the
# launchers vary as little as they can: a missing bias is passed as zeros, dpre always writes its column
# sums, the weight gradients always land in fp32 (the split-K workspace, or the output then rounded).
_NT = ("stride_ak", "stride_bk", "stride_cn")  # x @ w^T: both operands contiguous along K
_NN = ("stride_ak", "stride_bn", "stride_cn")  # dpre @ w, dy @ w_proj: B contiguous along N
_TN = ("stride_am", "stride_bn", "stride_cn")  # dy^T @ act, dpre^T @ x: A contiguous along M
_SITES = (
    ("c_fc fwd train", _NT, "gelu", True, True, False, False, ("epilogue", "small"), "M"),
    ("c_fc fwd infer", _NT, "gelu", True, False, False, False, ("epilogue", "small"), "M"),
    ("c_proj fwd", _NT, "none", True, False, False, False, ("main", "small"), "M"),
    ("dpre", _NN, "gelu_grad", False, False, True, False, ("epilogue", "small"), "M"),
    ("dx", _NN, "none", False, False, False, False, ("main", "small"), "M"),
    ("dw", _TN, "none", False, False, False, True, ("main", "small"), "K"),
)


def launch_configs(cc: int) -> list[LaunchConfig]:
    """Every launch of ``_matmul_kernel`` that ``mlp_fwd`` / ``mlp_bwd`` can make on compute capability ``cc``.

    One entry per dtype x launch site (operand layout and epilogue, see ``_SITES``) x tile role (the
    large tiles; the small ones for an inference forward of M <= SMALL_M, also with M = 1). Sizes and
    strides that are 1 at a site are listed as constexprs of value 1, as the JIT specializes them (a
    training step of a single row would specialize too and is not listed). The JIT also marks pointers and integers
    divisible by 16 (``tt.divisibility``); compile with those attributes to see the vectorized,
    pipelined kernel that runs. bf16 is not offered on sm_75 (no bf16 tensor cores there), where
    ``mlp`` refuses it.

    Args:
        cc: compute capability as an int, e.g. 75, 80, 86, 89, 90.
    Returns:
        A list of ``gpt2_kernels.aot.LaunchConfig``.
    """
    row = arch(cc).tiles
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cc >= 80 else [])
    ints = ("M", "N", "K", "k_split", "stride_am", "stride_ak", "stride_bk", "stride_bn",
            "stride_cs", "stride_cm", "stride_cn")
    out = []
    for dtype in dtypes:
        t = names[dtype]
        for site, unit, epi, has_bias, store_pre, col_sum, c_fp32, roles, rows in _SITES:
            # distinct tiles of every list, in order; a small-tile site also runs with one row (sampling a single
            # token), where the JIT makes the row count a constexpr 1 as well
            variants = dict.fromkeys((tiles, ones) for r in roles for tiles in _row_tiles(row, dtype, r)
                                     for ones in ((unit, (unit + (rows,))) if r == "small" else (unit,)))
            for tiles, ones in variants:
                c = "*fp32" if c_fp32 else f"*{t}"
                # unused pointers are passed as another tensor (a for bias and pre, the output for colsum): their
                # dtype is still part of the compiled signature
                signature = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": c, "bias_ptr": f"*{t}", "pre_ptr": f"*{t}",
                             "colsum_ptr": "*fp32" if col_sum else c}
                signature.update({name: "i32" for name in ints if name not in ones})
                constexprs = {name: 1 for name in ones}
                constexprs.update({
                    "EPILOGUE": epi, "HAS_BIAS": has_bias, "STORE_PRE": store_pre, "COL_SUM": col_sum,
                    "BLOCK_M": tiles.BLOCK_M, "BLOCK_N": tiles.BLOCK_N, "BLOCK_K": tiles.BLOCK_K,
                    "GROUP_M": tiles.GROUP_M,
                })
                out.append(LaunchConfig(
                    label=(f"mlp {site}{f' {rows}=1' if rows in ones else ''} {epi} {t} BLOCK_M={tiles.BLOCK_M} "
                           f"BLOCK_N={tiles.BLOCK_N} BLOCK_K={tiles.BLOCK_K}"),
                    kernel=_matmul_kernel, signature=signature, constexprs=constexprs,
                    num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                ))
    return out


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *, epilogue: str = "none",
           pre: torch.Tensor | None = None, col_sum: bool = False, out_dtype: torch.dtype | None = None,
           split_k: int | None = 1, role: str | None = None, tiles: Tiles | None = None):
    """C = epilogue(A @ B) with fp32 accumulation, through ``_matmul_kernel``.

    Operands may have any strides (pass ``w.t()`` for a transposed weight; nothing is copied).

    Args:
        a: (M, K) fp32 / fp16 / bf16.
        b: (K, N), same dtype as ``a``.
        bias: (N,) or None, added to the product.
        epilogue: "none"; "gelu" (C = gelu_tanh(A @ B + bias); if ``pre`` is given, A @ B + bias is
            also written into it); "gelu_grad" (C = (A @ B) * gelu_tanh'(pre), ``pre`` required).
        pre: (M, N) contiguous tensor of a's dtype: output buffer for "gelu", input for "gelu_grad".
        col_sum: also return the fp32 column sums of C (before rounding to the output dtype).
        out_dtype: dtype of C, default a's dtype.
        split_k: split K over this many programs per tile (epilogue "none" without bias only);
            None picks one from the SM count on a GPU (1 under the interpreter). Only the weight
            gradients ask for it, so they are the only launches whose output is an fp32 workspace.
        role: which tiles of ``_TILES`` to use: "main", "epilogue" or "small"; default "main" for
            epilogue "none", else "epilogue".
        tiles: force a tile configuration (tests); overrides ``role``.
    Returns:
        C (M, N) contiguous, or (C, colsum (N,) fp32) when ``col_sum``.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"matmul: unknown epilogue {epilogue!r}; supported: {', '.join(EPILOGUES)}")
    M, K = a.shape
    K2, N = b.shape
    if K2 != K:
        raise ValueError(f"matmul: a is {tuple(a.shape)} and b is {tuple(b.shape)}; inner sizes differ")
    if b.dtype != a.dtype:
        raise ValueError(f"matmul: a is {a.dtype} and b is {b.dtype}; operands must share a dtype")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"matmul: bias must have shape ({N},), got {tuple(bias.shape)}")
    if epilogue == "gelu_grad" and pre is None:
        raise ValueError("matmul: epilogue 'gelu_grad' needs the pre-activation `pre`")
    if pre is not None and (pre.shape != (M, N) or not pre.is_contiguous() or pre.dtype != a.dtype):
        raise ValueError(f"matmul: pre must be a contiguous ({M}, {N}) {a.dtype} tensor")
    splittable = epilogue == "none" and bias is None and not col_sum
    if split_k is not None and (split_k < 1 or (split_k > 1 and not splittable)):
        raise ValueError(f"matmul: split_k={split_k} needs epilogue 'none' without bias or column sums")
    return _matmul(a, b, bias, epilogue, pre, col_sum, out_dtype, split_k, role, tiles)


def _matmul(a, b, bias=None, epilogue: str = "none", pre=None, col_sum: bool = False, out_dtype=None,
            split_k: int | None = 1, role: str | None = None, tiles: Tiles | None = None):
    """``matmul`` on checked arguments (what ``mlp_fwd`` / ``mlp_bwd`` call): picks the tiles (timed on a GPU the
    first time a shape bucket is met, ``runtime.pick_tiles``) and runs them."""
    out_dtype = out_dtype or a.dtype
    M, K = a.shape
    N = b.shape[1]

    def run(t):
        return _matmul_tiles(a, b, bias, epilogue, pre, col_sum, out_dtype, split_k, t)

    if tiles is None:
        role = role or _default_role(epilogue)
        options = _tile_list(a.device, a.dtype, role)
        if len(options) == 1:  # the interpreter, fp32, sm_75, the small tiles: nothing to time or key
            tiles = options[0]
        else:
            bucket = (role, epilogue, bias is not None, pre is not None, col_sum, out_dtype, split_k,
                      a.stride(0) == 1, b.stride(0) == 1, "M", size_bucket(M), "N", size_bucket(N), "K",
                      size_bucket(K))
            tiles = pick_tiles("mlp matmul", options, a.device, bucket, a.dtype, run)
    return run(tiles)


def _matmul_tiles(a, b, bias, epilogue: str, pre, col_sum: bool, out_dtype, split_k: int | None, t: Tiles):
    """One ``_matmul_kernel`` launch at tiles ``t`` (and the split-K sum): writes only its own outputs."""
    M, K = a.shape
    N = b.shape[1]
    grid_mn = cdiv(M, t.BLOCK_M) * cdiv(N, t.BLOCK_N)
    if split_k is None:
        sms = sm_count(a.device)
        splittable = epilogue == "none" and bias is None and not col_sum
        split_k = _auto_split_k(grid_mn, K, sms) if splittable and sms else 1
    k_split = cdiv(cdiv(max(K, 1), split_k), t.BLOCK_K) * t.BLOCK_K
    split_k = cdiv(max(K, 1), k_split)  # rounding k_split up may leave fewer slices

    c = torch.empty(M, N, device=a.device, dtype=out_dtype)
    dest = c if split_k == 1 else torch.empty(split_k, M, N, device=a.device, dtype=torch.float32)
    colsum = torch.empty(cdiv(M, t.BLOCK_M), N, device=a.device, dtype=torch.float32) if col_sum else None
    if M > 0 and N > 0:
        a_strides, b_strides, d_strides = a.stride(), b.stride(), dest.stride()
        launch(
            _matmul_kernel, (grid_mn, split_k), a, b, dest,
            bias if bias is not None else a,  # unused when HAS_BIAS is False
            pre if pre is not None else a,  # unused unless "gelu" with pre, or "gelu_grad"
            colsum if colsum is not None else dest,  # unused unless COL_SUM
            M, N, K, k_split,
            a_strides[0], a_strides[1], b_strides[0], b_strides[1],
            d_strides[0] if split_k > 1 else 0, d_strides[-2], d_strides[-1],
            EPILOGUE=epilogue, HAS_BIAS=bias is not None, STORE_PRE=epilogue == "gelu" and pre is not None,
            COL_SUM=col_sum,
            BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, GROUP_M=t.GROUP_M,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        if split_k > 1 and out_dtype == torch.float32:
            torch.sum(dest, dim=0, out=c)  # (M, N) sum of the K slices
        elif split_k > 1:
            c.copy_(dest.sum(dim=0))  # summed in fp32, rounded once
    if col_sum:
        return c, (colsum.sum(dim=0) if M > 0 else torch.zeros(N, device=a.device, dtype=torch.float32))
    return c


@functools.lru_cache(maxsize=64)
def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only (n,) zero bias standing in for None: one per (size, dtype, device), not one per call."""
    return torch.zeros(n, dtype=dtype, device=device)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def mlp_fwd(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
            b_proj: torch.Tensor | None, save_pre: bool = True):
    """Forward of the MLP on rows; no checks (``mlp`` does them).

    Args:
        x: (M, C); w_fc: (H, C); b_fc: (H,) or None; w_proj: (C, H); b_proj: (C,) or None; all one dtype.
        save_pre: also return the pre-activation x @ w_fc^T + b_fc (needed by ``mlp_bwd``).
    Returns:
        (y (M, C), pre (M, H) or None, act (M, H) = gelu_tanh(pre)).
    """
    (M, C), H = x.shape, w_fc.shape[0]
    pre = torch.empty(M, H, device=x.device, dtype=x.dtype) if save_pre else None
    # A missing bias goes in as zeros (H + C reads): one kernel variant fewer per site.
    b_fc = b_fc if b_fc is not None else _zeros(H, x.dtype, x.device)
    b_proj = b_proj if b_proj is not None else _zeros(C, x.dtype, x.device)
    # A few rows (decoding, a tiny batch) take the small tiles so the rows still spread over many programs.
    small = M <= SMALL_M
    act = _matmul(x, w_fc.t(), b_fc, epilogue="gelu", pre=pre, role="small" if small else "epilogue")  # (M, H)
    y = _matmul(act, w_proj.t(), b_proj, role="small" if small else "main")  # (M, C)
    return y, pre, act


def mlp_bwd(dy: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, pre: torch.Tensor,
            act: torch.Tensor, needs: tuple = (True, True, True, True, True)):
    """Backward of the MLP on rows.

    Args:
        dy: (M, C) gradient of the output; x: (M, C); w_fc: (H, C); w_proj: (C, H);
        pre, act: (M, H) from ``mlp_fwd``. All one dtype.
        needs: which of (dx, dw_fc, db_fc, dw_proj, db_proj) to compute.
    Returns:
        (dx (M, C), dw_fc (H, C), db_fc (H,), dw_proj (C, H), db_proj (C,)) in x's dtype, None where not needed.
    """
    need_dx, need_dw_fc, need_db_fc, need_dw_proj, need_db_proj = needs
    dx = dw_fc = db_fc = dw_proj = db_proj = None
    dt = dy.dtype
    # A few rows (a tiny batch): small tiles everywhere; the large ones spilled with one row (a constexpr 1).
    small = dy.shape[0] <= SMALL_M
    # Weight gradients go through fp32 (the split-K workspace, or written in fp32 and rounded once here).
    if need_dw_proj:
        dw_proj = _cast(_matmul(dy.t(), act, out_dtype=torch.float32, split_k=None,
                                role="small" if small else "main"), dt)  # (C, H) = (C, M) @ (M, H)
    if need_db_proj:
        db_proj = _cast(dy.sum(dim=0, dtype=torch.float32), dt)  # (C,)
    if need_dx or need_dw_fc or need_db_fc:
        # The column sums are always taken (one kernel variant; (M / BLOCK_M, H) floats), kept if wanted.
        dpre, colsum = _matmul(dy, w_proj, epilogue="gelu_grad", pre=pre, col_sum=True,
                              role="small" if small else "epilogue")  # (M, H), (H,)
        db_fc = _cast(colsum, dt) if need_db_fc else None
        if need_dw_fc:
            dw_fc = _cast(_matmul(dpre.t(), x, out_dtype=torch.float32, split_k=None,
                                  role="small" if small else "main"), dt)  # (H, C) = (H, M) @ (M, C)
        if need_dx:
            dx = _matmul(dpre, w_fc, role="small" if small else "main")  # (M, C) = (M, H) @ (H, C)
    return dx, dw_fc, db_fc, dw_proj, db_proj


# --------------------------------------------------------------------------------------------
# Registered ops: what torch.compile sees (the eager path below calls the launchers directly)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{LIBRARY}::mlp_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor w_fc, Tensor? b_fc, Tensor w_proj, Tensor? b_proj, bool save_pre) "
                                "-> (Tensor y, Tensor pre, Tensor act)")
def _mlp_fwd_op(x, w_fc, b_fc, w_proj, b_proj, save_pre):
    # x (M, C) rows, every tensor in x's dtype; pre is an empty (0,) tensor unless save_pre (an op returns no None).
    _check(x, w_fc, b_fc, w_proj, b_proj)
    y, pre, act = mlp_fwd(x, w_fc, b_fc, w_proj, b_proj, save_pre=save_pre)
    return y, (pre if pre is not None else x.new_empty((0,))), act


@_mlp_fwd_op.register_fake
def _(x, w_fc, b_fc, w_proj, b_proj, save_pre):
    (M, C), H = x.shape, w_fc.shape[0]
    return x.new_empty((M, C)), x.new_empty((M, H) if save_pre else (0,)), x.new_empty((M, H))


@torch.library.custom_op(f"{LIBRARY}::mlp_bwd", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor w_fc, Tensor w_proj, Tensor pre, Tensor act, "
                                "bool[] needs) -> (Tensor dx, Tensor dw_fc, Tensor db_fc, Tensor dw_proj, "
                                "Tensor db_proj)")
def _mlp_bwd_op(dy, x, w_fc, w_proj, pre, act, needs):
    # needs: which of (dx, dw_fc, db_fc, dw_proj, db_proj) to compute; the others come back as empty (0,) tensors.
    grads = mlp_bwd(dy, x, w_fc, w_proj, pre, act, needs=tuple(needs))
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@_mlp_bwd_op.register_fake
def _(dy, x, w_fc, w_proj, pre, act, needs):
    (M, C), H = x.shape, w_fc.shape[0]
    shapes = ((M, C), (H, C), (H,), (C, H), (C,))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _mlp_setup(ctx, inputs, output):
    x, w_fc, _b_fc, w_proj, _b_proj, _save_pre = inputs
    _y, pre, act = output
    ctx.mark_non_differentiable(pre, act)
    ctx.set_materialize_grads(False)  # pre and act are never used downstream: no zero gradients allocated
    ctx.save_for_backward(x, w_fc, w_proj, pre, act)


def _mlp_backward(ctx, dy, _dpre, _dact):
    needs = tuple(ctx.needs_input_grad[:5])
    if dy is None or not any(needs):
        return None, None, None, None, None, None
    x, w_fc, w_proj, pre, act = ctx.saved_tensors
    if pre.shape != act.shape:
        raise RuntimeError("mlp: no backward without the pre-activation; call the op with save_pre=True when a "
                           "gradient is wanted")
    grads = _mlp_bwd_op(dy.contiguous(), x, w_fc, w_proj, pre, act, list(needs))  # contiguous: see MLPFunction
    return (*(g if need else None for g, need in zip(grads, needs)), None)


_mlp_fwd_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class MLPFunction(torch.autograd.Function):
    """Autograd for ``mlp`` on rows: saves x, pre and act (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj):
        needs_grad = any(ctx.needs_input_grad)
        y, pre, act = mlp_fwd(x, w_fc, b_fc, w_proj, b_proj, save_pre=needs_grad)
        if needs_grad:
            ctx.save_for_backward(x, w_fc, w_proj, pre, act)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_fc, w_proj, pre, act = ctx.saved_tensors
        # An upstream gradient may be an expanded view (stride 0, e.g. from a sum): one layout for every call, so the
        # kernels run the operand layouts launch_configs lists (a stride-0 dy compiled to a variant that spilled).
        return mlp_bwd(dy.contiguous(), x, w_fc, w_proj, pre, act, needs=tuple(ctx.needs_input_grad))


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, w_fc, b_fc, w_proj, b_proj) -> None:
    named = {"x": x, "w_fc": w_fc, "b_fc": b_fc, "w_proj": w_proj, "b_proj": b_proj}
    for name, t in named.items():
        if t is None and name in ("b_fc", "b_proj"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mlp: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"mlp: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if x.dim() < 1:
        raise ValueError("mlp: x must have at least one dimension (..., C)")
    C = x.shape[-1]
    if w_fc.dim() != 2 or w_fc.shape[1] != C:
        raise ValueError(f"mlp: w_fc must have shape (H, C) = (H, {C}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(w_fc.shape)}")
    H = w_fc.shape[0]
    if C == 0 or H == 0:
        raise ValueError(f"mlp: C and H must be positive, got C={C}, H={H}")
    if b_fc is not None and tuple(b_fc.shape) != (H,):
        raise ValueError(f"mlp: b_fc must have shape (H,) = ({H},), got {tuple(b_fc.shape)}")
    if tuple(w_proj.shape) != (C, H):
        raise ValueError(f"mlp: w_proj must have shape (C, H) = ({C}, {H}), got {tuple(w_proj.shape)}")
    if b_proj is not None and tuple(b_proj.shape) != (C,):
        raise ValueError(f"mlp: b_proj must have shape (C,) = ({C},), got {tuple(b_proj.shape)}")
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"mlp: {name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    dev = x.device.type
    if dev == "cpu":
        if not interpreting():
            raise RuntimeError("mlp: the Triton backend got CPU tensors; Triton runs on CPU only under its "
                               "interpreter (set TRITON_INTERPRET=1 before importing gpt2_kernels.mlp), else use a "
                               "CUDA device or the 'torch' backend")
        if x.dtype == torch.bfloat16:
            raise TypeError("mlp: bfloat16 is not supported under the Triton CPU interpreter; "
                            "use float32 or float16 there, bfloat16 on a GPU")
    elif dev == "cuda":
        arch(capability(x.device))  # raises below sm_75
        check_dtype("mlp", x.device, x.dtype)
    else:
        raise RuntimeError(f"mlp: the Triton backend runs on CUDA (or CPU under the interpreter), not {dev!r}")


def mlp(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
        b_proj: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's MLP, c_proj(gelu_tanh(c_fc(x))), on fused Triton matmuls; same contract as ``gpt2_kernels.ref.mlp``.

    Weights and biases of another dtype than x (fp32 master weights with fp16 activations) are cast
    to x's dtype here, so their gradients come back in their own dtype through autograd.

    Args:
        x: (..., C) fp32 / fp16 / bf16.
        w_fc: (H, C), b_fc: (H,) or None  -- c_fc, H is usually 4 C.
        w_proj: (C, H), b_proj: (C,) or None  -- c_proj.
    Returns:
        (..., C) in ``x.dtype``.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:  # the registered op checks when it runs (the GPU queries here are not for tracing)
        _check(x, w_fc, b_fc, w_proj, b_proj)
    dt = x.dtype
    # the model casts already (nothing twice): a dtype test, not a call, when they match
    w_fc, w_proj = _cast(w_fc, dt), _cast(w_proj, dt)
    b_fc = _cast(b_fc, dt) if b_fc is not None else None
    b_proj = _cast(b_proj, dt) if b_proj is not None else None
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (M, C)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, w_fc, b_fc, w_proj, b_proj))
    if compiling:
        y = _mlp_fwd_op(x2, w_fc, b_fc, w_proj, b_proj, grad)[0]  # (M, C)
    elif grad:
        y = MLPFunction.apply(x2, w_fc, b_fc, w_proj, b_proj)  # (M, C)
    else:
        # Inference (no_grad / inference_mode, or nothing needs a gradient): skip the autograd node, whose
        # needs_input_grad stays True under no_grad, so the pre-activation is neither written nor kept.
        y, _, _ = mlp_fwd(x2, w_fc, b_fc, w_proj, b_proj, save_pre=False)
    return y.reshape(x.shape)
