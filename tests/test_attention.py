"""Tests of the attention op: one parity check for every backend, then the Triton kernels (``kernels/attention.py``):
tile tables, strides, dropout replay, cached decoding, input checks.

Every forward output and every gradient (dq, dk, dv) is compared with ``gpt2_kernels.ref.attention`` through the one
tolerance table, ``gpt2_kernels.testing.assert_close``. ``test_matches_reference`` runs for every backend the registry can
run here (tests/conftest.py's ``backend``). Without a GPU the Triton kernels run under the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), which covers fp32 and fp16; bf16 and the long-sequence cases run only
on a CUDA GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpt2_kernels import attention as attn
from gpt2_kernels import ref
from gpt2_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and long sequences need a CUDA GPU")

pytestmark = pytest.mark.usefixtures("highest_fp32_matmul")  # on a GPU the fp32 reference must not run in TF32


def _qkv(B, nh, Tq, Tk, hs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, Tq, hs, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, nh, Tk, hs, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, nh, Tk, hs, generator=g).to(DEVICE, dtype)
    return q, k, v


def _ref_with_grads(q, k, v, do, causal, dropout_p=0.0, mask=None):
    """Reference output and (dq, dk, dv) on fresh leaves made from ``q, k, v`` (their dtype is kept)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    y = ref.attention(*leaves, causal=causal, dropout_p=dropout_p, dropout_mask=mask)
    y.backward(do.to(y.dtype))
    return (y.detach(), *(t.grad for t in leaves))


def _check_against_ref(name, got, q, k, v, do, causal, dropout_p=0.0, mask=None):
    """``got`` = (o, dq, dk, dv) from the kernels; compare each with the reference as the tolerance table asks."""
    want32 = _ref_with_grads(q.float(), k.float(), v.float(), do.float(), causal, dropout_p, mask)
    want_lowp = _ref_with_grads(q, k, v, do, causal, dropout_p, mask) if q.dtype != torch.float32 else (None,) * 4
    for label, y, r32, rlow in zip(("out", "dq", "dk", "dv"), got, want32, want_lowp):
        assert y.dtype == q.dtype, f"{name} {label}: dtype {y.dtype}, expected {q.dtype}"
        assert_close(f"attention {name} {label}", y, r32, rlow)


def _run_autograd(q, k, v, do, causal, dropout_p=0.0, fn=attn.attention):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    y = fn(*leaves, causal=causal, dropout_p=dropout_p)
    y.backward(do)
    return (y.detach(), *(t.grad for t in leaves))


# (B, nh, Tq, Tk, hs, causal): T = 1, primes, ragged block ends, every head size, cached decoding (Tq < Tk),
# non-causal. fp32 runs all of them; fp16 all but the two largest, to keep the CPU suite short.
SHAPES = [
    (1, 1, 1, 1, 32, True),
    (2, 3, 97, 97, 64, True),
    (1, 2, 130, 130, 32, True),
    (1, 1, 61, 61, 128, True),
    (1, 2, 1, 37, 64, True),
    (2, 1, 5, 70, 32, True),
    (1, 2, 53, 53, 64, False),
    (1, 1, 29, 83, 32, False),
]
CASES = [(s, torch.float32) for s in SHAPES] + [(s, torch.float16) for s in SHAPES if s[0] * s[1] * s[2] * s[3] < 20000]


