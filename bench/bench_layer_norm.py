"""LayerNorm over C: our backends against the reference, torch.compile, F.layer_norm and Liger-Kernel.

x is (B, T, C) from the GPT-2 table in bench/shapes.py, with a weight and bias of (C,). A
memory-bound op: read its GB/s against the measured copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.common import (
    InputSet,
    OpCase,
    Unavailable,
    compiled_reference,
    is_peer,
    registry_impl,
    run_op_benchmark,
)

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


def _liger(device: torch.device):
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError as e:
        raise Unavailable(f"Liger-Kernel is not importable here ({e})") from None
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel's Triton kernels need a CUDA GPU")

    def layer_norm(x, weight, bias, eps=1e-5):
        return LigerLayerNormFunction.apply(x, weight, bias, eps)

    return layer_norm


def load(case: OpCase, device: torch.device):
    if case.impl == "torch-compile":
        return compiled_reference(OP, (case.shape, case.dtype))
    if case.impl == "F.layer_norm":
        return _torch_functional
    if case.impl == "liger":
        return _liger(device)
    return registry_impl(OP, case.impl, device)


def test_layer_norm(benchmark, op_case, device, ceilings, settings):
    try:
        fn = load(op_case, device)
    except Unavailable as e:
        pytest.skip(str(e))
    run_op_benchmark(benchmark, op_case, make_inputs, fn, ceilings, settings, device, peer=is_peer(op_case.impl))
