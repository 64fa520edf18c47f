"""Model-level parity: one state dict under each backend gives the reference's logits, loss, every
parameter gradient, a 5-step AdamW loss trajectory, and greedy samples.

Runs for every backend that can run here (``triton`` under the CPU interpreter, ``ext`` when the
extension is built); each backend that cannot run is skipped with its reason.
"""

import copy

import pytest
import torch

from gpt2.model import GPT, GPTConfig
from gpt2_kernels.registry import unavailable_reason


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", block_size=32), backend="torch").to(_device())
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 512, (2, 19), generator=g).to(_device())
    tgt = torch.randint(0, 512, (2, 19), generator=g).to(_device())
    tgt[1, :5] = -1
    return m, idx, tgt


def _run(model, idx, tgt):
    model.zero_grad(set_to_none=True)
    logits, _ = model(idx)
    _, loss = model(idx, tgt)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _trajectory(model, idx, tgt, steps=5):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, tgt)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", ["triton", "ext", "native"])
def test_backend_matches_torch(base, backend):
    why = unavailable_reason(backend, _device())
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {why}")
    ref_model, idx, tgt = base
    model = copy.deepcopy(ref_model).set_backend(backend)
    assert set(model.ops.backends.values()) == {backend}
    l_ref, loss_ref, g_ref = _run(ref_model, idx, tgt)
    l, loss, g = _run(model, idx, tgt)
    torch.testing.assert_close(l, l_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    greedy_ref = ref_model.generate(idx[:, :3], 12, greedy=True)
    assert torch.equal(model.generate(idx[:, :3], 12, greedy=True), greedy_ref)
    a, b = copy.deepcopy(ref_model), copy.deepcopy(ref_model).set_backend(backend)
    traj_ref, traj = _trajectory(a, idx, tgt), _trajectory(b, idx, tgt)
    assert traj_ref[-1] < traj_ref[0]  # the run actually trains
    torch.testing.assert_close(torch.tensor(traj), torch.tensor(traj_ref), atol=1e-4, rtol=1e-4)
