"""The ``native`` backend (``gpt2_kernels.native``, PyTorch's built-ins) beyond the parity tests every backend runs.

The shared parity tests (test_layer_norm, test_attention, test_mlp, test_linear_cross_entropy, test_model_parity)
cover native's forward and every gradient in fp32 and fp16 as for every backend. Here: the plain ``layer_norm`` (the
shared file checks it on Triton only), bf16 on the CPU (native runs it; Triton's interpreter does not, so the
shared tests skip it there), a KV cache's strided keys, dropout, the no-grad MLP (a fused GEMM + GELU on a GPU) and
the loss head's row kernel on a target out of range.
"""

from __future__ import annotations

import pytest
import torch
from test_layer_norm import _compare, _run

from gpt2_kernels import native, ref
from gpt2_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = [torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("highest_fp32_matmul", "one_thread")


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 97), (2, 13, 48)], ids=str)
def test_layer_norm_matches_reference(shape, dtype):
    C = shape[-1]
    x, dy = _randn(*shape, dtype=dtype, scale=2.0) + 0.5, _randn(*shape, dtype=dtype, seed=1)
    w, b = _randn(C, dtype=dtype, seed=2) * 0.5 + 1.0, _randn(C, dtype=dtype, seed=3) * 0.5
    (y,), grads = _run(native.layer_norm, (x, w, b), (dy,))
    (y32,), grads32 = _run(ref.layer_norm, (x, w, b), (dy.float(),), dtype=torch.float32)
    (ylo,), gradslo = _run(ref.layer_norm, (x, w, b), (dy,))
    _compare(f"native layer_norm {shape} {dtype} y", y, y32, ylo)
    for name, got, r32, rlo in zip(("dx", "dweight", "dbias"), grads, grads32, gradslo):
        _compare(f"native layer_norm {shape} {dtype} {name}", got, r32, rlo)


