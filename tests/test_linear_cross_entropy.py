"""Parity, memory and error tests of the Triton fused linear cross-entropy (kernels/linear_cross_entropy.py).

Every loss and gradient is compared with ``kernels.ref.linear_cross_entropy`` through
``kernels.testing.assert_close``: fp32 against the reference on the same inputs; fp16 against the
reference on the upcast inputs, with the reference computed in fp16 as the yardstick. On the CPU
the kernels run under Triton's interpreter (tests/conftest.py), so shapes stay small; the
GPT-2-sized (V = 50257) bf16/fp16 tests need a CUDA GPU.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels import ref
from kernels.linear_cross_entropy import (
    LinearCrossEntropyFunction,
    _linear_cross_entropy_fwd_kernel,
    default_chunk_rows,
    launch_configs,
    linear_cross_entropy,
    linear_cross_entropy_fwd,
)
from kernels.testing import TOLERANCES, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and GPT-2-sized V need a CUDA GPU")


def _inputs(shape, C, V, dtype, ignore_frac=0.0, ignore_index=-1, seed=0, device=DEVICE):
    """h (*shape, C), weight (V, C) with logits of std ~2, targets (*shape) with some ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, C, generator=g)
    w = torch.randn(V, C, generator=g) * (2.0 / C**0.5)
    t = torch.randint(0, V, shape, generator=g)
    if ignore_frac > 0:
        t[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return h.to(device, dtype), w.to(device, dtype), t.to(device)


def _loss_and_grads(fn, h, w, t, *args, grad_scale=1.0):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, t, *args)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def _assert_loss_close(name, loss, ref32, ref_lowp, dtype):
    """The loss is fp32 whatever the inputs: judge it by the tolerance rule of the inputs' dtype.

    (Rounding the fp32 losses to fp16 to reuse ``assert_close`` would add up to half an fp16 ulp
    of ~10 to one side and not the other.)
    """
    if dtype == torch.float32:
        assert_close(name, loss, ref32)
        return
    tol = TOLERANCES[dtype]
    lowp_err = (ref_lowp - ref32).abs().item()
    err = (loss - ref32).abs().item()
    assert err <= tol["factor"] * lowp_err + tol["atol"], (
        f"{name}: |loss - ref32| = {err:.3e} > {tol['factor']} x {lowp_err:.3e} + {tol['atol']} "
        f"(loss {loss.item():.6f}, ref32 {ref32.item():.6f}, ref in {dtype} {ref_lowp.item():.6f})"
    )


