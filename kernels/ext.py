"""The ``ext`` backend: the registry ops on the C++/CUDA extension ``gpt2_kernels._C``.

The extension (``csrc/``) registers its operators as ``torch.ops.gpt2k.*`` with CPU kernels and,
when built against a CUDA torch with a CUDA toolkit, CUDA kernels. This module is the Python half:

- fake (meta) kernels for every op (``torch.library.register_fake``), so ``torch.compile`` can
  trace a model that calls them, and autograd (``torch.library.register_autograd``) for the
  functional ops;
- the public functions with the signatures of ``gpt2_kernels.ref``: ``layer_norm``, ``add_layer_norm``, ``attention``,
  ``mlp`` (matmuls by torch, bias + GELU fused in the extension) and ``linear_cross_entropy``
  (``gpt2_kernels.chunked_loss``'s driver; the extension turns each chunk of logits into its gradient in place; under
  torch.compile the whole chunked forward is one registered op, ``gpt2k_ext::linear_cross_entropy_fwd``, as on
  the Triton backend, so no chunk of logits is copied to make its in-place update functional).

Importing this module never fails when the extension is missing: ``unavailable_reason()`` says
why, and the registry reports it. Calling an op then raises that reason.

``attention`` with ``dropout_p > 0`` is not implemented by the extension; it falls back to
``gpt2_kernels.ref.attention`` (with a one-time warning) so that training with attention dropout
still works under ``--backend ext``.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import chunked_loss, ref

__all__ = ["add_layer_norm", "attention", "cpu_simd_level", "has_cuda_kernels", "layer_norm", "linear_cross_entropy",
           "mlp", "unavailable_reason"]

_BUILD_HINT = ("it is built on first use (a C++ compiler is needed; nvcc for the CUDA kernels), or at install time with "
               "`pip install --no-build-isolation -e .`")


@functools.cache
def _load():
    """Import the extension (``gpt2_kernels._C`` from an ahead-of-time build, else built here on first use) and register
    its Python half once; returns (module, None) or (None, why it is unavailable)."""
    from . import build

    if build.disabled():
        return None, "GPT2_KERNELS_NO_EXT is set"
    try:
        from . import _C as mod
    except (ImportError, OSError) as e:  # not built, or a stale .so built against another torch
        try:
            mod = build.build_on_first_use()
        except Exception as e2:  # noqa: BLE001 - no compiler, compile error, no sources
            why = str(e2).strip().splitlines()[-1] if str(e2).strip() else type(e2).__name__
            return None, f"gpt2_kernels._C does not load ({e}) and building it failed: {why}; {_BUILD_HINT}"
    if build.embeds_libstdcxx(mod.__file__):
        return None, (f"{mod.__file__} carries its own copy of the C++ standard library (its linker linked libstdc++ "
                      "statically), so its first error message would crash the process; rebuild it with the system "
                      "compiler as linker, e.g. CXX=g++ LDSHARED='g++ -shared'")
    _register()
    return mod, None


def unavailable_reason() -> str | None:
    """None when ``gpt2_kernels._C`` imports; otherwise why it does not and how to build it."""
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
            raise RuntimeError(f"gpt2_kernels.ext: {why}")
    return torch.ops.gpt2k


# ----------------------------------------------------------------------------- fake kernels and autograd


def _register() -> None:
    """Fake kernels and autograd for every gpt2k op (runs once, after the library is loaded)."""
    _register_fakes("gpt2k::")
    _register_autograd("gpt2k::")


def _register_fakes(lib: str) -> None:
    """Output shapes and dtypes of every op, for torch.compile's tracing."""

    @torch.library.register_fake(lib + "layer_norm_fwd")
    def _(x, weight, bias, eps):
        n = x.shape[0]
        return torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake(lib + "layer_norm_bwd")
    def _(dy, x, weight, mean, rstd):
        c = x.shape[1]
        return torch.empty_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)

    @torch.library.register_fake(lib + "add_layer_norm_fwd")
    def _(x, residual, weight, bias, eps):
        n = x.shape[0]
        stat = x.new_empty((n,), dtype=torch.float32)
        return torch.empty_like(x), torch.empty_like(x), stat, torch.empty_like(stat)

    @torch.library.register_fake(lib + "add_layer_norm_bwd")
    def _(dy, ds, s, weight, mean, rstd):
        c = s.shape[1]
        return torch.empty_like(s), s.new_empty((c,), dtype=torch.float32), s.new_empty((c,), dtype=torch.float32)

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


