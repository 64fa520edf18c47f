"""LayerNorm over C: our backends against the reference, torch.compile, F.layer_norm and Liger-Kernel.

x is (B, T, C) from the GPT-2 table in bench/shapes.py, with a weight and bias of (C,). A
memory-bound op: read its GB/s against the measured copy bandwidth.

The ``add_layer_norm`` rows time the registry's fused residual add + layer norm, forward + backward
only, at the same shapes: ``torch`` (the reference: the add, then the layer norm), its
``torch.compile``, and our backends.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

from bench import cases
from bench.common import (
    DTYPES,
    InputSet,
    Unavailable,
    bench_device,
    device_name,
    liger,
    load_impl,
    op_cost,
    record_rates,
    synchronize,
    time_case,
)
from bench.shapes import grid_name

OP = "layer_norm"


def make_inputs(shape, dtype, device, gen) -> InputSet:
    """x (B, T, C), weight and bias (C,), all with gradients, and an upstream gradient like x."""
    C = shape.C
    x = torch.randn(shape.B, shape.T, C, device=device, generator=gen).to(dtype).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(C, device=device, generator=gen)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(C, device=device, generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(shape.B, shape.T, C, device=device, generator=gen).to(dtype)
    return InputSet((x, w, b), {"eps": 1e-5}, (x, w, b), dy)


def _torch_functional(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _liger(case, device: torch.device):
    LigerLayerNormFunction = liger("ops.layer_norm", device).LigerLayerNormFunction

    def layer_norm(x, weight, bias, eps=1e-5):
        return LigerLayerNormFunction.apply(x, weight, bias, eps)

    return layer_norm


PEERS = {"F.layer_norm": lambda case, device: _torch_functional, "liger": _liger}


def test_layer_norm(benchmark, op_case, device, ceilings, settings):
    time_case(benchmark, op_case, make_inputs, device, ceilings, settings, peers=PEERS)


# --------------------------------------------------------------------------------------------
# add_layer_norm: (y, s) = (layer_norm(x + residual), x + residual), forward + backward
# --------------------------------------------------------------------------------------------

ADD_IMPLS = ("torch", "torch-compile", "triton", "ext")


def _add_cases(config) -> list:
    """The layer_norm cases of this run in fwd+bwd mode, for the implementations in ADD_IMPLS."""
    device_type = bench_device().type
    full = config.getoption("--full")

    def opt(name):
        return cases.parse_list(config.getoption(name))

    choices = cases.op_choices(OP, grid_name(device_type, full), device_type, full, opt("--bench-backends"),
                               opt("--bench-shapes"), opt("--bench-dtypes"), opt("--bench-modes"))
    picked = [dataclasses.replace(c.case, op="add_layer_norm") for c in choices  # bad names: the layer_norm rows say
              if c.case is not None and c.case.mode == "fwd+bwd" and c.case.impl in ADD_IMPLS]
    return [pytest.param(case, id=case.id) for case in picked]


def pytest_generate_tests(metafunc):
    if "add_case" in metafunc.fixturenames:
        metafunc.parametrize("add_case", _add_cases(metafunc.config))


def test_add_layer_norm(benchmark, add_case, device, ceilings, settings):
    try:
        fn = load_impl(add_case, device, PEERS)
    except Unavailable as e:
        pytest.skip(str(e))
    dtype = DTYPES[add_case.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    first = make_inputs(add_case.shape, dtype, device, gen)
    x, w, b = first.args
    res = torch.randn(x.shape, device=device, generator=gen).to(dtype).requires_grad_()
    ds = torch.randn(x.shape, device=device, generator=gen).to(dtype)

    def target():
        y, s = fn(x, res, w, b, 1e-5)
        torch.autograd.grad((y, s), (x, res, w, b), (first.grad_out, ds))
        synchronize(device)  # inside the timed call

    try:
        target()  # warm-up: compilation, allocator
    except (NotImplementedError, ValueError, TypeError) as e:
        pytest.skip(f"{add_case.impl} cannot run add_layer_norm {add_case.dtype} on {device.type}: {e}")
    t0 = time.perf_counter()
    target()
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.max_time / once)))
    cost = op_cost("add_layer_norm", add_case.shape, "fwd+bwd", dtype)
    flops, nbytes = cost.flops, cost.bytes
    copy, mm = ceilings.copy(), ceilings.matmul(dtype)
    benchmark.group = add_case.group
    shape = add_case.shape
    benchmark.extra_info.update(
        op=add_case.op, impl=add_case.impl, mode=add_case.mode, dtype=add_case.dtype, shape=shape.name,
        model=shape.model.name, B=shape.B, T=shape.T, C=shape.C, device=device_name(device), baseline="torch",
        flops=flops, bytes=nbytes, ceiling_gbps=copy["gbps"], ceiling_gbps_how=copy["how"],
        ceiling_tflops=mm["tflops"], ceiling_tflops_how=mm["how"])
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, iterations=1)
    record_rates(benchmark, flops, nbytes, mm["tflops"], copy["gbps"])
