"""The ``cuda`` backend: the four registry ops on the C++/CUDA extension ``kernels._C``.

The extension (``csrc/``) registers its operators as ``torch.ops.gpt2k.*`` with CPU kernels and,
when built against a CUDA torch with a CUDA toolkit, CUDA kernels. This module is the Python half:

- fake (meta) kernels for every op (``torch.library.register_fake``), so ``torch.compile`` can
  trace a model that calls them, and autograd (``torch.library.register_autograd``) for the
  functional ops;
- the public functions with the signatures of ``kernels.ref``: ``layer_norm``, ``attention``,
  ``mlp`` (matmuls by torch, bias + GELU fused in the extension) and ``linear_cross_entropy``
  (chunked over rows; the extension turns each chunk of logits into its gradient in place).

Importing this module never fails when the extension is missing: ``unavailable_reason()`` says
why, and the registry reports it. Calling an op then raises that reason.

``attention`` with ``dropout_p > 0`` is not implemented by the extension; it falls back to
``kernels.ref.attention`` (with a one-time warning) so that training with attention dropout
still works under ``--backend cuda``.
"""

from __future__ import annotations

import functools
import warnings

import torch

from kernels import ref

__all__ = ["attention", "cpu_simd_level", "has_cuda_kernels", "layer_norm", "linear_cross_entropy", "mlp", "unavailable_reason"]

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; nvcc for CUDA kernels)"


@functools.cache
def _load():
    """Import the extension and register its Python half once; returns (module, error string)."""
    try:
        from kernels import _C
    except ImportError as e:
        return None, f"the extension was not built: {e}; {_BUILD_HINT}"
    except OSError as e:  # a stale .so built against another torch
        return None, f"the extension kernels._C does not load: {e}; rebuild it: {_BUILD_HINT}"
    _register()
    return _C, None


