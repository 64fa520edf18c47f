"""gpt2_kernels.hf: a Hugging Face GPT-2 patched onto the kernel registry.

Under every backend that runs here: logits, loss (with ignored labels) and every parameter gradient equal the
unpatched model's, for GPT2LMHeadModel and GPT2Model, and greedy ``generate`` with transformers' KV cache gives the
same tokens. With the ``torch`` backend's ops replaced by counting spies: an ordinary call runs the ops (decoding
with Tq < Tk included), a padded mask, ``output_attentions`` and attention dropout fall back to transformers' code,
and after ``unpatch_gpt2`` no op runs and every output is bitwise the never-patched model's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gpt2_kernels.registry
from gpt2_kernels import hf, ref
from gpt2_kernels.testing import assert_close

transformers = pytest.importorskip("transformers", reason="the Hugging Face patch needs transformers (extra 'dev')")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: a second torch thread only spins

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
L = 2  # layers of the test model


def _model(kind: str = "lm", **overrides):
    """A tiny random GPT-2 (head size 32, which every backend takes; a vocabulary that is no multiple of 64)."""
    cfg = transformers.GPT2Config(n_layer=L, n_embd=64, n_head=2, n_positions=64, vocab_size=500, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0, **overrides)
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if kind == "lm" else transformers.GPT2Model
    return cls(cfg).to(DEVICE).eval()


def _batch(T: int = 13):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 500, (2, T), generator=g)
    labels = x.clone()
    labels[0, :4] = -100
    labels[1, T // 2] = -100
    return x.to(DEVICE), labels.to(DEVICE)


def _run_lm(model, x, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_same_run(got, want):
    (out, grads), (out_ref, grads_ref) = got, want
    assert_close("logits", out.logits, out_ref.logits)
    assert_close("loss", out.loss, out_ref.loss)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(f"grad {name}", grads[name], grads_ref[name])


@pytest.fixture
def spies(monkeypatch):
    """Counting wrappers around the reference ops, installed before patching so the ``torch`` backend loads them;
    ``calls[op]`` lists the (Tq, Tk) of each attention call and the input shape of the others."""
    calls = {op: [] for op in gpt2_kernels.registry.OPS}

    def spy(op):
        fn = getattr(ref, op)

        def counted(*args, **kwargs):
            a = args[0]
            calls[op].append((a.shape[-2], args[1].shape[-2]) if op == "attention" else tuple(a.shape))
            return fn(*args, **kwargs)

        return counted

    for op in gpt2_kernels.registry.OPS:
        monkeypatch.setattr(ref, op, spy(op))
    return calls


# ------------------------------------------------------------------------------------------- parity per backend


def test_lm_parity(backend):
    base = _model()
    x, labels = _batch()
    want = _run_lm(base, x, labels)
    patched = hf.patch_gpt2(copy.deepcopy(base), backend)
    assert patched._gpt2_kernels_patch.ops.backends == {op: backend for op in gpt2_kernels.registry.OPS}
    _assert_same_run(_run_lm(patched, x, labels), want)


def test_base_model_parity(backend):
    base = _model("base")
    x, _ = _batch(11)
    w = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(model):
        model.zero_grad(set_to_none=True)
        h = model(x).last_hidden_state
        (h * w).sum().backward()
        return h.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    h_ref, grads_ref = run(base)
    h, grads = run(hf.patch_gpt2(copy.deepcopy(base), backend))
    assert_close("last_hidden_state", h, h_ref)
    for name in grads_ref:
        assert_close(f"grad {name}", grads[name], grads_ref[name])


def test_generate_greedy(backend):
    base = _model()
    x, _ = _batch(5)
    kw = {"max_new_tokens": 4, "do_sample": False, "attention_mask": torch.ones_like(x)}
    want = base.generate(x, **kw)
    got = hf.patch_gpt2(copy.deepcopy(base), backend).generate(x, **kw)
    assert torch.equal(got, want), f"patched {got.tolist()} != unpatched {want.tolist()}"


def _compiled_decoding_backends():
    """torch and ext: the backends transformers users decode with here (Triton's interpreter under Dynamo costs
    minutes on a CPU, and its traced path is the same registered custom op as ext's)."""
    return [pytest.param(b, marks=pytest.mark.skipif(gpt2_kernels.registry.unavailable_reason(b, DEVICE) is not None,
                                                     reason=f"backend {b!r} cannot run here"))
            for b in ("torch", "ext")]


def _compiled_generate_matches_unpatched(backend, compile_model, kw, first_without_recompiles=False):
    """``generate`` twice (the second under ``error_on_recompile``, the first too if asked) on the unpatched and the
    patched model, each set up by ``compile_model``; the two calls agree and the patched tokens equal the unpatched
    ones. Returns the two models."""
    x, _ = _batch(5)
    runs = []
    for patch in (False, True):
        torch._dynamo.reset()
        model = _model()
        if patch:
            hf.patch_gpt2(model, backend)
        compile_model(model)
        with torch._dynamo.config.patch(error_on_recompile=first_without_recompiles):
            first = model.generate(x, **kw)  # a compiled forward meets the prompt's shape, then the step's
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(model.generate(x, **kw), first)
        runs.append((model, first))
    torch._dynamo.reset()
    (_, want), (_, got) = runs
    assert torch.equal(got, want), f"patched {got.tolist()} != unpatched {want.tolist()}"
    return [m for m, _ in runs]


@pytest.mark.parametrize("backend", _compiled_decoding_backends())
def test_generate_with_a_fullgraph_compiled_forward(backend):
    """transformers users' fast decoding: ``model.forward = torch.compile(model.forward, fullgraph=True)``, then
    ``generate`` with a static cache, and a second ``generate`` that must not recompile. The patched model traces
    (the mask check reads no device value while compiling) and gives the unpatched tokens."""
    def compile_forward(model):
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")

    kw = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static"}
    _compiled_generate_matches_unpatched(backend, compile_forward, kw)


@pytest.mark.parametrize("backend", _compiled_decoding_backends())
def test_static_cache_generate_under_transformers_own_compile(backend):
    """``generate`` with a static cache and a ``CompileConfig``: transformers compiles the model's call itself (its
    criteria forced true here, since it skips compiling on a CPU), fullgraph, with no recompile across calls."""
    from transformers.generation.configuration_utils import CompileConfig

    def let_transformers_compile(model):
        model._valid_auto_compile_criteria = lambda *args, **kwargs: True

    kw = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static",
          "compile_config": CompileConfig(fullgraph=True, backend="eager")}
    for model in _compiled_generate_matches_unpatched(backend, let_transformers_compile, kw, True):
        assert hasattr(model, "_compiled_call"), "transformers did not compile the model's call"


