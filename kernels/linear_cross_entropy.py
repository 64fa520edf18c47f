"""Fused linear cross-entropy: GPT-2's loss head without ever holding the full (N, V) logits.

``linear_cross_entropy(h, weight, targets, ignore_index)`` is the mean over non-ignored targets of
``logsumexp(z_i) - z_i[t_i]`` with ``z = h @ weight.T``, exactly as ``kernels.ref.linear_cross_entropy``.
The reference materialises all N x V logits (N = rows, V = 50257 for GPT-2), and autograd then keeps
them and builds a gradient of the same size. Here the rows are processed in chunks:

    for each chunk of rows [s, e):
        z      = h[s:e] @ weight.T                       cuBLAS, (rows, V) in the compute dtype
        kernel: per row, an online fp32 max / log-sum-exp over V in blocks, the row's loss, and
                z overwritten in place by dloss/dz = (softmax(z) - onehot(t)) / n_valid
        dh[s:e]  = dz @ weight                            cuBLAS
        dweight += dz.T @ h[s:e]                          fp32 accumulator across chunks

The gradients are computed during the forward (when some input needs one; under ``no_grad`` the
kernel only computes the loss and skips the three extra passes), and the backward only scales them
by the incoming gradient of the loss. This is the usual trade: the backward has nothing left to do,
at the price of holding dh (N x C) and dweight (V x C) from the forward to the backward.

Work (N rows, C channels, V classes):
    FLOPs: forward 2 N C V (the logits), + backward 4 N C V (dh and dweight), the same as the
        reference; the kernel's O(N V) exp / max / sum work is negligible beside them.
    Bytes of the logits, e = element size of the compute dtype: the logits GEMM writes a chunk,
        the kernel reads it twice and writes it once, the two gradient GEMMs read it: 6 e N V in
        all (12 N V bytes in fp16). The reference allocates about 20 N V bytes of full-size
        tensors (below), each written and read at least once: >= 40 N V bytes.

Memory (extra = allocated during forward + backward, beyond the inputs):
    reference: 20.0 N V bytes at its peak, in fp32 and in fp16 alike (measured by counting the
        live storages its ops allocate, forward + backward, N = 512, C = 64, V = 50257, on the
        CPU: full-size logits, their fp32 copy, temporaries and gradients of the same size).
        GPT-2 small training, N = 8 x 1024: 20 x 8192 x 50257 B = 8.2 GB.
    here: one chunk of logits (chunk x V x e, reused by every chunk), dh (N x C), dweight (V x C:
        fp32 in fp32; in fp16/bf16 an fp32 accumulator plus one low-precision V x C product per
        chunk), N fp32 losses; the backward adds the scaled copies of dh and dweight. Computed
        for GPT-2 small, N = 8192 (chunk 2048): fp16 forward peak 206 MB logits + 154 MB
        accumulator + 77 MB product + 13 MB dh = 0.45 GB, 5.5% of the reference; fp32: forward
        412 MB + 154 MB + 25 MB = 0.59 GB, 7.2%. Target: <= 25%. The CPU test counts the same
        storages for both (tests/test_linear_cross_entropy.py); on a GPU the GPU-only test
        compares ``torch.cuda.max_memory_allocated``.

Chunk size (``default_chunk_rows``): rows = min(N, max(2 C, ceil(N / 4))), rounded up to 64.
    - ceil(N / 4) keeps a chunk's logits at a quarter of the full logits in the compute dtype,
      N V e / 4 <= N V bytes, i.e. <= 5% of the reference's 20 N V bytes, which leaves room under
      the 25% target for the V x C dweight buffers (a fixed cost that dominates when N is small).
    - 2 C is the floor because every chunk re-streams the fp32 V x C dweight accumulator (about
      12 V C bytes with the low-precision product): a chunk's three GEMMs cost 6 rows C V FLOPs, so
      with rows >= 2 C they do >= C FLOP per accumulator byte (768 for GPT-2 small), 2.6 times an
      H100's balance (989 TFLOP/s dense bf16 over 3.35 TB/s, spec sheet: ~300 FLOP/byte), and
      the accumulator stays a minor cost. Chunks of "logits
      about the size of h" (rows = N C / V, ~125 rows for GPT-2) would re-stream it ~65 times and
      lose to the reference.
    - small N therefore runs as one chunk (no accumulator at all).

Targets outside [0, V) that are not ``ignore_index``: on the CPU (the interpreter) the wrapper
checks them before launching and raises. On the GPU the kernel records a flag (a plain store to
an int32, no extra pass over the targets), gives the row a NaN loss and a zero gradient, and the
wrapper reads the flag once after the last chunk -- one device synchronisation per call, small
beside the GEMMs -- and raises the same ``ValueError``.

dtypes: h and weight in fp32, fp16 or bf16 (bf16 needs a GPU: the interpreter has no bf16). The
compute dtype is autocast's when autocast is on for the device, else h's dtype (a weight of
another dtype, e.g. fp32 master weights with fp16 activations, is cast to it). Softmax statistics,
the loss and dweight's accumulation across chunks are fp32; gradients come back in each input's
own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.aot import LaunchConfig
from kernels.runtime import interpreting as interpreter_enabled
from kernels.runtime import launch

__all__ = [
    "LinearCrossEntropyFunction",
    "default_chunk_rows",
    "launch_configs",
    "linear_cross_entropy",
    "linear_cross_entropy_bwd",
    "linear_cross_entropy_fwd",
]

_OP = "linear_cross_entropy"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# One block width for every V: the kernel loops over V in BLOCK_V steps and masks the tail, so a
# single compiled variant per dtype serves any vocabulary (and keeps the AOT report small).
_BLOCK_V = 2048


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

# Row i has logits z_i (V,), target t_i and n_valid = #{i : t_i != ignore_index} over all N rows.
#   loss   = (1 / n_valid) sum_{i valid} l_i,   l_i = lse_i - z_{i, t_i},   lse_i = log sum_j exp z_ij
#   d l_i / d z_ij = exp(z_ij - lse_i) - [j == t_i] = softmax_ij - [j == t_i]
#   d loss / d z_ij = (softmax_ij - [j == t_i]) / n_valid   for valid rows, 0 for ignored rows.
# lse_i is computed online over blocks of V: with running max m and sum s of exp(z - m), a block
# with max b gives m' = max(m, b), s' = s exp(m - m') + sum exp(z_block - m'), lse = m + log s.
@triton.jit
def _linear_cross_entropy_fwd_kernel(
    logits_ptr,  # (rows, V) this chunk's logits; overwritten with d loss / d logits when COMPUTE_GRAD
    targets_ptr,  # (rows,) int64 targets of this chunk
    loss_ptr,  # (rows,) fp32 per-row loss out (0 for ignored rows, NaN for out-of-range targets)
    n_valid_ptr,  # () int64 number of non-ignored targets over all N rows (not just this chunk)
    err_ptr,  # () int32 set to 1 when some target is neither ignore_index nor in [0, V)
    stride_row,  # elements between consecutive rows of logits
    V,  # number of classes
    ignore_index,  # target value that contributes nothing
    COMPUTE_GRAD: tl.constexpr,  # write the gradient over the logits
    BLOCK_V: tl.constexpr,  # classes per loop step
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    bad = valid & ((t < 0) | (t >= V))
    tl.store(err_ptr, 1, mask=bad)

    # Pass 1: online max and sum of exp, in fp32.
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    z_t = tl.load(row_ptr + t, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(valid & in_range, lse - z_t, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # Pass 2: overwrite the logits with (softmax - onehot) * scale; ignored or bad rows get 0.
        n_valid = tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
        scale = tl.where(valid & in_range, 1.0 / n_valid, 0.0)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(row_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            g = (p - tl.where(idx == t, 1.0, 0.0)) * scale
            tl.store(row_ptr + idx, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_params(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, num_stages) the launcher uses for V classes."""
    return _BLOCK_V, 8, 2


