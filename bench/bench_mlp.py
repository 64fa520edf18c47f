"""GPT-2's MLP, c_proj(gelu_tanh(c_fc(x))): our backends against the reference and torch.compile.

x is (B, T, C) from the GPT-2 table in bench/shapes.py; c_fc is (4C, C), c_proj (C, 4C), both
with biases. Matmul-bound: read its TFLOP/s against the measured matmul rate. Neither Liger-Kernel
nor flash-attn ships a tanh-GELU MLP with this math, so there is no outside peer here.
"""

from __future__ import annotations

import torch

from bench.common import InputSet, time_case

OP = "mlp"


def make_inputs(shape, dtype, device, gen) -> InputSet:
    """x (B, T, C) and the four parameters with gradients, and an upstream gradient like x."""
    C, H = shape.C, 4 * shape.C

    def param(*size, scale=0.02):
        return (scale * torch.randn(*size, device=device, generator=gen)).to(dtype).requires_grad_()

    x = torch.randn(shape.B, shape.T, C, device=device, generator=gen).to(dtype).requires_grad_()
    w_fc, b_fc, w_proj, b_proj = param(H, C), param(H), param(C, H), param(C)
    dy = torch.randn(shape.B, shape.T, C, device=device, generator=gen).to(dtype)
    return InputSet((x, w_fc, b_fc, w_proj, b_proj), {}, (x, w_fc, b_fc, w_proj, b_proj), dy)


PEERS: dict = {}


def test_mlp(benchmark, op_case, device, ceilings, settings):
    time_case(benchmark, op_case, make_inputs, device, ceilings, settings, peers=PEERS)