def _case_id(case):
    (B, nh, Tq, Tk, hs, causal), dtype = case
    return f"B{B}nh{nh}Tq{Tq}Tk{Tk}hs{hs}{'c' if causal else 'nc'}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(backend, backend_op, case, one_thread):
    """The op's one parity check, for every backend that runs here: the output and dq, dk, dv in fp32 and fp16."""
    (B, nh, Tq, Tk, hs, causal), dtype = case
    q, k, v = _qkv(B, nh, Tq, Tk, hs, dtype)
    do = torch.randn(B, nh, Tq, hs, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = _run_autograd(q, k, v, do, causal, fn=backend_op("attention"))
    _check_against_ref(f"{backend} {_case_id(case)}", got, q, k, v, do, causal)


@pytest.mark.parametrize("cc", [90, 75])
def test_gpu_tile_tables_under_interpreter(cc):
    # The interpreter normally runs small tiles; the same launchers with an architecture's (bigger, unequal) tiles
    # must give the same answer, including a Tq that ends mid-block and Tq < Tk.
    B, nh, Tq, Tk, hs = 1, 1, 150, 201, 64
    for dtype in (torch.float32, torch.float16):
        q, k, v = _qkv(B, nh, Tq, Tk, hs, dtype, seed=3)
        do = torch.randn_like(q)
        o, lse = attn.attention_fwd(q, k, v, True, cc=cc)
        dq, dk, dv = attn.attention_bwd(do, q, k, v, o, lse, True, cc=cc)
        _check_against_ref(f"cc{cc} {dtype}", (o, dq, dk, dv), q, k, v, do, True)


def test_lse_is_the_row_logsumexp():
    B, nh, Tq, Tk, hs = 2, 2, 19, 45, 32
    q, k, v = _qkv(B, nh, Tq, Tk, hs, torch.float32)
    for causal in (True, False):
        _, lse = attn.attention_fwd(q, k, v, causal)
        s = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, Tq, Tk)
        if causal:
            pos = torch.arange(Tk, device=s.device)
            s = s.masked_fill(pos > pos[Tk - Tq:, None], float("-inf"))
        assert_close(f"attention lse causal={causal}", lse, torch.logsumexp(s, dim=-1))


def test_strided_inputs_are_read_in_place_and_match():
    # The model's layout: q, k, v are (B, nh, T, hs) views of one (B, T, 3, nh, hs) projection, and cached decoding
    # reads the first Tk positions of a preallocated (B, nh, Tmax, hs) KV buffer.
    B, nh, T, hs, Tmax, Tk = 2, 2, 23, 32, 64, 41
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, 3, nh, hs, generator=g).to(DEVICE).requires_grad_(True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, nh, T, hs), position stride 3 nh hs
    assert not q.is_contiguous() and attn._aligned(q) is q, "the model's q/k/v views should be read by strides"
    do = torch.randn(B, nh, T, hs, generator=g).to(DEVICE)
    y = attn.attention(q, k, v, causal=True)
    y.backward(do)
    ref_leaf = qkv.detach().clone().requires_grad_(True)
    rq, rk, rv = (ref_leaf[:, :, i].transpose(1, 2) for i in range(3))
    ref.attention(rq, rk, rv, causal=True).backward(do)
    assert_close("attention strided out", y, ref.attention(rq, rk, rv, causal=True))
    assert_close("attention strided d(qkv)", qkv.grad, ref_leaf.grad)

    cache_k = torch.randn(B, nh, Tmax, hs, generator=g).to(DEVICE)
    cache_v = torch.randn(B, nh, Tmax, hs, generator=g).to(DEVICE)
    k, v = cache_k[:, :, :Tk], cache_v[:, :, :Tk]  # (B, nh, Tk, hs) slices, head stride Tmax hs
    q = torch.randn(B, nh, 3, hs, generator=g).to(DEVICE)
    assert attn._aligned(k) is k
    o, _ = attn.attention_fwd(q, k, v, True)
    assert_close("attention kv-cache slice out", o, ref.attention(q, k, v, causal=True))


