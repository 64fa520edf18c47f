"""Run one Hugging Face GPT-2 on this project's kernels: ``patch_gpt2(model, backend)`` / ``unpatch_gpt2(model)``.

Contract: ``patch_gpt2`` changes one ``transformers.GPT2LMHeadModel`` or ``GPT2Model`` *instance* in place (its
submodules get an instance ``forward``; no transformers class is touched) so that every layer norm runs the registry's
``layer_norm``, the self-attention ``attention`` and the MLP ``mlp`` (Conv1D weights passed as transposed views, no
copy), and the LM loss, when ``labels`` are given, ``linear_cross_entropy`` (HF's shift and ignore_index=-100, and
Trainer's ``num_items_in_batch``). Outputs, loss and every gradient equal the unpatched model's within fp32 rounding;
``generate`` keeps transformers' own KV cache (decoding runs the op with Tq < Tk). ``unpatch_gpt2`` removes every
instance forward, restoring the original code exactly; patching again re-patches with the new backend.

Falls back to transformers' own code for that call (exact, never a different answer): attention whose mask is not
plain causal (padding zeros in ``attention_mask``, a 4-D or packed-sequence mask, a static cache's unfilled tail),
``output_attentions=True``, attention dropout while training (the op's dropout draws other random numbers),
cross-attention and ``EncoderDecoderCache``, attention implementations other than sdpa and eager, a mask tensor
while ``torch.compile`` traces (its values cannot be read there: ``generate`` with a compiled forward), unknown keyword
arguments; for the loss: a custom ``loss_function``, ``logits_to_keep`` != 0 or positional arguments. Residual adds stay
in HF's block code (so no ``add_layer_norm``), which keeps its gradient checkpointing. Raises ``TypeError`` for another
model type and ``ValueError`` for a GPT-2 variant the ops cannot compute (another activation, attention scaling).
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F

from . import registry

__all__ = ["patch_gpt2", "unpatch_gpt2"]

_STATE = "_gpt2_kernels_patch"  # the model's attribute holding its _Patch
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Keyword arguments the fused attention understands; any other makes the call fall back.
_ATTN_KWARGS = {"cache", "attention_mask", "use_cache", "position_ids", "num_items_in_batch", "output_attentions",
                "encoder_hidden_states", "encoder_attention_mask"}
# Keyword arguments of GPT2LMHeadModel.forward the fused loss path understands.
_LM_KWARGS = {"input_ids", "cache", "past_key_values", "attention_mask", "token_type_ids", "position_ids",
              "inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "labels", "use_cache",
              "logits_to_keep", "return_dict", "output_attentions", "output_hidden_states", "num_items_in_batch",
              "shift_labels", "ignore_index"}


class _Patch:
    """One patched model's state: the ops, the modules given a forward, and per-call flags."""

    def __init__(self, spec: str, device: torch.device, logits_with_loss: bool):
        self.spec = spec
        self.ops = registry.build_ops(spec, device)
        self.device_type = device.type
        self.logits_with_loss = logits_with_loss
        self.installed: list = []  # (module, the instance forward it had before, or None)
        self.weights_wanted = False  # output_attentions of the model call in progress
        self.mask_verdict = None  # (weakref to the last 4-D mask checked, its _version, Tq, Tk, plain causal?)

    def ops_for(self, device: torch.device):
        # ``auto`` resolves per device type: re-resolve after the model moves.
        if device.type != self.device_type:
            self.ops = registry.build_ops(self.spec, device)
            self.device_type = device.type
        return self.ops


class _Forward:
    """An instance ``forward``: ``impl(module, state, original, *args, **kwargs)``, with the original's signature
    (Trainer and ``generate`` inspect it). Holds its module, so ``copy.deepcopy`` rebinds it to the copy."""

    def __init__(self, module, state: _Patch, impl, previous):
        self.module, self.state, self.impl, self.previous = module, state, impl, previous
        self.__signature__ = inspect.signature(self.original)

    @property
    def original(self):
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def __call__(self, *args, **kwargs):
        return self.impl(self.module, self.state, self.original, *args, **kwargs)


