"""The loss head, cross-entropy of h @ wte.T: our backends against the reference, torch.compile and Liger.

h is (B, T, C) from the GPT-2 table in bench/shapes.py, the tied embedding wte is (V, C) with
V = 50257, targets are (B, T). The reference materialises the (B*T, V) logits; a fused backend
need not. Matmul-bound: read its TFLOP/s against the measured matmul rate.

Read the fwd+bwd rows. Our fused heads (both backends run kernels/chunked_loss.py) form their
gradients during the forward, chunk by chunk, so that no chunk's logits are made twice: three
matmuls in the fwd row, and in the bwd row only a scaling pass over dh and dweight (none at all in
fp32 on a CPU when the upstream gradient is 1.0); the reference does one matmul and two.
"""

from __future__ import annotations

import torch

from bench.common import InputSet, liger, time_case

OP = "linear_cross_entropy"


def make_inputs(shape, dtype, device, gen) -> InputSet:
    """h (B, T, C) and wte (V, C) with gradients, targets (B, T) with a few ignored positions."""
    V = shape.vocab_size
    h = torch.randn(shape.B, shape.T, shape.C, device=device, generator=gen).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(V, shape.C, device=device, generator=gen)).to(dtype).requires_grad_()
    t = torch.randint(0, V, (shape.B, shape.T), device=device, generator=gen)
    t[:, :: 17] = -1  # ignore_index, as padding would
    return InputSet((h, w, t), {"ignore_index": -1}, (h, w), None)


def _liger(case, device: torch.device):
    loss = liger("transformers", device).LigerFusedLinearCrossEntropyLoss(ignore_index=-1)

    def linear_cross_entropy(h, weight, targets, ignore_index=-1):
        return loss(weight, h.reshape(-1, h.shape[-1]), targets.reshape(-1))

    return linear_cross_entropy


PEERS = {"liger": _liger}


def test_linear_cross_entropy(benchmark, op_case, device, ceilings, settings):
    time_case(benchmark, op_case, make_inputs, device, ceilings, settings, peers=PEERS)
