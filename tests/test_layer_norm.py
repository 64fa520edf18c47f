"""Parity tests of the Triton layer norm, and of the fused add + layer norm of every backend, against ``gpt2_kernels.ref``.

On a machine without a GPU the kernels run under the Triton interpreter (set by conftest.py) in
fp32 and fp16; the bf16 and large-shape checks need a CUDA GPU and are skipped elsewhere.
Every test compares the forward outputs and every gradient with ``gpt2_kernels.ref``. The registry op
``add_layer_norm`` is checked on every backend that can run here (torch, triton, the extension).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import gpt2_kernels.registry
from gpt2_kernels import layer_norm as ln
from gpt2_kernels import ref
from gpt2_kernels.testing import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="bf16 / large shapes need a CUDA GPU (the interpreter has no bf16)")


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
    return t.requires_grad_(True)


def _run(fn, inputs, grads_out, dtype=None):
    """Outputs of fn(*inputs) and the gradients of every input, inputs cast to ``dtype`` if given.

    Params (1-D inputs) keep their dtype unless ``dtype`` is given, so the fp32 reference sees
    upcast copies of everything.
    """
    leaves = [_leaf(t, dtype) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads_out) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs, [leaf.grad if leaf is not None else None for leaf in leaves]


def _compare(name, got, ref32, ref_lowp):
    """Compare with the fp32 reference, passing the low-precision one when ``got`` is fp16/bf16.

    ``ref_lowp`` is the reference run on the very inputs the kernel saw. An fp32 result (a
    parameter gradient of fp32 params under fp16 activations) is checked against it at fp32
    tolerance: the reference computes it in fp32 from exactly those values, whereas ref32 may
    have started from other ones (the unrounded fp32 sum x + residual of the add variant).
    """
    if got is None:
        assert ref32 is None, f"{name}: no gradient, but the reference has one"
        return
    if ref_lowp is None:  # the reference's output was unused: a backend may give zeros instead of None
        assert not got.any(), f"{name}: a non-zero gradient where the reference has none"
        return
    assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype}, reference {ref_lowp.dtype}"
    if got.dtype == torch.float32:
        assert_close(name, got, ref_lowp)
    else:
        assert_close(name, got, ref32, ref_lowp)


def _inputs(shape, dtype, param_dtype, has_w=True, has_b=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g) * 2.0 + 0.5).to(DEVICE, dtype)  # non-zero mean: centring matters
    w = (torch.randn(C, generator=g) * 0.5 + 1.0).to(DEVICE, param_dtype) if has_w else None
    b = (torch.randn(C, generator=g) * 0.5).to(DEVICE, param_dtype) if has_b else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, w, b, dy


def _check_layer_norm(shape, dtype, param_dtype, has_w=True, has_b=True, eps=1e-5, x_transform=None):
    x, w, b, dy = _inputs(shape, dtype, param_dtype, has_w, has_b)
    if x_transform is not None:
        x = x_transform(x)
    names = ("y",), ("dx", "dweight", "dbias")
    (y,), grads = _run(lambda x_, w_, b_: ln.layer_norm(x_, w_, b_, eps), (x, w, b), (dy,))
    (y32,), grads32 = _run(lambda x_, w_, b_: ref.layer_norm(x_, w_, b_, eps), (x, w, b), (dy.float(),),
                           dtype=torch.float32)
    (ylo,), gradslo = _run(lambda x_, w_, b_: ref.layer_norm(x_, w_, b_, eps), (x, w, b), (dy,))
    tag = f"layer_norm {tuple(shape)} {dtype} params {param_dtype}"
    _compare(f"{tag} {names[0][0]}", y, y32, ylo)
    for name, got, r32, rlo in zip(names[1], grads, grads32, gradslo):
        _compare(f"{tag} {name}", got, r32, rlo)


SHAPES = [(1, 1), (3, 7), (5, 97), (2, 13, 48), (37, 768), (2, 1, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_norm_matches_reference(shape, dtype):
    _check_layer_norm(shape, dtype, dtype)


@pytest.mark.parametrize("shape", [(5, 97), (37, 768)], ids=lambda s: "x".join(map(str, s)))
def test_fp16_activations_fp32_params(shape):
    # Mixed precision: parameter gradients must come back in fp32, accumulated in fp32.
    _check_layer_norm(shape, torch.float16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("has_w,has_b", [(False, True), (True, False), (False, False)], ids=["no_w", "no_b", "none"])
def test_optional_weight_and_bias(dtype, has_w, has_b):
    _check_layer_norm((11, 97), dtype, dtype, has_w=has_w, has_b=has_b)


def test_non_contiguous_input_and_large_eps():
    # A column-major x (same values, non-contiguous rows) and an eps large enough to matter.
    def column_major(t):
        t = t.t().contiguous().t()
        assert not t.is_contiguous()
        return t

    _check_layer_norm((13, 48), torch.float32, torch.float32, eps=0.5, x_transform=column_major)


def test_constant_rows():
    # Zero variance: xhat = 0, y = bias, and the gradients stay finite.
    x = torch.full((4, 33), 3.0, device=DEVICE)
    w = torch.randn(33, device=DEVICE)
    b = torch.randn(33, device=DEVICE)
    dy = torch.randn(4, 33, device=DEVICE)
    (y,), grads = _run(ln.layer_norm, (x, w, b), (dy,))
    (yr,), grads_r = _run(ref.layer_norm, (x, w, b), (dy,))
    assert_close("layer_norm constant y", y, yr)
    for name, got, r in zip(("dx", "dweight", "dbias"), grads, grads_r):
        assert_close(f"layer_norm constant {name}", got, r)


@pytest.mark.parametrize("n_rows,C,rows_per_program", [(37, 48, 5), (37, 768, 7), (23, 97, 1), (9, 7, 64)])
def test_backward_launcher_row_groups(n_rows, C, rows_per_program):
    # Programs own contiguous row groups whose size is not a multiple of the tile height (or of
    # n_rows): the last group is short, and tiles must not leak rows into the next group.
    x, w, b, dy = _inputs((n_rows, C), torch.float32, torch.float32, seed=3)
    y, s, mean, rstd = ln.layer_norm_fwd(x, w, b)
    assert s is None and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    xm = x.double()
    assert_close("layer_norm_fwd mean", mean, xm.mean(-1).float())
    assert_close("layer_norm_fwd rstd", rstd, torch.rsqrt(xm.var(-1, unbiased=False) + 1e-5).float())
    dx, dw, db = ln.layer_norm_bwd(dy, x, w, mean, rstd, rows_per_program=rows_per_program)
    (yr,), (dxr, dwr, dbr) = _run(ref.layer_norm, (x, w, b), (dy,))
    assert_close("layer_norm_fwd y", y, yr)
    assert_close("layer_norm_bwd dx", dx, dxr)
    assert_close("layer_norm_bwd dweight", dw, dwr)
    assert_close("layer_norm_bwd dbias", db, dbr)


def test_backward_is_deterministic():
    x, w, b, dy = _inputs((37, 768), torch.float32, torch.float32, seed=4)
    _, _, mean, rstd = ln.layer_norm_fwd(x, w, b)
    first = ln.layer_norm_bwd(dy, x, w, mean, rstd)
    second = ln.layer_norm_bwd(dy, x, w, mean, rstd)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_empty_batch():
    x = torch.randn(0, 5, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y = ln.layer_norm(x, w, None)
    assert y.shape == (0, 5, 64)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_double_backward_is_refused():
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    (dx,) = torch.autograd.grad(ln.layer_norm(x, w, None).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        dx.sum().backward()


# ---------------------------------------------------------------------------------------------
# Fused residual add + layer norm
# ---------------------------------------------------------------------------------------------


def _ref_add_layer_norm(x, r, w, b, eps=1e-5):
    s = x + r
    return ref.layer_norm(s, w, b, eps), s


def _check_add_layer_norm(shape, dtype, param_dtype, use_y=True, use_s=True, has_w=True, has_b=True,
                          fn=ln.add_layer_norm, transform=None):
    """fn (an ``add_layer_norm``) against the reference: y, s and the gradients of x, residual, weight, bias.
    ``transform`` is applied to x and the residual (e.g. to make them non-contiguous)."""
    x, w, b, dy = _inputs(shape, dtype, param_dtype, has_w, has_b, seed=1)
    g = torch.Generator().manual_seed(2)
    r = torch.randn(shape, generator=g).to(DEVICE, dtype)
    ds = torch.randn(shape, generator=g).to(DEVICE, dtype)
    if transform is not None:
        x, r = transform(x), transform(r)
    douts = (dy if use_y else None, ds if use_s else None)
    outs, grads = _run(fn, (x, r, w, b), douts)
    outs32, grads32 = _run(_ref_add_layer_norm, (x, r, w, b), tuple(d.float() if d is not None else None
                                                                    for d in douts), dtype=torch.float32)
    outslo, gradslo = _run(_ref_add_layer_norm, (x, r, w, b), douts)
    tag = f"add_layer_norm {tuple(shape)} {dtype} params {param_dtype}"
    for name, got, r32, rlo in zip(("y", "s"), outs, outs32, outslo):
        _compare(f"{tag} {name}", got, r32, rlo)
    for name, got, r32, rlo in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads32, gradslo):
        _compare(f"{tag} {name}", got, r32, rlo)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 13, 48), (37, 768)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_add_layer_norm_matches_reference(shape, dtype):
    _check_add_layer_norm(shape, dtype, dtype)


def test_add_layer_norm_mixed_precision_no_bias():
    _check_add_layer_norm((5, 97), torch.float16, torch.float32, has_b=False)


@pytest.mark.parametrize("use_y,use_s", [(True, False), (False, True)], ids=["only_y", "only_s"])
def test_add_layer_norm_one_output_used(use_y, use_s):
    _check_add_layer_norm((5, 97), torch.float32, torch.float32, use_y=use_y, use_s=use_s)


# ---------------------------------------------------------------------------------------------
# add_layer_norm: the registry op, on every backend
# ---------------------------------------------------------------------------------------------


def _registry_add_layer_norm(backend):
    why = gpt2_kernels.registry.unavailable_reason(backend, DEVICE)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run on {DEVICE} here: {why}")
    return gpt2_kernels.registry.build_ops(backend, DEVICE).add_layer_norm


def _column_major(t):
    t = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, rows no longer contiguous
    assert not t.is_contiguous()
    return t


BACKENDS = ["torch", "triton", "ext", "native"]
ADD_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16", marks=needs_gpu)]
ADD_SHAPES = [(1, 768), (17, 768), (17, 1), (1, 1), (3, 17, 97)]  # 1 row, 17 rows, C = 1, GPT-2's 768


@pytest.mark.parametrize("shape", ADD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ADD_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_add_layer_norm(backend, dtype, shape):
    _check_add_layer_norm(shape, dtype, dtype, fn=_registry_add_layer_norm(backend))


@pytest.mark.parametrize("dtype", ADD_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_add_layer_norm_non_contiguous_no_affine(backend, dtype):
    fn = _registry_add_layer_norm(backend)
    _check_add_layer_norm((17, 48), dtype, dtype, fn=fn, transform=_column_major)
    _check_add_layer_norm((17, 48), dtype, dtype, fn=fn, has_w=False, has_b=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_add_layer_norm_one_output_used(backend):
    # In a model both outputs are used; with one unused, its gradient is missing (None or zeros).
    fn = _registry_add_layer_norm(backend)
    for use_y, use_s in ((True, False), (False, True)):
        _check_add_layer_norm((17, 97), torch.float32, torch.float32, use_y=use_y, use_s=use_s, fn=fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_reference_add_layer_norm_is_the_add_then_the_layer_norm(dtype):
    # The contract, bitwise: s = x + residual in x's dtype, y = ref.layer_norm(s); the gradients are
    # those of the unfused composition. In fp32, y also matches F.layer_norm (an independent oracle).
    x, w, b, dy = _inputs((17, 97), dtype, dtype, seed=5)
    r = torch.randn(17, 97, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    ds = torch.randn(17, 97, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)

    def unfused(x_, r_, w_, b_):
        s = x_ + r_
        return ref.layer_norm(s, w_, b_), s

    (y, s), grads = _run(ref.add_layer_norm, (x, r, w, b), (dy, ds))
    (yu, su), grads_u = _run(unfused, (x, r, w, b), (dy, ds))
    assert y.dtype == s.dtype == dtype
    assert torch.equal(y, yu) and torch.equal(s, su)
    for name, got, want in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_u):
        assert torch.equal(got, want), name
    if dtype == torch.float32:
        assert_close("ref add_layer_norm y vs F.layer_norm", y, F.layer_norm(x + r, (97,), w, b, 1e-5))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,error,words", [
    ("weight_shape", ValueError, ["layer_norm", "weight", "(97,)"]),
    ("bias_shape", ValueError, ["layer_norm", "bias", "(97,)"]),
    ("weight_device", ValueError, ["layer_norm", "weight", "device"]),
    ("x_float64", TypeError, ["layer_norm", "x", "float64", "float16"]),
    ("x_int", TypeError, ["layer_norm", "x", "int64"]),
    ("weight_int", TypeError, ["layer_norm", "weight", "floating"]),
    ("too_wide", ValueError, ["layer_norm", "C=8193", "8192"]),
    ("zero_width", ValueError, ["layer_norm", "C=0"]),
    ("scalar", ValueError, ["layer_norm", "x", "dimension"]),
])
def test_bad_input(case, error, words):
    x = torch.randn(5, 97, device=DEVICE)
    w, b = torch.randn(97, device=DEVICE), torch.randn(97, device=DEVICE)
    if case == "weight_shape":
        w = torch.randn(96, device=DEVICE)
    elif case == "bias_shape":
        b = torch.randn(1, 97, device=DEVICE)
    elif case == "weight_device":
        w = torch.randn(97, device="meta")
    elif case == "x_float64":
        x = x.double()
    elif case == "x_int":
        x = torch.ones(5, 97, dtype=torch.int64, device=DEVICE)
    elif case == "weight_int":
        w = torch.ones(97, dtype=torch.int32, device=DEVICE)
    elif case == "too_wide":
        x, w, b = torch.randn(2, 8193, device=DEVICE), None, None
    elif case == "zero_width":
        x, w, b = torch.randn(2, 0, device=DEVICE), None, None
    elif case == "scalar":
        x, w, b = torch.tensor(1.0, device=DEVICE), None, None
    with pytest.raises(error) as info:
        ln.layer_norm(x, w, b)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.skipif(CUDA, reason="checks the CPU interpreter's missing bf16")
def test_bf16_on_cpu_interpreter_is_refused():
    with pytest.raises(TypeError, match="layer_norm: x is bfloat16.*interpreter"):
        ln.layer_norm(torch.randn(2, 8, dtype=torch.bfloat16), None, None)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="layer_norm: x is a CPU tensor.*TRITON_INTERPRET=1"):
        ln.layer_norm(torch.randn(2, 8), None, None)


@pytest.mark.parametrize("case", ["shape", "dtype"])
def test_add_layer_norm_bad_residual(case):
    x = torch.randn(3, 16, device=DEVICE)
    r = torch.randn(3, 15 if case == "shape" else 16, device=DEVICE)
    r = r.half() if case == "dtype" else r
    with pytest.raises((ValueError, TypeError), match=f"add_layer_norm: residual has {case}"):
        ln.add_layer_norm(x, r, None, None)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time launch list
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cc", [75, 80, 86, 89, 90])
def test_launch_configs_cover_every_launch(cc):
    configs = ln.launch_configs(cc)
    kernels = {ln._layer_norm_fwd_kernel: "HAS_RESIDUAL", ln._layer_norm_bwd_kernel: "HAS_DS"}
    for cfg in configs:
        params = list(inspect.signature(cfg.kernel.fn).parameters)
        assert list(cfg.signature) + list(cfg.constexprs) == params, cfg.label
    # Every (kernel, dtype, flag, tile) a launcher picks for a GPT-2 width or the widest row.
    listed = {(c.kernel, c.signature["X"], c.constexprs[kernels[c.kernel]], c.constexprs["BLOCK_C"],
               c.constexprs["BLOCK_R"], c.num_warps, c.num_stages) for c in configs}
    for C in (64, 128, 768, 1024, 1280, 1600, ln.MAX_C):
        for kernel, backward in ((ln._layer_norm_fwd_kernel, False), (ln._layer_norm_bwd_kernel, True)):
            block_c, block_r, num_warps = ln._tile(C, backward)
            for t in ("*fp32", "*fp16", "*bf16"):
                for flag in (False, True):
                    # bf16 needs sm_80: the launchers refuse it before, so it must not be listed there.
                    wanted = t != "*bf16" or cc >= 80
                    assert ((kernel, t, flag, block_c, block_r, num_warps, 1) in listed) == wanted, (C, t, flag)
    assert len(configs) == len(listed)  # no duplicates


def test_tiles_hold_a_whole_row_in_few_registers():
    # Every width up to MAX_C fits one tile, and no thread holds more than 16 elements of it.
    for C in list(range(1, ln.MAX_C + 1, 97)) + [ln.MAX_C]:
        for backward in (False, True):
            block_c, block_r, num_warps = ln._tile(C, backward)
            assert C <= block_c < 2 * C, (C, block_c)
            assert block_r * block_c <= 16 * 32 * num_warps, (C, backward, block_r, num_warps)


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(37, 768), (4, 1, 1600), (3, 257, 1280), (2, 5, 8192), (4096, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision(shape, dtype):
    _check_layer_norm(shape, dtype, dtype)
    _check_layer_norm(shape, dtype, torch.float32)
    _check_add_layer_norm(shape, dtype, dtype)


@needs_gpu
@pytest.mark.gpu
def test_gpu_large_batch_fp32():
    _check_layer_norm((16384, 768), torch.float32, torch.float32)
    _check_add_layer_norm((8, 1024, 768), torch.float32, torch.float32)
