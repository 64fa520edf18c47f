"""Tests of the linear cross-entropy op: one parity check for every backend, then the shared chunked driver
(kernels/chunked_loss.py) and its Triton backend (kernels/linear_cross_entropy.py): memory, padding, GradScaler
numerics, host reads and errors.

Every loss and gradient is compared with ``gpt2_kernels.ref.linear_cross_entropy`` through
``gpt2_kernels.testing.assert_close``: fp32 against the reference on the same inputs; fp16 against the
reference on the upcast inputs, with the reference computed in fp16 as the yardstick (the fp32 loss of
fp16 inputs by the fp16 rule). ``test_parity`` runs for every backend the registry can run here
(tests/conftest.py's ``backend``). On the CPU the Triton kernels run under Triton's interpreter
(tests/conftest.py), so shapes stay small; the GPT-2-sized (V = 50257) bf16/fp16 tests need a CUDA GPU.
The tests of the driver itself (chunking, GradScaler numerics, vocabulary padding, no host reads) run
with every row kernel that runs here: Triton's and, when it is built, the C++ extension's.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gpt2_kernels import chunked_loss, ext, native, ref
from gpt2_kernels import linear_cross_entropy as lce
from gpt2_kernels.chunked_loss import ChunkPlan, chunk_plan, chunk_rows, padded_vocab
from gpt2_kernels.linear_cross_entropy import (
    _linear_cross_entropy_fwd_kernel,
    cross_entropy_rows_,
    launch_configs,
    linear_cross_entropy,
    linear_cross_entropy_fwd,
)
from gpt2_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and GPT-2-sized V need a CUDA GPU")
_EXT_WHY = ext.unavailable_reason()
_EXT_GPU = DEVICE == "cuda" and _EXT_WHY is None and ext.has_cuda_kernels()
# name -> (the backend's public op, its row kernel, the device its tests run on: the GPU where it has kernels
# for it, else the CPU -- Triton there under the interpreter, the extension with its CPU kernels).
BACKENDS = {
    "triton": (linear_cross_entropy, cross_entropy_rows_, DEVICE),
    "ext": (ext.linear_cross_entropy, ext._cross_entropy_rows_, "cuda" if _EXT_GPU else "cpu"),
    "native": (native.linear_cross_entropy, native._cross_entropy_rows_, DEVICE),
}
backend_names = pytest.mark.parametrize("backend", [
    "triton", pytest.param("ext", marks=pytest.mark.skipif(_EXT_WHY is not None, reason=f"extension: {_EXT_WHY}")),
    "native",
])


def _inputs(shape, C, V, dtype, ignore_frac=0.0, ignore_index=-1, seed=0, device=DEVICE, spread=2.0):
    """h (*shape, C), weight (V, C) with logits of std ~spread, targets (*shape) with some ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, C, generator=g)
    w = torch.randn(V, C, generator=g) * (spread / C**0.5)
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


def _chunked(row_kernel=cross_entropy_rows_, chunk_rows=None, vocab=None):
    """The driver with a given row kernel, and rows per chunk / padded vocabulary forced when given."""

    def fn(h, w, t, ignore_index=-1):
        plan = None
        if chunk_rows is not None or vocab is not None:
            V = w.shape[0]
            plan = ChunkPlan(chunk_rows or max(1, t.numel()), vocab if vocab is not None else padded_vocab(V))
        return chunked_loss.linear_cross_entropy(h, w, t, ignore_index, row_kernel,
                                                 compute_dtype=chunked_loss.compute_dtype_of(h), plan=plan)

    return fn