# ------------------------------------------------------------------------------------------- the fused path runs


def test_ordinary_calls_run_the_ops(spies):
    base = _model()
    x, labels = _batch()
    patched = hf.patch_gpt2(copy.deepcopy(base), "torch")
    _assert_same_run(_run_lm(patched, x, labels), _run_lm(base, x, labels))
    assert len(spies["layer_norm"]) == 2 * L + 1 and len(spies["mlp"]) == L
    assert spies["attention"] == [(13, 13)] * L
    assert spies["linear_cross_entropy"] == [(2, 13, 64)]
    spies["attention"].clear()
    patched.generate(x[:, :5], max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(x[:, :5]))
    # the prompt, then one query against the cached keys per step
    assert spies["attention"] == [(5, 5)] * L + [(1, 6)] * L + [(1, 7)] * L


def test_eager_attention_runs_the_op_on_its_causal_mask(spies):
    base = _model(attn_implementation="eager")
    x, labels = _batch()
    patched = hf.patch_gpt2(copy.deepcopy(base), "torch")
    _assert_same_run(_run_lm(patched, x, labels), _run_lm(base, x, labels))
    assert spies["attention"] == [(13, 13)] * L


def test_loss_options():
    """Trainer's num_items_in_batch, every label ignored (NaN, as F.cross_entropy), logits_with_loss=False."""
    base = _model()
    x, labels = _batch()
    patched = hf.patch_gpt2(copy.deepcopy(base), "torch")
    n = torch.tensor(40)
    _assert_same_run(_run_lm(patched, x, labels, num_items_in_batch=n), _run_lm(base, x, labels, num_items_in_batch=n))
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(patched(x, labels=ignored).loss) and torch.isnan(base(x, labels=ignored).loss)
    lean = hf.patch_gpt2(copy.deepcopy(base), "torch", logits_with_loss=False)
    out = lean(x, labels=labels)
    assert out.logits is None
    assert_close("loss", out.loss, base(x, labels=labels).loss)


