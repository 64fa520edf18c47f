"""Fused linear cross-entropy on Triton: GPT-2's loss head without ever holding the full (N, V) logits.

Contract: ``linear_cross_entropy(h, weight, targets, ignore_index)`` is the mean over non-ignored targets of
``logsumexp(z_i) - z_i[t_i]`` with ``z = h @ weight.T``, exactly as ``gpt2_kernels.ref.linear_cross_entropy`` (0 when every
target is ignored). h and weight in fp32, fp16 or bf16 (bf16 needs a GPU of compute capability 8.0+: the interpreter has
no bf16); the compute dtype is autocast's when autocast is on for the device, else h's (a weight of another dtype, e.g.
fp32 master weights with fp16 activations, is cast to it). Softmax statistics, the loss and dweight's accumulation are
fp32; gradients come back in each input's own dtype. Targets outside [0, V) that are not ``ignore_index``: on CPU
tensors (the interpreter) the driver raises ``ValueError``; on a GPU nothing is read back to the host, so such a row
gets a NaN loss (the mean is NaN) and a zero gradient. Check the data up front (``gpt2 train`` does).

Algorithm. The chunked driver, the chunk policy, the vocabulary padding and the autograd Function are shared with the
extension backend and live in ``kernels/chunked_loss.py`` (read its docstring first): per chunk of rows, a GEMM writes
the (rows, Vp) logits, this module's row kernel (``cross_entropy_rows_``, one program per row) turns them in place into
k (softmax - onehot) and writes the row's loss, and two GEMMs fold the chunk into dh and the fp32 dweight accumulator.
The row kernel streams its row twice (max and sum of exponentials, online; then the gradient), in fp32.

Extra memory beyond the inputs: one chunk of logits (reused by every chunk; at most twice the fp32 dweight, by the
chunk policy), the padded weight copy, dh, the fp32 dweight accumulator and N fp32 losses; the reference holds several
full (N, V) tensors.

Tiles: one block width, ``_BLOCK_V`` classes per loop step with 8 warps, for every V (the loop masks the tail);
``launch_configs`` lists it per dtype and architecture for ``python -m gpt2_kernels.report``.

Cost: ``bench.common.op_cost("linear_cross_entropy", ...)`` gives the FLOPs and fewest bytes of a call;
docs/performance.md holds the measurements (H100 and CPU, each with its machine and date).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import chunked_loss
from .aot import LaunchConfig
from .runtime import LIBRARY, check_dtype, launch
from .runtime import interpreting as interpreter_enabled

__all__ = [
    "cross_entropy_rows_",
    "launch_configs",
    "linear_cross_entropy",
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

# Row i has logits z_i (the first V of its stride_row columns), target t_i, and the chunk's factor k.
#   l_i = lse_i - z_{i, t_i},   lse_i = log sum_{j < V} exp z_ij
#   d l_i / d z_ij = exp(z_ij - lse_i) - [j == t_i] = softmax_ij - [j == t_i]
#   written: k (softmax_ij - [j == t_i]) for valid rows, 0 for ignored and out-of-range rows, j < V only.
# The driver makes k = 1 in fp16 / bf16 (the range stays [-1, 1]; 1 / n_valid and the upstream gradient are
# applied in fp32 in the backward) and k = 1 / n_valid in fp32 (kernels/chunked_loss.py).
# lse_i is computed online over blocks of V: with running max m and sum s of exp(z - m), a block
# with max b gives m' = max(m, b), s' = s exp(m - m') + sum exp(z_block - m'), lse = m + log s.
@triton.jit
def _linear_cross_entropy_fwd_kernel(
    logits_ptr,  # (rows, stride_row) chunk, logits in columns [0, V); the gradient there when COMPUTE_GRAD
    targets_ptr,  # (rows,) int64 targets of this chunk
    loss_ptr,  # (rows,) fp32 per-row loss out (0 for ignored rows, NaN for out-of-range targets)
    scale_ptr,  # (1,) fp32 k, the factor of the gradient written (read only when COMPUTE_GRAD)
    stride_row,  # elements between consecutive rows of logits (the padded vocabulary Vp >= V)
    V,  # number of classes; columns [V, stride_row) are neither read nor written
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
        # Pass 2: overwrite the logits with k (softmax - onehot); ignored or bad rows get 0.
        k = tl.where(valid & in_range, tl.load(scale_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(row_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            g = (p - tl.where(idx == t, 1.0, 0.0)) * k
            tl.store(row_ptr + idx, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_params(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, num_stages) the launcher uses for V classes."""
    return _BLOCK_V, 8, 2


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, n_classes: int, ignore_index: int,
                        grad_scale: torch.Tensor | None) -> torch.Tensor:
    """Per-row losses of a chunk of logits and, with ``grad_scale``, its gradient in place (the driver's row kernel).

    Args:
        logits: (rows, Vp) with unit column stride; columns [0, V) are read (and written).
        targets: (rows,) int64 class ids in [0, V) or ``ignore_index``.
        n_classes: V <= Vp.
        ignore_index: target value that contributes nothing.
        grad_scale: (1,) fp32 k, or None for the loss alone (logits only read).
    Returns:
        (rows,) fp32 losses: 0 for ignored rows, NaN for out-of-range targets. With grad_scale, logits[:, :V]
        holds k (softmax - onehot) on return (0 in ignored and out-of-range rows).
    """
    rows = logits.shape[0]
    losses = torch.empty((rows,), device=logits.device, dtype=torch.float32)
    if rows == 0:
        return losses
    scale = grad_scale if grad_scale is not None else losses  # unread without COMPUTE_GRAD
    block_v, num_warps, num_stages = _block_params(n_classes)
    launch(_linear_cross_entropy_fwd_kernel, (rows,), logits, targets, losses, scale, logits.stride(0), n_classes,
           ignore_index, COMPUTE_GRAD=grad_scale is not None, BLOCK_V=block_v, num_warps=num_warps,
           num_stages=num_stages)
    return losses