def _check_parity(h, w, t, ignore_index=-1, chunk_rows=None, grad_scale=1.0, fn=None):
    """Loss, dh and dweight of the op vs the reference (fp32 or fp16 rule of the tolerance table).

    fn defaults to the driver with Triton's row kernel, chunk_rows rows per chunk and the padded vocabulary.
    """
    fn = fn or _chunked(chunk_rows=chunk_rows)
    ours = _loss_and_grads(fn, h, w, t, ignore_index, grad_scale=grad_scale)
    ref32 = _loss_and_grads(ref.linear_cross_entropy, h.float(), w.float(), t, ignore_index, grad_scale=grad_scale)
    lowp = None
    if h.dtype != torch.float32:
        lowp = _loss_and_grads(ref.linear_cross_entropy, h, w, t, ignore_index, grad_scale=grad_scale)
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    assert ours[1].dtype == h.dtype and ours[2].dtype == w.dtype and ours[2].shape == w.shape
    what = f"linear_cross_entropy {tuple(h.shape)} V={w.shape[0]} chunk_rows={chunk_rows}"
    # The loss is fp32 whatever the inputs: judged by the rule of the inputs' dtype (rounding it to fp16 to compare
    # would add up to half an fp16 ulp of ~10 to one side and not the other).
    assert_close(f"{what} loss", ours[0], ref32[0], None if lowp is None else lowp[0], dtype=h.dtype)
    for i, name in ((1, "dh"), (2, "dweight")):
        assert_close(f"{what} {name}", ours[i], ref32[i], None if lowp is None else lowp[i])
    return ours


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,C,V",
    [
        ((1,), 8, 11),  # one row (T = 1), V below one block
        ((37,), 48, 1000),  # prime row count
        ((2, 13), 32, 257),  # 3-D h, prime V
    ],
)
def test_parity(backend, backend_op, dtype, shape, C, V, one_thread):
    """The op's one parity check, for every backend that runs here: the loss, dh and dweight, fp32 and fp16."""
    h, w, t = _inputs(shape, C, V, dtype, ignore_frac=0.2 if shape[0] > 1 else 0.0)
    _check_parity(h, w, t, fn=backend_op("linear_cross_entropy"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tiny_chunks_and_grad_scale(dtype):
    # chunk_rows=3 forces 13 chunks (the last one of 1 row); a grad_output of 3 checks the scaling.
    h, w, t = _inputs((37,), 24, 300, dtype, ignore_frac=0.3)
    _check_parity(h, w, t, chunk_rows=3, grad_scale=3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_launcher_gradients(dtype):
    # The launcher alone: chunked dh and the fp32 dweight accumulator, on the padded vocabulary, times the
    # pending factor (1 / n_valid in fp16; already in the chunk in fp32) equal the reference's gradients.
    h, w, t = _inputs((29,), 16, 130, dtype, ignore_frac=0.25)
    loss, dh, dw, pending = linear_cross_entropy_fwd(h, w, t, plan=ChunkPlan(4, 192))
    _, rdh, rdw = _loss_and_grads(ref.linear_cross_entropy, h.float(), w.float(), t)
    lowp = _loss_and_grads(ref.linear_cross_entropy, h, w, t) if dtype != torch.float32 else (None,) * 3
    assert dh.shape == (29, 16) and dh.dtype == dtype and dw.shape == (192, 16) and dw.dtype == torch.float32
    assert (pending is None) == (dtype == torch.float32)
    scale = 1.0 if pending is None else pending
    assert not dw[130:].any()  # the pad rows of dweight: exactly 0
    assert_close("launcher dh", (dh.float() * scale).to(dtype), rdh, lowp[1])
    assert_close("launcher dweight", (dw[:130] * scale).to(dtype), rdw, lowp[2])
    # Loss only: neither gradient is computed.
    loss2, dh2, dw2, _ = linear_cross_entropy_fwd(h, w, t, need_dh=False, need_dweight=False, plan=ChunkPlan(4, 192))
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
    ours = _check_parity(h, w, t, ignore_index=ignore_index, chunk_rows=8, fn=linear_cross_entropy)
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
    assert_close("mixed loss", loss, ref32[0], lowp[0], dtype=torch.float16)
    assert_close("mixed dh", dh, ref32[1], lowp[1])
    assert_close("mixed dweight", dw.half(), ref32[2], lowp[2])
    # Autocast to fp16 with fp32 inputs: the GEMMs run in fp16, the gradients come back in fp32.
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss_ac, dh_ac, dw_ac = _loss_and_grads(linear_cross_entropy, h32, w32, t)
        lowp_ac = _loss_and_grads(ref.linear_cross_entropy, h32, w32, t)
    assert dh_ac.dtype == torch.float32 and dw_ac.dtype == torch.float32
    ref32 = _loss_and_grads(ref.linear_cross_entropy, h32, w32, t)
    assert_close("autocast loss", loss_ac, ref32[0], lowp_ac[0], dtype=torch.float16)
    assert_close("autocast dh", dh_ac.half(), ref32[1], lowp_ac[1].half())
    assert_close("autocast dweight", dw_ac.half(), ref32[2], lowp_ac[2].half())


def test_no_grad_matches():
    h, w, t = _inputs((2, 9), 16, 75, torch.float32, ignore_frac=0.2)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t)
    assert_close("no_grad loss", loss, ref.linear_cross_entropy(h, w, t))


def test_chunk_policy():
    # The numbers of chunked_loss.chunk_rows' docstring: rows = min(N, max(4 b, 8 C / e)), evened out over the
    # chunks and rounded up to 64; the vocabulary padded where the weight copy pays for itself.
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert chunk_rows(8192, 768, torch.bfloat16, gpu) == 2752  # 3 chunks; 8 C / e = 3072 > 4 b = 1200
    assert chunk_rows(8192, 768, torch.float32, gpu) == 1408  # 2 C = 1536 -> 6 chunks of 1366, to 1408
    assert chunk_rows(8192, 64, torch.bfloat16, gpu) == 1216  # the stream floor: 4 b = 1200 rows, 7 chunks
    assert chunk_rows(16384, 1600, torch.bfloat16, gpu) == 5504  # GPT-2 1.5B: 3 chunks
    assert chunk_rows(1024, 128, torch.float32, cpu) == 256  # the main job: 4 chunks of 256 rows
    assert chunk_rows(64, 768, torch.float32, cpu) == 64  # one chunk
    assert chunk_rows(1, 768, torch.float32, gpu) == 1 and chunk_rows(0, 768, torch.float32, gpu) == 1
    for n in (1, 63, 64, 65, 1000, 4097, 100_000):
        rows = chunk_rows(n, 768, torch.float16, gpu)
        assert 1 <= rows <= n and (rows == n or rows % 64 == 0)
    assert chunk_plan(8192, 768, 50257, torch.bfloat16, gpu) == ChunkPlan(2752, 50304)
    assert chunk_plan(256, 768, 50257, torch.bfloat16, gpu) == ChunkPlan(256, 50257)  # copy > GEMM savings
    assert chunk_plan(1024, 128, 50257, torch.float32, cpu) == ChunkPlan(256, 50304)
    assert chunk_plan(64, 768, 50257, torch.float32, cpu) == ChunkPlan(64, 50257)
    assert padded_vocab(1) == 64 and padded_vocab(64) == 64 and padded_vocab(50257) == 50304


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
    N, C, V = 128, 8, 250
    h, w, t = _inputs((N,), C, V, dtype)
    elem = h.element_size()
    plan = chunk_plan(N, C, V, dtype, h.device)
    chunk, Vp = plan.rows, plan.vocab
    assert chunk == N // 2 and Vp == 256  # 2 chunks, on the padded vocabulary
    ref_mode = _allocations(ref.linear_cross_entropy, h, w, t)
    ours = _allocations(linear_cross_entropy, h, w, t)
    # The reference holds full (N, V) logits (several copies); we never allocate more than one chunk.
    # (fp16 on the CPU: the chunk is upcast to fp32 for the fp32-accumulated dweight GEMM, which cuBLAS does
    # without a copy.)
    assert ref_mode.largest >= N * V * 4
    upcast = 4 if DEVICE == "cpu" else elem
    assert ours.largest <= max(chunk * Vp * upcast, Vp * C * 4), ours.largest
    # Peak extra memory of forward + backward within the 25% target (chunk logits, the padded weight,
    # the fp32 dweight accumulator, dh, and the gradients handed on).
    assert ours.peak <= 0.25 * ref_mode.peak, (ours.peak, ref_mode.peak)
    # Under no_grad (inputs that require grad all the same) nothing of the gradient pass is
    # allocated: one chunk of logits, the per-row losses and a few scalars.
    with torch.no_grad():
        nograd = _allocations(linear_cross_entropy, h, w, t, backward=False)
    assert nograd.largest <= chunk * Vp * elem
    extra = Vp * C * elem  # the padded weight
    assert nograd.peak <= chunk * Vp * elem + extra + N * 4 + 4096, (nograd.peak, chunk * Vp * elem)


# ----------------------------------------------------------------------------------------------
# The shared driver with every row kernel: GradScaler numerics, padding, host reads
# ----------------------------------------------------------------------------------------------


@backend_names
@pytest.mark.parametrize("spread", [0.25, 3.0])
def test_fp16_gradients_under_a_grad_scaler(backend, spread):
    """fp16 with GradScaler's first scale, 2^16, as the upstream gradient, against a float64 reference.

    Nearly uniform logits over V = 2048 classes give probabilities p ~ 1 / V = 4.9e-4 (normal in fp16), but
    p / n_valid ~ 1e-6 (n_valid = 512 rows) is a few dozen steps of fp16's smallest subnormal, 6e-8; with logits of
    std 3 over a tenth of the p / n_valid lie below that subnormal (checked below). Written as
    p / n_valid in the fp16 logits chunk, the gradient of the rows of dweight that are never a target (all but 8
    here) is rounded to a few percent or flushed; rounding 2^16 to fp16 gives inf. Each region (dh, the rows of
    dweight that are never a target, the target rows) is held to the tolerance rule on its own: at most twice the
    fp16 reference's error (from the float64 one) plus the table's floor. (On a GPU: test_gpt2_fp16_grad_scaler_gpu.)
    """
    op, _, device = BACKENDS[backend]
    N, C, V, seed = 512, 16, 2048, 2.0**16
    h, w, t = _inputs((N,), C, V, torch.float16, spread=spread, device=device)
    t = (t % 8) * 255  # 8 target classes
    p = torch.softmax(h.double() @ w.double().t(), dim=-1) / N
    below = (p < 2.0**-24).double().mean().item()  # under fp16's smallest subnormal
    assert below > 0.1 if spread > 1 else below == 0, below
    ours = _loss_and_grads(op, h, w, t, grad_scale=seed)
    ref64 = _loss_and_grads(ref.linear_cross_entropy, h.double(), w.double(), t, grad_scale=seed)
    ref16 = _loss_and_grads(ref.linear_cross_entropy, h, w, t, grad_scale=seed)
    target = torch.zeros(V, dtype=torch.bool, device=device)
    target[t] = True
    assert_close(f"{backend} loss", ours[0], ref64[0].float(), ref16[0], dtype=torch.float16)
    assert_close(f"{backend} dh", ours[1], ref64[1], ref16[1])
    assert_close(f"{backend} dweight, rows never a target", ours[2][~target], ref64[2][~target], ref16[2][~target])
    assert_close(f"{backend} dweight, target rows", ours[2][target], ref64[2][target], ref16[2][target])
    # Row by row, relative to each row's own size: a row of tiny probabilities flushed to zero is 100% wrong even
    # where the largest rows hide it from a max-abs bound.
    rel = [_row_rel_err(x[2][~target], ref64[2][~target]) for x in (ours, ref16)]
    assert rel[0] <= 2 * rel[1] + 1e-2, (f"{backend}: worst row of dweight off by {rel[0]:.3g} "
                                        f"(fp16 reference {rel[1]:.3g})")


def _row_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest ||y_i - ref_i|| / ||ref_i|| over the rows i."""
    y, ref = y.double(), ref.double()
    return ((y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)).max().item()


@backend_names
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,C,V,chunk", [
    ((37,), 48, 1000, 16),  # chunks that do not divide N (16, 16, 5)
    ((2, 13), 32, 257, 7),  # 3-D h over several chunks
])
def test_chunks(backend, dtype, shape, C, V, chunk):
    # The driver over several chunks with each row kernel: the fp32 dweight accumulator across chunks.
    _, row_kernel, device = BACKENDS[backend]
    h, w, t = _inputs(shape, C, V, dtype, ignore_frac=0.2, device=device)
    _check_parity(h, w, t, chunk_rows=chunk, fn=_chunked(row_kernel, chunk_rows=chunk))


@pytest.mark.skipif(_EXT_WHY is not None or _EXT_GPU, reason="the extension's CPU row kernel (bf16 on the CPU)")
@pytest.mark.parametrize("chunk", [7, 64])
def test_bf16_weight_gradient_on_the_cpu(chunk, monkeypatch):
    # bf16 on the CPU forms each chunk's dweight product in bf16 and sums the chunks in fp32 (no fp32-output GEMM
    # there): over one and several chunks (padded vocabulary), within the bf16 rule of the tolerance table, and
    # no further from the fp32 reference than products formed in fp32 ("upcast") are, but for rounding.
    h, w, t = _inputs((2, 29), 32, 300, torch.bfloat16, ignore_frac=0.2, device="cpu")
    fn = _chunked(ext._cross_entropy_rows_, chunk_rows=chunk, vocab=320)
    dw = _check_parity(h, w, t, chunk_rows=chunk, fn=fn)[2]
    monkeypatch.setattr(chunked_loss, "_fp32_output_gemm", lambda device_type, dtype: "upcast")
    dw_upcast = _loss_and_grads(fn, h, w, t)[2]
    dw32 = _loss_and_grads(ref.linear_cross_entropy, h.float(), w.float(), t)[2]
    err, err_upcast = ((d.float() - dw32).norm() / dw32.norm() for d in (dw, dw_upcast))
    assert err <= 1.25 * err_upcast + 1e-4, (err, err_upcast)


@backend_names
@pytest.mark.parametrize("V,chunk,vocab", [(1, 3, 64), (37, 5, 64), (37, 8, 192), (130, 8, 192)])
def test_padded_vocabulary(backend, V, chunk, vocab):
    # GEMMs on a padded vocabulary (V = 1, V < 64, V not a multiple of 64, more than one block of pad), over
    # several chunks: the same loss and gradients as the reference, and a (V, C) dweight (the pad rows' gradient
    # never leaks into it).
    _, row_kernel, device = BACKENDS[backend]
    h, w, t = _inputs((23,), 16, V, torch.float32, ignore_frac=0.2, device=device)
    _check_parity(h, w, t, fn=_chunked(row_kernel, chunk_rows=chunk, vocab=vocab), grad_scale=3.0)


@backend_names
def test_row_kernel_leaves_the_padding_alone(backend):
    """A row kernel reads and writes only the first V columns of a padded chunk: the softmax excludes the pad
    (here huge values, which would dominate it) and the pad columns come back untouched."""
    _, row_kernel, device = BACKENDS[backend]
    V, Vp = 10, 64
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.tensor([3, -1, 9, 0], device=device)
    want = torch.stack([ref.cross_entropy(logits[i:i + 1], t[i:i + 1]) for i in range(4)])  # row 1 ignored: 0
    z = torch.full((4, Vp), 100.0, device=device)
    z[:, :V] = logits
    assert_close(f"{backend} row losses, loss only", row_kernel(z, t, V, -1, None), want)
    assert torch.equal(z[:, :V], logits)  # loss only: the logits are only read
    losses = row_kernel(z, t, V, -1, torch.tensor([0.5], device=device))
    expect = 0.5 * (torch.softmax(logits, -1) - torch.nn.functional.one_hot(t.clamp(min=0), V))
    expect[1] = 0.0
    assert_close(f"{backend} row losses", losses, want)
    assert_close(f"{backend} row gradient", z[:, :V], expect)
    assert torch.equal(z[:, V:], torch.full((4, Vp - V), 100.0, device=device))


class _NoHostReads(TorchDispatchMode):
    """Fails any op that copies a tensor value to the host (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``
    all end in ``aten._local_scalar_dense``), except while ``paused``."""

    paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            raise AssertionError("a host read on the device path of the loss head")
        return func(*args, **(kwargs or {}))


def _paused(mode, fn):
    """fn with ``mode`` paused while it runs."""

    def run(*args, **kwargs):
        mode.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            mode.paused = False

    return run


@backend_names
def test_no_host_read_on_the_device_path(backend, monkeypatch):
    """The op as it runs on a GPU, run on CPU tensors: ``host_reads_are_free`` (the one switch of the driver's
    host-side checks) says no, and every host read raises. Forward and both kinds of backward must get through,
    with the reference's results; an out-of-range target then gives a NaN loss and a zero gradient, no error."""
    op, _, device = BACKENDS[backend]
    no_reads = _NoHostReads()
    monkeypatch.setattr(chunked_loss, "host_reads_are_free", lambda device: False)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() on the device path"))
    # The Triton interpreter reads a kernel's arguments on the host; a GPU launch does not: launches are let be.
    monkeypatch.setattr(lce, "launch", _paused(no_reads, lce.launch))
    h, w, t = _inputs((21,), 16, 100, torch.float32, ignore_frac=0.2, device=device)
    want = _loss_and_grads(ref.linear_cross_entropy, h, w, t, grad_scale=2.0)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with no_reads:
        loss = op(hh, ww, t)
        kept = torch.autograd.grad(2.0 * loss, (hh, ww), retain_graph=True)
        freed = torch.autograd.grad(2.0 * loss, (hh, ww))
    assert_close(f"{backend} loss", loss.detach(), want[0])
    for got in (kept, freed):
        assert_close(f"{backend} dh", got[0], want[1])
        assert_close(f"{backend} dweight", got[1], want[2])
    if device == "cpu" and backend == "ext":
        return  # the extension's CPU op checks its targets itself (a CPU op reads them for free)
    t[4] = 100
    hh = h.clone().requires_grad_()
    with no_reads:
        loss = op(hh, w, t)
        loss.backward()
    assert torch.isnan(loss).item()
    assert not hh.grad[4].any() and torch.isfinite(hh.grad).all()


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@backend_names
def test_out_of_range_targets_raise(backend):
    # On CPU tensors both backends check the targets before any work, with one message.
    if backend == "triton" and DEVICE == "cuda":
        pytest.skip("Triton takes CPU tensors only under the interpreter (the GPU: test_out_of_range_target_gpu)")
    op = BACKENDS[backend][0]
    h, w, t = _inputs((9,), 8, 20, torch.float32, device="cpu")
    for bad in (20, -5):
        tb = t.clone()
        tb[4] = bad
        with pytest.raises(ValueError, match=rf"linear_cross_entropy: targets .*\[0, 20\).*e\.g\. {bad}"):
            op(h, w, tb)
        with torch.no_grad(), pytest.raises(ValueError, match=r"linear_cross_entropy: targets .*\[0, 20\)"):
            op(h, w, tb)
    # -100 is fine once it is the ignore_index.
    tb = t.clone()
    tb[4] = -100
    op(h, w, tb, ignore_index=-100)


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
        cases.append(((h.bfloat16(), w.bfloat16(), t), TypeError,
                      "linear_cross_entropy: bfloat16 is not supported by Triton's CPU interpreter"))
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            linear_cross_entropy(*args)
    with pytest.raises(ValueError, match="linear_cross_entropy: a plan needs rows >= 1"):
        linear_cross_entropy_fwd(h, w, t, plan=ChunkPlan(0, 64))
    with pytest.raises(ValueError, match="linear_cross_entropy: a plan needs .*vocab >= V = 20"):
        linear_cross_entropy_fwd(h, w, t, plan=ChunkPlan(4, 16))


def test_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, t = _inputs((4,), 8, 10, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="linear_cross_entropy: h is a CPU tensor.*TRITON_INTERPRET=1"):
        linear_cross_entropy(h, w, t)


def test_launch_configs_cover_the_launcher():
    configs = launch_configs(80)
    blocks = {c.constexprs["BLOCK_V"] for c in configs}
    # What the launcher picks for the V of these tests and GPT-2's is listed.
    from gpt2_kernels.linear_cross_entropy import _block_params

    assert {_block_params(v)[0] for v in (1, 11, 257, 1000, 50257, 250_000)} <= blocks
    assert {c.signature["logits_ptr"] for c in configs} == {"*fp32", "*fp16", "*bf16"}
    assert {c.signature["logits_ptr"] for c in launch_configs(75)} == {"*fp32", "*fp16"}  # no bf16 before sm_80
    params = [name for name in _linear_cross_entropy_fwd_kernel.arg_names]
    for c in configs:
        assert set(c.constexprs) == {"COMPUTE_GRAD", "BLOCK_V"}
        assert list(c.signature) + list(c.constexprs) == params


# ----------------------------------------------------------------------------------------------
# GPU: GPT-2's vocabulary in fp16 / bf16, and measured memory
# ----------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpt2_vocab_gpu(dtype):
    h, w, t = _inputs((4, 257), 768, 50257, dtype, ignore_frac=0.05)
    _check_parity(h, w, t, fn=linear_cross_entropy)  # the default plan: one chunk on the padded vocabulary
    _check_parity(h, w, t, chunk_rows=300)  # 4 chunks, the last partial: the fp32 accumulator across chunks
    _check_parity(h, w, t, fn=_chunked(chunk_rows=300, vocab=50257))  # unpadded


def _gpu_op(backend: str):
    """The backend's op on a GPU; the extension's only where its CUDA kernels were built."""
    if backend == "ext" and not _EXT_GPU:
        pytest.skip(f"the extension's CUDA kernels are not available here ({_EXT_WHY or 'a CPU-only build'})")
    return BACKENDS[backend][0]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_gpt2_fp16_grad_scaler_gpu(backend):
    # The H100 report: N = 4096, V = 16384, C = 64, upstream gradient 2^16, fp16: non-target dweight rows and dh.
    op = _gpu_op(backend)
    h, w, t = _inputs((4096,), 64, 16384, torch.float16)
    t = (t % 8) * 2039
    ours = _loss_and_grads(op, h, w, t, grad_scale=2.0**16)
    ref64 = _loss_and_grads(ref.linear_cross_entropy, h.double(), w.double(), t, grad_scale=2.0**16)
    ref16 = _loss_and_grads(ref.linear_cross_entropy, h, w, t, grad_scale=2.0**16)
    target = torch.zeros(16384, dtype=torch.bool, device=h.device)
    target[t] = True
    assert_close("dh", ours[1], ref64[1], ref16[1])
    assert_close("dweight, rows never a target", ours[2][~target], ref64[2][~target], ref16[2][~target])
    assert_close("dweight, target rows", ours[2][target], ref64[2][target], ref16[2][target])


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
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_out_of_range_target_gpu(backend):
    # No host read on a GPU: the bad row's loss is NaN (so is the mean) and its gradient 0; no error.
    op = _gpu_op(backend)
    h, w, t = _inputs((64,), 64, 1000, torch.float16)
    t[10] = 1000
    hh = h.clone().requires_grad_()
    loss = op(hh, w, t)
    loss.backward()
    assert torch.isnan(loss).item()
    assert not hh.grad[10].any() and torch.isfinite(hh.grad).all()
