"""The ``native`` backend: every registry op on PyTorch's own fastest built-ins, as a peer the others must beat.

Not the oracle (that is ``gpt2_kernels.ref``, the ``torch`` backend): these are the calls a PyTorch user would
write for speed, so ``auto`` can measure our kernels against them and take whichever is faster here.

- ``layer_norm``: ``F.layer_norm`` (fp32 statistics inside, on CPU and CUDA);
- ``add_layer_norm``: the residual add, then ``F.layer_norm``;
- ``attention``: ``F.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN kernels on a GPU, the fused
  flash kernel on a CPU), causal with queries aligned to the *last* keys (``causal_lower_right``) when Tq < Tk;
- ``mlp``: ``F.linear``, ``F.gelu(approximate="tanh")``, ``F.linear``. Where no gradient is wanted on a GPU, the
  first product and the GELU are one cuBLASLt GEMM with its GELU epilogue (``torch._addmm_activation``, which is
  GPT-2's tanh GELU there; torch gives it no autograd, and on the CPU it computes the erf GELU, so not there);
- ``linear_cross_entropy``: the one chunked driver (``gpt2_kernels.chunked_loss``) with its GEMMs, and per chunk
  ``F.cross_entropy``'s two halves, ``log_softmax`` then ``nll_loss``, whose log-probabilities are reused for the
  chunk's gradient (one exp pass fewer than calling ``F.cross_entropy`` and ``softmax`` apart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import chunked_loss

__all__ = ["add_layer_norm", "attention", "layer_norm", "linear_cross_entropy", "mlp"]


def _like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    # A parameter in x's dtype (a no-op when it already is; the cast is differentiable).
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension.

    Args:
        x: (..., C).
        weight: (C,) or None (no scale).
        bias: (C,) or None (no shift).
        eps: added to the variance.
    Returns:
        (..., C) in ``x.dtype`` (autocast would otherwise hand back fp32).
    """
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # The CPU kernel's fp16 / bf16 backward sums the bias gradient in that dtype: 2e-3 off on 17 rows of fp16
        # (measured), outside the tolerance table; run those in fp32 there.
        y = F.layer_norm(x.float(), (x.shape[-1],), _like(weight, x.float()), _like(bias, x.float()), eps)
    else:
        y = F.layer_norm(x, (x.shape[-1],), _like(weight, x), _like(bias, x), eps)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual, y = ``F.layer_norm(s)``.

    Args:
        x: (..., C).
        residual: (..., C), the shape and dtype of x.
        weight, bias: (C,) or None.
        eps: added to the variance.
    Returns:
        (y, s), both (..., C) in ``x.dtype``.
    """
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; "
                         "they must match")
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; the queries are the last Tq of Tk positions (as ``ref.attention``).

    Args:
        q: (B, nh, Tq, hs).
        k, v: (B, nh, Tk, hs) with Tk >= Tq.
        causal: mask keys after each query's position.
        dropout_p: attention-weight dropout probability (SDPA's own dropout).
    Returns:
        (B, nh, Tq, hs) in ``q.dtype``.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tk < Tq:
        raise ValueError(f"attention: k has {Tk} positions, fewer than q's {Tq}")
    if not causal or Tq == 1:  # one query at the last position sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if Tq == Tk:  # SDPA's is_causal aligns the mask to the top left, which is the same square
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), dropout_p=dropout_p)


def mlp(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
        b_proj: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's MLP, c_proj(gelu_tanh(c_fc(x))), on ``F.linear`` and ``F.gelu(approximate="tanh")``.

    Args:
        x: (..., C).
        w_fc: (H, C), b_fc: (H,) or None  -- c_fc.
        w_proj: (C, H), b_proj: (C,) or None  -- c_proj.
    Returns:
        (..., C) in ``x.dtype``.
    """
    if _gemm_gelu_applies(x, w_fc, b_fc):
        x2 = x.reshape(-1, x.shape[-1])  # (N, C)
        act = torch._addmm_activation(b_fc, x2, w_fc.t(), use_gelu=True)  # (N, H), cuBLASLt's tanh-GELU epilogue
        return F.linear(act, w_proj, b_proj).reshape(*x.shape[:-1], w_proj.shape[0])
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


def _gemm_gelu_applies(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None) -> bool:
    """The fused GEMM + GELU runs on CUDA, without autograd (torch has none for it), on one dtype, with a bias."""
    if x.device.type != "cuda" or b_fc is None or not (x.dtype == w_fc.dtype == b_fc.dtype):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or w_fc.requires_grad or b_fc.requires_grad))


def _cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, n_classes: int, ignore_index: int,
                         grad_scale: torch.Tensor | None) -> torch.Tensor:
    """The chunked driver's row kernel in PyTorch ops (contract: ``gpt2_kernels.chunked_loss.RowKernel``).

    lp = log_softmax(z[:, :V]) in fp32, loss = nll_loss(lp); with k, z[:, :V] := k (exp(lp) - onehot(t)), 0 on
    ignored rows. A target out of range gives its row a NaN loss and a zero gradient (no host read).
    """
    z = logits[:, :n_classes]  # (rows, V), rows stay Vp apart
    ok = (targets >= 0) & (targets < n_classes)  # (rows,)
    safe = torch.where(ok, targets, torch.zeros_like(targets))
    lp = torch.log_softmax(z, dim=-1, dtype=torch.float32)  # (rows, V) fp32
    losses = F.nll_loss(lp, safe, reduction="none")  # (rows,) fp32
    keep = targets != ignore_index
    losses = torch.where(keep, torch.where(ok, losses, torch.full_like(losses, float("nan"))), torch.zeros_like(losses))
    if grad_scale is not None:
        kk = (grad_scale * (keep & ok)).unsqueeze(1)  # (rows, 1) fp32: k, or 0 where the row gives no gradient
        p = lp.exp_().mul_(kk)  # k softmax, in place of the log-probabilities
        p.scatter_add_(1, safe.unsqueeze(1), -kk)  # minus k at each row's target
        z.copy_(p)
    return losses


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` over the non-ignored targets, chunked (never all the logits at once).

    Args:
        h: (..., C) final hidden states.
        weight: (V, C) output embedding.
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
    Returns:
        A 0-dim fp32 tensor (0 when every target is ignored).
    """
    chunked_loss.check_inputs(h, weight, targets, ignore_index)
    return chunked_loss.linear_cross_entropy(h, weight, targets, int(ignore_index), _cross_entropy_rows_,
                                             compute_dtype=chunked_loss.compute_dtype_of(h), op=_forward_op)


def _chunked_forward(h, weight, targets, ignore_index, *, need_dh, need_dweight, compute_dtype):
    # What the registered op runs under torch.compile: the shared driver with this row kernel, outside autocast.
    with torch.autocast(h.device.type, enabled=False):
        return chunked_loss.chunked_forward(h, weight, targets, ignore_index, _cross_entropy_rows_,
                                            compute_dtype=compute_dtype, need_dh=need_dh, need_dweight=need_dweight)


_forward_op = chunked_loss.register_forward_op("gpt2k_native::linear_cross_entropy_fwd", _chunked_forward)