def _check_device(h: torch.Tensor) -> None:
    if h.device.type == "cpu":
        if not interpreter_enabled():
            raise RuntimeError(
                f"{_OP}: h is a CPU tensor, and Triton kernels run on the CPU only under the interpreter "
                f"(set TRITON_INTERPRET=1 before importing kernels), or use the 'torch' backend"
            )
    elif h.device.type != "cuda":
        raise ValueError(f"{_OP}: h is on {h.device}; the Triton backend runs on CUDA (or the CPU interpreter)")


def _checked_compute_dtype(h, weight, targets, ignore_index, compute_dtype) -> torch.dtype:
    """Check the arguments for this backend; the compute dtype (given, else autocast's, else h's)."""
    chunked_loss.check_inputs(h, weight, targets, ignore_index)
    _check_device(h)
    if compute_dtype is None:
        compute_dtype = chunked_loss.compute_dtype_of(h)
    if compute_dtype not in _DTYPES:
        raise TypeError(f"{_OP}: compute dtype {compute_dtype} (from autocast) is not supported; "
                        f"use float32, float16 or bfloat16")
    check_dtype(_OP, h.device, compute_dtype)
    return compute_dtype


def linear_cross_entropy_fwd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                             *, need_dh: bool = True, need_dweight: bool = True,
                             plan: chunked_loss.ChunkPlan | None = None, compute_dtype: torch.dtype | None = None):
    """Loss and, when asked, the gradients of the summed row losses, chunk by chunk, without autograd.

    Args:
        h: (..., C) hidden states, fp32 / fp16 / bf16.
        weight: (V, C) output embedding.
        targets: (...) int64 class ids in [0, V) or ``ignore_index``.
        ignore_index: target value that contributes nothing.
        need_dh, need_dweight: compute these gradients (both False: loss only, no gradient pass).
        plan: rows per chunk and padded vocabulary (default ``chunked_loss.chunk_plan``).
        compute_dtype: dtype of the GEMMs and the logits chunk (default: autocast's, else h's).
    Returns:
        ``chunked_loss.chunked_forward``'s (loss, dh, dweight, pending): loss 0-dim fp32; dh (N, C) in the compute
        dtype or None; dweight (Vp, C) fp32 or None; d loss / dh = dh * pending (pending None: 1).
    """
    compute_dtype = _checked_compute_dtype(h, weight, targets, ignore_index, compute_dtype)
    with torch.autocast(h.device.type, enabled=False):
        return chunked_loss.chunked_forward(h, weight, targets, ignore_index, cross_entropy_rows_,
                                            compute_dtype=compute_dtype, need_dh=need_dh,
                                            need_dweight=need_dweight, plan=plan)


# What torch.compile calls: the forward above as one registered op (gpt2_kernels.chunked_loss.register_forward_op).
_forward_op = chunked_loss.register_forward_op(f"{LIBRARY}::linear_cross_entropy_fwd", linear_cross_entropy_fwd)


# ----------------------------------------------------------------------------------------------
# Public function (the autograd Function is gpt2_kernels.chunked_loss.LinearCrossEntropyFunction)
# ----------------------------------------------------------------------------------------------


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` over non-ignored targets, without the full logits.

    Same signature and semantics as ``gpt2_kernels.ref.linear_cross_entropy``, except for out-of-range targets: a
    ``ValueError`` for CPU tensors, a NaN loss on a GPU (no host read; see the module docstring).

    Args:
        h: (..., C) final hidden states, fp32 / fp16 / bf16.
        weight: (V, C) output embedding (nn.Linear layout).
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
    Returns:
        A 0-dim fp32 tensor (0 when every target is ignored).
    """
    if torch.compiler.is_compiling():  # the registered op checks the inputs when it runs
        return chunked_loss.linear_cross_entropy(h, weight, targets, ignore_index, cross_entropy_rows_,
                                                 compute_dtype=chunked_loss.compute_dtype_of(h), op=_forward_op)
    compute_dtype = _checked_compute_dtype(h, weight, targets, ignore_index, None)
    return chunked_loss.linear_cross_entropy(h, weight, targets, ignore_index, cross_entropy_rows_,
                                             compute_dtype=compute_dtype)


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
                        "scale_ptr": "*fp32", "stride_row": "i32", "V": "i32", "ignore_index": "i32",
                    },
                    constexprs={"COMPUTE_GRAD": grad, "BLOCK_V": block_v},
                    num_warps=num_warps,
                    num_stages=num_stages,
                ))
    return configs
