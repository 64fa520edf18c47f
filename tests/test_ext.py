"""Tests of the C++/CUDA extension backend (``gpt2_kernels.ext`` on ``gpt2_kernels._C``).

Every op's forward and every gradient is compared with ``gpt2_kernels.ref`` on the CPU in fp32 and
bf16 (and on a GPU, when there is one, in fp32 / fp16 / bf16), on awkward shapes: T = 1, prime
sizes, Tq < Tk, row counts that are not a multiple of any block, ignored targets. The raw
``torch.ops.gpt2k`` operators go through ``torch.library.opcheck`` (schema, fake kernel, autograd
registration, AOT dispatch) and bad inputs must raise errors that name the argument.

The whole file is skipped, with the reason, when the extension was not built.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_kernels import ext, ref, registry
from gpt2_kernels.testing import assert_close

_WHY = ext.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"C++ extension unavailable: {_WHY}")

CUDA = torch.cuda.is_available() and _WHY is None and ext.has_cuda_kernels()
needs_gpu = pytest.mark.skipif(not CUDA, reason="the extension's CUDA kernels need a CUDA GPU and a CUDA build")

# The brief is fp32 and bf16 on the CPU; the kernels also take fp16 there, so it is checked too.
CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes: OpenMP's spinning threads only slow them down on a busy CI machine.
    # test_results_do_not_depend_on_thread_count runs the kernels on several threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fp32_reference_is_fp32():
    # On a GPU the fp32 reference must not run its matmuls in TF32, whatever another module set.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _run(fn, inputs, grad_out_seed=0):
    """fn(*inputs) and the gradient of every floating input w.r.t. a fixed random projection of the output."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(grad_out_seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    if out.dim() == 0:
        g = torch.ones_like(out)
    diff = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, diff, g))
    return out, [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def _parity(name, fn, inputs, dtype, device="cpu", **kwargs):
    """Compare fn (the extension) with the same function of gpt2_kernels.ref on inputs cast to dtype.

    kwargs (non-tensor arguments, e.g. causal) go to both functions.
    """
    fn_ext = functools.partial(getattr(ext, fn), **kwargs)
    fn_ref = functools.partial(getattr(ref, fn), **kwargs)
    low = [t.to(device=device, dtype=dtype) if t is not None and t.is_floating_point() else
           (t.to(device) if t is not None else None) for t in inputs]
    up = [t.float() if t is not None and t.is_floating_point() else t for t in low]
    y, gs = _run(fn_ext, low)
    y32, gs32 = _run(fn_ref, up)
    if dtype == torch.float32:
        assert_close(f"{name} out", y, y32)
        for i, (g, g32) in enumerate(zip(gs, gs32)):
            if g32 is not None:
                assert g is not None, f"{name}: no gradient for input {i}"
                assert_close(f"{name} grad[{i}]", g, g32)
        return
    y_lp, gs_lp = _run(fn_ref, low)
    assert y.dtype == y_lp.dtype, f"{name}: output dtype {y.dtype}, reference {y_lp.dtype}"
    assert_close(f"{name} out", y, y32, y_lp)
    for i, (g, g32, glp) in enumerate(zip(gs, gs32, gs_lp)):
        if g32 is not None:
            assert g is not None and g.dtype == glp.dtype, f"{name}: gradient {i} missing or of the wrong dtype"
            assert_close(f"{name} grad[{i}]", g, g32, glp)


def _randn(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------- parity on the CPU

LN_CASES = [  # (leading shape, C, weight?, bias?)
    ((1, 1), 64, True, True),        # one token
    ((2, 97), 67, True, True),       # prime rows and width
    ((3, 5), 768, False, False),     # GPT-2 width, no affine
    ((37,), 31, True, False),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C,has_w,has_b", LN_CASES)
def test_layer_norm(lead, C, has_w, has_b, dtype):
    x = _randn(*lead, C, scale=2.0) + 0.5
    w = _randn(C, seed=1) * 0.5 + 1.0 if has_w else None
    b = _randn(C, seed=2) * 0.1 if has_b else None
    _parity(f"layer_norm {lead}x{C}", "layer_norm", [x, w, b], dtype)


MLP_CASES = [((1, 1), 16, 64, True), ((2, 7), 24, 97, True), ((3, 13), 32, 128, False)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C,H,has_b", MLP_CASES)
def test_mlp(lead, C, H, has_b, dtype):
    x = _randn(*lead, C)
    w_fc, w_proj = _randn(H, C, seed=1, scale=C ** -0.5), _randn(C, H, seed=2, scale=H ** -0.5)
    b_fc = _randn(H, seed=3, scale=0.5) if has_b else None
    b_proj = _randn(C, seed=4, scale=0.1) if has_b else None
    _parity(f"mlp {lead} C={C} H={H}", "mlp", [x, w_fc, b_fc, w_proj, b_proj], dtype)


ATTN_CASES = [  # (B, nh, Tq, Tk, hs, causal)
    (1, 2, 1, 1, 64, True),      # T = 1
    (1, 1, 1, 33, 64, True),     # one new query against a cache
    (2, 3, 97, 97, 64, True),    # prime T, more than one block of queries and keys
    (1, 2, 31, 67, 16, True),    # Tq < Tk
    (1, 1, 37, 37, 24, False),
    (2, 1, 13, 29, 13, False),   # prime head size, Tq < Tk, not causal
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,nh,Tq,Tk,hs,causal", ATTN_CASES)
def test_attention(B, nh, Tq, Tk, hs, causal, dtype):
    q, k, v = (_randn(B, nh, T, hs, seed=s) for s, T in ((0, Tq), (1, Tk), (2, Tk)))
    name = f"attention B={B} nh={nh} Tq={Tq} Tk={Tk} hs={hs} causal={causal}"
    _parity(name, "attention", [q, k, v], dtype, causal=causal)


CE_CASES = [  # (leading shape, C, V, number of ignored targets)
    ((1,), 16, 31, 0),        # one row
    ((3, 37), 24, 101, 9),    # several chunks (V/C > 1), ignored targets
    ((2, 5), 32, 257, 10),    # every target ignored: loss and gradients are 0
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C,V,n_ignored", CE_CASES)
def test_linear_cross_entropy(lead, C, V, n_ignored, dtype):
    h = _randn(*lead, C)
    w = _randn(V, C, seed=1, scale=C ** -0.5)
    t = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(2))
    t.view(-1)[:n_ignored] = -1
    _parity(f"linear_cross_entropy {lead} C={C} V={V}", "linear_cross_entropy", [h, w, t], dtype)
    if n_ignored == t.numel():
        loss = ext.linear_cross_entropy(h.to(dtype), w.to(dtype), t)
        assert loss.item() == 0.0


def test_linear_cross_entropy_gradient_buffers():
    """The loss head forms its gradients in the forward and hands them on in the backward: scaled by
    the upstream gradient, equal to the reference's whether the graph is kept or freed, and zero
    (not uninitialised memory) when there are no rows."""
    h, w = _randn(37, 24), _randn(53, 24, seed=1, scale=0.2)
    t = torch.randint(0, 53, (37,), generator=torch.Generator().manual_seed(3))
    t[::5] = -1
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(3.0 * ref.linear_cross_entropy(hh, ww, t), (hh, ww))
    loss = ext.linear_cross_entropy(hh, ww, t)
    kept = torch.autograd.grad(3.0 * loss, (hh, ww), retain_graph=True)  # buffers kept, copies scaled
    freed = torch.autograd.grad(3.0 * loss, (hh, ww))  # last use: scaled in place
    for name, a, b, c in zip(("dh", "dweight"), kept, freed, want):
        assert_close(f"{name} (graph kept)", a, c)
        assert torch.equal(a, b), name
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    ext.linear_cross_entropy(hh, ww, t).backward()  # seed 1.0: no scaling pass at all
    assert_close("dweight via .backward()", ww.grad, want[1] / 3.0)
    h0, w0 = _randn(0, 24).requires_grad_(), w.clone().requires_grad_()
    ext.linear_cross_entropy(h0, w0, torch.zeros(0, dtype=torch.long)).backward()
    assert torch.equal(w0.grad, torch.zeros_like(w0))


def test_linear_cross_entropy_out_of_range_target_is_a_value_error():
    """On CPU tensors the op checks its targets before any work and raises the Triton backend's ValueError (on
    a GPU, where that would cost a host read, such a row gets a NaN loss instead); the raw CPU op, called
    directly, still names the bad row."""
    h, w = _randn(6, 8), _randn(11, 8, seed=1)
    t = torch.tensor([3, 7, 11, 0, -1, 2])
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"targets must be class ids in \[0, 11\)"):
            ext.linear_cross_entropy(h.requires_grad_(grad), w, t)
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 11, outside \[0, 11\)"):
        torch.ops.gpt2k.cross_entropy_fwd(_randn(6, 11), t, -1)


def test_cross_entropy_op_takes_rows_of_a_padded_buffer():
    """The raw op on the first V columns of a (rows, Vp) buffer: the softmax over those V only, the gradient
    written there only (the loss head's padded vocabulary)."""
    V, Vp = 7, 64
    buf = torch.full((3, Vp), 50.0)
    buf[:, :V] = _randn(3, V)
    logits = buf[:, :V].clone()
    t = torch.tensor([2, -1, 6])
    rows = torch.ops.gpt2k.cross_entropy_fwd_bwd_(buf[:, :V], t, torch.tensor([0.5]), -1)
    expect = torch.softmax(logits, -1)
    expect[torch.arange(3), t.clamp(min=0)] -= 1.0
    expect[1] = 0.0
    assert_close("padded rows: gradient", buf[:, :V], 0.5 * expect)
    assert_close("padded rows: loss", rows, torch.stack([ref.cross_entropy(logits[i:i + 1], t[i:i + 1])
                                                         for i in range(3)]))
    assert torch.equal(buf[:, V:], torch.full((3, Vp - V), 50.0))


def test_cross_entropy_ignore_index_value():
    h, w = _randn(4, 8), _randn(11, 8, seed=1)
    t = torch.tensor([3, 7, 7, 0])
    got = ext.linear_cross_entropy(h, w, t, ignore_index=7)
    assert_close("ignore_index=7", got, ref.linear_cross_entropy(h, w, t, ignore_index=7))


def test_noncontiguous_inputs():
    x = _randn(8, 5, 3).transpose(0, 2)  # (3, 5, 8), not contiguous
    w = _randn(8, seed=1)
    assert_close("layer_norm transposed", ext.layer_norm(x, w, None), ref.layer_norm(x, w, None))
    q, k, v = (_randn(1, 11, 2, 16, seed=s).transpose(1, 2) for s in range(3))  # (1, 2, 11, 16) views
    assert_close("attention transposed", ext.attention(q, k, v), ref.attention(q, k, v))


def test_attention_reads_a_kv_cache_view_in_place():
    """The CPU forward takes k, v as a cache's first T positions (heads spaced block_size apart)
    without copying them, and gives what contiguous copies give; gradients still flow."""
    cache = _randn(2, 2, 3, 19, 16, seed=4)  # (k/v, B, nh, block_size, hs)
    k, v = cache[0, :, :, :11], cache[1, :, :, :11]  # (2, 3, 11, 16) views, heads 19 * 16 apart
    assert not k.is_contiguous() and ext._heads_evenly_spaced(k)
    q = _randn(2, 3, 4, 16, seed=5)
    y, lse = torch.ops.gpt2k.attention_fwd(q, k, v, True, 0.0)
    y_dense, lse_dense = torch.ops.gpt2k.attention_fwd(q, k.contiguous(), v.contiguous(), True, 0.0)
    assert torch.equal(y, y_dense) and torch.equal(lse, lse_dense)
    assert_close("attention on a cache view", ext.attention(q, k, v), ref.attention(q, k, v))
    grads = []
    for fn in (ext.attention, ref.attention):  # gradients reach the cache through the views
        c = cache.clone().requires_grad_()
        fn(q, c[0, :, :, :11], c[1, :, :, :11]).square().sum().backward()
        grads.append(c.grad)
    assert_close("gradient through cache views", grads[0], grads[1])
    assert grads[0][:, :, :, 11:].abs().max() == 0  # positions past T get none
    # A layout the op cannot read (rows not contiguous) is refused, naming the argument.
    with pytest.raises(RuntimeError, match="argument 'k' must be contiguous, or a view"):
        torch.ops.gpt2k.attention_fwd(q, k.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :11], v, True, 0.0)


def test_attention_dropout_falls_back_to_reference():
    q = _randn(1, 1, 4, 8)
    with pytest.warns(UserWarning, match="no dropout"):
        y = ext.attention(q, q, q, dropout_p=0.5)
    assert y.shape == q.shape


def test_results_do_not_depend_on_thread_count():
    """Every op gives bitwise the same result on 1 and on 3 threads (fixed-size partial sums)."""
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(301, 67, generator=g), torch.randn(67, generator=g), torch.randn(67, generator=g)
    q, k, v = (torch.randn(2, 3, 97, 16, generator=g) for _ in range(3))
    logits, t = torch.randn(37, 101, generator=g), torch.randint(0, 101, (37,), generator=g)
    ops = torch.ops.gpt2k

    def run_all():
        y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
        out = [y, *ops.layer_norm_bwd(x, x, w, mean, rstd), ops.bias_gelu_fwd(x, b)]
        y, s, mean, rstd = ops.add_layer_norm_fwd(x, x, w, b, 1e-5)
        out += [y, s, *ops.add_layer_norm_bwd(x, x, s, w, mean, rstd)]
        out += ops.bias_gelu_bwd(x, x, b)
        ya, lse = ops.attention_fwd(q, k, v, True, 0.0)
        out += [ya, lse, *ops.attention_bwd(q, q, k, v, ya, lse, True)]
        grad = logits.clone()
        out += [ops.cross_entropy_fwd_bwd_(grad, t, torch.tensor([0.1]), -1), grad]
        return out

    one = run_all()
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = run_all()
    finally:
        torch.set_num_threads(previous)
    for i, (a, b3) in enumerate(zip(one, three)):
        assert torch.equal(a, b3), f"output {i} differs between 1 and 3 threads"


def test_cpu_kernels_run_the_vector_build_this_cpu_supports():
    """On a CPU where torch runs its AVX2 / AVX-512 kernels, ours must not fall back to the SSE2 build.

    The loops are built in three versions (target_clones) picked by CPU feature when the library
    loads; a dispatch keyed on the wrong thing (a CPU model name, say) silently runs the baseline
    build, 4 to 7 times slower, with every parity test still passing.
    """
    level = ext.cpu_simd_level()
    torch_level = torch.backends.cpu.get_cpu_capability()
    assert level in {"avx512", "avx2", "sse2", "native"}, level
    if torch_level in {"AVX2", "AVX512"}:
        assert level != "sse2", f"torch runs {torch_level} kernels here but the extension runs its SSE2 build"


def test_registry_builds_cuda_backend_on_cpu():
    ops = registry.build_ops("ext", "cpu")
    assert ops.layer_norm is ext.layer_norm and ops.linear_cross_entropy is ext.linear_cross_entropy


# ----------------------------------------------------------------------------- raw ops: opcheck and errors


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    x, w, b = r(5, 12), r(12), r(12)
    _, mean, rstd = torch.ops.gpt2k.layer_norm_fwd(x, w, b, 1e-5)
    res = r(5, 12)
    _, s, s_mean, s_rstd = torch.ops.gpt2k.add_layer_norm_fwd(x, res, w, b, 1e-5)
    q, k, v = r(1, 2, 3, 8), r(1, 2, 7, 8), r(1, 2, 7, 8)
    y, lse = torch.ops.gpt2k.attention_fwd(q, k, v, True, 0.0)
    h, hb = r(3, 10), r(10)
    logits, t = r(4, 9), torch.tensor([1, -1, 8, 0])
    scale = torch.tensor([0.25])
    ops = torch.ops.gpt2k
    return [
        ("layer_norm_fwd", ops.layer_norm_fwd.default, (x.requires_grad_(), w.requires_grad_(), b, 1e-5)),
        ("layer_norm_fwd none", ops.layer_norm_fwd.default, (x, None, None, 1e-5)),
        ("layer_norm_bwd", ops.layer_norm_bwd.default, (r(5, 12), x.detach(), w.detach(), mean, rstd)),
        ("add_layer_norm_fwd", ops.add_layer_norm_fwd.default,
         (x.detach().clone().requires_grad_(), res.requires_grad_(), w.detach().clone().requires_grad_(),
          b.clone().requires_grad_(), 1e-5)),
        ("add_layer_norm_fwd none", ops.add_layer_norm_fwd.default, (x.detach(), res.detach(), None, None, 1e-5)),
        ("add_layer_norm_bwd", ops.add_layer_norm_bwd.default, (r(5, 12), r(5, 12), s, w.detach(), s_mean, s_rstd)),
        ("add_layer_norm_bwd none", ops.add_layer_norm_bwd.default, (r(5, 12), r(5, 12), s, None, s_mean, s_rstd)),
        ("bias_gelu_fwd", ops.bias_gelu_fwd.default, (h.requires_grad_(), hb.requires_grad_())),
        ("bias_gelu_bwd", ops.bias_gelu_bwd.default, (r(3, 10), h.detach(), None)),
        ("attention_fwd", ops.attention_fwd.default, (q.requires_grad_(), k, v.requires_grad_(), True, 0.0)),
        ("attention_bwd", ops.attention_bwd.default, (r(1, 2, 3, 8), q.detach(), k, v.detach(), y, lse, True)),
        ("cross_entropy_fwd", ops.cross_entropy_fwd.default, (logits, t, -1)),
        ("cross_entropy_fwd_bwd_", ops.cross_entropy_fwd_bwd_.default, (logits.clone(), t, scale, -1)),
        ("cross_entropy_fwd_bwd_ padded", ops.cross_entropy_fwd_bwd_.default, (r(4, 64)[:, :9], t, scale, -1)),
    ]


@pytest.mark.parametrize("case", _opcheck_cases() if _WHY is None else [], ids=lambda c: c[0])
def test_opcheck(case):
    _, op, args = case
    torch.library.opcheck(op, args)


def test_cross_entropy_op_writes_gradient_in_place():
    logits = _randn(3, 7)
    t = torch.tensor([2, -1, 6])
    expect = torch.softmax(logits, -1)
    expect[torch.arange(3), t.clamp(min=0)] -= 1.0
    expect[1] = 0.0
    rows = torch.ops.gpt2k.cross_entropy_fwd_bwd_(logits, t, torch.tensor([0.5]), -1)
    assert_close("in-place gradient", logits, 0.5 * expect)
    assert rows[1].item() == 0.0


BAD = [  # (op, args builder, words the error must contain)
    ("layer_norm_fwd", lambda: (torch.randn(3, 4, dtype=torch.float64), None, None, 1e-5), ["'x'", "float64"]),
    ("layer_norm_fwd", lambda: (torch.randn(3, 4), torch.randn(5), None, 1e-5), ["'weight'", "(4,)"]),
    ("layer_norm_fwd", lambda: (torch.randn(3, 4), None, torch.randn(4).to(torch.bfloat16), 1e-5), ["'bias'", "dtype"]),
    ("layer_norm_fwd", lambda: (torch.randn(4, 3).t(), None, None, 1e-5), ["'x'", "contiguous"]),
    ("layer_norm_fwd", lambda: (torch.randn(2, 3, 4), None, None, 1e-5), ["'x'", "2-D"]),
    ("add_layer_norm_fwd", lambda: (torch.randn(3, 4), torch.randn(3, 5), None, None, 1e-5), ["'residual'", "shape"]),
    ("add_layer_norm_fwd", lambda: (torch.randn(3, 4), torch.randn(3, 4).half(), None, None, 1e-5),
     ["'residual'", "float16"]),
    ("add_layer_norm_fwd", lambda: (torch.randn(3, 4), torch.randn(4, 3).t(), None, None, 1e-5),
     ["'residual'", "contiguous"]),
    ("add_layer_norm_bwd", lambda: (torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(3),
                                    torch.randn(3)), ["'ds'", "shape"]),
    ("add_layer_norm_bwd", lambda: (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), None, torch.randn(3),
                                    torch.randn(2)), ["'rstd'", "[3]"]),
    ("bias_gelu_fwd", lambda: (torch.randn(3, 4), torch.randn(3)), ["'bias'", "(4,)"]),
    ("bias_gelu_bwd", lambda: (torch.randn(3, 5), torch.randn(3, 4), None), ["'dact'", "shape"]),
    ("attention_fwd", lambda: (torch.randn(1, 1, 5, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), True, 0.0),
     ["'k'", "fewer"]),
    ("attention_fwd", lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), True, 0.1),
     ["dropout_p"]),
    ("attention_fwd", lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 8, 4).transpose(2, 3), torch.randn(1, 1, 4, 8),
                               True, 0.0), ["'k'", "contiguous"]),
    ("attention_fwd", lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), True, 0.0), ["'q'", "4-D"]),
    ("attention_bwd", lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8),
                               torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4).double(), True),
     ["'lse'", "float32"]),
    ("cross_entropy_fwd", lambda: (torch.randn(3, 5), torch.tensor([1, 2, 3], dtype=torch.int32), -1), ["'targets'", "int64"]),
    ("cross_entropy_fwd", lambda: (torch.randn(3, 5), torch.tensor([1, 2]), -1), ["'targets'", "(3,)"]),
    ("cross_entropy_fwd", lambda: (torch.randn(3, 5), torch.tensor([1, 5, 0]), -1), ["targets[1]", "outside"]),
    ("cross_entropy_fwd_bwd_", lambda: (torch.randn(3, 5), torch.tensor([1, 2, 0]), torch.tensor(0.5).double(), -1),
     ["'scale'", "float32"]),
    ("cross_entropy_fwd", lambda: (torch.randn(5, 3).t(), torch.tensor([1, 2, 0]), -1),
     ["'logits'", "contiguous rows"]),
    ("cross_entropy_fwd", lambda: (torch.randn(3, 10)[:, ::2], torch.tensor([1, 2, 0]), -1),
     ["'logits'", "contiguous rows"]),
]