def test_odd_strides_are_copied_and_match():
    # A feature stride of 2 and a misaligned start cannot be read in place: the launcher copies them, same answer.
    B, nh, T, hs = 1, 2, 17, 32
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, nh, T, 2 * hs, generator=g).to(DEVICE)[..., ::2]  # feature stride 2
    flat = torch.randn(B * nh * T * hs + 1, generator=g).to(DEVICE)
    k = flat[1:].view(B, nh, T, hs)  # starts 4 bytes past an aligned address
    v = torch.randn(B, nh, T, hs, generator=g).to(DEVICE)
    assert attn._aligned(q) is not q and attn._aligned(k) is not k
    do = torch.randn(B, nh, T, hs, generator=g).to(DEVICE)
    _check_against_ref("odd strides", _run_autograd(q, k, v, do, True), q, k, v, do, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_dropout_replays_through_the_reference(dtype, causal):
    B, nh, Tq, Tk, hs, p, seed = 2, 2, 37, 53, 32, 0.3, 1234
    q, k, v = _qkv(B, nh, Tq, Tk, hs, dtype, seed=7)
    do = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    y = attn.AttentionFunction.apply(*leaves, causal, p, seed)
    y.backward(do)
    got = (y.detach(), *(t.grad for t in leaves))
    mask = attn.dropout_keep_mask(seed, B, nh, Tq, Tk, p, DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (B, nh, Tq, Tk)
    _check_against_ref(f"dropout {dtype}", got, q, k, v, do, causal, p, mask)
    # A different seed is a different mask, so the replay above is not trivially satisfied.
    other = attn.dropout_keep_mask(seed + 1, B, nh, Tq, Tk, p, DEVICE)
    assert (other != mask).any()


def test_dropout_seed_reproducibility_and_keep_fraction():
    B, nh, T, hs, p = 1, 2, 40, 32, 0.25
    q, k, v = _qkv(B, nh, T, T, hs, torch.float32, seed=8)
    torch.manual_seed(11)
    y1 = attn.attention(q, k, v, causal=True, dropout_p=p)
    torch.manual_seed(11)
    y2 = attn.attention(q, k, v, causal=True, dropout_p=p)
    torch.manual_seed(12)
    y3 = attn.attention(q, k, v, causal=True, dropout_p=p)
    assert torch.equal(y1, y2), "the same torch seed must give the same dropout"
    assert not torch.equal(y1, y3), "a different torch seed must give different dropout"
    assert not torch.allclose(y1, attn.attention(q, k, v, causal=True)), "dropout changed nothing"

    mask = attn.dropout_keep_mask(99, 2, 3, 64, 200, p, DEVICE)
    n = mask.numel()
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept fraction {kept:.4f}, expected {1 - p}"
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0]), \
        "every (batch, head) must draw its own mask"


