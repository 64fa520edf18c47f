"""The fused pieces alone, forward + backward: bias + tanh-GELU, and softmax cross-entropy on logits.

The op benchmarks time whole ops (the MLP with its two matmuls, the loss head with its three),
where the matmuls set the pace on every backend. These two rows isolate what a backend fuses:

- ``bias_gelu``: gelu_tanh(h + b) and its gradients dh, db for h of (B*T, 4C). The reference is
  ``gpt2_kernels.ref.gelu_tanh`` under autograd (about ten elementwise passes, each over the whole
  tensor); the extension's ``bias_gelu_fwd`` / ``bias_gelu_bwd`` read h once per direction.
  Fewest bytes: read h, write act; read dact and h, write dh: 5 B*T*4C elements.
- ``cross_entropy``: the mean loss over (B*T, V) logits and its gradient. The reference is
  ``gpt2_kernels.ref.cross_entropy`` under autograd (log-sum-exp, gather, then a softmax pass for the
  gradient); the extension's ``cross_entropy_fwd_bwd_`` reads each row once and overwrites it with
  its gradient. Fewest bytes: read and write the logits once: 2 B*T*V elements. Being in place,
  the extension's row works on its own buffer, which after the first call holds the previous
  gradient instead of logits: the same work, and every value stays finite.

The ``native`` rows are PyTorch's fused built-ins for the same pieces: ``F.gelu(h + b, approximate="tanh")`` under
autograd, and the ``native`` backend's row kernel (``log_softmax`` and ``nll_loss``, the gradient from the
log-probabilities, written over the logits as the extension's is).

Shapes: the ``mlp`` and ``linear_cross_entropy`` shapes of the grid (bench/shapes.py). Only the
``torch`` reference, the ``ext`` extension and ``native`` run here: the Triton backend fuses these pieces into
its matmul kernels, so it has no separate piece to time. Memory-bound: read GB/s against the copy
ceiling.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench import cases
from bench.common import DTYPE_ALIASES, DTYPES, bench_device, device_name, record_rates, synchronize
from bench.shapes import GRIDS, grid_name

IMPLS = ("torch", "ext", "native")
PIECES = {"bias_gelu": "mlp", "cross_entropy": "linear_cross_entropy"}  # piece -> op whose shapes it takes


def _cases(config) -> list:
    device = bench_device()
    grid = grid_name(device.type, config.getoption("--full"))
    backends = cases.parse_list(config.getoption("--bench-backends"))
    modes = cases.parse_list(config.getoption("--bench-modes"))
    dtypes = [DTYPE_ALIASES.get(d, d) for d in cases.parse_list(config.getoption("--bench-dtypes")) or []]
    dtypes = dtypes or cases.default_dtypes(device.type, False)
    out = []
    for piece, op in PIECES.items():
        for shape in GRIDS[grid][op]:
            for dtype in dtypes:
                for impl in IMPLS:
                    skip = None
                    if backends and impl not in backends:
                        skip = f"--bench-backends {','.join(backends)} leaves out {impl}"
                    elif modes and "fwd+bwd" not in modes:
                        skip = "the fused pieces are timed forward + backward only"
                    elif dtype not in DTYPES:
                        skip = f"unknown dtype {dtype!r}; dtypes are {', '.join(DTYPES)}"
                    marks = [pytest.mark.skip(reason=skip)] if skip else []
                    out.append(pytest.param((piece, shape, dtype, impl), marks=marks,
                                            id=f"{piece}-{impl}-{dtype}-{shape.name}"))
    return out


def pytest_generate_tests(metafunc):
    if "piece_case" in metafunc.fixturenames:
        metafunc.parametrize("piece_case", _cases(metafunc.config))


def _extension(device: torch.device):
    from gpt2_kernels import ext

    why = ext.unavailable_reason()
    if why is None and device.type == "cuda" and not ext.has_cuda_kernels():
        why = "the extension was built without its CUDA kernels"
    if why is not None:
        pytest.skip(f"ext backend unavailable: {why}")
    return torch.ops.gpt2k


def _bias_gelu(shape, dtype, device, impl, gen):
    from gpt2_kernels import ref

    n, hidden = shape.tokens, 4 * shape.C
    h = torch.randn(n, hidden, device=device, generator=gen).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype).requires_grad_()
    dact = torch.randn(n, hidden, device=device, generator=gen).to(dtype)
    if impl == "torch":
        def call():
            return torch.autograd.grad(ref.gelu_tanh(h + b), (h, b), dact)
    elif impl == "native":
        def call():
            return torch.autograd.grad(torch.nn.functional.gelu(h + b, approximate="tanh"), (h, b), dact)
    else:
        ops = _extension(device)

        def call():
            return torch.autograd.grad(ops.bias_gelu_fwd(h, b), (h, b), dact)
    nbytes = 5 * n * hidden * h.element_size()
    return call, nbytes


def _cross_entropy(shape, dtype, device, impl, gen):
    from gpt2_kernels import ref

    n, vocab = shape.tokens, shape.vocab_size
    logits = (2.0 * torch.randn(n, vocab, device=device, generator=gen)).to(dtype)
    t = torch.randint(0, vocab, (n,), device=device, generator=gen)
    t[::17] = -1  # ignored, as padding would be
    if impl == "torch":
        logits.requires_grad_()

        def call():
            return torch.autograd.grad(ref.cross_entropy(logits, t, -1), logits)
    else:
        from gpt2_kernels import native

        rows = native._cross_entropy_rows_ if impl == "native" else _extension(device).cross_entropy_fwd_bwd_
        inv = (1.0 / (t != -1).sum().clamp(min=1).float()).reshape(1)

        def call():
            if impl == "native":
                return rows(logits, t, vocab, -1, inv).sum() * inv[0]
            return rows(logits, t, inv, -1).sum() * inv[0]
    nbytes = 2 * n * vocab * logits.element_size()
    return call, nbytes


def test_fused_piece(benchmark, piece_case, device, ceilings, settings):
    piece, shape, dtype_name, impl = piece_case
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    make = _bias_gelu if piece == "bias_gelu" else _cross_entropy
    call, nbytes = make(shape, dtype, device, impl, gen)

    def target():
        call()
        synchronize(device)  # inside the timed call

    target()  # warm-up
    t0 = time.perf_counter()
    target()
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.max_time / once)))
    benchmark.group = f"{piece} fwd+bwd {dtype_name} {shape.name}"
    copy, mm = ceilings.copy(), ceilings.matmul(dtype)
    benchmark.extra_info.update(
        op=piece, impl=impl, mode="fwd+bwd", dtype=dtype_name, shape=shape.name, model=shape.model.name,
        B=shape.B, T=shape.T, C=shape.C, device=device_name(device), baseline="torch", flops=0.0, bytes=nbytes,
        ceiling_gbps=copy["gbps"], ceiling_gbps_how=copy["how"], ceiling_tflops=mm["tflops"],
        ceiling_tflops_how=mm["how"])
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, iterations=1)
    record_rates(benchmark, 0.0, nbytes, mm["tflops"], copy["gbps"])