@pytest.mark.parametrize("op,make,words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(op, make, words):
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.gpt2k, op)(*make())
    msg = str(info.value)
    assert f"gpt2k::{op}" in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in: {msg}"


# ----------------------------------------------------------------------------- CUDA kernels


@needs_gpu
def test_cuda_device_mismatch_names_the_argument():
    x = torch.randn(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="'weight'.*cpu"):
        torch.ops.gpt2k.layer_norm_fwd(x, torch.randn(4), None, 1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_layer_norm(dtype):
    for lead, C in (((1, 1), 64), ((3, 97), 768), ((2, 5), 1600), ((7,), 33)):
        x = _randn(*lead, C, scale=2.0) + 0.5
        _parity(f"ext layer_norm {lead}x{C}", "layer_norm", [x, _randn(C, seed=1), _randn(C, seed=2)], dtype, "cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_mlp(dtype):
    for lead, C, H in (((1, 1), 16, 64), ((4, 97), 768, 3072), ((3, 13), 24, 97)):
        args = [_randn(*lead, C), _randn(H, C, seed=1, scale=C ** -0.5), _randn(H, seed=3, scale=0.5),
                _randn(C, H, seed=2, scale=H ** -0.5), _randn(C, seed=4, scale=0.1)]
        _parity(f"ext mlp {lead} C={C} H={H}", "mlp", args, dtype, "cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,nh,Tq,Tk,hs,causal", ATTN_CASES + [(2, 12, 1025, 1025, 64, True), (1, 2, 129, 200, 128, False)])
def test_cuda_attention(B, nh, Tq, Tk, hs, causal, dtype):
    q, k, v = (_randn(B, nh, T, hs, seed=s) for s, T in ((0, Tq), (1, Tk), (2, Tk)))
    _parity(f"ext attention {B},{nh},{Tq},{Tk},{hs},{causal}", "attention", [q, k, v], dtype, "cuda", causal=causal)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_linear_cross_entropy(dtype):
    # (8, 128) rows: N >= 500, so the GEMMs run on the padded vocabulary (gpt2_kernels.chunked_loss.pads_vocab).
    for lead, C, V, n_ign in (((1,), 16, 31, 0), ((3, 37), 24, 101, 9), ((4, 64), 768, 50257, 5), ((2, 5), 32, 257, 10),
                              ((8, 128), 768, 50257, 40)):
        h, w = _randn(*lead, C), _randn(V, C, seed=1, scale=C ** -0.5)
        t = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(2))
        t.view(-1)[:n_ign] = -1
        _parity(f"ext linear_cross_entropy {lead} V={V}", "linear_cross_entropy", [h, w, t], dtype, "cuda")


@needs_gpu
def test_cuda_opcheck():
    for name, op, args in _opcheck_cases():
        cargs = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                      for a in args)
        torch.library.opcheck(op, cargs)