def test_backward_is_deterministic():
    q, k, v = _qkv(1, 2, 45, 45, 64, torch.float32, seed=9)
    do = torch.randn_like(q)
    o, lse = attn.attention_fwd(q, k, v, True)
    first = attn.attention_bwd(do, q, k, v, o, lse, True)
    second = attn.attention_bwd(do, q, k, v, o, lse, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _bad(**over):
    # CPU tensors like the overrides (the argument checks come before the device check, on a GPU machine too)
    q, k, v = (t.cpu() for t in _qkv(1, 2, 4, 6, 32, torch.float32))
    args = {"q": q, "k": k, "v": v, "causal": True, "dropout_p": 0.0}
    args.update(over)
    return args


@pytest.mark.parametrize("args, error, words", [
    (lambda: _bad(q=torch.randn(1, 2, 4, 48), k=torch.randn(1, 2, 6, 48), v=torch.randn(1, 2, 6, 48)),
     ValueError, ["head size", "32, 64, 128"]),
    (lambda: _bad(k=torch.randn(1, 2, 6, 32, dtype=torch.float16)), TypeError, ["dtype"]),
    (lambda: _bad(q=torch.randn(1, 2, 4, 32).to(torch.int32)), TypeError, ["q", "float16, bfloat16, float32"]),
    (lambda: _bad(v=torch.randn(1, 2, 5, 32)), ValueError, ["k and v", "same shape"]),
    (lambda: _bad(k=torch.randn(1, 3, 6, 32), v=torch.randn(1, 3, 6, 32)), ValueError, ["k and v", "match q"]),
    (lambda: _bad(q=torch.randn(1, 2, 7, 32)), ValueError, ["Tq <= Tk"]),
    (lambda: _bad(q=torch.randn(2, 4, 32)), ValueError, ["q", "4-D"]),
    (lambda: _bad(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
    (lambda: _bad(causal="yes"), TypeError, ["causal"]),
    (lambda: _bad(k=torch.randn(1, 2, 6, 32, device="meta"), v=torch.randn(1, 2, 6, 32, device="meta")),
     ValueError, ["one device"]),
    (lambda: _bad(q=torch.randn(1, 2, 4, 32).tolist()), TypeError, ["q", "torch.Tensor"]),
])
def test_bad_inputs_raise_clear_errors(args, error, words):
    with pytest.raises(error) as info:
        attn.attention(**args())
    message = str(info.value)
    assert message.startswith("attention:"), message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 1, 4, 32) for _ in range(3))
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 or use a CUDA tensor"):
        attn.attention(q, k, v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's bf16 refusal on the CPU")
def test_bf16_on_the_interpreter_is_refused():
    q, k, v = (torch.randn(1, 1, 4, 32, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(TypeError, match="bfloat16"):
        attn.attention(q, k, v)


def test_launch_configs_cover_every_launch():
    # Whatever tiles the launchers pick on an architecture must be among the configs the AOT report compiles, and
    # each config must name the kernel's arguments exactly.
    for cc in (75, 80, 86, 89, 90):
        configs = attn.launch_configs(cc)
        labels = [c.label for c in configs]
        assert len(labels) == len(set(labels)), f"duplicate configs for sm_{cc}"
        for c in configs:
            args = attn._kernel_args(c.kernel)
            assert list(c.signature) == [name for name, const in args if not const], c.label
            assert set(c.constexprs) == {name for name, const in args if const}, c.label
        launched = {(c.kernel, c.signature["Q"], tuple(sorted(c.constexprs.items())), c.num_warps, c.num_stages)
                    for c in configs if "Q" in c.signature}
        combines = {(c.signature["O"], tuple(sorted(c.constexprs.items())), c.num_warps, c.num_stages)
                    for c in configs if c.kernel is attn._attn_fwd_combine_kernel}
        for dtype, dt in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
            if dtype == torch.bfloat16 and cc < 80:
                assert not any(c.signature.get("Q") == dt for c in configs), "bf16 is refused before sm_80"
                continue
            for hs in (32, 64, 128):
                for name, fn in (("fwd", attn._attn_fwd_kernel), ("dkdv", attn._attn_bwd_dkdv_kernel),
                                 ("dq", attn._attn_bwd_dq_kernel)):
                    for dropout in (False, True):
                        bm, bn, warps, stages = attn._tiles(name, dtype, hs, dropout, torch.device("cuda"), cc)
                        ce = tuple(sorted({"HEAD": hs, "BLOCK_M": bm, "BLOCK_N": bn, "DROPOUT": dropout}.items()))
                        assert (fn, dt, ce, warps, stages) in launched, (cc, name, dt, hs, dropout)
                # The decode forward, the split kernel and the combine kernel at the decode tiles.
                bm, bn, warps, stages = attn._tiles("decode", dtype, hs, False, torch.device("cuda"), cc)
                assert bm == attn._DECODE_BLOCK_M, (cc, dt, hs)
                ce = {"HEAD": hs, "BLOCK_M": bm, "BLOCK_N": bn}
                assert (attn._attn_fwd_kernel, dt, tuple(sorted({**ce, "DROPOUT": False}.items())), warps,
                        stages) in launched, (cc, "decode", dt, hs)
                assert (attn._attn_fwd_split_kernel, dt, tuple(sorted(ce.items())), warps, stages) in launched, \
                    (cc, "split", dt, hs)
                assert (dt, (("BLOCK_M", bm), ("HEAD", hs)), attn._COMBINE_WARPS, 1) in combines, (cc, dt, hs)


# ---------------------------------------------------------------------------------------------------------------------
# Cached decoding: Tq <= 16 queries run the decode tiles, split over keys (flash-decoding) when the plan says so.

# (Tq, Tk, hs, causal): one new token and a few; Tk from 1 to a few hundred, not a multiple of any block (the
# interpreter's decode tiles are 16 x 16); Tq = 16 fills the decode tile, Tq = 17 is past it (the training tiles).
DECODE_SHAPES = [
    (1, 1, 32, True),
    (1, 37, 64, True),
    (2, 50, 32, True),
    (5, 129, 32, True),
    (16, 16, 64, True),
    (16, 203, 32, True),
    (17, 90, 32, True),
    (1, 77, 128, False),
    (5, 61, 64, False),
]
DECODE_CASES = [(s, dt) for dt in (torch.float32, torch.float16) for s in DECODE_SHAPES]


def _decode_id(case):
    (Tq, Tk, hs, causal), dtype = case
    return f"Tq{Tq}Tk{Tk}hs{hs}{'c' if causal else 'nc'}-{str(dtype)[6:]}"


def _kv_cache_views(B, nh, Tq, Tk, hs, dtype, seed):
    """q as the model's (B, nh, Tq, hs) view of a (B, Tq, nh, hs) projection; k, v as the first Tk positions of a KV
    cache of larger capacity (B, nh, Tk + 24, hs)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, nh, hs, generator=g).to(DEVICE, dtype).transpose(1, 2)  # (B, nh, Tq, hs)
    cache_k, cache_v = (torch.randn(B, nh, Tk + 24, hs, generator=g).to(DEVICE, dtype) for _ in range(2))
    k, v = cache_k[:, :, :Tk], cache_v[:, :, :Tk]  # (B, nh, Tk, hs), head stride (Tk + 24) hs
    assert attn._aligned(q) is q and attn._aligned(k) is k, "decode inputs should be read in place"
    return q, k, v


def _lse_ref(q, k, causal):
    # The natural-log log-sum-exp of every row of scaled scores, in fp32.
    Tq, Tk, hs = q.shape[2], k.shape[2], q.shape[3]
    s = q.float() @ k.float().transpose(-2, -1) / math.sqrt(hs)  # (B, nh, Tq, Tk)
    if causal:
        s = s.masked_fill(torch.arange(Tk, device=s.device) > torch.arange(Tk - Tq, Tk, device=s.device)[:, None],
                          float("-inf"))
    return torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_decode_matches_reference(case):
    # Forward, lse and the backward from that lse, unsplit (what the plan picks without a GPU) and split in three.
    (Tq, Tk, hs, causal), dtype = case
    B, nh = 2, 2
    q, k, v = _kv_cache_views(B, nh, Tq, Tk, hs, dtype, seed=Tq * 1000 + Tk)
    do = torch.randn(B, nh, Tq, hs, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    o, lse = attn.attention_fwd(q, k, v, causal)
    assert_close(f"decode {_decode_id(case)} lse", lse, _lse_ref(q, k, causal))
    grads = attn.attention_bwd(do, q, k, v, o, lse, causal)
    _check_against_ref(_decode_id(case), (o, *grads), q, k, v, do, causal)
    if Tq > attn._DECODE_BLOCK_M:
        return
    o3, lse3 = attn.attention_fwd(q, k, v, causal, splits=3)
    assert_close(f"decode {_decode_id(case)} lse, 3 splits", lse3, _lse_ref(q, k, causal))
    want_lowp = ref.attention(q, k, v, causal=causal) if dtype != torch.float32 else None
    assert_close(f"decode {_decode_id(case)} out, 3 splits", o3, ref.attention(q.float(), k.float(), v.float(),
                                                                               causal=causal), want_lowp)
    if dtype == torch.float32:  # the backward from the split forward's lse (the kernels are the same in fp16)
        _check_against_ref(f"{_decode_id(case)} 3 splits", (o3, *attn.attention_bwd(do, q, k, v, o3, lse3, causal)),
                           q, k, v, do, causal)
        assert_close(f"decode {_decode_id(case)}: 3 splits vs 1", o3, o)
        assert_close(f"decode {_decode_id(case)}: 3 splits vs 1, lse", lse3, lse)


@pytest.mark.parametrize("splits", [2, 4, 7, 50])
def test_decode_splits_equal_one_split(splits):
    # Every split count, up to one split per key block (50 asks for more than the 13 blocks of Tk = 200), gives
    # the unsplit answer; with Tq = 16 causal, the last split holds keys that the first rows do not see.
    B, nh, Tq, Tk, hs = 1, 2, 16, 200, 32
    q, k, v = _kv_cache_views(B, nh, Tq, Tk, hs, torch.float32, seed=splits)
    for causal in (True, False):
        o1, lse1 = attn.attention_fwd(q, k, v, causal, splits=1)
        o, lse = attn.attention_fwd(q, k, v, causal, splits=splits)
        assert_close(f"decode {splits} splits causal={causal}", o, o1)
        assert_close(f"decode {splits} splits causal={causal} lse", lse, lse1)
        assert_close(f"decode {splits} splits causal={causal} vs ref", o, ref.attention(q, k, v, causal=causal))


def test_decode_plan():
    plan = attn._decode_plan
    # GPT-2 small, one sequence, 1024 cached keys, on a 132-SM H100: 12 programs. Inside a CUDA graph 4 splits of
    # 256 keys each; eagerly the combine launch's host time would outweigh what it saves: no split.
    assert plan(1, 12, 1, 1024, 132, graph=True) == (True, 4)
    assert plan(1, 12, 1, 1024, 132) == (True, 1)
    assert plan(1, 12, 1, 65536, 132) == (True, 4)  # eagerly, from 16384 keys per split
    assert plan(1, 12, 1, 16384, 132, graph=True) == (True, 11)  # 12 * 11 = 132 programs fill the SMs
    assert plan(8, 12, 1, 1024, 132, graph=True) == (True, 1)  # 96 programs already: a split would not fit
    assert plan(1, 12, 1, 511, 132, graph=True) == (True, 1)  # two splits would read fewer than 256 keys each
    assert plan(1, 12, 16, 1024, 132, graph=True) == (True, 4)
    assert plan(1, 12, 17, 1024, 132, graph=True) == (False, 1)  # past the 16-row decode tile: the training tiles
    assert plan(1, 12, 1, 1024, 132, dropout=True, graph=True) == (False, 1)  # dropout keeps the training path
    assert plan(1, 12, 1, 1024, None, graph=True) == (True, 1)  # the interpreter: no SM count, no split
    for B in (1, 2, 7, 64):
        for nh in (1, 12, 25):
            for Tk in (1, 255, 256, 1000, 5000, 70000):
                for sms in (1, 28, 108, 132):
                    for graph, min_keys in ((True, attn._SPLIT_MIN_KEYS), (False, attn._SPLIT_MIN_KEYS_EAGER)):
                        decode, S = plan(B, nh, 1, Tk, sms, graph=graph)
                        assert decode and S >= 1
                        assert S == 1 or (B * nh * S <= sms and Tk // S >= min_keys), (B, nh, Tk, sms, graph, S)
    for Tk in (1, 15, 16, 17, 200, 1024, 1025):
        for splits in (1, 2, 3, 4, 11, 100):
            for block_n in (16, 64, 128):
                chunk, S = attn._split_keys(Tk, splits, block_n)
                assert chunk % block_n == 0 and 1 <= S <= splits, (Tk, splits, block_n)
                assert (S - 1) * chunk < Tk <= S * chunk, "every split holds keys, and all keys are covered"


def test_decode_with_dropout_keeps_the_training_path():
    # Decoding runs without dropout; a small Tq with dropout runs the training tiles and replays through the
    # reference with the kernels' own mask. Splitting it is refused.
    B, nh, Tq, Tk, hs, p, seed = 1, 2, 3, 45, 32, 0.2, 21
    for dtype in (torch.float32, torch.float16):
        q, k, v = _kv_cache_views(B, nh, Tq, Tk, hs, dtype, seed=4)
        do = torch.randn(B, nh, Tq, hs, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
        o, lse = attn.attention_fwd(q, k, v, True, p, seed)
        grads = attn.attention_bwd(do, q, k, v, o, lse, True, p, seed)
        mask = attn.dropout_keep_mask(seed, B, nh, Tq, Tk, p, DEVICE)
        _check_against_ref(f"decode dropout {dtype}", (o, *grads), q, k, v, do, True, p, mask)
    with pytest.raises(ValueError, match="splits"):
        attn.attention_fwd(q, k, v, True, p, seed, splits=2)
    with pytest.raises(ValueError, match="splits"):
        attn.attention_fwd(*(torch.randn(1, 1, n, 32, device=DEVICE) for n in (17, 20, 20)), splits=2)


def test_decode_lengths_are_not_specialised():
    # A decoding run calls the kernels with a new Tk (and chunk) every step: none may become a constant or an
    # alignment assumption of the compiled kernel, or each length would compile its own kernel.
    from gpt2_kernels.runtime import record_launches

    with record_launches() as records:
        for Tk in (16, 37, 64):
            q, k, v = _kv_cache_views(1, 1, 1, Tk, 32, torch.float32, seed=Tk)
            attn.attention_fwd(q, k, v, True)
            attn.attention_fwd(q, k, v, True, splits=2)
    varying = {"_attn_fwd_kernel": ("Tq", "Tk", "shift"), "_attn_fwd_split_kernel": ("Tq", "Tk", "shift", "chunk"),
               "_attn_fwd_combine_kernel": ("Tq", "splits")}
    signatures = {}
    for r in records:
        signatures.setdefault(r.name, set()).add(r.signature)
    assert set(signatures) == set(varying)
    for name, seen in signatures.items():
        assert len(seen) == 1, f"{name} specialised differently for different lengths: {seen}"
        sig = dict(next(iter(seen)))
        for arg in varying[name]:
            assert sig.get(arg) == "i32:1", f"{name}: {arg} is {sig.get(arg)!r}, expected a plain i32"


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_on_gpu(dtype):
    # GPT-2 small's decode step (nh = 12, hs = 64) against 1024 cached keys: the planned splits and forced ones.
    B, nh, Tk, hs = 1, 12, 1024, 64
    for Tq in (1, 16):
        q, k, v = _kv_cache_views(B, nh, Tq, Tk, hs, dtype, seed=13)
        want32, want = ref.attention(q.float(), k.float(), v.float()), ref.attention(q, k, v)
        for splits in (None, 1, 4, 11):
            o, lse = attn.attention_fwd(q, k, v, True, splits=splits)
            assert_close(f"gpu decode Tq={Tq} splits={splits}", o, want32, want)
            assert_close(f"gpu decode Tq={Tq} splits={splits} lse", lse, _lse_ref(q, k, True))
    # Captured in a CUDA graph, the plan splits the keys (the combine launch then costs no host time).
    from gpt2_kernels.runtime import record_launches

    attn.attention_fwd(q, k, v, True, splits=4)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with record_launches() as records, torch.cuda.graph(graph):
        o, lse = attn.attention_fwd(q, k, v, True)
    graph.replay()
    torch.cuda.synchronize()
    assert [r.name for r in records] == ["_attn_fwd_split_kernel", "_attn_fwd_combine_kernel"]
    assert_close("gpu decode in a CUDA graph", o, want32, want)
    assert_close("gpu decode in a CUDA graph, lse", lse, _lse_ref(q, k, True))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hs", [64, 128])
def test_long_sequences_on_gpu(dtype, hs):
    B, nh, T = 2, 4, 1024
    q, k, v = _qkv(B, nh, T, T, hs, dtype, seed=10)
    do = torch.randn_like(q)
    for causal in (True, False):
        _check_against_ref(f"T={T} {dtype} causal={causal}", _run_autograd(q, k, v, do, causal), q, k, v, do, causal)
    # cached decoding: one new query against the 1024 cached keys
    q1 = q[:, :, -1:]
    _check_against_ref("decode", _run_autograd(q1, k, v, do[:, :, -1:], True), q1, k, v, do[:, :, -1:], True)


@needs_gpu
@pytest.mark.gpu
def test_dropout_replay_on_gpu():
    B, nh, T, hs, p, seed = 2, 4, 1024, 64, 0.1, 77
    q, k, v = _qkv(B, nh, T, T, hs, torch.bfloat16, seed=12)
    do = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    y = attn.AttentionFunction.apply(*leaves, True, p, seed)
    y.backward(do)
    mask = attn.dropout_keep_mask(seed, B, nh, T, T, p, DEVICE)
    _check_against_ref("gpu dropout", (y.detach(), *(t.grad for t in leaves)), q, k, v, do, True, p, mask)
