"""The chunked loss head that every fused backend shares: one driver, one chunk policy, one autograd Function.

Contract: ``linear_cross_entropy(h, weight, targets, ignore_index)`` is the mean over non-ignored targets of
``logsumexp(z_i) - z_i[t_i]`` with ``z = h @ weight.T`` (``gpt2_kernels.ref.linear_cross_entropy``). A backend supplies
only a *row kernel*, which turns one chunk of logits into its gradient in place and returns the per-row losses
(Triton: ``gpt2_kernels.linear_cross_entropy.cross_entropy_rows_``; the extension: ``gpt2_kernels.ext``). The rest is here:

    wp = weight in the compute dtype, padded with zero rows to Vp                    (Vp, C)
    for each chunk of rows [s, e):
        z        = h[s:e] @ wp.T           GEMM; the pad columns are h @ 0 = 0       (rows, Vp)
        row kernel: losses[s:e], and z[:, :V] := k (softmax(z) - onehot(t))        (0 for ignored rows)
        dh[s:e]  = z @ wp                  GEMM, compute dtype                       (rows, C)
        dw      += z.T @ h[s:e]            GEMM into an fp32 accumulator             (Vp, C)
    loss = sum(losses) / n_valid;   backward: dh and dw[:V] times g / (k n_valid), computed in fp32

The gradients are formed in the forward (a loss-only call skips the two gradient GEMMs), and the backward only scales
them by the upstream gradient g. In fp16 / bf16 the chunk holds k = 1: softmax - onehot lies in [-1, 1], so no fp16
sum can overflow, and g / n_valid is applied in fp32 in the backward; folding 1 / n_valid (or a GradScaler's 2^16,
inf in fp16) into the fp16 chunk would flush the small probabilities, and with them most of the gradient of output
rows that are never a target. In fp32 the chunk holds k = 1 / n_valid, so a backward seeded with 1.0 has nothing left
to scale (checked only where reading g costs no device synchronisation: on the CPU).

Chunks: ``chunk_rows`` derives the policy. Padding: the GEMMs run on Vp = V rounded up to ``VOCAB_ALIGN`` wherever
the weight copy pays for itself (``pads_vocab``): a (rows, 50257) chunk's odd row stride keeps cuBLAS off its aligned
tensor-core kernels. The row kernels touch only columns < V, so the pad columns stay 0 and add nothing.

Host reads: none on a GPU, so a call never stalls its launch queue. ``check_targets_on_host`` (``ValueError`` for a
target neither ``ignore_index`` nor in [0, V)) and the look at a 1.0 seed run only where they are free
(``host_reads_are_free``: CPU tensors, outside torch.compile); on a GPU such a target gives its row a NaN loss.

Cost: ``bench.common.op_cost("linear_cross_entropy", ...)`` gives the FLOPs and fewest bytes of a call;
docs/performance.md holds the measurements (H100 and CPU, each with its machine and date).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = [
    "VOCAB_ALIGN", "ChunkPlan", "LinearCrossEntropyFunction", "RowKernel", "check_inputs",
    "check_targets_on_host", "chunk_plan", "chunk_rows", "chunked_forward", "compute_dtype_of",
    "host_reads_are_free", "linear_cross_entropy", "padded_vocab", "pads_vocab", "register_forward_op",
]

_OP = "linear_cross_entropy"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VOCAB_ALIGN = 64

# (z (rows, Vp) chunk, targets (rows,) int64, V, ignore_index, k: (1,) fp32 or None) -> per-row losses (rows,)
# fp32, 0 for ignored rows and NaN for out-of-range targets. With k, the kernel overwrites z[:, :V] with
# k * (softmax - onehot) in place (0 for ignored and out-of-range rows) and leaves the pad columns alone;
# without k it only reads z.
RowKernel = Callable[[torch.Tensor, torch.Tensor, int, int, Optional[torch.Tensor]], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Chunk policy

# Machine balance in FLOP per byte: dense GEMM rate over memory bandwidth. H100 SXM: 989 TFLOP/s bf16 over
# 3.35 TB/s (spec sheet) ~ 300. The 2-core EPYC the main job runs on, measured: ~150 GFLOP/s for the loss head's
# fp32 GEMMs at the main job's sizes over 30-50 GB/s for an in-place pass over a (V, C) fp32 tensor: 3 to 5.
_BALANCE = {"cuda": 300, "cpu": 5}
# Share of the GEMM time that an unaligned vocabulary costs (V = 50257 against Vp = 50304, logits + dh + dW GEMMs):
# H100 bf16, 2048 x 768 rows: 4.04 ms against 0.68 ms, 0.83. 2-core EPYC fp32: 78 against 65 ms at 256 x 128
# rows, 132 against 129 ms at 64 x 768 rows: 0.02 to 0.17, take 0.1.
_UNALIGNED_SHARE = {"cuda": 0.8, "cpu": 0.1}


@dataclass(frozen=True)
class ChunkPlan:
    """How the driver splits the work: ``rows`` per chunk, GEMMs on ``vocab`` (Vp >= V) columns."""

    rows: int
    vocab: int


def padded_vocab(n_classes: int) -> int:
    """V rounded up to a multiple of ``VOCAB_ALIGN`` (64)."""
    return -(-n_classes // VOCAB_ALIGN) * VOCAB_ALIGN


def pads_vocab(n_rows: int, device: torch.device) -> bool:
    """Whether the GEMMs should run on the padded vocabulary for N rows on ``device``.

    Padding costs one copy of the weight, 8 V C bytes (an fp32 read and write; less in fp16 / bf16), and saves a
    share u of the GEMMs' 6 N C V FLOPs of time: worth it when u 6 N C V / rate > 8 V C / bandwidth, i.e.
    N > 4 b / (3 u) with b the balance in FLOP/byte (V and C cancel): 500 rows on an H100 (b ~ 300, u ~ 0.8),
    67 on the main job's CPU (b ~ 5, u ~ 0.1).
    """
    balance = _BALANCE.get(device.type, _BALANCE["cuda"])
    share = _UNALIGNED_SHARE.get(device.type, _UNALIGNED_SHARE["cuda"])
    return n_rows * 3 * share > 4 * balance


def chunk_rows(n_rows: int, n_channels: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk for N rows of C channels in ``dtype`` on ``device``.

    Derivation (V classes, e bytes per compute-dtype element, balance b FLOP/byte of the device):
      - FLOPs: 6 N C V (logits, dh and dw GEMMs), whatever the chunking: chunks cost bytes, not FLOPs.
      - Each chunk re-streams the fp32 (V, C) dw accumulator: 8 V C bytes (read + write), against the chunk's
        6 rows C V GEMM FLOPs. That stream costs at most 1/3 of the GEMM time when
        8 V C / bandwidth <= (1/3) 6 rows C V / rate, i.e. rows >= 4 b (V and C cancel): 1200 rows on an H100
        (b ~ 300), 20 on the main job's CPU (b ~ 5). Thinner chunks are stream-bound: N C / V rows
        (~125 for GPT-2 small) re-stream dw 65 times, ~30 GB per step.
      - Memory: a chunk of logits is rows x Vp x e bytes; bigger chunks are faster (fewer dw passes), so take
        the largest chunk that costs no more than twice the fp32 dw accumulator the op holds anyway
        (2 x 4 Vp C bytes): rows <= 8 C / e = 2 C in fp32, 4 C in fp16 / bf16.
      - rows = min(N, max(4 b, 8 C / e)), then evened out over the chunks and rounded up to a multiple of 64.
    GPT-2 small (C = 768) on an H100 in bf16, N = 8192: 3 chunks of 2752 rows (277 MB of logits each); the main
    job (C = 128, N = 1024, fp32, CPU): 4 chunks of 256 rows. Measured there (H100, torch 2.11, Triton row
    kernel, padded, fwd + bwd / peak extra memory): 1024 rows 6.05 ms / 246 MiB, 2048 rows 4.98 ms / 344 MiB,
    this policy's 2752 rows 4.85 ms / 411 MiB, one chunk of 8192 rows 4.31 ms / 933 MiB: each extra chunk costs
    ~0.25 ms, ~6% of the one-chunk time (the model above: 1/3 at 1200 rows).

    Args:
        n_rows: N, rows of h.
        n_channels: C.
        dtype: compute dtype of the GEMMs and the logits chunk.
        device: where they run.
    Returns:
        Rows per chunk, in [1, max(N, 1)].
    """
    e = torch.finfo(dtype).bits // 8
    stream_floor = 4 * _BALANCE.get(device.type, _BALANCE["cuda"])
    memory_rows = 8 * n_channels // e
    rows = max(1, min(n_rows, max(stream_floor, memory_rows)))
    chunks = -(-n_rows // rows)
    even = -(-n_rows // max(chunks, 1))
    return max(1, min(n_rows, -(-even // 64) * 64))


def chunk_plan(n_rows: int, n_channels: int, n_classes: int, dtype: torch.dtype, device: torch.device) -> ChunkPlan:
    """The plan for N rows, C channels, V classes: ``chunk_rows`` rows per chunk, GEMMs on ``padded_vocab(V)``
    columns where ``pads_vocab`` says it pays, else on V.

    Args:
        n_rows, n_channels, n_classes: N, C, V.
        dtype: compute dtype.
        device: where it runs.
    Returns:
        A ``ChunkPlan``.
    """
    vocab = padded_vocab(n_classes) if pads_vocab(n_rows, device) else n_classes
    return ChunkPlan(chunk_rows(n_rows, n_channels, dtype, device), vocab)


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def compute_dtype_of(h: torch.Tensor) -> torch.dtype:
    """autocast's dtype when autocast is on for h's device, else h's dtype."""
    dev = h.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def check_inputs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index) -> None:
    """Raise TypeError / ValueError, naming the argument, unless the arguments fit the op's signature."""
    for name, x in (("h", h), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if h.dim() < 1:
        raise ValueError(f"{_OP}: h must have shape (..., C), got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must have shape (V, C), got {tuple(weight.shape)}")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(f"{_OP}: weight has C = {weight.shape[1]} channels (shape {tuple(weight.shape)}) but h has "
                         f"C = {h.shape[-1]} (shape {tuple(h.shape)})")
    if weight.shape[0] < 1:
        raise ValueError(f"{_OP}: weight must have at least one class (V >= 1), got shape {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"{_OP}: targets must have h's leading shape {tuple(h.shape[:-1])}, got "
                         f"{tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{_OP}: targets must be int64 (torch.long) class ids, got {targets.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, x in (("h", h), ("weight", weight)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{_OP}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.device != h.device or targets.device != h.device:
        raise ValueError(f"{_OP}: h, weight and targets must be on one device, got h on {h.device}, weight on "
                         f"{weight.device}, targets on {targets.device}")


def host_reads_are_free(device: torch.device) -> bool:
    """Whether the op may read a value of a tensor on ``device`` on the host: only for CPU tensors, and not while
    torch.compile traces (a host read there is a graph break)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def check_targets_on_host(targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise ValueError if a target is neither ``ignore_index`` nor in [0, V). Reads the targets on the host: call
    it only where ``host_reads_are_free``.

    Args:
        targets: (N,) int64.
        n_classes: V.
        ignore_index: the ignored value.
    """
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_classes))
    if bool(bad.any()):
        raise ValueError(f"{_OP}: targets must be class ids in [0, {n_classes}) or ignore_index={ignore_index}; "
                         f"found a target out of range (e.g. {int(targets[bad][0])})")


# ---------------------------------------------------------------------------------------------------------------------
# The driver


def _padded_weight(weight: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """(Vp, C) copy of weight in ``dtype`` with zero pad rows; weight itself (cast if needed) when Vp = V."""
    n_classes, n_channels = weight.shape
    if vocab == n_classes:
        return weight.to(dtype)
    wp = torch.empty((vocab, n_channels), device=weight.device, dtype=dtype)
    wp[:n_classes].copy_(weight)
    wp[n_classes:].zero_()
    return wp


_FP32_GEMM_MODES: dict = {}  # dtype -> what _probe_fp32_output_gemm found on this torch's CUDA build


def _fp32_output_gemm(device_type: str, dtype: torch.dtype) -> str:
    """How this torch forms an fp32 product of two ``dtype`` matrices on ``device_type``.

    ``"addmm"``: ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` accumulates in place (cuBLAS, torch
    versions whose addmm takes an fp32 ``self``, e.g. 2.11); ``"mm"``: ``torch.mm(a, b, out_dtype=torch.float32)``
    (cuBLAS, torch >= 2.8); ``"upcast"``: neither (older torch; fp16 on the CPU), the operands are cast to fp32
    first; ``"lowp"``: bf16 on the CPU, which has no fp32-output overload: the chunk's product runs in bf16 (oneDNN
    accumulates in fp32 and rounds the result once) and is added into the fp32 sum. Each chunk's product is then
    rounded to bf16 once, as an autocast weight gradient is, and the loss head's weight gradient reaches an
    autocast model in bf16 anyway. Measured on the 2-core EPYC (50304 x 1024 x 128): 34 ms against 153 ms
    upcast, whose fp32 copy of the chunk alone is 200 MB.
    Probed once per dtype by running each on tiny CUDA tensors; while torch.compile traces, an unprobed dtype
    takes ``"upcast"`` (always correct) rather than tracing the probe.
    """
    if device_type != "cuda":
        return "lowp" if dtype == torch.bfloat16 else "upcast"
    if dtype not in _FP32_GEMM_MODES:
        if torch.compiler.is_compiling():
            return "upcast"
        _FP32_GEMM_MODES[dtype] = _probe_fp32_output_gemm(dtype)
    return _FP32_GEMM_MODES[dtype]


def _probe_fp32_output_gemm(dtype: torch.dtype) -> str:
    a = torch.zeros((16, 16), device="cuda", dtype=dtype)
    acc = torch.zeros((16, 16), device="cuda", dtype=torch.float32)
    for mode, gemm in (("addmm", lambda: torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)),
                       ("mm", lambda: torch.mm(a, a, out_dtype=torch.float32))):
        try:
            gemm()
            return mode
        except (RuntimeError, TypeError):  # the overload or its dtype combination is missing here
            continue
    return "upcast"


def _accumulate_dw(dw: torch.Tensor, zt: torch.Tensor, hc: torch.Tensor, first: bool) -> None:
    """dw (Vp, C) fp32 := (first ? 0 : dw) + zt @ hc, the product summed in fp32 whatever zt's dtype.

    The first chunk writes dw without a zero fill (one pass less over (Vp, C)).
    """
    if zt.dtype == torch.float32:
        if first:
            torch.mm(zt, hc, out=dw)
        else:
            dw.addmm_(zt, hc)
        return
    mode = _fp32_output_gemm(zt.device.type, zt.dtype)
    if mode == "addmm":
        torch.addmm(dw, zt, hc, out_dtype=torch.float32, beta=0 if first else 1, out=dw)
    elif mode == "mm" and first:
        torch.mm(zt, hc, out_dtype=torch.float32, out=dw)
    elif mode == "mm":
        dw.add_(torch.mm(zt, hc, out_dtype=torch.float32))
    elif mode == "lowp" and first:
        dw.copy_(torch.mm(zt, hc))
    elif mode == "lowp":
        dw.add_(torch.mm(zt, hc))
    elif first:
        torch.mm(zt.float(), hc.float(), out=dw)
    else:
        dw.addmm_(zt.float(), hc.float())


def chunked_forward(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                    row_kernel: RowKernel, *, compute_dtype: torch.dtype, need_dh: bool = True,
                    need_dweight: bool = True, plan: ChunkPlan | None = None):
    """Loss and, when asked, the gradients of the summed row losses, chunk by chunk (module docstring).

    Run with autocast off: the GEMMs write into preallocated buffers (``out=``) in ``compute_dtype``.

    Args:
        h: (..., C) hidden states.
        weight: (V, C) output embedding.
        targets: (...) int64 class ids in [0, V) or ``ignore_index``.
        ignore_index: target value that contributes nothing.
        row_kernel: the backend's ``RowKernel``.
        compute_dtype: dtype of the GEMMs and the logits chunk.
        need_dh, need_dweight: form these gradients (both False: the loss alone, no gradient pass).
        plan: chunking and padding (default ``chunk_plan(N, C, V, compute_dtype, device)``).
    Returns:
        (loss, dh, dw, pending): loss a 0-dim fp32 tensor; dh (N, C) in the compute dtype or None; dw (Vp, C)
        fp32 or None (its first V rows are the gradient); pending a 0-dim fp32 tensor (1 / n_valid) that dh and
        dw must still be multiplied by, or None when the chunk already held it (fp32).
    """
    n_classes, n_channels = weight.shape
    h2 = h.reshape(-1, n_channels)  # (N, C)
    t = targets.reshape(-1).contiguous()  # (N,)
    n_rows, dev = h2.shape[0], h.device
    if plan is None:
        plan = chunk_plan(n_rows, n_channels, n_classes, compute_dtype, dev)
    if plan.vocab < n_classes or plan.rows < 1:
        raise ValueError(f"{_OP}: a plan needs rows >= 1 and vocab >= V = {n_classes}, got {plan}")
    if host_reads_are_free(dev):
        check_targets_on_host(t, n_classes, ignore_index)
    grad = need_dh or need_dweight
    n_valid = (t != ignore_index).sum().clamp(min=1)  # () int64, stays on the device
    fold = compute_dtype == torch.float32  # 1 / n_valid goes into the chunk (module docstring)
    inv = (1.0 / n_valid.to(torch.float32)).reshape(1)  # (1,) fp32
    k = (inv if fold else torch.ones(1, device=dev)) if grad else None
    dh = torch.empty((n_rows, n_channels), device=dev, dtype=compute_dtype) if need_dh else None
    dw = torch.empty((plan.vocab, n_channels), device=dev, dtype=torch.float32) if need_dweight else None
    losses = torch.empty((n_rows,), device=dev, dtype=torch.float32)
    if n_rows > 0:
        _run_chunks(h2.to(compute_dtype), _padded_weight(weight, plan.vocab, compute_dtype), t, ignore_index,
                    row_kernel, k, losses, dh, dw, plan, n_classes)
    elif dw is not None:
        dw.zero_()  # no chunk wrote it
    loss = losses.sum() / n_valid
    return loss, dh, dw, (None if fold or not grad else inv[0])


def _run_chunks(hc, wp, t, ignore_index, row_kernel, k, losses, dh, dw, plan, n_classes) -> None:
    """The chunk loop: three GEMMs and one row kernel per chunk, every buffer preallocated."""
    n_rows = hc.shape[0]
    rows = min(plan.rows, n_rows)
    # One (rows, Vp) buffer for every chunk: a fresh one per chunk would be page-faulted in again each time on a
    # CPU (allocations this large are mmap'd and returned on free).
    buf = torch.empty((rows, plan.vocab), device=hc.device, dtype=hc.dtype)
    for s in range(0, n_rows, rows):
        e = min(n_rows, s + rows)
        z = buf[: e - s]  # (rows, Vp), contiguous
        torch.mm(hc[s:e], wp.t(), out=z)
        losses[s:e].copy_(row_kernel(z, t[s:e], n_classes, ignore_index, k))
        if dh is not None:
            torch.mm(z, wp, out=dh[s:e])  # (rows, C)
        if dw is not None:
            _accumulate_dw(dw, z.t(), hc[s:e], first=s == 0)  # (Vp, C)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd


def _graph_is_freed_after_this_backward() -> bool:
    """True inside a backward run with retain_graph=False (the usual ``loss.backward()``).

    Uses torch's private ``_get_current_graph_task_keep_graph``; where it is missing, or while torch.compile
    traces, answers False, which is always safe (the caller then copies).
    """
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None or torch.compiler.is_compiling():
        return False
    try:
        return not probe()
    except RuntimeError:  # not inside a backward
        return False


def _scaled(grad: torch.Tensor | None, s: torch.Tensor | None, dtype: torch.dtype, in_place: bool):
    """grad * s computed in fp32, returned in ``dtype``; in place when allowed and grad is fp32; s None: as is."""
    if grad is None:
        return None
    if s is None:
        return grad.to(dtype)
    if in_place and grad.dtype == torch.float32:
        return grad.mul_(s).to(dtype)
    return (grad.float() * s).to(dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The loss head, chunked: gradients formed in the forward, scaled by the upstream gradient in the backward.

    ``apply(h, weight, targets, ignore_index, row_kernel, compute_dtype, plan)``; see ``linear_cross_entropy``.
    A backward that frees the graph (the usual ``loss.backward()``) scales the fp32 buffers in place and hands
    them on as the gradients: a new (V, C) tensor would cost another pass over fresh memory, page faults
    included on a CPU. With ``retain_graph=True`` it scales copies, so the next backward sees the same buffers.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, row_kernel, compute_dtype, plan):
        with torch.autocast(h.device.type, enabled=False):
            loss, dh, dw, pending = chunked_forward(
                h, weight, targets, ignore_index, row_kernel, compute_dtype=compute_dtype,
                need_dh=ctx.needs_input_grad[0], need_dweight=ctx.needs_input_grad[1], plan=plan)
        # Attributes, not saved tensors, so that a backward which frees the graph can hand them on without a copy.
        ctx.grads = (dh, None if dw is None else dw[: weight.shape[0]], pending)
        ctx.h_shape, ctx.h_dtype, ctx.w_dtype = h.shape, h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw, pending = ctx.grads
        freed = _graph_is_freed_after_this_backward()
        if freed:
            ctx.grads = None  # nobody can run this backward again: scale in place and let the buffers go
        s = grad.float() if pending is None else grad.float() * pending  # () fp32
        if pending is None and freed and host_reads_are_free(grad.device) and grad.item() == 1.0:
            s = None  # loss.backward() seeds 1.0 and the chunk held 1 / n_valid: nothing left to scale
        gh = _scaled(dh, s, ctx.h_dtype, freed)
        gw = _scaled(dw, s, ctx.w_dtype, freed)
        return (None if gh is None else gh.reshape(ctx.h_shape)), gw, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# The registered op: what torch.compile sees

_OP_SCHEMA = ("(Tensor h, Tensor weight, Tensor targets, int ignore_index, ScalarType compute_dtype, bool need_dh, "
              "bool need_dweight) -> (Tensor loss, Tensor dh, Tensor dweight, Tensor pending)")


def register_forward_op(name: str, forward: Callable):
    """Register a backend's chunked forward as the ``torch.library`` op ``name``, with a fake kernel and autograd.

    The op is what ``linear_cross_entropy(..., op=...)`` calls while torch.compile traces: one opaque node that runs
    the chunk loop as eagerly (no functionalised copies of the in-place chunk), returning the loss and the
    gradients formed in the forward as outputs that no gradient flows into; its backward scales them by the
    upstream gradient as ``LinearCrossEntropyFunction`` does, out of place (a compiled graph is functional).

    Args:
        name: ``"namespace::op_name"``.
        forward: ``forward(h, weight, targets, ignore_index, *, need_dh, need_dweight, compute_dtype)`` returning
            ``chunked_forward``'s (loss, dh, dw, pending), e.g. ``gpt2_kernels.linear_cross_entropy.
            linear_cross_entropy_fwd`` (the backend's input checks included).
    Returns:
        The op: ``op(h, weight, targets, ignore_index, compute_dtype, need_dh, need_dweight) -> (loss, dh,
        dweight, pending)``, with loss 0-dim fp32, dh (N, C) in the compute dtype, dweight (V, C) fp32, pending 0-dim
        fp32; an output that is not formed (not asked for; pending where the chunk held 1 / n_valid) is an empty
        (0,) fp32 tensor.
    """

    @torch.library.custom_op(name, mutates_args=(), schema=_OP_SCHEMA)
    def op(h, weight, targets, ignore_index, compute_dtype, need_dh, need_dweight):
        loss, dh, dw, pending = forward(h, weight, targets, ignore_index, need_dh=need_dh,
                                        need_dweight=need_dweight, compute_dtype=compute_dtype)
        dw = None if dw is None else dw[: weight.shape[0]]  # (V, C) of the (Vp, C) buffer
        return loss, *(_or_empty(t, h) for t in (dh, dw, pending))

    @op.register_fake
    def _(h, weight, targets, ignore_index, compute_dtype, need_dh, need_dweight):
        n_classes, n_channels = weight.shape
        f32 = torch.float32
        pending = (need_dh or need_dweight) and compute_dtype != f32  # the chunk holds 1 / n_valid in fp32
        return (h.new_empty((), dtype=f32),
                h.new_empty((h.numel() // n_channels, n_channels) if need_dh else (0,),
                            dtype=compute_dtype if need_dh else f32),
                h.new_empty((n_classes, n_channels) if need_dweight else (0,), dtype=f32),
                h.new_empty(() if pending else (0,), dtype=f32))

    op.register_autograd(_op_backward, setup_context=_op_setup)
    return op


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # An op returns no None; each stand-in is its own tensor (outputs may not alias each other).
    return like.new_empty((0,), dtype=torch.float32) if t is None else t


def _op_setup(ctx, inputs, output):
    h, weight = inputs[:2]
    _loss, dh, dw, pending = output
    ctx.mark_non_differentiable(dh, dw, pending)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dh, dw, pending)
    ctx.h_shape, ctx.h_dtype, ctx.w_dtype = h.shape, h.dtype, weight.dtype


def _op_backward(ctx, grad, _ddh, _ddw, _dpending):
    dh, dw, pending = ctx.saved_tensors  # formed ones are 2-D (dh, dw) and 0-dim (pending); empty (0,) ones are not
    if grad is None:
        return (None,) * 7
    s = grad.float() * pending if pending.dim() == 0 else grad.float()  # () fp32
    gh = _scaled(dh, s, ctx.h_dtype, False).reshape(ctx.h_shape) if dh.dim() == 2 else None
    gw = _scaled(dw, s, ctx.w_dtype, False) if dw.dim() == 2 else None
    return gh, gw, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# The public driver


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         row_kernel: RowKernel, *, compute_dtype: torch.dtype,
                         plan: ChunkPlan | None = None, op=None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` over the non-ignored targets, chunked, with ``row_kernel``.

    Through the autograd Function when a gradient is wanted; else the loss alone (no gradient pass). While
    torch.compile traces, through ``op`` when given (``register_forward_op``; the default chunk plan only).

    Args:
        h: (..., C) hidden states.
        weight: (V, C) output embedding.
        targets: (...) int64 class ids in [0, V), or ``ignore_index``.
        ignore_index: target value that contributes nothing.
        row_kernel: the backend's ``RowKernel``.
        compute_dtype: dtype of the GEMMs and the logits chunk.
        plan: chunking and padding (default: ``chunk_plan``).
        op: the backend's registered forward, for torch.compile (``register_forward_op``), or None.
    Returns:
        A 0-dim fp32 tensor (0 when every target is ignored; NaN when a target is out of range on a GPU).
    """
    if op is not None and plan is None and torch.compiler.is_compiling():
        grad = torch.is_grad_enabled()
        loss, _, _, _ = op(h, weight, targets, ignore_index, compute_dtype, grad and h.requires_grad,
                           grad and weight.requires_grad)
        return loss
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(h, weight, targets, ignore_index, row_kernel, compute_dtype, plan)
    with torch.autocast(h.device.type, enabled=False):
        loss, _, _, _ = chunked_forward(h, weight, targets, ignore_index, row_kernel, compute_dtype=compute_dtype,
                                        need_dh=False, need_dweight=False, plan=plan)
    return loss