def test_layer_norm_keeps_the_input_dtype_under_autocast():
    # F.layer_norm is on autocast's fp32 list: a bf16 input would come back fp32 without the cast back.
    x = _randn(4, 32, dtype=torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = native.layer_norm(x, torch.ones(32, device=DEVICE), torch.zeros(32, device=DEVICE))
    assert y.dtype == torch.bfloat16


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("Tq,Tk", [(17, 17), (1, 23), (5, 29)])
def test_attention_low_precision(dtype, Tq, Tk):
    """bf16 (and fp16) attention, square and cached (queries the last Tq of Tk keys), every gradient."""
    q, k, v = (_randn(2, 2, T, 32, dtype=dtype, seed=s) for s, T in ((0, Tq), (1, Tk), (2, Tk)))
    dy = _randn(2, 2, Tq, 32, dtype=dtype, seed=3)
    got = _grads(native.attention, (q, k, v), dy)
    want32 = _grads(ref.attention, (q.float(), k.float(), v.float()), dy.float())
    want_lo = _grads(ref.attention, (q, k, v), dy)
    for name, y, r32, rlo in zip(("out", "dq", "dk", "dv"), got, want32, want_lo):
        assert y.dtype == dtype
        assert_close(f"native attention {dtype} Tq{Tq} Tk{Tk} {name}", y, r32, rlo)


def test_attention_reads_a_kv_cache_view():
    # The model's decoding layout: k, v the first Tk positions of a (B, nh, capacity, hs) buffer (not contiguous).
    cache = _randn(2, 3, 2, 40, 32, seed=4)
    k, v = cache[0, :, :, :29], cache[1, :, :, :29]
    q = _randn(3, 2, 1, 32, seed=5)
    assert not k.is_contiguous()
    assert_close("native attention on a cache view", native.attention(q, k, v), ref.attention(q, k, v))


def test_attention_dropout_keeps_the_expectation():
    # With v = 1 every output is the kept attention weights' sum over (1 - p): 1 on average, spread by the mask.
    q, k = _randn(1, 2, 64, 32, seed=6), _randn(1, 2, 64, 32, seed=7)
    v = torch.ones(1, 2, 64, 32, device=DEVICE)
    torch.manual_seed(0)
    y = native.attention(q, k, v, dropout_p=0.5)[..., 0]  # (1, 2, 64)
    assert torch.isfinite(y).all()
    assert y.std() > 0.05, "no dropout happened"
    assert abs(y.mean().item() - 1.0) < 0.15, y.mean().item()


def test_attention_refuses_fewer_keys_than_queries():
    q, k = _randn(1, 1, 5, 32), _randn(1, 1, 3, 32)
    with pytest.raises(ValueError, match="fewer than q's 5"):
        native.attention(q, k, k)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_mlp_without_grad_matches_reference(dtype):
    """The inference path (on a GPU the cuBLASLt GEMM with its GELU epilogue, which must be GPT-2's tanh GELU)."""
    C, H = 48, 192
    x = _randn(3, 7, C, dtype=dtype)
    w_fc, b_fc = _randn(H, C, dtype=dtype, seed=1, scale=C ** -0.5), _randn(H, dtype=dtype, seed=2)
    w_proj, b_proj = _randn(C, H, dtype=dtype, seed=3, scale=H ** -0.5), _randn(C, dtype=dtype, seed=4)
    with torch.no_grad():
        got = native.mlp(x, w_fc, b_fc, w_proj, b_proj)
        want32 = ref.mlp(*(t.float() for t in (x, w_fc, b_fc, w_proj, b_proj)))
        want_lo = None if dtype == torch.float32 else ref.mlp(x, w_fc, b_fc, w_proj, b_proj)
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(f"native mlp no-grad {dtype}", got, want32, want_lo)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_mlp_and_loss_head_bf16_gradients(dtype):
    C, H, V, N = 32, 128, 300, 29
    args = [_randn(N, C, dtype=dtype), _randn(H, C, dtype=dtype, seed=1, scale=C ** -0.5),
            _randn(H, dtype=dtype, seed=2), _randn(C, H, dtype=dtype, seed=3, scale=H ** -0.5),
            _randn(C, dtype=dtype, seed=4)]
    dy = _randn(N, C, dtype=dtype, seed=5)
    got = _grads(native.mlp, args, dy)
    want32, want_lo = _grads(ref.mlp, [a.float() for a in args], dy.float()), _grads(ref.mlp, args, dy)
    for name, y, r32, rlo in zip(("out", "dx", "dw_fc", "db_fc", "dw_proj", "db_proj"), got, want32, want_lo):
        assert_close(f"native mlp bf16 {name}", y, r32, rlo)
    h, w = _randn(N, C, dtype=dtype, seed=6), _randn(V, C, dtype=dtype, seed=7, scale=2 * C ** -0.5)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    t[::5] = -1

    def loss_of(fn, h_, w_):
        return fn(h_, w_, t, -1)

    one = torch.ones((), device=DEVICE)
    got = _grads(lambda a, b: loss_of(native.linear_cross_entropy, a, b), (h, w), one)
    want32 = _grads(lambda a, b: loss_of(ref.linear_cross_entropy, a, b), (h.float(), w.float()), one)
    want_lo = _grads(lambda a, b: loss_of(ref.linear_cross_entropy, a, b), (h, w), one)
    assert_close("native loss bf16", got[0], want32[0], want_lo[0], dtype=dtype)
    for name, y, r32, rlo in zip(("dh", "dweight"), got[1:], want32[1:], want_lo[1:]):
        assert_close(f"native loss bf16 {name}", y, r32, rlo)


def test_row_kernel_marks_a_target_out_of_range_without_a_host_read():
    """The GPU contract (no host check there): a target outside [0, V) gives its row a NaN loss and no gradient;
    the other rows are exact, an ignored row is 0."""
    V = 10
    logits = _randn(4, V, seed=9)
    t = torch.tensor([3, 11, -1, 0], device=DEVICE)
    z = logits.clone()
    losses = native._cross_entropy_rows_(z, t, V, -1, torch.tensor([1.0], device=DEVICE))
    assert torch.isnan(losses[1]) and losses[2] == 0
    for i in (0, 3):
        assert_close(f"row {i} loss", losses[i], ref.cross_entropy(logits[i:i + 1], t[i:i + 1]))
        want = torch.softmax(logits[i], -1) - torch.nn.functional.one_hot(t[i], V)
        assert_close(f"row {i} gradient", z[i], want)
    assert not z[1].any() and not z[2].any()