def default_chunk_rows(n_rows: int, n_channels: int) -> int:
    """Rows per chunk: min(N, max(2 C, ceil(N / 4))) rounded up to 64 (module docstring: why)."""
    rows = max(2 * n_channels, -(-n_rows // 4))
    rows = -(-rows // 64) * 64
    return max(1, min(n_rows, rows))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _check_inputs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index) -> None:
    for name, x in (("h", h), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if h.dim() < 1:
        raise ValueError(f"{_OP}: h must have shape (..., C), got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must have shape (V, C), got {tuple(weight.shape)}")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(
            f"{_OP}: weight has C = {weight.shape[1]} channels (shape {tuple(weight.shape)}) but h has "
            f"C = {h.shape[-1]} (shape {tuple(h.shape)})"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"{_OP}: weight must have at least one class (V >= 1), got shape {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"{_OP}: targets must have h's leading shape {tuple(h.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.dtype != torch.int64:
        raise TypeError(f"{_OP}: targets must be int64 (torch.long) class ids, got {targets.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, x in (("h", h), ("weight", weight)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{_OP}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.device != h.device or targets.device != h.device:
        raise ValueError(
            f"{_OP}: h, weight and targets must be on one device, got h on {h.device}, weight on "
            f"{weight.device}, targets on {targets.device}"
        )
    if h.device.type == "cpu":
        if not interpreter_enabled():
            raise RuntimeError(
                f"{_OP}: h is a CPU tensor, and Triton kernels run on the CPU only under the interpreter "
                f"(set TRITON_INTERPRET=1 before importing kernels), or use the 'torch' backend"
            )
    elif h.device.type != "cuda":
        raise ValueError(f"{_OP}: h is on {h.device}; the Triton backend runs on CUDA (or the CPU interpreter)")


def _check_compute_dtype(device: torch.device, compute_dtype: torch.dtype) -> None:
    if compute_dtype not in _DTYPES:
        raise TypeError(f"{_OP}: compute dtype {compute_dtype} (from autocast) is not supported; "
                        f"use float32, float16 or bfloat16")
    if device.type == "cpu" and compute_dtype == torch.bfloat16:
        raise TypeError(
            f"{_OP}: bfloat16 needs a CUDA GPU (Triton's CPU interpreter has no bfloat16); "
            f"use float32 or float16 on the CPU"
        )
    if device.type == "cuda" and compute_dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
        raise TypeError(f"{_OP}: bfloat16 needs compute capability 8.0 or newer (sm_80+); use float16 on {device}")


def _out_of_range_error(V: int, ignore_index: int, example=None) -> ValueError:
    ex = f" (e.g. {example})" if example is not None else ""
    return ValueError(
        f"{_OP}: targets must be class ids in [0, {V}) or ignore_index={ignore_index}; found a target out of range{ex}"
    )


def linear_cross_entropy_fwd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                             *, need_dh: bool = True, need_dweight: bool = True, chunk_rows: int | None = None,
                             compute_dtype: torch.dtype | None = None):
    """Loss and, when asked, the unscaled gradients (d loss / d h, d loss / d weight), chunk by chunk.

    Args:
        h: (..., C) hidden states, fp32 / fp16 / bf16.
        weight: (V, C) output embedding.
        targets: (...) int64 class ids in [0, V) or ``ignore_index``.
        ignore_index: target value that contributes nothing.
        need_dh, need_dweight: compute these gradients (both False: loss only, no gradient pass).
        chunk_rows: rows per chunk (default ``default_chunk_rows(N, C)``).
        compute_dtype: dtype of the GEMMs and the logits chunk (default: autocast's, else h's).
    Returns:
        (loss, dh, dweight): loss a 0-dim fp32 tensor; dh (N, C) in the compute dtype or None;
        dweight (V, C) in fp32 (or the compute dtype when it took a single GEMM) or None.
    """
    _check_inputs(h, weight, targets, ignore_index)
    if compute_dtype is None:
        compute_dtype = _compute_dtype(h)
    _check_compute_dtype(h.device, compute_dtype)
    C = h.shape[-1]
    V = weight.shape[0]
    h2 = h.reshape(-1, C)  # (N, C)
    t = targets.reshape(-1).contiguous()  # (N,)
    N = h2.shape[0]
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(N, C)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"{_OP}: chunk_rows must be a positive int, got {chunk_rows!r}")
    chunk_rows = min(chunk_rows, max(N, 1))
    dev = h.device

    if dev.type == "cpu":
        bad = (t != ignore_index) & ((t < 0) | (t >= V))
        if bool(bad.any()):
            raise _out_of_range_error(V, ignore_index, int(t[bad][0]))

    hc = h2.to(compute_dtype)  # (N, C), no copy when already in the compute dtype
    wc = weight.to(compute_dtype)  # (V, C)
    grad = need_dh or need_dweight
    dh = torch.empty((N, C), device=dev, dtype=compute_dtype) if need_dh else None
    dweight = None
    if N == 0:
        zero = torch.zeros((), device=dev, dtype=torch.float32)
        if need_dweight:
            dweight = torch.zeros((V, C), device=dev, dtype=torch.float32)
        return zero, dh, dweight

    n_chunks = -(-N // chunk_rows)
    n_valid = (t != ignore_index).sum()  # () int64, stays on the device
    losses = torch.empty((N,), device=dev, dtype=torch.float32)
    err = torch.zeros((), device=dev, dtype=torch.int32)
    logits = torch.empty((chunk_rows, V), device=dev, dtype=compute_dtype)  # the only (rows, V) buffer
    product = None  # (V, C) low-precision dweight of one chunk, when accumulating in fp32
    if need_dweight:
        if compute_dtype == torch.float32:
            dweight = torch.empty((V, C), device=dev, dtype=torch.float32)
        elif n_chunks > 1:
            dweight = torch.zeros((V, C), device=dev, dtype=torch.float32)
            product = torch.empty((V, C), device=dev, dtype=compute_dtype)

    block_v, num_warps, num_stages = _block_params(V)
    for c in range(n_chunks):
        s, e = c * chunk_rows, min(N, (c + 1) * chunk_rows)
        z = logits[: e - s]  # (rows, V), contiguous
        torch.mm(hc[s:e], wc.t(), out=z)
        launch(_linear_cross_entropy_fwd_kernel, (e - s,), z, t[s:e], losses[s:e], n_valid, err, z.stride(0), V,
               ignore_index, COMPUTE_GRAD=grad, BLOCK_V=block_v, num_warps=num_warps, num_stages=num_stages)
        if not grad:
            continue
        if need_dh:
            torch.mm(z, wc, out=dh[s:e])  # (rows, C)
        if need_dweight:
            if compute_dtype == torch.float32:
                if c == 0:
                    torch.mm(z.t(), hc[s:e], out=dweight)  # (V, C)
                else:
                    dweight.addmm_(z.t(), hc[s:e])
            elif product is None:
                dweight = torch.mm(z.t(), hc[s:e])  # (V, C), one chunk: one GEMM, fp32-accumulated inside
            else:
                torch.mm(z.t(), hc[s:e], out=product)
                dweight.add_(product)

    if dev.type == "cuda" and bool(err.item()):
        raise _out_of_range_error(V, ignore_index)
    loss = losses.sum() / n_valid.clamp(min=1)
    return loss, dh, dweight


def linear_cross_entropy_bwd(grad_loss: torch.Tensor, dh: torch.Tensor | None, dweight: torch.Tensor | None,
                             h_dtype: torch.dtype, weight_dtype: torch.dtype):
    """Scale the gradients the forward computed by the incoming d(out)/d(loss).

    Args:
        grad_loss: () gradient of the loss.
        dh: (N, C) or None; dweight: (V, C) or None -- from ``linear_cross_entropy_fwd``.
        h_dtype, weight_dtype: dtypes to return each gradient in.
    Returns:
        (dh, dweight) scaled, new tensors (the saved ones are left as they were, so a retained
        graph can run backward again), in ``h_dtype`` and ``weight_dtype``.
    """
    g = grad_loss.float()
    out_h = out_w = None
    if dh is not None:
        out_h = torch.empty(dh.shape, device=dh.device, dtype=h_dtype)
        torch.mul(dh, g, out=out_h)
    if dweight is not None:
        out_w = torch.empty(dweight.shape, device=dweight.device, dtype=weight_dtype)
        torch.mul(dweight, g, out=out_w)
    return out_h, out_w


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in the forward, the backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index=-1, chunk_rows=None, compute_dtype=None):
        _check_inputs(h, weight, targets, ignore_index)
        if compute_dtype is None:
            compute_dtype = _compute_dtype(h)  # read before autocast is switched off below
        need_dh, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The launcher casts h and weight to compute_dtype itself; autocast must not touch its out= GEMMs.
        with torch.autocast(h.device.type, enabled=False):
            loss, dh, dweight = linear_cross_entropy_fwd(
                h, weight, targets, ignore_index, need_dh=need_dh, need_dweight=need_dweight,
                chunk_rows=chunk_rows, compute_dtype=compute_dtype,
            )
        ctx.h_shape, ctx.h_dtype, ctx.weight_dtype = h.shape, h.dtype, weight.dtype
        ctx.save_for_backward(dh, dweight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dweight = ctx.saved_tensors
        dh, dweight = linear_cross_entropy_bwd(grad_loss, dh, dweight, ctx.h_dtype, ctx.weight_dtype)
        if dh is not None:
            dh = dh.view(ctx.h_shape)
        return dh, dweight, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` over non-ignored targets, without the full logits.

    Same signature and semantics as ``kernels.ref.linear_cross_entropy``.

    Args:
        h: (..., C) final hidden states, fp32 / fp16 / bf16.
        weight: (V, C) output embedding (nn.Linear layout).
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
    Returns:
        A 0-dim fp32 tensor (0 when every target is ignored).
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(h, weight, targets, ignore_index, None, None)
    # No gradient wanted (no_grad, inference_mode, or frozen inputs): the loss alone, no gradient pass.
    _check_inputs(h, weight, targets, ignore_index)
    compute_dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        loss, _, _ = linear_cross_entropy_fwd(h, weight, targets, ignore_index, need_dh=False, need_dweight=False,
                                              compute_dtype=compute_dtype)
    return loss


# ----------------------------------------------------------------------------------------------
# Ahead-of-time report
# ----------------------------------------------------------------------------------------------


def launch_configs(cc: int) -> list[LaunchConfig]:
    """Every kernel configuration the launcher may launch on compute capability ``cc``.

    The kernel is a memory-bound row reduction with no shared-memory tiles; BLOCK_V is the same
    for every V, so these are all the choices; bf16 only from sm_80 on.
    """
    dtypes = _DTYPES if cc >= 80 else (torch.float32, torch.float16)  # bf16 needs sm_80+ (the wrapper refuses it)
    configs = []
    for block_v in (_BLOCK_V,):
        _, num_warps, num_stages = _block_params(block_v)
        for dtype in dtypes:
            for grad in (True, False):
                name = _TL_NAMES[dtype]
                configs.append(LaunchConfig(
                    label=f"linear_cross_entropy fwd {name} COMPUTE_GRAD={grad} BLOCK_V={block_v}",
                    kernel=_linear_cross_entropy_fwd_kernel,
                    signature={
                        "logits_ptr": f"*{name}", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                        "n_valid_ptr": "*i64", "err_ptr": "*i32", "stride_row": "i32", "V": "i32",
                        "ignore_index": "i32",
                    },
                    constexprs={"COMPUTE_GRAD": grad, "BLOCK_V": block_v},
                    num_warps=num_warps,
                    num_stages=num_stages,
                ))
    return configs

