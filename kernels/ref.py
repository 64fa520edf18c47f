"""The reference backend: every op of the registry written in plain PyTorch.

This module is three things at once: the ``torch`` backend of the op registry, the oracle every
test compares against, and the baseline of every benchmark. Nothing else in the project
re-implements this math in PyTorch.

Every function here has the functional signature shared by all backends (see
``kernels/registry.py``). Statistics and reductions (layer-norm mean and variance, softmax max and
sum, the loss's log-sum-exp) are computed in float32 whatever the input dtype; outputs come back
in the input dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["add_layer_norm", "attention", "cross_entropy", "gelu_tanh", "gelu_tanh_grad", "layer_norm",
           "linear_cross_entropy", "mlp"]

# sqrt(2 / pi), the constant of the tanh approximation of GELU that GPT-2 uses.
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (float64 stays float64, so the reference can be checked in fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed in fp32.

    Args:
        x: any shape, any float dtype.
    Returns:
        Same shape and dtype as ``x``.
    """
    xf = _f32(x)
    y = 0.5 * xf * (1.0 + torch.tanh(GELU_C * (xf + GELU_A * xf * xf * xf)))
    return y.to(x.dtype)


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh(x) / dx in fp32 (used by tests of the fused backward epilogues).

    With u = c (x + a x^3) and t = tanh(u):  d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2).
    """
    xf = _f32(x)
    t = torch.tanh(GELU_C * (xf + GELU_A * xf * xf * xf))
    return 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * xf * xf)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the last dimension, statistics in fp32.

    Args:
        x: (..., C).
        weight: (C,) or None (no scale).
        bias: (C,) or None (no shift).
        eps: added to the variance.
    Returns:
        (..., C) in ``x.dtype``.
    """
    xf = _f32(x)
    mean = xf.mean(dim=-1, keepdim=True)
    xc = xf - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)  # biased variance, as F.layer_norm
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _f32(weight)
    if bias is not None:
        y = y + _f32(bias)
    return y.to(x.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then layer norm: s = x + residual, y = layer_norm(s, weight, bias, eps).

    A pre-norm block's ``x = x + f(x)`` followed by the next norm, as one op so that a backend can
    read x and residual once. The gradient reaching s (from y and from s's own uses) goes to both
    x and residual.

    Args:
        x: (..., C).
        residual: (..., C), the shape and dtype of x.
        weight: (C,) or None (no scale).
        bias: (C,) or None (no shift).
        eps: added to the variance.
    Returns:
        (y, s), both (..., C) in ``x.dtype``; s is rounded to x.dtype before it is normalised.
    """
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0, *, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, softmax in fp32.

    The queries are the *last* Tq positions of a sequence of Tk keys (Tq <= Tk), which is what
    cached decoding needs: query i sits at absolute position Tk - Tq + i and, when causal, sees
    keys 0 .. Tk - Tq + i.

    Args:
        q: (B, nh, Tq, hs).
        k, v: (B, nh, Tk, hs) with Tk >= Tq.
        causal: mask keys after each query's position.
        dropout_p: probability of dropping an attention weight (inverted dropout, 1/(1-p) scale).
        dropout_mask: reference-only, for replaying another backend's dropout: a boolean
            (B, nh, Tq, Tk) tensor, True where the weight is kept. Overrides random sampling.
    Returns:
        (B, nh, Tq, hs) in ``q.dtype``.
    """
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    if Tk < Tq:
        raise ValueError(f"attention: k has {Tk} positions, fewer than q's {Tq}")
    scale = 1.0 / math.sqrt(hs)
    att = torch.matmul(_f32(q), _f32(k).transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    if causal:
        qpos = torch.arange(Tk - Tq, Tk, device=q.device).unsqueeze(1)  # (Tq, 1)
        kpos = torch.arange(Tk, device=q.device).unsqueeze(0)  # (1, Tk)
        att = att.masked_fill(kpos > qpos, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_mask is not None:
        att = att * dropout_mask.to(att.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        att = torch.nn.functional.dropout(att, p=dropout_p, training=True)
    y = torch.matmul(att, _f32(v))  # (B, nh, Tq, hs)
    return y.to(q.dtype)


def mlp(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
        b_proj: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's MLP: c_proj(gelu_tanh(c_fc(x))), weights in nn.Linear layout.

    Args:
        x: (..., C).
        w_fc: (H, C), b_fc: (H,) or None  -- c_fc, H is usually 4 C.
        w_proj: (C, H), b_proj: (C,) or None  -- c_proj.
    Returns:
        (..., C) in ``x.dtype``.
    """
    h = torch.nn.functional.linear(x, w_fc, b_fc)  # (..., H)
    h = gelu_tanh(h)
    return torch.nn.functional.linear(h, w_proj, b_proj)  # (..., C)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` over the targets that are not ignored.

    The loss head as one op, so that a backend may fuse it without materialising the logits.
    The log-sum-exp is taken in fp32. If every target is ignored the loss is 0 (and so are the
    gradients), rather than the NaN of 0/0.

    Args:
        h: (..., C) final hidden states.
        weight: (V, C) output embedding (nn.Linear layout).
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs).
    """
    return cross_entropy(torch.nn.functional.linear(h, weight), targets, ignore_index)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` over the targets that are not ignored (the loss head after
    its matmul; ``linear_cross_entropy`` is this on ``h @ weight.T``).

    Args:
        logits: (..., V), any float dtype; the log-sum-exp is taken in fp32.
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs); 0 if every target is ignored.
    """
    logits = _f32(logits)
    logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    t = targets.reshape(-1)  # (N,)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    tgt = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)  # (N,)
    losses = torch.where(valid, lse - tgt, torch.zeros_like(lse))
    return losses.sum() / valid.sum().clamp(min=1)
