"""torch.compile: the GPT model traces as one graph under every backend, and the compiled model computes what the
eager one does.

The Triton ops are ``torch.library`` custom ops (``torch.ops.gpt2k_triton.*``, fake kernels and autograd registered)
that the public functions call while torch.compile traces; the extension's are ``torch.ops.gpt2k.*``. Compiled
here with ``backend="aot_eager"``: that runs Dynamo (graph breaks), the fake kernels and AOTAutograd (the registered
autograd) as Inductor would, without Inductor's C++ compile, which costs ~45 s for this model on a 2-core CPU. On the
CPU the Triton kernels run under the interpreter, eagerly, inside the compiled graph's custom ops.
"""

import pytest
import torch

import gpt2_kernels.registry
from gpt2.model import GPT, GPTConfig
from gpt2_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # as tests/conftest.py

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch: no cached graph (or recompile count) carried between backends."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny_model(backend: str) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    """The ``tiny`` preset (2 layers, 2 heads of 32, 64 wide, vocabulary 512) on ``backend``, and a (2, 32) batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=32), backend=backend).to(DEVICE)
    model.check_inputs = False  # its id check reads the ids on the host: a graph break (gpt2 train turns it off too)
    model.set_backend(backend)  # resolved before tracing
    idx = torch.randint(0, 512, (2, 32), device=DEVICE)
    targets = torch.randint(0, 512, (2, 32), device=DEVICE)
    targets[0, :3] = -1  # a few ignored positions
    return model, idx, targets


def test_compiled_loss_and_gradients_match_eager(backend):
    """One graph (fullgraph=True: a graph break is an error naming its reason), the eager loss and gradients."""
    model, idx, targets = _tiny_model(backend)
    _, loss = model(idx, targets)
    loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _, loss_c = compiled(idx, targets)
    loss_c.backward()
    assert_close(f"{backend} compiled loss", loss_c, loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{backend}: the compiled backward gave {name} no gradient"
        assert_close(f"{backend} compiled d{name}", p.grad, eager[name])
    with torch.no_grad():  # the loss-only path (no gradient formed in the forward)
        assert_close(f"{backend} compiled no-grad loss", compiled(idx, targets)[1], loss)


def test_compiled_recompute_matches_eager_without(backend):
    """fullgraph compile of a model that recomputes every block (non-reentrant checkpoints inside the graph):
    the loss and every gradient of eager without recompute."""
    model, idx, targets = _tiny_model(backend)
    model.train()
    _, loss = model(idx, targets)
    loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model.set_recompute("block"), fullgraph=True, backend="aot_eager")
    _, loss_c = compiled(idx, targets)
    loss_c.backward()
    assert_close(f"{backend} compiled recompute loss", loss_c, loss)
    for name, p in model.named_parameters():
        assert_close(f"{backend} compiled recompute d{name}", p.grad, eager[name])


# ---------------------------------------------------------------------------------------------------- the Triton ops


@pytest.fixture(scope="module")
def triton_ops():
    why = gpt2_kernels.registry.unavailable_reason("triton", DEVICE)
    if why is not None:
        pytest.skip(f"the Triton backend cannot run on {DEVICE} here: {why}")
    from gpt2_kernels import attention, layer_norm, linear_cross_entropy, mlp

    return {"layer_norm": layer_norm, "attention": attention, "mlp": mlp, "linear_cross_entropy": linear_cross_entropy}