def _check_parity(h, w, t, ignore_index=-1, chunk_rows=None, grad_scale=1.0):
    """Loss, dh and dweight of the Triton op vs the reference (fp32 or fp16 rule of the tolerance table)."""
    ours = _loss_and_grads(LinearCrossEntropyFunction.apply, h, w, t, ignore_index, chunk_rows, None,
                           grad_scale=grad_scale)
    ref32 = _loss_and_grads(ref.linear_cross_entropy, h.float(), w.float(), t, ignore_index, grad_scale=grad_scale)
    lowp = None
    if h.dtype != torch.float32:
        lowp = _loss_and_grads(ref.linear_cross_entropy, h, w, t, ignore_index, grad_scale=grad_scale)
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    assert ours[1].dtype == h.dtype and ours[2].dtype == w.dtype
    what = f"linear_cross_entropy {tuple(h.shape)} V={w.shape[0]} chunk_rows={chunk_rows}"
    _assert_loss_close(f"{what} loss", ours[0], ref32[0], None if lowp is None else lowp[0], h.dtype)
    for i, name in ((1, "dh"), (2, "dweight")):
        assert_close(f"{what} {name}", ours[i], ref32[i], None if lowp is None else lowp[i])
    return ours


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,C,V,chunk_rows",
    [
        ((1,), 8, 11, None),  # one row (T = 1), V below one block
        ((37,), 48, 1000, None),  # prime row count, default chunking (one chunk)
        ((37,), 48, 1000, 16),  # chunks that do not divide N (16, 16, 5)
        ((2, 13), 32, 257, None),  # 3-D h, prime V
        ((2, 13), 32, 257, 7),  # 3-D h over several chunks
    ],
)
def test_parity(dtype, shape, C, V, chunk_rows):
    h, w, t = _inputs(shape, C, V, dtype, ignore_frac=0.2 if shape[0] > 1 else 0.0)
    _check_parity(h, w, t, chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tiny_chunks_and_grad_scale(dtype):
    # chunk_rows=3 forces 13 chunks (the last one of 1 row); a grad_output of 3 checks the scaling.
    h, w, t = _inputs((37,), 24, 300, dtype, ignore_frac=0.3)
    _check_parity(h, w, t, chunk_rows=3, grad_scale=3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_launcher_gradients_unscaled(dtype):
    # The launcher alone: chunked dh and fp32-accumulated dweight equal the reference's gradients.
    h, w, t = _inputs((29,), 16, 130, dtype, ignore_frac=0.25)
    loss, dh, dw = linear_cross_entropy_fwd(h, w, t, chunk_rows=4)
    _, rdh, rdw = _loss_and_grads(ref.linear_cross_entropy, h.float(), w.float(), t)
    lowp = _loss_and_grads(ref.linear_cross_entropy, h, w, t) if dtype != torch.float32 else (None,) * 3
    assert dh.shape == (29, 16) and dw.shape == (130, 16) and dw.dtype == torch.float32
    assert_close("launcher dh", dh, rdh, lowp[1])
    assert_close("launcher dweight", dw.to(dtype), rdw, lowp[2])
    # Loss only: neither gradient is computed.
    loss2, dh2, dw2 = linear_cross_entropy_fwd(h, w, t, need_dh=False, need_dweight=False, chunk_rows=4)
    assert dh2 is None and dw2 is None
    assert torch.equal(loss, loss2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_targets_ignored(dtype):
    h, w, t = _inputs((11,), 16, 97, dtype)
    t.fill_(-1)
    loss, dh, dw = _check_parity(h, w, t, chunk_rows=4)
    assert loss.item() == 0.0
    assert not dh.any() and not dw.any()


def test_empty_and_non_contiguous_inputs():
    # No rows at all: loss 0 and zero gradients, as the reference.
    h, w, t = _inputs((2, 0), 16, 30, torch.float32)
    loss, dh, dw = _check_parity(h, w, t)
    assert loss.item() == 0.0 and dh.shape == (2, 0, 16) and not dw.any()
    # Strided views: every other row of h and targets, a column slice of h and of the weight.
    h, w, t = _inputs((26,), 40, 90, torch.float32, ignore_frac=0.2)
    _check_parity(h[::2, 4:36], w[:, 4:36], t[::2], chunk_rows=5)


@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_custom_ignore_index(ignore_index):
    # -100 (PyTorch's default), and a value that is also a valid class id: rows with target 5 are ignored.
    h, w, t = _inputs((31,), 16, 64, torch.float32, ignore_frac=0.3, ignore_index=ignore_index)
    t[:3] = 5
    ours = _check_parity(h, w, t, ignore_index=ignore_index, chunk_rows=8)
    # And ignoring really changes the result: the same targets with the default ignore_index differ.
    if ignore_index == 5:
        other = _loss_and_grads(linear_cross_entropy, h, w, t)
        assert not torch.allclose(other[0], ours[0])


def test_only_one_input_needs_grad():
    h, w, t = _inputs((23,), 16, 50, torch.float32, ignore_frac=0.2)
    _, rdh, rdw = _loss_and_grads(ref.linear_cross_entropy, h, w, t)
    hh = h.clone().requires_grad_()
    linear_cross_entropy(hh, w, t).backward()
    assert_close("dh (weight frozen)", hh.grad, rdh)
    ww = w.clone().requires_grad_()
    linear_cross_entropy(h, ww, t).backward()
    assert_close("dweight (h frozen)", ww.grad, rdw)


def test_retained_graph_backward_twice():
    # The saved gradients are scaled into new tensors, so a second backward gives the same result.
    h, w, t = _inputs((17,), 16, 40, torch.float32)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, t)
    (g1,) = torch.autograd.grad(2.0 * loss, h, retain_graph=True)
    (g2,) = torch.autograd.grad(2.0 * loss, h)
    assert torch.equal(g1, g2)


def test_mixed_dtypes_and_autocast():
    # fp32 master weight with fp16 activations: computed in fp16, each gradient in its input's dtype.
    h32, w32, t = _inputs((19,), 32, 90, torch.float32, ignore_frac=0.2)
    h16 = h32.half()
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, h16, w32, t)
    assert dh.dtype == torch.float16 and dw.dtype == torch.float32
    ref32 = _loss_and_grads(ref.linear_cross_entropy, h16.float(), w32, t)
    lowp = _loss_and_grads(ref.linear_cross_entropy, h16, w32.half(), t)
    _assert_loss_close("mixed loss", loss, ref32[0], lowp[0], torch.float16)
    assert_close("mixed dh", dh, ref32[1], lowp[1])
    assert_close("mixed dweight", dw.half(), ref32[2], lowp[2])
    # Autocast to fp16 with fp32 inputs: the GEMMs run in fp16, the gradients come back in fp32.
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss_ac, dh_ac, dw_ac = _loss_and_grads(linear_cross_entropy, h32, w32, t)
        lowp_ac = _loss_and_grads(ref.linear_cross_entropy, h32, w32, t)
    assert dh_ac.dtype == torch.float32 and dw_ac.dtype == torch.float32
    ref32 = _loss_and_grads(ref.linear_cross_entropy, h32, w32, t)
    _assert_loss_close("autocast loss", loss_ac, ref32[0], lowp_ac[0], torch.float16)
    assert_close("autocast dh", dh_ac.half(), ref32[1], lowp_ac[1].half())
    assert_close("autocast dweight", dw_ac.half(), ref32[2], lowp_ac[2].half())


def test_no_grad_matches():
    h, w, t = _inputs((2, 9), 16, 75, torch.float32, ignore_frac=0.2)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t)
    assert_close("no_grad loss", loss, ref.linear_cross_entropy(h, w, t))


