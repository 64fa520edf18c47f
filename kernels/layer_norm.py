"""The ``triton`` backend of ``layer_norm`` and ``add_layer_norm`` (see ``kernels/registry.py``).

Contract, as ``gpt2_kernels.ref``: ``layer_norm(x, weight, bias, eps) -> y`` normalises the last dimension
with fp32 mean and biased variance and returns ``x.dtype``; ``add_layer_norm(x, residual, weight,
bias, eps) -> (y, s)`` with ``s = x + residual`` rounded to ``x.dtype`` and ``y = layer_norm(s)``.
x is fp32, fp16 or bf16 (bf16 only on a GPU), any leading shape, 1 <= C <= 8192, copied when not
contiguous; weight and bias are (C,) of any float dtype or None, read as fp32 (ones / zeros stand in
for None, so one compiled kernel serves every case); their gradients come back in their own dtype.

Algorithm: one program holds BLOCK_R whole rows in registers: mean, then the centred second moment
(two passes over registers, no cancellation), y, and with a residual s, in one read of the inputs.
The backward recomputes xhat from the saved fp32 mean / rstd, adds the gradient of s into dx for the
add variant, and keeps per-program fp32 dweight / dbias sums over a contiguous group of rows (about
two programs per SM, no atomics: bitwise reproducible), finished by one ``torch.sum``.

Tiles (``_tile``): BLOCK_C = next power of two >= C; about 4096 elements and 16 per thread forward,
2048 and 8 per thread backward (it keeps twice the live values), num_stages = 1 (no tl.dot to
pipeline); for GPT-2's widths the first of a list of two (``_tile_list``) that a GPU picks among by
timing (``runtime.pick_tiles``). ``launch_configs`` lists every launch; ``python -m gpt2_kernels.report`` compiles them for
sm_75 .. sm_90 (registers, spills, shared memory). FLOPs and fewest bytes: ``bench.common.op_cost``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .aot import LaunchConfig
from .runtime import (
    LIBRARY,
    cdiv,
    check_dtype,
    interpreting,
    launch,
    next_power_of_2,
    pick_tiles,
    size_bucket,
    sm_count,
)

__all__ = [
    "MAX_C",
    "AddLayerNormFunction",
    "LayerNormFunction",
    "add_layer_norm",
    "launch_configs",
    "layer_norm",
    "layer_norm_bwd",
    "layer_norm_fwd",
]

# Largest row the kernels hold in registers (a C beyond this would spill; see launch_configs).
MAX_C = 8192
# Row blocks whose tile lists have a second entry to time on a GPU (GPT-2's widths 768 .. 1600).
_TUNED_BLOCKS = (1024, 2048)
# Elements of a forward tile (BLOCK_R x BLOCK_C); a backward tile holds half as many.
_TILE = 4096
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("n_rows",))
def _layer_norm_fwd_kernel(
    X,  # (N, C) input rows, contiguous
    R,  # (N, C) residual, same dtype as X; read only when HAS_RESIDUAL
    S,  # (N, C) output X + R in X's dtype; written only when HAS_RESIDUAL
    Y,  # (N, C) output rows, X's dtype
    W,  # (C,) fp32 scale
    B,  # (C,) fp32 shift
    Mean,  # (N,) fp32 output: row means, kept for the backward
    Rstd,  # (N,) fp32 output: 1 / sqrt(var + eps) per row, kept for the backward
    n_rows,  # N
    C,  # features per row (the row stride of every (N, C) tensor)
    eps,  # added to the variance
    HAS_RESIDUAL: tl.constexpr,  # normalise s = X + R (and store it) instead of X
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # power of two >= C
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    row_mask = rows < n_rows
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_R, BLOCK_C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]  # int64: N * C may pass 2**31

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # round to x's dtype, as the unfused x + residual
        tl.store(S + offs, s, mask=mask)
        x = s.to(tl.float32)

    # Two passes over registers (mean, then centred second moment): no E[x^2] - E[x]^2 cancellation.
    mean = tl.sum(x, axis=1) / C  # (BLOCK_R,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = tl.rsqrt(var + eps)  # (BLOCK_R,)

    w = tl.load(W + cols, mask=col_mask, other=0.0)
    b = tl.load(B + cols, mask=col_mask, other=0.0)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


# Backward of y = xhat * w + b with xhat = (x - mean) * rstd, per row of C features.
# With wdy = w * dy, and mean() over the C features of the row:
#   dL/dxhat = wdy
#   dxhat_j/dx_i = rstd * (delta_ij - 1/C - xhat_i xhat_j / C)
# so
#   dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))
# and, summing over every row n,
#   dw = sum_n dy * xhat,   db = sum_n dy.
# For the add variant s = x + residual feeds both y and the output s, so the gradient reaching
# x and residual is dx above plus ds.
@triton.jit(do_not_specialize=("n_rows", "rows_per_prog"))
def _layer_norm_bwd_kernel(
    X,  # (N, C) the forward's normalised input (s for the add variant)
    W,  # (C,) fp32 scale
    Mean,  # (N,) fp32 row means from the forward
    Rstd,  # (N,) fp32 row 1 / sqrt(var + eps) from the forward
    DY,  # (N, C) gradient of y, X's dtype
    DS,  # (N, C) gradient of s, X's dtype; read only when HAS_DS
    DX,  # (N, C) output: gradient of X (and of the residual), X's dtype
    DW_partial,  # (P, C) fp32 output: row p = sum of dy * xhat over program p's rows
    DB_partial,  # (P, C) fp32 output: row p = sum of dy over program p's rows
    n_rows,  # N
    C,  # features per row (the row stride of every (N, C) tensor)
    rows_per_prog,  # rows of each program's contiguous group (the last group may be shorter)
    HAS_DS: tl.constexpr,  # add DS into DX
    BLOCK_R: tl.constexpr,  # rows per loop step
    BLOCK_C: tl.constexpr,  # power of two >= C
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    col_mask = cols < C
    w = tl.load(W + cols, mask=col_mask, other=0.0)
    dw_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_R, BLOCK_C)
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy  # zero outside the row, as w and dy load 0 there
        c1 = tl.sum(xhat * wdy, axis=1) / C  # mean(wdy * xhat), (BLOCK_R,)
        c2 = tl.sum(wdy, axis=1) / C  # mean(wdy)
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(DW_partial + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(DB_partial + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _tile(C: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_R, num_warps) for rows of C features (see the module docstring): the first entry of
    ``_tile_list``.

    Forward: ~4096-element tiles, 16 elements per thread (8 warps; 16 at BLOCK_C = 8192).
    Backward: ~2048-element tiles, 8 per thread, since it keeps twice the live values (x, dy, two
    accumulators); 16 per thread there costs 128-250 registers and spills at BLOCK_C = 8192.
    """
    block_c = next_power_of_2(C)
    tile = _TILE // 2 if backward else _TILE
    block_r = max(1, tile // block_c)
    if backward:  # 8 elements per thread at every width: 32 warps at 8192 (16 spill in fp32 + ds)
        num_warps = max(8, block_r * block_c // (32 * 8))
    else:
        num_warps = max(8, min(16, block_r * block_c // (32 * 16)))
    return block_c, block_r, num_warps


@functools.cache
def _tile_list(C: int, backward: bool = False) -> tuple:
    """The tiles a launch of rows of C features picks among by timing on a GPU (``runtime.pick_tiles``); the first
    is ``_tile``'s and the only one under the interpreter. The second holds half as many elements per thread (half
    the rows, or twice the warps where one row fills the tile), which can win where a wave of programs is short.
    The tiles need no tl.dot and little shared memory, so they are the same on every architecture row. Only the
    blocks of GPT-2's widths (768 .. 1600) have a second entry, which keeps the report's list short.
    """
    block_c, block_r, warps = _tile(C, backward)
    if block_c not in _TUNED_BLOCKS:
        return ((block_c, block_r, warps),)
    if block_r > 1:
        return ((block_c, block_r, warps), (block_c, block_r // 2, warps))
    if warps < 32:
        return ((block_c, block_r, warps), (block_c, block_r, warps * 2))
    return ((block_c, block_r, warps),)


def _check_tensor(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; put every argument on one device")


def _check_inputs(op: str, x: torch.Tensor, weight, bias, residual=None) -> None:
    """Raise a clear error for anything the kernels do not support."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"{op}: x has dtype {x.dtype}; supported are float32, float16 and bfloat16")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (..., C), got a 0-dim tensor")
    C = x.shape[-1]
    if not 1 <= C <= MAX_C:
        raise ValueError(
            f"{op}: x has C={C} features in its last dimension; supported are 1 <= C <= {MAX_C} "
            "(a row is held in registers)"
        )
    if x.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                f"{op}: x is a CPU tensor but Triton kernels run on the CPU only under the interpreter "
                "(set TRITON_INTERPRET=1 before importing gpt2_kernels.layer_norm), or move x to a CUDA device"
            )
        if x.dtype == torch.bfloat16:
            raise TypeError(f"{op}: x is bfloat16, which the Triton CPU interpreter does not support; "
                            "use float32/float16 on the CPU or run on a CUDA device")
    elif x.device.type == "cuda":
        check_dtype(op, x.device, x.dtype)
    else:
        raise RuntimeError(f"{op}: x is on {x.device}; the Triton kernels run on CUDA devices (or the CPU interpreter)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_tensor(op, name, p, x)
        if tuple(p.shape) != (C,):
            raise ValueError(f"{op}: {name} has shape {tuple(p.shape)}; expected ({C},) to match x's last dimension")
        if not p.is_floating_point():
            raise TypeError(f"{op}: {name} has dtype {p.dtype}; expected a floating-point dtype")
    if residual is not None:
        _check_tensor(op, "residual", residual, x)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; "
                             "they must match")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual has dtype {residual.dtype} but x has {x.dtype}; s = x + residual is "
                            "kept in x's dtype, so cast one of them")


def _param(p: torch.Tensor | None, C: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """The (C,) fp32 contiguous parameter the kernels read: ``p`` itself when it is one already (the model's fp32
    parameters: no copy), else an fp32 copy; a cached constant of ones / zeros stands in for None."""
    if p is None:
        return _filled(C, fill, like.device)
    if p.dtype == torch.float32 and p.is_contiguous():
        return p
    return p.detach().to(torch.float32).contiguous()


@functools.lru_cache(maxsize=64)
def _filled(C: int, fill: float, device: torch.device) -> torch.Tensor:
    """A (C,) fp32 constant; the kernels only read it, so one tensor serves every call of that shape and device."""
    return torch.full((C,), fill, dtype=torch.float32, device=device)


def _stat(lead: tuple, device: torch.device) -> torch.Tensor:
    """An fp32 tensor of the leading shape (sizes unpacked: a torch.Size argument parses at twice the host time)."""
    return torch.empty(*lead, dtype=torch.float32, device=device) if lead else torch.empty((), dtype=torch.float32, device=device)


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
                   residual: torch.Tensor | None = None):
    """Launch the forward kernel (no autograd).

    Args:
        x: (..., C) fp32/fp16/bf16; copied to contiguous if it is not.
        weight, bias: (C,) any float dtype, or None.
        eps: added to the variance.
        residual: (..., C) like x, or None. When given, the kernel normalises s = x + residual.
    Returns:
        (y, s, mean, rstd): y (..., C) in x.dtype; s (..., C) in x.dtype, or None without a
        residual; mean and rstd (...) in fp32.
    """
    op = "add_layer_norm" if residual is not None else "layer_norm"
    _check_inputs(op, x, weight, bias, residual)
    # The kernels take pointers and row counts, so every tensor keeps its (..., C) shape: no views to make.
    shape, C = x.shape, x.shape[-1]
    x2 = x.contiguous()  # (..., C) read as (N, C) rows
    n_rows = x2.numel() // C
    y = torch.empty_like(x2)  # (empty_like: a third of torch.empty's host time)
    mean, rstd = _stat(shape[:-1], x.device), _stat(shape[:-1], x.device)
    if residual is not None:
        r2 = residual.contiguous()
        s = torch.empty_like(x2)
    else:
        r2, s = x2, y  # not read / written: HAS_RESIDUAL is off
    if n_rows > 0:
        w = _param(weight, C, 1.0, x)
        b = _param(bias, C, 0.0, x)
        has_res = residual is not None

        def run(tile):
            block_c, block_r, num_warps = tile
            launch(_layer_norm_fwd_kernel, (cdiv(n_rows, block_r),), x2, r2, s, y, w, b, mean, rstd, n_rows, C,
                   float(eps), HAS_RESIDUAL=has_res, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
                   num_stages=1)

        run(pick_tiles("layer_norm fwd", _tile_list(C), x.device, ("C", C, "rows", size_bucket(n_rows), "res", has_res),
                       x.dtype, run))
    return y, (s if residual is not None else None), mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, ds: torch.Tensor | None = None, rows_per_program: int | None = None):
    """Launch the backward kernel and reduce the weight / bias partial sums (no autograd).

    Args:
        dy: (..., C) gradient of y, any strides; cast to x.dtype if it differs.
        x: (..., C) the forward's normalised input (s for the add variant), contiguous.
        weight: (C,) or None (then the kernels use ones).
        mean, rstd: (...) fp32 statistics from ``layer_norm_fwd``.
        ds: (..., C) gradient of s for the add variant (added into dx), or None.
        rows_per_program: rows each backward program handles; default: spread over ~2 programs
            per SM in multiples of the tile height.
    Returns:
        (dx, dweight, dbias): dx (..., C) in x.dtype; dweight = sum dy * xhat and dbias = sum dy,
        each (C,) fp32 (computed as if weight were ones when it is None).
    """
    # (..., C) tensors read as (N, C) rows, as in the forward: no views.
    C = x.shape[-1]
    x2 = x.contiguous()
    dy2 = (dy if dy.dtype == x.dtype else dy.to(x.dtype)).contiguous()
    ds2 = (ds if ds.dtype == x.dtype else ds.to(x.dtype)).contiguous() if ds is not None else dy2  # unread without ds
    n_rows = x2.numel() // C
    dx = torch.empty_like(x2)
    if n_rows == 0:
        zeros = torch.zeros(C, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    if rows_per_program is not None and rows_per_program < 1:
        raise ValueError(f"layer_norm: rows_per_program must be >= 1, got {rows_per_program}")
    w = _param(weight, C, 1.0, x)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    sms = sm_count(x.device) or 4  # 4: the interpreter runs programs in turn

    def run(tile):
        block_c, block_r, num_warps = tile
        rows = rows_per_program
        if rows is None:  # ~2 programs per SM, each a whole number of tiles
            rows = cdiv(cdiv(n_rows, sms * max(1, 16 // num_warps)), block_r) * block_r
        n_prog = cdiv(n_rows, rows)
        dw_partial = torch.empty(n_prog, C, dtype=torch.float32, device=x.device)
        db_partial = torch.empty(n_prog, C, dtype=torch.float32, device=x.device)
        launch(_layer_norm_bwd_kernel, (n_prog,), x2, w, mean, rstd, dy2, ds2, dx, dw_partial, db_partial, n_rows, C,
               rows, HAS_DS=ds is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps, num_stages=1)
        return dw_partial, db_partial

    tile = pick_tiles("layer_norm bwd", _tile_list(C, backward=True), x.device,
                      ("C", C, "rows", size_bucket(n_rows), "ds", ds is not None), x.dtype, run)
    dw_partial, db_partial = run(tile)
    return dx, dw_partial.sum(dim=0), db_partial.sum(dim=0)


# ----------------------------------------------------------------------------------------------
# Registered ops: what torch.compile sees (the eager path below calls the launchers directly)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{LIBRARY}::layer_norm_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual) "
                                "-> (Tensor y, Tensor s, Tensor mean, Tensor rstd)")
def _layer_norm_fwd_op(x, weight, bias, eps, residual):
    # x (and residual) contiguous; s is an empty (0,) tensor without a residual (an op returns no None).
    y, s, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual=residual)
    return y, (s if s is not None else x.new_empty((0,))), mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, residual):
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    s = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), s, stat, torch.empty_like(stat)


@torch.library.custom_op(f"{LIBRARY}::layer_norm_bwd", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? ds) "
                                "-> (Tensor dx, Tensor dweight, Tensor dbias)")
def _layer_norm_bwd_op(dy, x, weight, mean, rstd, ds):
    return layer_norm_bwd(dy, x, weight, mean, rstd, ds=ds)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, ds):
    C = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps, residual = inputs
    _y, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd, *(() if ctx.has_residual else (s,)))
    ctx.set_materialize_grads(False)  # an unused output gives None: nothing to allocate or read
    ctx.save_for_backward(s if ctx.has_residual else x, weight, mean, rstd)  # the normalised input
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    ds = ds if ctx.has_residual else None
    if dy is None:  # only s was used: y's path contributes nothing
        return ds, None, None, None, ds
    dx, dw, db = _layer_norm_bwd_op(dy, x, weight, mean, rstd, ds)
    dweight, dbias = _param_grads(ctx, dw, db, 1, 2)
    # x and residual get the same gradient, as for a plain x + residual.
    return dx, dweight, dbias, None, (dx if ctx.has_residual else None)


_layer_norm_fwd_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


def _param_grads(ctx, dw: torch.Tensor, db: torch.Tensor, weight_idx: int, bias_idx: int):
    dweight = dw.to(ctx.weight_dtype) if ctx.needs_input_grad[weight_idx] else None
    dbias = db.to(ctx.bias_dtype) if ctx.needs_input_grad[bias_idx] else None
    return dweight, dbias


class LayerNormFunction(torch.autograd.Function):
    """y = layer_norm(x, weight, bias, eps) with the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        if isinstance(x, torch.Tensor):
            x = x.contiguous()  # once, for the kernel and the backward
        y, _, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd)
        dweight, dbias = _param_grads(ctx, dw, db, 1, 2)
        return dx if ctx.needs_input_grad[0] else None, dweight, dbias, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the last dimension, statistics in fp32 (Triton kernels).

    Same signature and semantics as ``gpt2_kernels.ref.layer_norm``. A non-contiguous x is copied to
    a contiguous one first.

    Args:
        x: (..., C) fp32, fp16 or bf16, 1 <= C <= 8192.
        weight: (C,) or None (no scale), any float dtype; its gradient comes back in its dtype.
        bias: (C,) or None (no shift), likewise.
        eps: added to the variance.
    Returns:
        (..., C) in ``x.dtype``.
    """
    if torch.compiler.is_compiling():  # the registered op: opaque to the compiler, no graph break
        return _layer_norm_fwd_op(x.contiguous(), weight, bias, float(eps), None)[0]
    return LayerNormFunction.apply(x, weight, bias, eps)


class AddLayerNormFunction(torch.autograd.Function):
    """(y, s) = (layer_norm(x + residual), x + residual) in one pass, gradients through both."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, s, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual=residual)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)  # an unused output gives None: skip reading zeros
        return y, s

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, ds):
        s, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only s was used: y's path contributes nothing
            return ds, ds, None, None, None
        dx, dw, db = layer_norm_bwd(dy, s, weight, mean, rstd, ds=ds)
        dweight, dbias = _param_grads(ctx, dw, db, 2, 3)
        # x and residual get the same gradient, as for a plain x + residual.
        return dx, dx, dweight, dbias, None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add and layer norm: s = x + residual, y = layer_norm(s, weight, bias, eps).

    Reads x and residual once and writes s and y once; gradients flow through both outputs.

    Args:
        x: (..., C) fp32, fp16 or bf16, 1 <= C <= 8192; non-contiguous is copied.
        residual: same shape and dtype as x.
        weight, bias: (C,) or None, any float dtype.
        eps: added to the variance.
    Returns:
        (y, s), both (..., C) in ``x.dtype``.
    """
    if torch.compiler.is_compiling():
        y, s, _, _ = _layer_norm_fwd_op(x.contiguous(), weight, bias, float(eps), residual.contiguous())
        return y, s
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time launch list
# ----------------------------------------------------------------------------------------------

# C of the GPT-2 presets (test sizes 64, 128; small .. xl 768, 1024, 1280, 1600) and the largest.
_AOT_C = (64, 128, 768, 1024, 1280, 1600, MAX_C)


def _listed(backward: bool) -> list:
    """Every entry of the tile lists of the GPT-2 widths, each once, the first entries first (the report matches a
    recorded launch to the first listed configuration of its kind)."""
    lists = [_tile_list(c, backward) for c in _AOT_C]
    return list(dict.fromkeys([t[0] for t in lists] + [e for t in lists for e in t[1:]]))


def launch_configs(cc: int) -> list[LaunchConfig]:
    """Every launch the launchers may make on compute capability ``cc`` for the GPT-2 widths: every entry of every
    tile list (``_tile_list``), the single source of the tiles.

    Widths that share a block (768 and 1024; 1280 and 1600) share a launch, so the list holds
    5 blocks x their list entries x 3 dtypes x {forward, forward + residual, backward, backward + ds}; before sm_80
    the launchers refuse bf16, so it is not listed there. The tiles do not depend on ``cc``: no
    launch spills or needs more than 33 KB of shared memory on sm_75 .. sm_90.
    """
    configs = []
    for dtype in _SUPPORTED if cc >= 80 else (torch.float32, torch.float16):  # no bf16 before sm_80
        t = _TL_NAME[dtype]
        for block_c, block_r, num_warps in _listed(False):
            for has_res in (False, True):
                configs.append(LaunchConfig(
                    label=f"layer_norm fwd {t} BLOCK_R={block_r} BLOCK_C={block_c}" + (" +residual" if has_res else ""),
                    kernel=_layer_norm_fwd_kernel,
                    signature={"X": f"*{t}", "R": f"*{t}", "S": f"*{t}", "Y": f"*{t}", "W": "*fp32", "B": "*fp32",
                               "Mean": "*fp32", "Rstd": "*fp32", "n_rows": "i32", "C": "i32", "eps": "fp32"},
                    constexprs={"HAS_RESIDUAL": has_res, "BLOCK_R": block_r, "BLOCK_C": block_c},
                    num_warps=num_warps, num_stages=1,
                ))
        for block_c, block_r, num_warps in _listed(True):
            for has_ds in (False, True):
                configs.append(LaunchConfig(
                    label=f"layer_norm bwd {t} BLOCK_R={block_r} BLOCK_C={block_c}" + (" +ds" if has_ds else ""),
                    kernel=_layer_norm_bwd_kernel,
                    signature={"X": f"*{t}", "W": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "DY": f"*{t}",
                               "DS": f"*{t}", "DX": f"*{t}", "DW_partial": "*fp32", "DB_partial": "*fp32",
                               "n_rows": "i32", "C": "i32", "rows_per_prog": "i32"},
                    constexprs={"HAS_DS": has_ds, "BLOCK_R": block_r, "BLOCK_C": block_c},
                    num_warps=num_warps, num_stages=1,
                ))
    return configs