def _act_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmul-like ops run in: autocast's when it is on, else x's (as gpt2.model)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---------------------------------------------------------------------------------------------- forwards


def _layer_norm_forward(ln, state, original, *args, **kwargs):
    if len(args) != 1 or kwargs:
        return original(*args, **kwargs)
    x = args[0]
    return state.ops_for(x.device).layer_norm(x, ln.weight, ln.bias, ln.eps)


def _mlp_forward(mlp, state, original, *args, **kwargs):
    if len(args) != 1 or kwargs:
        return original(*args, **kwargs)
    x = args[0]
    dt = _act_dtype(x)

    def cast(t):
        return None if t is None else t.to(dt)

    # Conv1D keeps its weight as (in, out); .t() is the nn.Linear (out, in) view every backend reads in place.
    y = state.ops_for(x.device).mlp(x.to(dt), cast(mlp.c_fc.weight).t(), cast(mlp.c_fc.bias),
                                    cast(mlp.c_proj.weight).t(), cast(mlp.c_proj.bias))
    return mlp.dropout(y)


def _plain_causal(state: _Patch, mask, Tq: int, Tk: int, implementation: str) -> bool:
    """Whether ``mask`` (as HF passes it to the attention function) means exactly causal attention of the Tq queries
    at the last Tq of Tk positions, which the registry op computes."""
    if mask is None:
        # sdpa without a mask is causal when Tq > 1 (top-left aligned: right only when Tq == Tk); eager has no
        # mask at all then. One query seeing every key is both.
        return Tq == 1 or (implementation == "sdpa" and Tq == Tk)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or tuple(mask.shape[-2:]) != (Tq, Tk):
        return False
    if torch.compiler.is_compiling():
        # Reading the mask's values would be a data-dependent guard (no fullgraph compile of generate): a mask
        # tensor under torch.compile goes to transformers' own attention, exactly as unpatched.
        return False
    seen = state.mask_verdict  # every block gets the same mask object: check it once per model call
    if seen is not None:
        mask_ref, version, q, k, verdict = seen
        if mask_ref() is mask and (version, q, k) == (mask._version, Tq, Tk):
            return verdict
    qpos = torch.arange(Tk - Tq, Tk, device=mask.device).unsqueeze(1)  # (Tq, 1)
    keep = torch.arange(Tk, device=mask.device).unsqueeze(0) <= qpos  # (Tq, Tk)
    if mask.dtype == torch.bool:  # sdpa: True = attend
        ok = bool((mask == keep).all())
    elif mask.is_floating_point():  # eager: added to the scores, 0 = attend, the dtype's minimum = masked
        masked = (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)
        ok = bool(torch.where(keep, mask == 0, masked).all())
    else:
        ok = False
    state.mask_verdict = (weakref.ref(mask), mask._version, Tq, Tk, ok)
    return ok


def _attention_forward(attn, state, original, *args, **kwargs):
    """GPT2Attention's self-attention path with the registry op in place of HF's attention function."""
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    implementation = attn.config._attn_implementation
    if (len(args) != 1 or not set(kwargs) <= _ATTN_KWARGS or args[0].dim() != 3 or attn.is_cross_attention
            or kwargs.get("encoder_hidden_states") is not None or kwargs.get("output_attentions")
            or state.weights_wanted or isinstance(kwargs.get("cache"), EncoderDecoderCache)
            or implementation not in ("sdpa", "eager") or (attn.training and attn.attn_dropout.p > 0)):
        return original(*args, **kwargs)
    x = args[0]
    cache, mask = kwargs.get("cache"), kwargs.get("attention_mask")
    rest = {k: v for k, v in kwargs.items() if k not in ("cache", "attention_mask", "encoder_hidden_states",
                                                         "encoder_attention_mask", "output_attentions")}
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)  # each (B, T, C)
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # each (B, nh, T, hs)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=rest)  # (B, nh, past + T, hs)
    if _plain_causal(state, mask, T, k.shape[2], implementation):
        y = state.ops_for(x.device).attention(q, k, v, causal=True, dropout_p=0.0)  # (B, nh, T, hs)
        y, weights = y.transpose(1, 2), None  # (B, T, nh, hs)
    else:  # the function HF would have called, on the same q, k, v
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        y, weights = fn(attn, q, k, v, mask, dropout=attn.attn_dropout.p if attn.training else 0.0,
                        scaling=attn.scaling, **rest)  # (B, T, nh, hs)
    y = y.reshape(B, T, C).contiguous()
    return attn.resid_dropout(attn.c_proj(y)), weights


