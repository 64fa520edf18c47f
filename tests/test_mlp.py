"""Tests of the MLP op: one parity check for every backend, then the Triton MLP (kernels/mlp.py): its matmul
epilogues, launch configurations and errors.

``test_mlp_parity`` runs for every backend the registry can run here (tests/conftest.py's ``backend``): the output
and every gradient against gpt2_kernels.ref, fp16 by the tolerance table's fp16 rule, fp32 against a float64 reference
with the fp32 reference's own error as the yardstick (the plain fp32 rule's 1e-4 would let a wrong digit of the
GELU constant through). On the CPU the Triton kernels run under the Triton interpreter (fp32 and fp16, small
shapes); the bf16 / fp16 tests at GPT-2 size run only on a CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch

from gpt2_kernels import mlp as K
from gpt2_kernels import ref, runtime
from gpt2_kernels.aot import LaunchConfig
from gpt2_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 at GPT-2 size needs a CUDA GPU")
GRAD_NAMES = ("dx", "dw_fc", "db_fc", "dw_proj", "db_proj")


def _inputs(x_shape, H, dtype, bias_fc=True, bias_proj=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = x_shape[-1]
    x = torch.randn(x_shape, generator=g)
    w_fc = torch.randn(H, C, generator=g) / C**0.5
    b_fc = torch.randn(H, generator=g) * 0.5 if bias_fc else None
    w_proj = torch.randn(C, H, generator=g) / H**0.5
    b_proj = torch.randn(C, generator=g) * 0.5 if bias_proj else None
    dy = torch.randn(x_shape, generator=g)
    ts = [t.to(DEVICE, dtype) if t is not None else None for t in (x, w_fc, b_fc, w_proj, b_proj, dy)]
    return ts[:5], ts[5]


def _run(fn, params, dy):
    """Forward output and the gradient of each input (None where the input is None)."""
    leaves = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [p for p in leaves if p is not None], dy)
    it = iter(grads)
    return y.detach(), [next(it) if p is not None else None for p in leaves]


def _check_parity(params, dy, what, fn=K.mlp):
    """fn's output and gradients against the reference's: fp16 / bf16 by the rule of their dtype; fp32 against the
    reference in float64, with the reference in fp32 as the yardstick (the tolerance table's float64 rule)."""
    dtype = params[0].dtype
    y, grads = _run(fn, params, dy)
    up = [p.float() if p is not None else None for p in params]
    y32, grads32 = _run(ref.mlp, up, dy.float())
    if dtype == torch.float32:  # the reference in float64 is the one to match, fp32's error the yardstick
        y_lp, grads_lp = y32, grads32
        y32, grads32 = _run(ref.mlp, [p.double() if p is not None else None for p in params], dy.double())
    else:
        y_lp, grads_lp = _run(ref.mlp, params, dy)
    assert y.dtype == dtype and y.shape == params[0].shape
    assert_close(f"mlp {what} y", y, y32, y_lp)
    for name, g, g32, g_lp in zip(GRAD_NAMES, grads, grads32, grads_lp):
        if g32 is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_close(f"mlp {what} {name}", g, g32, g_lp)


SHAPES = [
    pytest.param((1, 32), 128, True, True, id="M1"),
    pytest.param((37, 48), 192, True, True, id="M37"),
    pytest.param((2, 13, 32), 128, True, True, id="3d"),
    pytest.param((19, 23), 41, True, True, id="primes"),
    pytest.param((19, 23), 41, False, False, id="primes-nobias"),
    pytest.param((37, 48), 192, False, True, id="no-b_fc"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape,H,bias_fc,bias_proj", SHAPES)
def test_mlp_parity(backend, backend_op, x_shape, H, bias_fc, bias_proj, dtype, highest_fp32_matmul, one_thread):
    """The op's one parity check, for every backend that runs here: y and every gradient, fp32 and fp16."""
    params, dy = _inputs(x_shape, H, dtype, bias_fc, bias_proj)
    _check_parity(params, dy, f"{backend} {tuple(x_shape)}->H={H} {dtype}", fn=backend_op("mlp"))


def test_mlp_mixed_dtypes_grads_in_own_dtype():
    """fp16 activations with fp32 master weights: compute in fp16, weight grads come back in fp32."""
    params, dy = _inputs((13, 32), 64, torch.float32)
    x16 = params[0].half()
    y, grads = _run(K.mlp, [x16] + params[1:], dy.half())
    y16, grads16 = _run(K.mlp, [x16] + [p.half() for p in params[1:]], dy.half())
    assert y.dtype == torch.float16 and grads[0].dtype == torch.float16
    assert all(g.dtype == torch.float32 for g in grads[1:])
    torch.testing.assert_close(y, y16, rtol=0, atol=0)
    for g, g16 in zip(grads, grads16):
        torch.testing.assert_close(g.float(), g16.float(), rtol=0, atol=0)


def test_mlp_partial_requires_grad_and_no_grad(monkeypatch):
    fwd = K.mlp_fwd
    params, dy = _inputs((11, 16), 48, torch.float32)
    x, w_fc, b_fc, w_proj, b_proj = params
    w_proj = w_proj.clone().requires_grad_()  # only w_proj needs a gradient
    y = K.mlp(x, w_fc, b_fc, w_proj, b_proj)
    (dw,) = torch.autograd.grad(y, [w_proj], dy)
    y_ref = ref.mlp(x, w_fc, b_fc, w_proj.detach().requires_grad_(), b_proj)
    assert_close("mlp y (only w_proj grad)", y, y_ref)
    w_ref = w_proj.detach().clone().requires_grad_()
    (dw_ref,) = torch.autograd.grad(ref.mlp(x, w_fc, b_fc, w_ref, b_proj), [w_ref], dy)
    assert_close("mlp dw_proj (only w_proj grad)", dw, dw_ref)
    leaves = [p.clone().requires_grad_() for p in params]
    calls = []
    monkeypatch.setattr(K, "mlp_fwd", lambda *a, **kw: calls.append(kw) or fwd(*a, **kw))
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y_ng = K.mlp(*leaves)
        assert not y_ng.requires_grad
        assert_close(f"mlp y ({ctx.__name__})", y_ng, ref.mlp(*params))
    assert calls == [{"save_pre": False}] * 2  # inference neither writes nor keeps the pre-activation


def test_mlp_expanded_output_grad():
    """y.sum() backpropagates a stride-0 dy; the kernels read it through its strides."""
    params, _ = _inputs((2, 5, 24), 40, torch.float32)
    leaves = [p.clone().requires_grad_() for p in params]
    K.mlp(*leaves).sum().backward()
    leaves_ref = [p.clone().requires_grad_() for p in params]
    ref.mlp(*leaves_ref).sum().backward()
    for name, a, b in zip(GRAD_NAMES, leaves, leaves_ref):
        assert_close(f"mlp {name} (expanded dy)", a.grad, b.grad)


def test_mlp_empty_rows():
    params, _ = _inputs((0, 16), 32, torch.float32)
    leaves = [p.clone().requires_grad_() for p in params]
    y = K.mlp(*leaves)
    assert y.shape == (0, 16)
    y.sum().backward()
    for p in leaves[1:]:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


# ---- the raw matmul launcher, every epilogue, against torch


SMALL_TILES = K.Tiles(16, 16, 16, 2, 4, 1)  # many tiles and a partial last group on small shapes


def _operands(M, K_, N, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K_, generator=g).to(DEVICE, dtype)
    b_t = torch.randn(N, K_, generator=g).to(DEVICE, dtype)  # used transposed: B = b_t.T, strided
    bias = torch.randn(N, generator=g).to(DEVICE, dtype)
    pre = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    return a, b_t.t(), bias, pre


def _lowp(x):
    return x if x.dtype == torch.float32 else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["default-tiles", "16x16x16-group2"])
def test_matmul_epilogues(dtype, tiles):
    M, K_, N = 37, 29, 41
    a, b, bias, pre = _operands(M, K_, N, dtype)
    a32, b32, bias32, pre32 = a.float(), b.float(), bias.float(), pre.float()
    lowp = dtype != torch.float32

    c = K.matmul(a, b, tiles=tiles)
    assert_close("matmul none", c, a32 @ b32, (a @ b) if lowp else None)

    c = K.matmul(a, b, bias, tiles=tiles)
    assert_close("matmul bias", c, a32 @ b32 + bias32, (a @ b + bias) if lowp else None)

    pre_out = torch.empty(M, N, device=DEVICE, dtype=dtype)
    c = K.matmul(a, b, bias, epilogue="gelu", pre=pre_out, tiles=tiles)
    h32 = a32 @ b32 + bias32
    h_lp = (a @ b + bias) if lowp else None
    assert_close("matmul gelu pre", pre_out, h32, h_lp)
    assert_close("matmul gelu", c, ref.gelu_tanh(h32), ref.gelu_tanh(h_lp) if lowp else None)

    c = K.matmul(a, b, epilogue="gelu", tiles=tiles)  # no bias, no pre store
    assert_close("matmul gelu (no bias)", c, ref.gelu_tanh(a32 @ b32), ref.gelu_tanh(a @ b) if lowp else None)

    c, colsum = K.matmul(a, b, epilogue="gelu_grad", pre=pre, col_sum=True, tiles=tiles)
    d32 = (a32 @ b32) * ref.gelu_tanh_grad(pre32)
    if lowp:
        assert_close("matmul gelu_grad", c, d32, ((a @ b).float() * ref.gelu_tanh_grad(pre)).to(dtype))
    else:  # against float64, fp32's own error the yardstick: a wrong digit of a GELU constant shows here
        assert_close("matmul gelu_grad", c, (a.double() @ b.double()) * ref.gelu_tanh_grad(pre.double()), d32)
    assert colsum.dtype == torch.float32
    assert_close("matmul gelu_grad colsum", colsum, d32.sum(0))  # fp32 sums of the fp32 tile values


def test_matmul_gelu_saturation():
    """GELU and its derivative in the epilogues over [-40, 40]: the exp2 cap keeps the tails finite and exact."""
    z = torch.linspace(-40.0, 40.0, 97, device=DEVICE)
    a = torch.zeros(97, 16, device=DEVICE)
    a[:, 0] = z  # A @ B = z in every column
    b = torch.zeros(16, 24, device=DEVICE)
    b[0] = 1.0
    zz = z[:, None].expand(97, 24)
    assert_close("matmul gelu tails", K.matmul(a, b, epilogue="gelu"), ref.gelu_tanh(zz))
    ones = torch.ones(16, 24, device=DEVICE) / 16  # A @ B = z / 16, times gelu'(pre)
    pre = zz.contiguous()
    c, _ = K.matmul(a, ones, epilogue="gelu_grad", pre=pre, col_sum=True)
    assert_close("matmul gelu_grad tails", c, (z / 16)[:, None] * ref.gelu_tanh_grad(zz))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matmul_split_k_and_transposed_a(dtype):
    M, K_, N = 23, 100, 19
    g = torch.Generator().manual_seed(2)
    a = torch.randn(K_, M, generator=g).to(DEVICE, dtype).t()  # (M, K) with unit row stride, like dy.T
    b = torch.randn(K_, N, generator=g).to(DEVICE, dtype)
    want = a.float() @ b.float()
    for split in (1, 3):
        c = K.matmul(a, b, split_k=split, tiles=SMALL_TILES)
        assert c.dtype == dtype
        assert_close(f"matmul split_k={split}", c, want, (a @ b) if dtype != torch.float32 else None)


def test_auto_split_k_fills_waves():
    # 72 tiles on 132 SMs: one half-empty wave unsplit; the split found keeps the last wave >= 85% full.
    s = K._auto_split_k(72, 16384, 132)
    assert s > 1 and (72 * s) / (-(-72 * s // 132) * 132) >= 0.85
    assert K._auto_split_k(2000, 16384, 132) == 1  # already many waves
    assert K._auto_split_k(72, 600, 132) == 1  # K too short to split


# ---- errors


def test_mlp_bad_inputs():
    params, _ = _inputs((5, 16), 32, torch.float32)
    x, w_fc, b_fc, w_proj, b_proj = params
    with pytest.raises(ValueError, match=r"mlp: w_fc must have shape \(H, C\)"):
        K.mlp(x, w_fc[:, :8], b_fc, w_proj, b_proj)
    with pytest.raises(ValueError, match=r"mlp: w_proj must have shape \(C, H\) = \(16, 32\)"):
        K.mlp(x, w_fc, b_fc, w_proj.t(), b_proj)
    with pytest.raises(ValueError, match=r"mlp: b_fc must have shape \(H,\) = \(32,\)"):
        K.mlp(x, w_fc, b_fc[:5], w_proj, b_proj)
    with pytest.raises(ValueError, match=r"mlp: b_proj must have shape \(C,\) = \(16,\)"):
        K.mlp(x, w_fc, b_fc, w_proj, b_fc)
    with pytest.raises(TypeError, match="mlp: x has dtype torch.float64; supported: float32, float16, bfloat16"):
        K.mlp(x.double(), w_fc, b_fc, w_proj, b_proj)
    with pytest.raises(TypeError, match="mlp: w_fc has dtype torch.int64"):
        K.mlp(x, w_fc.long(), b_fc, w_proj, b_proj)
    with pytest.raises(ValueError, match="mlp: w_proj is on meta but x is on"):
        K.mlp(x, w_fc, b_fc, w_proj.to("meta"), b_proj)
    with pytest.raises(ValueError, match="split_k=2 needs epilogue 'none'"):
        K.matmul(x, w_fc.t(), epilogue="gelu", split_k=2)
    with pytest.raises(ValueError, match="unknown epilogue 'relu'"):
        K.matmul(x, w_fc.t(), epilogue="relu")
    with pytest.raises(ValueError, match="gelu_grad' needs the pre-activation"):
        K.matmul(x, w_fc.t(), epilogue="gelu_grad")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_mlp_cpu_errors(monkeypatch):
    params, _ = _inputs((5, 16), 32, torch.float32)
    with pytest.raises(TypeError, match="mlp: bfloat16 is not supported under the Triton CPU interpreter"):
        K.mlp(*[p.bfloat16() for p in params])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="mlp: the Triton backend got CPU tensors"):
        K.mlp(*params)


# ---- launch configurations (compiled ahead of time by kernels/report.py)


SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


_INT_ARGS = ("M", "N", "K", "k_split", "stride_am", "stride_ak", "stride_bk", "stride_bn",
             "stride_cs", "stride_cm", "stride_cn")


def _config_key(c):
    ones = frozenset(n for n in _INT_ARGS if n in c.constexprs and c.constexprs[n] == 1)
    ce = {n: v for n, v in c.constexprs.items() if n not in _INT_ARGS}
    return (c.signature["a_ptr"], c.signature["c_ptr"], ones, tuple(sorted(ce.items())), c.num_warps, c.num_stages)


_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _record_launches(monkeypatch, cc):
    """Run the launchers with the tiles of sm_<cc> and a stand-in kernel that records each launch's key."""
    names = K._matmul_kernel.arg_names
    launches, splits = [], []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **constexprs):
                assert len(args) + len(constexprs) == len(names)
                given = dict(zip(names, args))
                ones = frozenset(n for n in _INT_ARGS if given[n] == 1)  # what the JIT makes constexpr 1
                launches.append((_TYPES[given["a_ptr"].dtype], _TYPES[given["c_ptr"].dtype], ones,
                                 tuple(sorted(constexprs.items())), num_warps, num_stages))
                splits.append(grid[1])
            return launch

    arch = runtime.arch(cc).tiles
    monkeypatch.setattr(K, "_matmul_kernel", Recorder())
    monkeypatch.setattr(K, "_tile_list", lambda device, dtype, role: K._row_tiles(arch, dtype, role))

    def every_entry(kernel, tiles, device, bucket, dtype, run):  # as the tuner on a GPU: each entry runs once
        for t in tiles[1:]:
            run(t)
        return tiles[0]

    monkeypatch.setattr(K, "pick_tiles", every_entry)
    monkeypatch.setattr(K, "sm_count", lambda device: 132)  # as on an H100, so the weight grads split K
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cc >= 80 else [])
    for dtype in dtypes:
        # 1100 rows, H = 1040: K long enough that a product asking for auto split-K would split (only
        # the weight gradients may); 5 rows and 1 row: decoding.
        cases = ((1100, 1040, True, True), (100, 48, True, False), (5, 48, False, True), (1, 48, False, True),
                 (100, 48, False, False), (5, 48, True, True), (1, 48, True, True))
        for M, H, train, bias in cases:
            (x, w_fc, b_fc, w_proj, b_proj), dy = _inputs((M, 16), H, dtype, bias, bias)
            _, pre, act = K.mlp_fwd(x, w_fc, b_fc, w_proj, b_proj, save_pre=train)
            if train:
                K.mlp_bwd(dy, x, w_fc, w_proj, pre, act)
    assert max(splits) > 1, "no launch split K"
    return launches


@pytest.mark.parametrize("cc", sorted(SMEM_LIMIT))
def test_launch_configs_are_exactly_the_launches(cc, monkeypatch):
    configs = K.launch_configs(cc)
    assert configs and all(isinstance(c, LaunchConfig) for c in configs)
    args = K._matmul_kernel.arg_names
    for c in configs:
        assert set(c.signature) | set(c.constexprs) == set(args), c.label
        assert list(c.signature) == [a for a in args if a in c.signature], c.label  # kernel order
        # the operand pipeline alone must fit; the compiler's epilogue scratch reuses it
        tile = c.constexprs["BLOCK_M"] * c.constexprs["BLOCK_K"] + c.constexprs["BLOCK_K"] * c.constexprs["BLOCK_N"]
        elem = 4 if c.signature["a_ptr"] == "*fp32" else 2
        assert c.num_stages * tile * elem <= SMEM_LIMIT[cc], c.label
    assert cc >= 80 or not any(c.signature["a_ptr"] == "*bf16" for c in configs)
    listed = {_config_key(c) for c in configs}
    assert len(listed) == len(configs), "a configuration is listed twice"
    launched = set(_record_launches(monkeypatch, cc))
    assert launched - listed == set(), "launched but not listed"
    assert listed - launched == set(), "listed but never launched"


# ---- GPU: bf16 / fp16 at GPT-2 size


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mlp_gpt2_size_gpu(dtype):
    params, dy = _inputs((4, 1024, 768), 3072, dtype)
    _check_parity(params, dy, f"GPT-2 {dtype}")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mlp_decode_and_odd_sizes_gpu(dtype):
    for x_shape, H in (((3, 768), 3072), ((1, 97, 768), 3072), ((5, 37, 200), 803)):
        params, dy = _inputs(x_shape, H, dtype)
        _check_parity(params, dy, f"{x_shape}->H={H} {dtype}")