def unavailable_reason() -> str | None:
    """None when ``kernels._C`` imports; otherwise why it does not and how to build it."""
    return _load()[1]


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels (a CUDA torch and nvcc at build time)."""
    mod, _ = _load()
    return bool(mod is not None and getattr(mod, "WITH_CUDA", 0))


def cpu_simd_level() -> str | None:
    """The instruction set the extension's CPU loops run with here, or None without the extension.

    ``"avx512"`` or ``"avx2"`` on a modern x86-64 CPU, ``"sse2"`` on an old one (the baseline build),
    ``"native"`` where the compiler built a single version (not GCC on x86-64 Linux).
    """
    mod, _ = _load()
    return None if mod is None else getattr(mod, "CPU_SIMD", "unknown")


def _ops():
    # Under torch.compile the library is already loaded (the registry asked unavailable_reason()
    # first); skipping the check there keeps Dynamo out of the import machinery.
    if not torch.compiler.is_compiling():
        mod, why = _load()
        if mod is None:
            raise RuntimeError(f"kernels.cuda: {why}")
    return torch.ops.gpt2k


# ----------------------------------------------------------------------------- fake kernels and autograd


def _register() -> None:
    """Fake kernels and autograd for every gpt2k op (runs once, after the library is loaded)."""
    lib = "gpt2k::"

    @torch.library.register_fake(lib + "layer_norm_fwd")
    def _(x, weight, bias, eps):
        n = x.shape[0]
        return torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake(lib + "layer_norm_bwd")
    def _(dy, x, weight, mean, rstd):
        c = x.shape[1]
        return torch.empty_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)

    @torch.library.register_fake(lib + "bias_gelu_fwd")
    def _(h, bias):
        return torch.empty_like(h)

    @torch.library.register_fake(lib + "bias_gelu_bwd")
    def _(dact, h, bias):
        return torch.empty_like(h), h.new_empty((h.shape[1],), dtype=torch.float32)

    @torch.library.register_fake(lib + "attention_fwd")
    def _(q, k, v, causal, dropout_p):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake(lib + "attention_bwd")
    def _(dy, q, k, v, y, lse, causal):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake(lib + "cross_entropy_fwd")
    def _(logits, targets, ignore_index):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake(lib + "cross_entropy_fwd_bwd_")
    def _(logits, targets, scale, ignore_index):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    # layer_norm_fwd -> (y, mean, rstd); only y carries a gradient.
    def ln_setup(ctx, inputs, output):
        x, weight, bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None

    def ln_backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.gpt2k.layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd)
        dw = dw.to(weight.dtype) if weight is not None else None
        db = db.to(x.dtype) if ctx.has_bias else None
        return dx, dw, db, None

    torch.library.register_autograd(lib + "layer_norm_fwd", ln_backward, setup_context=ln_setup)

    def gelu_setup(ctx, inputs, output):
        h, bias = inputs
        ctx.save_for_backward(h, bias)

    def gelu_backward(ctx, dact):
        h, bias = ctx.saved_tensors
        dh, dbias = torch.ops.gpt2k.bias_gelu_bwd(dact.contiguous(), h, bias)
        return dh, (dbias.to(bias.dtype) if bias is not None else None)

    torch.library.register_autograd(lib + "bias_gelu_fwd", gelu_backward, setup_context=gelu_setup)

    # attention_fwd -> (y, lse); only y carries a gradient.
    def attn_setup(ctx, inputs, output):
        q, k, v, causal, _p = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.causal = causal

    def attn_backward(ctx, dy, _dlse):
        q, k, v, y, lse = ctx.saved_tensors
        # The CPU forward may have read k, v in place (a cache's view); the backward wants them dense.
        dq, dk, dv = torch.ops.gpt2k.attention_bwd(dy.contiguous(), q, k.contiguous(), v.contiguous(), y, lse,
                                                   ctx.causal)
        return dq, dk, dv, None, None

    torch.library.register_autograd(lib + "attention_fwd", attn_backward, setup_context=attn_setup)


# ----------------------------------------------------------------------------- public functions


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the last dimension (fp32 statistics) on the extension.

    Args:
        x: (..., C), float32 / bfloat16 / float16.
        weight: (C,) or None (no scale).
        bias: (C,) or None (no shift).
        eps: added to the variance.
    Returns:
        (..., C) in ``x.dtype``.
    """
    ops = _ops()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, C)
    w = weight.to(x.dtype).contiguous() if weight is not None else None
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    y, _mean, _rstd = ops.layer_norm_fwd(x2, w, b, float(eps))
    return y.reshape(shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention (fp32 softmax, never a Tq x Tk matrix) on the extension.

    The queries are the last Tq of Tk positions, as in ``kernels.ref.attention``. The extension
    has no dropout: with ``dropout_p > 0`` this falls back to ``kernels.ref.attention``.

    Args:
        q: (B, nh, Tq, hs).
        k, v: (B, nh, Tk, hs) with Tk >= Tq.
        causal: mask keys after each query's position.
        dropout_p: attention-weight dropout probability.
    Returns:
        (B, nh, Tq, hs) in ``q.dtype``.
    """
    if dropout_p > 0.0:
        warnings.warn("kernels.cuda.attention: the extension has no dropout; using kernels.ref.attention for "
                      f"dropout_p={dropout_p}", stacklevel=2)
        return ref.attention(q, k, v, causal=causal, dropout_p=dropout_p)
    ops = _ops()
    # The CPU op reads a KV cache's view in place; copying it would cost O(context) per step.
    if not (k.device.type == "cpu" and k.stride() == v.stride() and _heads_evenly_spaced(k)):
        k, v = k.contiguous(), v.contiguous()
    y, _lse = ops.attention_fwd(q.contiguous(), k, v, bool(causal), 0.0)
    return y


def _heads_evenly_spaced(t: torch.Tensor) -> bool:
    """(B, nh, T, hs) whose heads are contiguous (T, hs) blocks evenly spaced, e.g. ``cache[..., :T, :]``.

    The layouts the CPU ``attention_fwd`` takes besides contiguous ones (see uniform_head_stride in
    csrc/ops.cpp, which checks them again).
    """
    B, H, T, D = t.shape
    s = t.stride()
    return t.is_contiguous() or (s[3] == 1 and s[2] == D and (B == 1 or s[0] == H * s[1]) and s[1] >= T * D)


def mlp(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
        b_proj: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's MLP: torch matmuls around the extension's fused bias + tanh-GELU.

    Args:
        x: (..., C).
        w_fc: (H, C), b_fc: (H,) or None  -- c_fc.
        w_proj: (C, H), b_proj: (C,) or None  -- c_proj.
    Returns:
        (..., C) in ``x.dtype``.
    """
    ops = _ops()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (N, C)
    h = torch.nn.functional.linear(x2, w_fc).contiguous()  # (N, H), bias added in the fused GELU
    b = b_fc.to(h.dtype).contiguous() if b_fc is not None else None
    act = ops.bias_gelu_fwd(h, b)  # (N, H)
    out = torch.nn.functional.linear(act, w_proj, b_proj)  # (N, C)
    return out.reshape(*shape[:-1], out.shape[-1])


_MIN_CHUNK_ROWS = 256


def _chunk_rows(n: int, v: int, c: int) -> int:
    # Rows per chunk so that a chunk of logits (rows, V) is about as large as h (N, C), but at least
    # _MIN_CHUNK_ROWS: each chunk adds a (V, C) matmul into dweight whose inner dimension is the chunk,
    # and thin chunks make that update (a full pass over dweight) dominate.
    chunks = max(1, -(-v // max(c, 1)))
    return max(1, min(n, max(-(-n // chunks), _MIN_CHUNK_ROWS)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss head computed chunk by chunk; gradients are formed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index):
        ops = _ops()
        c = h.shape[-1]
        h2 = h.reshape(-1, c).contiguous()  # (N, C)
        t = targets.reshape(-1).to(torch.int64).contiguous()  # (N,)
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        n = h2.shape[0]
        n_valid = (t != ignore_index).sum()
        inv = (1.0 / n_valid.clamp(min=1).to(torch.float32)).reshape(1)  # 1 / (number of counted targets)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h2) if need_h else None
        # dweight is written by the first chunk's product and accumulated into by the rest: no zero-fill
        # pass over (V, C).
        dw = torch.empty(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = _chunk_rows(n, w.shape[0], c)
        # One (step, V) logits buffer for every chunk: a fresh one per chunk would be page-faulted in
        # again each time on a CPU (allocations this large are mmap'd and returned on free).
        buf = torch.empty((min(step, n), w.shape[0]), dtype=h2.dtype, device=h.device)
        for s in range(0, n, step):
            hc, tc = h2[s:s + step], t[s:s + step]
            logits = torch.mm(hc, w.t(), out=buf[: hc.shape[0]])  # (rows, V)
            if need_h or need_w:
                rows = ops.cross_entropy_fwd_bwd_(logits, tc, inv, ignore_index)  # logits := dloss/dlogits
                if need_h:
                    torch.mm(logits, w, out=dh[s:s + step])
                if need_w and logits.dtype == torch.float32:
                    if s == 0:
                        torch.mm(logits.t(), hc, out=dw)
                    else:
                        dw.addmm_(logits.t(), hc)
                elif need_w:  # low precision: the product in that dtype, accumulated in fp32
                    if s == 0:
                        dw.copy_(torch.mm(logits.t(), hc))
                    else:
                        dw += torch.mm(logits.t(), hc)
            else:
                rows = ops.cross_entropy_fwd(logits, tc, ignore_index)
            total += rows.sum()
        if dw is not None and n == 0:  # no rows, no chunk wrote it
            dw.zero_()
        # Kept as attributes, not saved tensors, so that a backward which frees the graph can hand
        # them on without a copy (see backward).
        ctx.dh, ctx.dw = dh, dw
        ctx.h_shape, ctx.w_dtype = h.shape, weight.dtype
        return total * inv[0]

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.dh, ctx.dw
        if _graph_is_freed_after_this_backward():
            # Nobody can run this backward again: scale the buffers in place and let them go, so the
            # gradients are these tensors themselves (autograd takes them as .grad without a copy).
            # A new (V, C) tensor here would cost a second pass over fresh memory, which on a CPU is
            # about a third of the whole op at GPT-2 small widths.
            ctx.dh = ctx.dw = None
            # loss.backward() seeds 1.0: then there is nothing to scale (asked only on a CPU, where
            # reading the value costs no device sync).
            if not (grad.device.type == "cpu" and grad.item() == 1.0):
                dh = dh.mul_(grad.to(dh.dtype)) if dh is not None else None
                dw = dw.mul_(grad) if dw is not None else None
            gh = dh.reshape(ctx.h_shape) if dh is not None else None
            gw = dw.to(ctx.w_dtype) if dw is not None else None
        else:  # retain_graph=True: keep the unscaled buffers for the next backward
            gh = (dh * grad.to(dh.dtype)).reshape(ctx.h_shape) if dh is not None else None
            gw = (dw * grad).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None


def _graph_is_freed_after_this_backward() -> bool:
    """True inside a backward run with retain_graph=False (the usual ``loss.backward()``).

    Uses torch's private ``_get_current_graph_task_keep_graph``; where it is missing, or while
    torch.compile traces, answers False, which is always safe (the caller then copies).
    """
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None or torch.compiler.is_compiling():
        return False
    try:
        return not probe()
    except RuntimeError:  # not inside a backward
        return False


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` over the non-ignored targets, never holding all logits.

    Rows are processed in chunks whose logits are about the size of ``h`` (at least 256 rows, so
    that the per-chunk dweight update stays a real matmul); for each chunk torch computes the
    logits, the extension turns them in place into the gradient (softmax - onehot) / n_valid and
    returns the per-row losses, and torch folds the gradient into dh and dweight. If every target
    is ignored the loss and the gradients are 0.

    Args:
        h: (..., C) final hidden states.
        weight: (V, C) output embedding.
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
    Returns:
        A 0-dim fp32 tensor.
    """
    _ops()
    return _LinearCrossEntropy.apply(h, weight, targets, int(ignore_index))