def _body_forward(body, state, original, *args, **kwargs):
    """GPT2Model.forward, noting whether the call returns attention weights (which the fused attention lacks)."""
    wanted = kwargs.get("output_attentions")
    if wanted is None:
        wanted = getattr(body.config, "output_attentions", False)
    before = state.weights_wanted
    state.weights_wanted = bool(wanted)
    try:
        return original(*args, **kwargs)
    finally:
        state.weights_wanted = before


def _lm_forward(model, state, original, *args, **kwargs):
    """GPT2LMHeadModel.forward; with labels, the shifted mean cross-entropy through ``linear_cross_entropy``."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    keep = kwargs.get("logits_to_keep", 0)
    if (kwargs.get("labels") is None or len(args) > 1 or not set(kwargs) <= _LM_KWARGS
            or not (isinstance(keep, int) and keep == 0) or model.loss_function is not ForCausalLMLoss):
        return original(*args, **kwargs)
    kw = dict(kwargs)
    labels, shift = kw.pop("labels"), kw.pop("shift_labels", None)
    n_items, ignore = kw.pop("num_items_in_batch", None), kw.pop("ignore_index", -100)
    kw.pop("logits_to_keep", None)
    return_dict = kw.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    out = model.transformer(*args, return_dict=True, **kw)
    h = out.last_hidden_state  # (B, T, C)
    if shift is None:  # position t predicts label t + 1; the last position predicts nothing
        shift = F.pad(labels, (0, 1), value=ignore)[..., 1:]
    shift = shift.to(h.device)
    dt = _act_dtype(h)
    loss = state.ops_for(h.device).linear_cross_entropy(h.to(dt), model.lm_head.weight.to(dt), shift, ignore)
    n_valid = (shift != ignore).sum().to(loss.dtype)
    if n_items is None:
        loss = loss * (n_valid / n_valid)  # F.cross_entropy's mean is NaN when every label is ignored; the op's is 0
    else:  # Trainer's gradient accumulation: the sum over this batch's tokens divided by the accumulated count
        loss = loss * n_valid / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
    result = CausalLMOutputWithCrossAttentions(
        loss=loss, logits=model.lm_head(h) if state.logits_with_loss else None, cache=getattr(out, "cache", None),
        hidden_states=out.hidden_states, attentions=out.attentions, cross_attentions=out.cross_attentions)
    return result if return_dict else result.to_tuple()


# ---------------------------------------------------------------------------------------------- patching


def _check_model(model):
    """The GPT2Model inside ``model``; raises if the model is not one the ops compute exactly."""
    from torch import nn
    from transformers import GPT2LMHeadModel, GPT2Model
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block

    kind = type(model)
    if kind not in (GPT2LMHeadModel, GPT2Model):
        raise TypeError(f"patch_gpt2: cannot patch a {kind.__module__}.{kind.__qualname__}; it patches "
                        "transformers.GPT2LMHeadModel and GPT2Model (for another GPT-2 head, patch its .transformer)")
    cfg = model.config
    if cfg.activation_function not in _TANH_GELUS:
        raise ValueError(f"patch_gpt2: this GPT-2 uses activation_function={cfg.activation_function!r}; the mlp op "
                         f"computes the tanh GELU ({' or '.join(_TANH_GELUS)}) only")
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False)):
        if bool(getattr(cfg, name, want)) != want:
            raise ValueError(f"patch_gpt2: this GPT-2 sets config.{name}={getattr(cfg, name)!r}; the attention op "
                             f"computes softmax(q k^T / sqrt(head size)) only ({name}={want})")
    body = model.transformer if kind is GPT2LMHeadModel else model
    if kind is GPT2LMHeadModel and not (isinstance(model.lm_head, nn.Linear) and model.lm_head.bias is None):
        raise ValueError(f"patch_gpt2: lm_head is {model.lm_head!r}; the loss op takes a bias-free linear head")
    for i, block in enumerate(body.h):
        parts = (type(block) is GPT2Block, type(block.attn) is GPT2Attention, type(block.mlp) is GPT2MLP)
        if not all(parts) or not all(_plain_ln(ln) for ln in (block.ln_1, block.ln_2)):
            raise ValueError(f"patch_gpt2: block {i} has been changed from transformers' GPT2Block "
                             f"({type(block).__name__}: {type(block.attn).__name__}, {type(block.mlp).__name__}); "
                             "cannot patch it")
    if not _plain_ln(body.ln_f):
        raise ValueError(f"patch_gpt2: ln_f is {body.ln_f!r}, not a 1-D nn.LayerNorm; cannot patch it")
    return body


def _plain_ln(ln) -> bool:
    return type(ln) is torch.nn.LayerNorm and len(ln.normalized_shape) == 1


def _install(state: _Patch, module, impl) -> None:
    previous = module.__dict__.get("forward")
    module.forward = _Forward(module, state, impl, previous)
    state.installed.append((module, previous))


def patch_gpt2(model, backend: str = "auto", *, logits_with_loss: bool = True):
    """Run ``model``'s layer norms, attention, MLP and LM loss through the kernel registry, in place.

    Args:
        model: a ``transformers.GPT2LMHeadModel`` or ``GPT2Model``. Patching a patched model re-patches it.
        backend: a backend spec of ``registry.build_ops`` (``"auto"``, ``"torch"``, ``"triton"``, ``"ext"``,
            ``"torch,attention=triton"``), resolved for the model's device now and again if it moves.
        logits_with_loss: with ``labels``, also return the logits (as HF does). False returns ``logits=None``
            then, so the (B, T, vocab) logits are never built (the point of the fused loss; Trainer's training
            step reads only the loss).
    Returns:
        ``model``.
    Raises:
        TypeError: another model type. ValueError: a GPT-2 variant the ops cannot compute exactly.
        registry.SpecError, registry.BackendError: a bad spec, or a backend that cannot run on the model's device.
    """
    body = _check_model(model)
    device = next(model.parameters()).device
    state = _Patch(backend, device, logits_with_loss)  # resolves the spec: fails here, before any change
    unpatch_gpt2(model)
    for block in body.h:
        for ln in (block.ln_1, block.ln_2, getattr(block, "ln_cross_attn", None)):
            if ln is not None and _plain_ln(ln):
                _install(state, ln, _layer_norm_forward)
        _install(state, block.attn, _attention_forward)
        _install(state, block.mlp, _mlp_forward)
    _install(state, body.ln_f, _layer_norm_forward)
    _install(state, body, _body_forward)
    if body is not model:
        _install(state, model, _lm_forward)
    model.__dict__[_STATE] = state
    return model


def unpatch_gpt2(model):
    """Undo ``patch_gpt2``: every module's own forward again (a model never patched is returned unchanged).

    Returns:
        ``model``.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for module, previous in reversed(state.installed):
        del module.__dict__["forward"]
        if previous is not None:
            module.__dict__["forward"] = previous
    return model
