"""The reference ops (kernels/ref.py) against PyTorch's built-ins, forward and every gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2_kernels import ref


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 97)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_builtin(shape, affine):
    torch.manual_seed(0)
    x = _leaf(*shape)
    w = _leaf(shape[-1]) if affine else None
    b = _leaf(shape[-1]) if affine else None
    y = ref.layer_norm(x, w, b, 1e-5)
    y_pt = F.layer_norm(x, (shape[-1],), w, b, 1e-5)
    torch.testing.assert_close(y, y_pt, atol=1e-6, rtol=1e-6)
    ins = [x] + ([w, b] if affine else [])
    for g, g_pt in zip(_grads(y, ins), _grads(y_pt, ins)):
        torch.testing.assert_close(g, g_pt, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tq,tk", [(1, 1), (13, 13), (1, 9), (5, 12)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa(tq, tk, causal):
    torch.manual_seed(0)
    q, k, v = _leaf(2, 3, tq, 8), _leaf(2, 3, tk, 8), _leaf(2, 3, tk, 8)
    y = ref.attention(q, k, v, causal=causal)
    # SDPA's is_causal aligns the mask to the top-left; the reference's queries are the last tq
    # positions (bottom-right), so give SDPA that mask explicitly.
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq) if causal else None
    y_pt = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(y, y_pt, atol=1e-6, rtol=1e-6)
    for g, g_pt in zip(_grads(y, [q, k, v]), _grads(y_pt, [q, k, v])):
        torch.testing.assert_close(g, g_pt, atol=1e-6, rtol=1e-6)


def test_attention_dropout_mask_replay_and_scaling():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(1, 2, 6, 6) > 0.3
    y = ref.attention(q, k, v, causal=True, dropout_p=0.3, dropout_mask=keep)
    att = torch.softmax((q @ k.transpose(-2, -1) / 2.0).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(),
                                                                    float("-inf")), -1)
    torch.testing.assert_close(y, (att * keep / 0.7) @ v)
    # random dropout keeps about 1-p of the weights and is unbiased in expectation
    torch.manual_seed(1)
    ones = torch.ones(1, 1, 64, 8, dtype=torch.float64)
    y = ref.attention(ones, ones, torch.ones(1, 1, 64, 8, dtype=torch.float64), causal=False, dropout_p=0.5)
    assert abs(y.mean().item() - 1.0) < 0.1


def test_gelu_matches_builtin_and_grad():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64).requires_grad_()
    y = ref.gelu_tanh(x)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ref.gelu_tanh_grad(x.detach()).double(), g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_matches_builtins(bias):
    torch.manual_seed(0)
    C, H = 12, 48
    x = _leaf(2, 5, C)
    w_fc, w_proj = _leaf(H, C), _leaf(C, H)
    b_fc, b_proj = (_leaf(H), _leaf(C)) if bias else (None, None)
    y = ref.mlp(x, w_fc, b_fc, w_proj, b_proj)
    y_pt = F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)
    torch.testing.assert_close(y, y_pt)
    ins = [t for t in (x, w_fc, b_fc, w_proj, b_proj) if t is not None]
    for g, g_pt in zip(_grads(y, ins), _grads(y_pt, ins)):
        torch.testing.assert_close(g, g_pt)


@pytest.mark.parametrize("ignore_index", [-1, -100, 3])
def test_linear_cross_entropy_matches_builtin(ignore_index):
    torch.manual_seed(0)
    h, w = _leaf(2, 7, 16), _leaf(11, 16)
    t = torch.randint(0, 11, (2, 7))
    t[0, :3] = ignore_index
    loss = ref.linear_cross_entropy(h, w, t, ignore_index)
    loss_pt = F.cross_entropy(F.linear(h, w).view(-1, 11), t.view(-1), ignore_index=ignore_index)
    assert loss.dtype == torch.float64  # fp32 or wider: fp64 inputs stay fp64
    torch.testing.assert_close(loss.double(), loss_pt, atol=1e-6, rtol=1e-6)
    for g, g_pt in zip(torch.autograd.grad(loss, [h, w]), torch.autograd.grad(loss_pt, [h, w])):
        torch.testing.assert_close(g, g_pt, atol=1e-6, rtol=1e-6)


def test_linear_cross_entropy_all_ignored_is_zero():
    h, w = _leaf(3, 4), _leaf(5, 4)
    loss = ref.linear_cross_entropy(h, w, torch.full((3,), -1), -1)
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_low_precision_outputs_keep_dtype_and_fp32_statistics():
    x = (torch.randn(4, 64) * 100 + 1000).half()  # a large mean: fp16 statistics would lose it
    y = ref.layer_norm(x, None, None)
    assert y.dtype == torch.float16
    y32 = F.layer_norm(x.float(), (64,))
    assert (y.float() - y32).abs().max() < 5e-3
    q = torch.randn(1, 1, 4, 8).half()
    assert ref.attention(q, q, q).dtype == torch.float16
    assert math.isfinite(ref.linear_cross_entropy(x, torch.randn(3, 64).half(), torch.tensor([0, 1, 2, 1])).item())