def _rand(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def _opcheck_cases(m):
    """(name, op, args) for every registered op, on fast shapes: rows that are not a multiple of a block, optional
    arguments given and None, a KV cache's strided view, dropout, fp16, and gradients asked for or not."""
    ln, at, mlp, lce = m["layer_norm"], m["attention"], m["mlp"], m["linear_cross_entropy"]
    x, r = _rand(3, 5, 64), _rand(3, 5, 64)
    seed = torch.tensor(1234)
    cache = torch.randn(2, 1, 2, 16, 32, device=DEVICE)  # (k/v, B, nh, block, hs)
    q = _rand(1, 2, 5, 32)
    rows, w_fc, w_proj = _rand(7, 64), _rand(256, 64) * 0.1, _rand(64, 256) * 0.1
    h, w = _rand(11, 64), _rand(100, 64) * 0.1
    targets = torch.randint(0, 100, (11,), device=DEVICE)
    targets[0] = -1
    return [
        ("layer_norm_fwd", ln._layer_norm_fwd_op, (x, _rand(64), _rand(64), 1e-5, None)),
        ("layer_norm_fwd residual", ln._layer_norm_fwd_op, (x, _rand(64), _rand(64), 1e-5, r)),
        ("layer_norm_fwd no weight", ln._layer_norm_fwd_op, (x, None, None, 1e-5, r)),
        ("layer_norm_bwd", ln._layer_norm_bwd_op,
         (_rand(15, 64, grad=False), _rand(15, 64, grad=False), _rand(64, grad=False), _rand(15, grad=False),
          torch.rand(15, device=DEVICE) + 0.5, _rand(15, 64, grad=False))),
        ("attention_fwd", at._attention_fwd_op, (q, _rand(1, 2, 5, 32), _rand(1, 2, 5, 32), True, 0.0, seed)),
        ("attention_fwd dropout", at._attention_fwd_op, (q, _rand(1, 2, 5, 32), _rand(1, 2, 5, 32), True, 0.3, seed)),
        ("attention_fwd kv-cache view", at._attention_fwd_op,
         (q.detach(), cache[0, :, :, :9], cache[1, :, :, :9], True, 0.0, seed)),
        ("mlp_fwd", mlp._mlp_fwd_op, (rows, w_fc.detach().requires_grad_(), _rand(256), w_proj.detach(), None, True)),
        ("mlp_fwd inference", mlp._mlp_fwd_op, (rows.detach(), w_fc.detach(), None, w_proj.detach(), None, False)),
        ("linear_cross_entropy_fwd", lce._forward_op, (h, w.detach().requires_grad_(), targets, -1, torch.float32,
                                                       True, True)),
        ("linear_cross_entropy_fwd fp16 weight only", lce._forward_op,
         (h.detach().half(), w.detach().half().requires_grad_(), targets, -1, torch.float16, False, True)),
        ("linear_cross_entropy_fwd loss only", lce._forward_op,
         (h.detach(), w.detach(), targets, -1, torch.float32, False, False)),
    ]


def test_opcheck_every_registered_op(triton_ops):
    # Schema (no aliasing, declared mutation), fake kernel against the real one, autograd registration, and the op
    # traced by AOTAutograd with dynamic shapes. The backward ops are checked through the forward ops' autograd
    # (test_aot_dispatch_dynamic runs their backward) and, layer_norm_bwd, directly.
    cases = _opcheck_cases(triton_ops)
    registered = {name.split(" ")[0] for name, _, _ in cases}
    from gpt2_kernels.runtime import LIBRARY

    library = {n for n in dir(getattr(torch.ops, LIBRARY)) if not n.startswith("_") and n != "name"}
    assert library - {"attention_bwd", "mlp_bwd"} <= registered, f"ops without an opcheck case: {library - registered}"
    for name, op, args in cases:
        try:
            torch.library.opcheck(op, args)
        except Exception as e:
            raise AssertionError(f"opcheck failed for {name}: {e}") from e


def test_opcheck_the_extension_s_loss_op():
    """The extension's chunked loss forward is registered the same way (``gpt2_kernels.chunked_loss.register_forward_op``)."""
    why = gpt2_kernels.registry.unavailable_reason("ext", DEVICE)
    if why is not None:
        pytest.skip(f"the extension cannot run here: {why}")
    from gpt2_kernels import ext

    h, w = _rand(11, 64), _rand(100, 64) * 0.1
    targets = torch.randint(0, 100, (11,), device=DEVICE)
    targets[0] = -1
    for args in ((h, w.detach().requires_grad_(), targets, -1, torch.float32, True, True),
                 (h.detach(), w.detach(), targets, -1, torch.float32, False, False)):
        torch.library.opcheck(ext._forward_op, args)


def test_eager_calls_bypass_the_registered_ops(triton_ops):
    """Eagerly, the public functions call the launchers directly: a custom op costs ~8 us of host time per forward
    and ~75 us per forward + backward (layer_norm, 2-core CPU), which decoding and small batches would feel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gpt2_kernels.runtime import LIBRARY

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    m = triton_ops
    x, r, w = _rand(2, 3, 64), _rand(2, 3, 64), _rand(64)
    q, k, v = _rand(1, 2, 4, 32), _rand(1, 2, 4, 32), _rand(1, 2, 4, 32)
    with Record():
        y = m["layer_norm"].layer_norm(x, w, None) + sum(m["layer_norm"].add_layer_norm(x, r, w, None))
        y = y + m["mlp"].mlp(y, _rand(256, 64), None, _rand(64, 256), None)
        loss = m["linear_cross_entropy"].linear_cross_entropy(y, _rand(100, 64), torch.zeros(2, 3, dtype=torch.long,
                                                                                             device=DEVICE))
        (loss + m["attention"].attention(q, k, v).sum()).backward()
    assert seen and not [op for op in seen if LIBRARY in op], "an eager call went through a registered op"


def test_fresh_model_compiles_fullgraph_with_its_id_check(backend):
    """A model as a library user builds it (``check_inputs`` on, as GPT() leaves it) compiles with fullgraph=True on
    ``model(idx, targets)``, computes the eager loss, and still refuses an id outside the vocabulary."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=32), backend=backend).to(DEVICE)
    assert model.check_inputs
    idx = torch.randint(0, 512, (2, 32), device=DEVICE)
    targets = torch.randint(0, 512, (2, 32), device=DEVICE)
    _, loss = model(idx, targets)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(f"{backend} compiled loss with the id check", compiled(idx, targets)[1], loss)
    if DEVICE == "cpu":  # on a GPU the check is a device-side assert, which ends the process's CUDA context
        bad = idx.clone()
        bad[1, 5] = 512  # the tiny preset's vocabulary is 512 (padded rows beyond it must not be reachable)
        with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 512\)"):
            compiled(bad, targets)