def test_default_chunk_rows():
    # One chunk for small N; a quarter of N (multiple of 64) when N is large; never below 2 C.
    assert default_chunk_rows(1, 768) == 1
    assert default_chunk_rows(1024, 768) == 1024
    assert default_chunk_rows(8192, 768) == 2048
    assert default_chunk_rows(4096, 768) == 1536
    assert default_chunk_rows(100, 8) == 64


# ----------------------------------------------------------------------------------------------
# Memory: the allocations of one forward + backward, counted by a dispatch mode
# ----------------------------------------------------------------------------------------------


class _PeakAllocations(TorchDispatchMode):
    """Bytes of the storages that ops create while active: peak of the live sum, and the largest one.

    A storage counts from the op that creates it until it is freed (a finalizer on its Python
    object, which torch keeps alive as long as the storage lives). Storages of ``known`` tensors
    (the inputs) are not counted.
    """

    def __init__(self, known=()):
        super().__init__()
        self.live = {t.untyped_storage().data_ptr(): 0 for t in known}
        self.current = self.peak = self.largest = 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if not isinstance(x, torch.Tensor):
                continue
            storage = x.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in self.live or nbytes == 0:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, nbytes)
            weakref.finalize(storage, self._free, key)
        return out


def _allocations(fn, h, w, t, backward=True):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    mode = _PeakAllocations(known=(h, w, t))
    with mode:
        loss = fn(h, w, t)
        if backward:
            loss.backward()
    return mode


@pytest.mark.parametrize("dtype", DTYPES)
def test_peak_extra_memory_is_bounded(dtype):
    N, C, V = 128, 8, 256
    h, w, t = _inputs((N,), C, V, dtype)
    elem = h.element_size()
    chunk = default_chunk_rows(N, C)
    assert chunk == N // 2  # ceil(N / 4) = 32 rounded up to 64 rows
    ref_mode = _allocations(ref.linear_cross_entropy, h, w, t)
    ours = _allocations(linear_cross_entropy, h, w, t)
    # The reference holds full (N, V) logits (several copies); we never allocate more than one chunk.
    assert ref_mode.largest >= N * V * 4
    assert ours.largest <= max(chunk * V * elem, V * C * 4), ours.largest
    # Peak extra memory of forward + backward within the 25% target (fp32: chunk logits + dweight;
    # fp16: chunk logits + fp32 dweight accumulator + one fp16 chunk product + the returned dweight).
    assert ours.peak <= 0.25 * ref_mode.peak, (ours.peak, ref_mode.peak)
    # Under no_grad (inputs that require grad all the same) nothing of the gradient pass is
    # allocated: one chunk of logits, the per-row losses and a few scalars.
    with torch.no_grad():
        nograd = _allocations(linear_cross_entropy, h, w, t, backward=False)
    assert nograd.largest <= chunk * V * elem
    assert nograd.peak <= chunk * V * elem + N * 4 + 4096, (nograd.peak, chunk * V * elem)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_out_of_range_targets_raise():
    h, w, t = _inputs((9,), 8, 20, torch.float32)
    for bad in (20, -5):
        tb = t.clone()
        tb[4] = bad
        with pytest.raises(ValueError, match=r"linear_cross_entropy: targets .*\[0, 20\)"):
            linear_cross_entropy(h, w, tb)
    # -100 is fine once it is the ignore_index.
    tb = t.clone()
    tb[4] = -100
    linear_cross_entropy(h, w, tb, ignore_index=-100)