def test_torch_compile_traces_every_op():
    """A block built from the four ops compiles (fake kernels + autograd) and matches eager."""

    def block(x, w, b, w_fc, b_fc, w_proj, b_proj, w_out, t):
        h = ext.layer_norm(x, w, b)
        B, T, C = h.shape
        q = h.view(B, T, 2, C // 2).transpose(1, 2)  # (B, nh, T, hs)
        h = h + ext.attention(q, q, q).transpose(1, 2).reshape(B, T, C)
        h = h + ext.mlp(h, w_fc, b_fc, w_proj, b_proj)
        return ext.linear_cross_entropy(h, w_out, t)

    shapes = [(2, 7, 16), (16,), (16,), (64, 16), (64,), (16, 64), (16,), (50, 16)]
    args = [(_randn(*s, seed=i) * (0.2 if len(s) == 2 else 1.0)).requires_grad_() for i, s in enumerate(shapes)]
    t = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(9))
    loss = block(*args, t)
    grads = torch.autograd.grad(loss, args)
    torch._dynamo.reset()
    loss_c = torch.compile(block, backend="aot_eager", fullgraph=True)(*args, t)
    grads_c = torch.autograd.grad(loss_c, args)
    assert_close("compiled loss", loss_c, loss)
    for i, (g, gc) in enumerate(zip(grads, grads_c)):
        assert_close(f"compiled grad[{i}]", gc, g)


