"""Host time of each Triton op's Python path per call, with the Triton launch itself replaced by a no-op.

What is timed is everything the host does between the model calling the registry's op and Triton's launcher: the
public function, the checks, the autograd Function (forward, and for ``fwd+bwd`` the engine and the backward),
allocations, dtype casts, tile choice and ``gpt2_kernels.runtime.launch`` (device guard, recorder test). Only
``kernel[grid](...)`` is stubbed out, here and only here (``no_launch``), so a row is the host cost that a launch
adds to, whatever the device: on a GPU a step is host-bound when this exceeds the kernel's device time.

Small GPT-2-like shapes (``SHAPE``), one torch thread, fp32 on the CPU (the interpreter's checks run, no kernel),
the dtype the kernels default to on a GPU. ``python -m bench.bench_host`` prints the table; under pytest each row is
a pytest-benchmark benchmark (``pytest bench/bench_host.py --benchmark-only``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():  # the ops' checks want the interpreter on a CPU; no kernel runs anyway
    os.environ.setdefault("TRITON_INTERPRET", "1")

OPS = ("layer_norm", "add_layer_norm", "attention", "mlp", "linear_cross_entropy")
# What torch alone costs: an autograd Function that only allocates its output and its input gradients, called with
# layer_norm's arguments. No op can be cheaper than this row on the same machine.
FLOOR = "floor"
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """A small GPT-2-like block: batch, positions, width, heads; the loss head's vocabulary."""

    B: int = 2
    T: int = 32
    C: int = 256
    n_head: int = 4
    V: int = 512


SHAPE = Shape()


@contextlib.contextmanager
def no_launch():
    """Every ``kernel[grid](...)`` is a no-op inside the block (the bench only; the library never does this).

    On a GPU the tile tuner would time no-op launches: its choices go to a throwaway cache folder and are forgotten
    afterwards, so neither this process nor the user's ``tiles.json`` keeps them.
    """
    import tempfile

    from triton.runtime.jit import KernelInterface

    from gpt2_kernels import runtime

    original, saved_dir = KernelInterface.__getitem__, os.environ.get("GPT2_KERNELS_CACHE_DIR")
    chosen = dict(runtime._CHOSEN)
    KernelInterface.__getitem__ = lambda self, grid: _noop
    with tempfile.TemporaryDirectory(prefix="bench-host-") as scratch:
        os.environ["GPT2_KERNELS_CACHE_DIR"] = scratch
        try:
            yield
        finally:
            KernelInterface.__getitem__ = original
            if saved_dir is None:
                os.environ.pop("GPT2_KERNELS_CACHE_DIR", None)
            else:
                os.environ["GPT2_KERNELS_CACHE_DIR"] = saved_dir
            runtime._CHOSEN.clear()
            runtime._CHOSEN.update(chosen)


def _noop(*args, **kwargs):
    return None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(device: torch.device) -> torch.dtype:
    from gpt2_kernels.runtime import default_dtype

    return default_dtype(device)


def make_call(op: str, mode: str, shape: Shape = SHAPE, device: torch.device | None = None):
    """A no-argument function running ``op`` once in ``mode`` through the registry's ``triton`` backend."""
    from gpt2_kernels.registry import build_ops

    device = device or _device()
    dt = _dtype(device)
    fn = _Floor.apply if op == FLOOR else getattr(build_ops("triton", device), op)
    B, T, C, nh = shape.B, shape.T, shape.C, shape.n_head
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*size, dtype=dt, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    if op in ("layer_norm", "add_layer_norm", FLOOR):
        x, w, b = leaf(B, T, C), leaf(C, dtype=torch.float32), leaf(C, dtype=torch.float32)  # fp32 parameters
        args = (x, leaf(B, T, C), w, b, 1e-5) if op == "add_layer_norm" else (x, w, b, 1e-5)
    elif op == "attention":
        # the model's layout: (B, T, nh, hs) views transposed to (B, nh, T, hs)
        q, k, v = (leaf(B, T, nh, C // nh).transpose(1, 2).detach().requires_grad_() for _ in range(3))
        args = (q, k, v, True, 0.0)
    elif op == "mlp":
        args = (leaf(B, T, C), leaf(4 * C, C, scale=0.02), leaf(4 * C), leaf(C, 4 * C, scale=0.02), leaf(C))
    elif op == "linear_cross_entropy":
        targets = torch.randint(0, shape.V, (B * T,), generator=gen).to(device)
        args = (leaf(B * T, C), leaf(shape.V, C, scale=0.02), targets, -1)
    else:
        raise ValueError(f"bench_host: unknown op {op!r}; known: {', '.join(OPS)}")
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if mode == "fwd":
        return lambda: fn(*args)
    if mode != "fwd+bwd":
        raise ValueError(f"bench_host: unknown mode {mode!r}; known: {', '.join(MODES)}")

    def fwd_bwd():
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.ones_like(o) for o in outs]  # what the next op hands back (allocated per call)
        return torch.autograd.grad(outs, inputs, grads)

    return fwd_bwd


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight), None


def time_call(call, reps: int = 200, rounds: int = 7, clock=time.process_time) -> float:
    """Median over ``rounds`` of the mean microseconds of one ``call()`` over ``reps`` calls, after a warm-up.

    The clock is this process's CPU time by default: on a shared machine, wall time also counts the time other
    processes held the core, which is not the host cost of the call (on an idle one the two agree).
    """
    for _ in range(max(10, reps // 10)):
        call()
    means = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(reps):
            call()
        means.append((clock() - t0) / reps * 1e6)
    return statistics.median(means)


@contextlib.contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def measure_all(ops=(FLOOR, *OPS), modes=MODES, reps: int = 200) -> dict:
    """{(op, mode): microseconds per call} with the launch stubbed out, one thread."""
    out = {}
    with one_thread(), no_launch():
        for op in ops:
            for mode in modes:
                out[(op, mode)] = time_call(make_call(op, mode), reps=reps)
    return out


def format_table(results: dict) -> str:
    ops = list(dict.fromkeys(op for op, _ in results))
    lines = [f"{'op':<22} {'fwd us':>8} {'fwd+bwd us':>11}"]
    for op in ops:
        fwd, both = results.get((op, "fwd")), results.get((op, "fwd+bwd"))
        lines.append(f"{op:<22} {fwd if fwd is None else f'{fwd:.1f}':>8} {both if both is None else f'{both:.1f}':>11}")
    return "\n".join(lines)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", (FLOOR, *OPS))
def test_host(benchmark, op, mode):
    with one_thread(), no_launch():
        call = make_call(op, mode)
        call()  # warm (first-call caches)
        benchmark.extra_info.update({"op": op, "mode": mode, "shape": str(SHAPE), "threads": 1,
                                     "what": "host time per call, Triton launch stubbed out"})
        benchmark(call)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.bench_host", description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join((FLOOR, *OPS)), help=f"comma-separated ops ({FLOOR}: torch alone)")
    p.add_argument("--reps", type=int, default=200, help="calls per timed round")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    results = measure_all(ops, reps=args.reps)
    device = _device()
    print(f"host us per call, Triton launch stubbed out; {SHAPE}, {_dtype(device)}, one thread, {device}")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