def test_kernel_flags_out_of_range_targets():
    # The GPU's check, run by the kernel itself: a bad row sets the flag, gets a NaN loss and a zero
    # gradient; good and ignored rows are untouched by it.
    V = 10
    z = torch.randn(4, V, device=DEVICE)
    t = torch.tensor([3, V, -1, -7], device=DEVICE)
    losses = torch.empty(4, device=DEVICE)
    err = torch.zeros((), dtype=torch.int32, device=DEVICE)
    n_valid = torch.tensor(3, device=DEVICE)
    expected_row0 = (torch.softmax(z[0], 0) - torch.nn.functional.one_hot(t[0], V)) / 3
    _linear_cross_entropy_fwd_kernel[(4,)](z, t, losses, n_valid, err, z.stride(0), V, -1,
                                           COMPUTE_GRAD=True, BLOCK_V=128)
    assert err.item() == 1
    assert torch.isnan(losses[1]) and torch.isnan(losses[3]) and losses[2].item() == 0.0
    assert torch.isfinite(losses[0])
    assert not z[1:].any()
    assert_close("kernel gradient row", z[0], expected_row0)
    err.zero_()
    _linear_cross_entropy_fwd_kernel[(1,)](z, t, losses, n_valid, err, z.stride(0), V, -1,
                                           COMPUTE_GRAD=False, BLOCK_V=128)
    assert err.item() == 0


def test_bad_inputs_raise():
    h, w, t = _inputs((2, 5), 8, 20, torch.float32)
    cases = [
        ((h, w, t[:, :4]), ValueError, "linear_cross_entropy: targets must have h's leading shape"),
        ((h, w[:, :7], t), ValueError, "linear_cross_entropy: weight has C = 7"),
        ((h, w[0], t), ValueError, r"linear_cross_entropy: weight must have shape \(V, C\)"),
        ((h, w, t.int()), TypeError, "linear_cross_entropy: targets must be int64"),
        ((h.double(), w, t), TypeError, "linear_cross_entropy: h must be float32, float16 or bfloat16"),
        ((h, w, t.to("meta")), ValueError, "linear_cross_entropy: h, weight and targets must be on one device"),
    ]
    if DEVICE == "cpu":
        cases.append(((h.bfloat16(), w.bfloat16(), t), TypeError, "linear_cross_entropy: bfloat16 needs a CUDA GPU"))
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            linear_cross_entropy(*args)
    with pytest.raises(ValueError, match="linear_cross_entropy: chunk_rows must be a positive int"):
        linear_cross_entropy_fwd(h, w, t, chunk_rows=0)


def test_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, t = _inputs((4,), 8, 10, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="linear_cross_entropy: h is a CPU tensor.*TRITON_INTERPRET=1"):
        linear_cross_entropy(h, w, t)


def test_launch_configs_cover_the_launcher():
    configs = launch_configs(80)
    blocks = {c.constexprs["BLOCK_V"] for c in configs}
    # What the launcher picks for the V of these tests and GPT-2's is listed.
    from kernels.linear_cross_entropy import _block_params

    assert {_block_params(v)[0] for v in (1, 11, 257, 1000, 50257, 250_000)} <= blocks
    assert {c.signature["logits_ptr"] for c in configs} == {"*fp32", "*fp16", "*bf16"}
    assert {c.signature["logits_ptr"] for c in launch_configs(75)} == {"*fp32", "*fp16"}  # no bf16 before sm_80
    for c in configs:
        assert set(c.constexprs) == {"COMPUTE_GRAD", "BLOCK_V"}
        assert list(c.signature) == ["logits_ptr", "targets_ptr", "loss_ptr", "n_valid_ptr", "err_ptr",
                                     "stride_row", "V", "ignore_index"]


# ----------------------------------------------------------------------------------------------
# GPU: GPT-2's vocabulary in fp16 / bf16, and measured memory
# ----------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpt2_vocab_gpu(dtype):
    h, w, t = _inputs((4, 257), 768, 50257, dtype, ignore_frac=0.05)
    _check_parity(h, w, t)
    _check_parity(h, w, t, chunk_rows=300)  # 4 chunks, the last partial: the fp32 accumulator path


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpt2_peak_memory_gpu(dtype):
    h, w, t = _inputs((4, 1024), 768, 50257, dtype)
    peaks = []
    for fn in (ref.linear_cross_entropy, linear_cross_entropy):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hh, ww, t).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del hh, ww
    assert peaks[1] <= 0.25 * peaks[0], peaks


@needs_gpu
@pytest.mark.gpu
def test_out_of_range_target_gpu():
    h, w, t = _inputs((64,), 64, 1000, torch.float16)
    t[10] = 1000
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets .*\[0, 1000\)"):
        linear_cross_entropy(h, w, t)