def _register_autograd(lib: str) -> None:
    """The backward of every differentiable op (the loss head forms its gradients in its forward)."""
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

    # add_layer_norm_fwd -> (y, s, mean, rstd); y and s carry gradients, and s feeds y, so x and
    # residual both get ds + the layer norm's dx.
    def add_ln_setup(ctx, inputs, output):
        _x, _residual, weight, bias, _eps = inputs
        _y, s, mean, rstd = output
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_bias = bias is not None

    def add_ln_backward(ctx, dy, ds, _dmean, _drstd):
        s, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.gpt2k.add_layer_norm_bwd(dy.contiguous(), ds.contiguous(), s, weight, mean, rstd)
        dw = dw.to(weight.dtype) if weight is not None else None
        db = db.to(s.dtype) if ctx.has_bias else None
        return dx, dx, dw, db, None

    torch.library.register_autograd(lib + "add_layer_norm_fwd", add_ln_backward, setup_context=add_ln_setup)

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


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and layer norm in one pass on the extension: s = x + residual, y = layer_norm(s).

    Args:
        x: (..., C), float32 / bfloat16 / float16.
        residual: (..., C), the shape and dtype of x.
        weight: (C,) or None (no scale).
        bias: (C,) or None (no shift).
        eps: added to the variance.
    Returns:
        (y, s), both (..., C) in ``x.dtype``.
    """
    ops = _ops()
    shape = x.shape
    if residual.shape != shape:  # reshaping below would hide a mismatch of equal size
        raise ValueError(f"add_layer_norm: residual has shape {tuple(residual.shape)} but x has {tuple(shape)}; "
                         "they must match")
    x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, C)
    r2 = residual.reshape(-1, shape[-1]).contiguous()  # (N, C)
    w = weight.to(x.dtype).contiguous() if weight is not None else None
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    y, s, _mean, _rstd = ops.add_layer_norm_fwd(x2, r2, w, b, float(eps))
    return y.reshape(shape), s.reshape(shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention (fp32 softmax, never a Tq x Tk matrix) on the extension.

    The queries are the last Tq of Tk positions, as in ``gpt2_kernels.ref.attention``. The extension
    has no dropout: with ``dropout_p > 0`` this falls back to ``gpt2_kernels.ref.attention``.

    Args:
        q: (B, nh, Tq, hs).
        k, v: (B, nh, Tk, hs) with Tk >= Tq.
        causal: mask keys after each query's position.
        dropout_p: attention-weight dropout probability.
    Returns:
        (B, nh, Tq, hs) in ``q.dtype``.
    """
    if dropout_p > 0.0:
        warnings.warn("gpt2_kernels.ext.attention: the extension has no dropout; using gpt2_kernels.ref.attention for "
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


def _cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, n_classes: int, ignore_index: int,
                         grad_scale: torch.Tensor | None) -> torch.Tensor:
    """The chunked driver's row kernel on the extension: per-row losses of logits[:, :V], and with ``grad_scale``
    (a (1,) fp32 k) that part overwritten in place by k (softmax - onehot) (see ``gpt2_kernels.chunked_loss``)."""
    ops = _ops()
    x = logits if logits.shape[1] == n_classes else logits[:, :n_classes]  # rows stay Vp apart
    if grad_scale is None:
        return ops.cross_entropy_fwd(x, targets, ignore_index)
    return ops.cross_entropy_fwd_bwd_(x, targets, grad_scale, ignore_index)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` over the non-ignored targets, never holding all logits.

    The chunked loss head of ``gpt2_kernels.chunked_loss`` (chunk policy, padded GEMMs, autograd) with the
    extension's ``cross_entropy_fwd_bwd_`` as the kernel that turns each chunk of logits into its gradient.
    Computes in autocast's dtype when autocast is on, else h's. If every target is ignored the loss and
    the gradients are 0. A target neither ``ignore_index`` nor in [0, V) raises ``ValueError`` for CPU
    tensors and gives a NaN loss on a GPU (no host read there), as the Triton backend.

    Args:
        h: (..., C) final hidden states.
        weight: (V, C) output embedding.
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
    Returns:
        A 0-dim fp32 tensor.
    """
    _ops()
    chunked_loss.check_inputs(h, weight, targets, ignore_index)
    return chunked_loss.linear_cross_entropy(h, weight, targets, int(ignore_index), _cross_entropy_rows_,
                                             compute_dtype=chunked_loss.compute_dtype_of(h), op=_forward_op)


def _chunked_forward(h, weight, targets, ignore_index, *, need_dh, need_dweight, compute_dtype):
    # What the registered op runs: the shared driver with the extension's row kernel, outside autocast.
    _ops()
    with torch.autocast(h.device.type, enabled=False):
        return chunked_loss.chunked_forward(h, weight, targets, ignore_index, _cross_entropy_rows_,
                                            compute_dtype=compute_dtype, need_dh=need_dh, need_dweight=need_dweight)


_forward_op = chunked_loss.register_forward_op("gpt2k_ext::linear_cross_entropy_fwd", _chunked_forward)