def test_torch_compile_traces_add_layer_norm():
    """The fused add + layer norm under torch.compile (fake kernel + autograd) matches eager, as in a block."""

    def two_adds(x, a, m, w1, b1, w2, b2):
        h, x = ext.add_layer_norm(x, a, w1, b1)
        h, x = ext.add_layer_norm(x, m * h, w2, b2)
        return (h * h).sum() + x.sum()

    shapes = [(2, 7, 16), (2, 7, 16), (2, 7, 16), (16,), (16,), (16,), (16,)]
    args = [_randn(*s, seed=i).requires_grad_() for i, s in enumerate(shapes)]
    loss = two_adds(*args)
    grads = torch.autograd.grad(loss, args)
    torch._dynamo.reset()
    loss_c = torch.compile(two_adds, backend="aot_eager", fullgraph=True)(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    assert_close("compiled loss", loss_c, loss)
    for i, (g, gc) in enumerate(zip(grads, grads_c)):
        assert_close(f"compiled grad[{i}]", gc, g)


_BLOCK_AOT_BUILD = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'gpt2_kernels._C':\n"
    "            raise ImportError('blocked by the test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def _run_python(code: str, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=timeout,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, proc.stderr
    return proc


def test_missing_extension_is_reported_not_raised():
    """Without gpt2_kernels._C and with the build on first use failing, importing gpt2_kernels.ext works and the registry
    says why 'ext' is unavailable."""
    code = _BLOCK_AOT_BUILD + (
        "import gpt2_kernels.build\n"
        "def no_compiler(log=None):\n"
        "    raise RuntimeError('no compiler (the test)')\n"
        "gpt2_kernels.build.build_on_first_use = no_compiler\n"
        "import gpt2_kernels.ext as c\n"
        "from gpt2_kernels import registry\n"
        "assert not c.has_cuda_kernels()\n"
        "print(c.unavailable_reason())\n"
        "try:\n"
        "    registry.build_ops('ext')\n"
        "except registry.BackendError as e:\n"
        "    print(e)\n"
    )
    reason, error = _run_python(code, 120).stdout.strip().splitlines()
    assert "blocked by the test" in reason and "no compiler (the test)" in reason and "pip install" in reason
    assert "ext" in error and "blocked by the test" in error


def test_extension_is_built_on_first_use_without_an_install_build():
    """An install that did not build gpt2_kernels._C (pip's isolated build has no torch) gets the extension on first
    use: compiled once into torch's extension cache, then loaded from there, its ops equal to the reference."""
    code = _BLOCK_AOT_BUILD + (
        "import torch\n"
        "import gpt2_kernels.ext as c\n"
        "from gpt2_kernels import build, ref\n"
        "assert c.unavailable_reason() is None, c.unavailable_reason()\n"
        "assert c._load()[0].__name__ == build.JIT_NAME\n"
        "x = torch.randn(5, 48)\n"
        "w, b = torch.randn(48), torch.randn(48)\n"
        "print(float((c.layer_norm(x, w, b) - ref.layer_norm(x, w, b)).abs().max()), c.cpu_simd_level())\n"
    )
    err, simd = _run_python(code, 600).stdout.split()
    assert float(err) < 1e-5 and simd == ext.cpu_simd_level()


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None, reason="needs Linux and g++")
def test_a_library_with_its_own_libstdcxx_is_detected(tmp_path):
    """A linker that embeds a static libstdc++ gives the process two copies, and the extension's first formatted
    error crashed the process (seen on an H100 machine). The check tells such a library from a normal one, and
    naming torch's shared libstdc++ to the linker (``build.link_flags``) keeps even a static-by-default link shared."""
    from gpt2_kernels import build

    src = tmp_path / "f.cpp"
    src.write_text("#include <sstream>\n#include <string>\n"
                   "extern \"C\" int f(long x) { std::ostringstream s; s << x; return (int)s.str().size(); }\n")
    # After the objects, as setuptools and torch.utils.cpp_extension pass link flags (with --as-needed a library
    # named before the objects that need it is dropped).
    shared = [f for f in build.link_flags() if f.startswith("/")]  # torch's libstdc++, named to the linker
    assert shared, "no libstdc++ mapped into this process"
    cases = ((["-static-libstdc++"], True), ([], False), ([*shared, "-static-libstdc++"], False))
    for i, (flags, embedded) in enumerate(cases):
        lib = tmp_path / f"lib{i}.so"
        subprocess.run(["g++", "-shared", "-fPIC", str(src), *flags, "-o", str(lib)], check=True, timeout=120)
        assert build.embeds_libstdcxx(str(lib)) is embedded, flags
    assert not build.embeds_libstdcxx(ext._load()[0].__file__)