# ------------------------------------------------------------------------------------------- fallbacks


def test_padded_mask_falls_back(spies):
    base = _model()
    x, labels = _batch()
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    patched = hf.patch_gpt2(copy.deepcopy(base), "torch")
    _assert_same_run(_run_lm(patched, x, labels, attention_mask=mask), _run_lm(base, x, labels, attention_mask=mask))
    assert spies["attention"] == [] and len(spies["mlp"]) == L
    kw = {"max_new_tokens": 4, "do_sample": False, "attention_mask": mask}
    assert torch.equal(patched.generate(x, **kw), base.generate(x, **kw))
    assert spies["attention"] == []


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_output_attentions_falls_back(spies, implementation):
    base = _model(attn_implementation=implementation)
    x, _ = _batch()
    want = base(x, output_attentions=True).attentions
    got = hf.patch_gpt2(copy.deepcopy(base), "torch")(x, output_attentions=True).attentions
    assert len(got) == len(want) == (L if implementation == "eager" else 0)
    for a, b in zip(got, want):
        assert_close("attention weights", a, b)
    assert spies["attention"] == []


def test_training_with_dropout_and_an_optimizer_step(spies):
    """Attention dropout falls back (HF's random numbers); the MLP's dropout stays HF's, so one seed gives one answer."""
    base = _model().train()
    x, labels = _batch()
    patched = hf.patch_gpt2(copy.deepcopy(base), "torch")
    runs = []
    for model in (patched, base):
        torch.manual_seed(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam's first step, lr * sign(grad), magnifies ~0 grads
        runs.append(_run_lm(model, x, labels))
        opt.step()
    _assert_same_run(*runs)
    assert spies["attention"] == [] and len(spies["mlp"]) == L and len(spies["linear_cross_entropy"]) == 1
    for (name, p), q in zip(patched.named_parameters(), base.parameters()):
        assert_close(f"{name} after a step", p, q)


def test_trainer_trains_the_patched_model_to_the_same_losses(spies, tmp_path):
    """transformers' own Trainer runs a patched model through the ops and logs the unpatched model's losses."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (extra 'dev')")
    rows = torch.randint(0, 500, (8, 16), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": r, "labels": r} for r in rows]
    losses = []
    for patched in (True, False):
        model = _model(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        if patched:
            hf.patch_gpt2(model, "torch")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run{patched}"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        if patched:
            assert len(spies["linear_cross_entropy"]) == 2 and len(spies["attention"]) == 2 * L
    assert len(losses[0]) == 2
    assert losses[0] == pytest.approx(losses[1], abs=2e-4)  # the Trainer logs losses rounded to 4 decimals


# ------------------------------------------------------------------------------------------- patch, unpatch


def _instance_forwards(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_unpatch_restores_exactly(spies):
    base = _model()
    x, labels = _batch()
    model = copy.deepcopy(base)
    hf.patch_gpt2(model, "torch")
    hf.patch_gpt2(model, "torch,attention=torch")  # patching again re-patches: one layer of wrapping
    assert all(m.forward.previous is None for m in model.modules() if "forward" in m.__dict__)
    assert len(_instance_forwards(model)) == 4 * L + 1 + 2  # ln_1, ln_2, attn, mlp per block; ln_f; body; model
    assert hf.unpatch_gpt2(model) is model and _instance_forwards(model) == []
    spies["layer_norm"].clear()
    got, want = _run_lm(model, x, labels), _run_lm(base, x, labels)
    assert all(calls == [] for calls in spies.values())
    assert torch.equal(got[0].logits, want[0].logits) and torch.equal(got[0].loss, want[0].loss)
    assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])
    assert hf.unpatch_gpt2(model) is model  # unpatching an unpatched model does nothing


def test_rejects_what_it_cannot_serve():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=100))
    with pytest.raises(TypeError, match="BertModel"):
        hf.patch_gpt2(bert)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100, n_positions=16)
    with pytest.raises(TypeError, match="GPT2ForSequenceClassification"):
        hf.patch_gpt2(transformers.GPT2ForSequenceClassification(cfg))
    relu = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100,
                                                          n_positions=16, activation_function="relu"))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        hf.patch_gpt2(relu)
    assert _instance_forwards(relu) == []
    with pytest.raises(gpt2_kernels.registry.SpecError):
        hf.patch_gpt2(transformers.GPT2Model(cfg), "fastest")
