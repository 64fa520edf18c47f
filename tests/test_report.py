"""Tests of the static GPU-readiness report (``kernels/report.py``).

Two parts:

1. The report itself, on toy kernels defined here (this test module is its own "op module": it has
   a ``launch_configs(cc)`` the report's worker processes import by name): a small fp16 matmul that
   fits, one whose pipeline buffers exceed the shared memory of some architectures, one whose fp32
   accumulator spills, and a bf16 config listed for sm_75, which the report must refuse.
2. The real thing: every kernel of every Triton op module, as a training step, a cached decode and the JIT's
   edge values launch it (recorded under the interpreter, with bf16 twins), compiles for sm_75..sm_90 with the tiles
   each architecture picks, fits the shared memory, does not spill, and the fp16/bf16 matmul kernels (attention,
   mlp) use tensor cores. Every listed configuration (each tile-list entry) is the report's own run.

Compiling needs no GPU, only Triton's NVIDIA backend tools (ptxas, cuobjdump); tests that compile
skip when those are absent.
"""

from __future__ import annotations

import json
import os

import pytest
import triton
import triton.language as tl

from gpt2_kernels import report
from gpt2_kernels.aot import LaunchConfig

MISSING = report.missing_tools()
needs_tools = pytest.mark.skipif(
    bool(MISSING), reason=f"Triton's NVIDIA backend tools are absent ({', '.join(MISSING)}): cannot compile for GPUs"
)

TOY_ARCHS = (75, 80, 86, 90)


@triton.jit
def _toy_matmul_kernel(
    a_ptr,  # (M, K) input, row-major
    b_ptr,  # (K, N) input, row-major
    c_ptr,  # (M, N) fp32 output, row-major
    M,
    N,
    K,
    stride_am,  # row stride of a, elements
    stride_bk,  # row stride of b, elements
    stride_cm,  # row stride of c, elements
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One (BLOCK_M, BLOCK_N) tile of c = a @ b, accumulated in fp32 over K.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ka = k0 + rk
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + ka[None, :], mask=(rm[:, None] < M) & (ka[None, :] < K), other=0.0
        )
        b = tl.load(
            b_ptr + ka[:, None] * stride_bk + rn[None, :], mask=(ka[:, None] < K) & (rn[None, :] < N), other=0.0
        )
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _toy(label, dtype, bm, bn, bk, num_warps, num_stages):
    sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("M", "N", "K", "stride_am", "stride_bk", "stride_cm")})
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    return LaunchConfig(label, _toy_matmul_kernel, sig, consts, num_warps=num_warps, num_stages=num_stages)


def launch_configs(cc: int) -> list:
    """The toy configurations (see the module docstring); the report imports this module by name."""
    if cc < 80:
        # Listing bf16 for sm_75 is a bug of the op module: the report must refuse it before compiling.
        return [_toy("toy bf16", "bf16", 64, 64, 32, 4, 2)]
    return [
        _toy("toy fits", "fp16", 64, 64, 32, 4, 2),
        # Pipeline buffers of (64x128 + 128x64) fp16 per stage: more than sm_86's 99 KB, less than sm_80's 163 KB.
        _toy("toy big smem", "fp16", 64, 64, 128, 4, 5),
        # A 256x128 fp32 accumulator over 128 threads is 256 registers each, over the 255 a thread has: it spills.
        _toy("toy spills", "fp16", 256, 128, 32, 4, 2),
    ]


@pytest.fixture(scope="module")
def toy():
    """{(label, arch): Result} of the toy module on TOY_ARCHS."""
    results = report.run_report([__name__], TOY_ARCHS, workers=1)  # a dozen compiles: one process to import
    return {(r.label, r.arch): r for r in results}


# ---------------------------------------------------------------------------------------------------
# 1. The report on toy kernels.


@needs_tools
@pytest.mark.parametrize("arch", (80, 86, 90))
def test_toy_that_fits_passes_and_uses_tensor_cores(toy, arch):
    r = toy[("toy fits", arch)]
    assert r.error is None, r.error
    assert r.ok, r.problems
    assert 0 < r.shared <= r.shared_limit
    assert 0 < r.registers <= 255
    assert r.spill_stores == r.spill_loads == 0
    assert r.dots == 1
    assert r.tensor_core_count > 0, f"fp16 tl.dot on sm_{arch} emitted no tensor-core instruction: {r.tensor_cores}"
    if arch == 90:
        assert r.tensor_cores.get("HGMMA", 0) > 0, r.tensor_cores  # Hopper's warpgroup MMA (wgmma)
    else:
        assert r.tensor_cores.get("HMMA", 0) > 0, r.tensor_cores


@needs_tools
def test_toy_oversized_shared_memory_is_flagged_per_arch(toy):
    fits80, over86 = toy[("toy big smem", 80)], toy[("toy big smem", 86)]
    assert fits80.error is None and over86.error is None, (fits80.error, over86.error)
    # The same kernel needs the same bytes on both; only sm_86's smaller limit is exceeded.
    assert fits80.shared == over86.shared
    assert report.SHARED_LIMIT[86] < over86.shared <= report.SHARED_LIMIT[80]
    assert fits80.ok, fits80.problems
    _assert_flagged(over86, "shared memory", "SMEM")


def _assert_flagged(r, problem: str, tag: str) -> None:
    """``r`` is not ok, a problem names ``problem`` and the table marks the row ``tag``."""
    assert not r.ok
    assert any(problem in p for p in r.problems), r.problems
    assert tag in report.format_table([r])


@needs_tools
def test_toy_spilling_config_is_flagged(toy):
    r = toy[("toy spills", 80)]
    assert r.error is None, r.error
    assert r.spill_stores > 0 and r.spill_loads > 0
    assert r.spill_source == "ptxas"
    _assert_flagged(r, "spills", "SPILL")


@needs_tools
def test_bf16_config_on_sm75_is_refused(toy):
    r = toy[("toy bf16", 75)]
    assert r.error is not None and "bf16" in r.error and "sm_75" in r.error, r.error
    assert not r.ok


@needs_tools
def test_missing_module_and_missing_launch_configs_are_errors(tmp_path):
    results = report.run_report(["gpt2_kernels.no_such_op", "gpt2_kernels.testing"], [80], workers=1)
    by_module = {r.module: r for r in results}
    assert set(by_module) == {"gpt2_kernels.no_such_op", "gpt2_kernels.testing"}
    assert "cannot import" in by_module["gpt2_kernels.no_such_op"].error
    assert "no launch_configs" in by_module["gpt2_kernels.testing"].error
    out = tmp_path / "report.json"
    assert report.main(["--module", "gpt2_kernels.no_such_op", "--arch", "sm_80", "--json", str(out), "--workers", "1"]) == 1
    data = json.loads(out.read_text())
    assert data["archs"] == [80] and not data["results"][0]["ok"]


def test_arguments_are_checked():
    assert report.parse_arch("sm_90a") == report.parse_arch("9.0") == report.parse_arch("90") == 90
    with pytest.raises(ValueError, match="unsupported architecture 'sm_70'.*sm_75"):
        report.parse_arch("sm_70")
    with pytest.raises(SystemExit):
        report.main(["--arch", "sm_70"])
    assert report.module_name("attention") == "gpt2_kernels.attention"


def test_config_key_spells_out_the_default_alignment():
    """A recorded launch with every argument aligned compiles to the listed configuration's kernel: one compile."""
    from gpt2_kernels import attention as A

    listed = next(c for c in A.launch_configs(90) if c.kernel.__name__ == "_attn_fwd_kernel")
    explicit = LaunchConfig(label="x", kernel=listed.kernel, constexprs=listed.constexprs,
                            num_warps=listed.num_warps, num_stages=listed.num_stages,
                            signature={n: (t + ":16" if report._aligned_by_default(listed.kernel, i, t) else
                                           t + (":1" if t[:1] in "iu*" else ""))
                                       for i, (n, t) in enumerate(listed.signature.items())})
    assert report._config_key(explicit) == report._config_key(listed)
    unaligned = LaunchConfig(**{**explicit.__dict__, "signature": {**explicit.signature, "stride_qt": "i32:1"}})
    assert report._config_key(unaligned) != report._config_key(listed)


def test_ptx_tensor_core_counting():
    ptx = """
        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2}, {%r3}, {%f1};
        // mma.sync in a comment does not count
        wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%f5}, %rd1, %rd2, 1, 1, 1, 0, 1;
        wgmma.fence.sync.aligned;
        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2}, {%r3}, {%f1};
    """
    assert report.ptx_tensor_core_ops(ptx) == {"HMMA": 2, "HGMMA": 1}
    assert report.ptx_tensor_core_ops("fma.rn.f32 %f1, %f2, %f3, %f4;") == {}


def test_sass_counting():
    sass = """
        /*0130*/                   STL [R1+0x190], R194 ;                     /* 0x000190c201007387 */
        /*0290*/                   STL.64 [R1+0x188], R198 ;                  /* 0x000188c601007387 */
        /*02a0*/              @!P1 LDL.LU.128 R4, [R1+0x10] ;                 /* 0x000188c601007387 */
        /*02b0*/                   HMMA.16816.F32 R24, R4, R8, R24 ;          /* 0x000188c601007387 */
        /*02c0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;  /* 0x000188c601007387 */
    """
    ops = report.sass_opcodes(sass)
    assert ops["STL"] == 2 and ops["STL bytes"] == 4 + 8
    assert ops["LDL"] == 1 and ops["LDL bytes"] == 16
    assert ops["HMMA"] == 1 and ops["HGMMA"] == 1


# ---------------------------------------------------------------------------------------------------
# 2. The real thing, as the suite checks it: every op module's kernels as real launches specialise them (part 3
#    below), compiled for every architecture with the tiles each launcher picks there. The listed configurations of
#    ``launch_configs`` (every tile-list entry a GPU may time, 1145 configurations x architectures, about 1,350 CPU s)
#    are the report's own run, ``python -m gpt2_kernels.report``, which bench/gpu_check.sh runs on every GPU session;
#    the suite's two cores cannot afford them inside its 15 minutes.

MATMUL_MODULES = ("gpt2_kernels.attention", "gpt2_kernels.mlp")
# Compiling for all five architectures takes minutes on a 2-core machine; a developer may narrow it, e.g.
# KERNELS_REPORT_ARCHS=sm_80,sm_90 (the other architectures' tests then skip, saying so).
REAL_ARCHS = (
    tuple(report.parse_arch(a) for a in os.environ.get("KERNELS_REPORT_ARCHS", "").split(",") if a.strip())
    or report.ARCHS
)
# sm_89 (Ada) is compiled as sm_86 (Ampere): the same tile row and shared memory, and Triton emits the same PTX for
# both (but its .target line), from which ptxas makes the same registers, spills and shared memory (in all 247 of
# the listed configurations on 2026-12-06). test_sm89_compiles_as_sm86 keeps checking that, for one launch of every
# kernel; the report's own run compiles sm_89 in full.
COMPILED_AS = {89: 86}


def _compiled_arch(arch: int) -> int:
    return COMPILED_AS[arch] if arch in COMPILED_AS and COMPILED_AS[arch] in REAL_ARCHS else arch


# What each architecture compiles of the recorded launches (part 3), to fit the suite's 15 minutes on 2 cores (the
# report's own run compiles everything everywhere):
# - the workload's fp16 launches (and their bf16 twins from sm_80): every architecture, with its own tiles;
# - its fp32 launches (IEEE dots and element-wise code on the CUDA cores, small tiles of one stage): FP32_ARCHS, the
#   architecture with the least shared memory and Hopper's own code generation;
# - the JIT's edge values (integers equal to 1) that the workload does not make: EDGE_ARCH, the cheapest to compile.
#   Whether a kernel compiles with a constant 1 is decided in Triton's front end, before any target.
FP32_ARCHS = (75, 90)
EDGE_ARCH = 75


def _low_precision(rec) -> bool:
    return any(t.startswith(("*fp16", "*bf16")) for _, t in rec["signature"])


def _plan(workload: list, edges: list, archs: list) -> dict:
    """{arch: the recorded launches it compiles} (see FP32_ARCHS)."""
    fp32_archs = [a for a in FP32_ARCHS if a in archs] or archs[-1:]
    edge_arch = EDGE_ARCH if EDGE_ARCH in archs else archs[0]
    return {a: [r for r in workload if _low_precision(r) or a in fp32_archs] + (edges if a == edge_arch else [])
            for a in archs}


@pytest.fixture(scope="module")
def compiled():
    """(workload, edges, plan, results): the recorded launches (part 3), what each of REAL_ARCHS (sm_89 as sm_86)
    compiles of them (``_plan``) and the results, in one process pool."""
    workload, edges = recorded_launches()
    archs = sorted({_compiled_arch(a) for a in REAL_ARCHS})
    plan = _plan(workload, edges, archs)
    return workload, edges, plan, report.run_report(report.OP_MODULES, archs, launches=plan, listed=False)


@needs_tools
@pytest.mark.parametrize("arch", report.ARCHS)
def test_op_modules_ready_for_arch(arch, request):
    if arch not in REAL_ARCHS:
        pytest.skip(f"sm_{arch} is not in KERNELS_REPORT_ARCHS={os.environ.get('KERNELS_REPORT_ARCHS')}")
    _, _, plan, results = request.getfixturevalue("compiled")
    here = [r for r in results if r.arch == _compiled_arch(arch)]
    planned = {r["module"] for r in plan[_compiled_arch(arch)]}
    bad = [f"{r.label}: {'; '.join(r.problems)}" for r in here if not r.ok]
    assert not bad, f"sm_{arch}: {len(bad)} launch specialisation(s) not ready:\n" + "\n".join(bad)
    modules = {r.module for r in here}
    assert modules == planned, f"sm_{arch}: no launches from {planned - modules}"
    # Triton >= 3.2 lowers tl.dot to FMA below sm_80 (its MMA path there is deprecated): no tensor cores on sm_75.
    lowp_dots = [r for r in here if r.module in MATMUL_MODULES and r.dots and {"fp16", "bf16"} & set(r.pointer_dtypes)]
    no_tc = [f"{r.label} ({r.dots} tt.dot)" for r in lowp_dots if not r.tensor_core_count]
    if arch >= 80:
        assert not no_tc, f"sm_{arch}: fp16/bf16 matmul kernels without tensor-core instructions:\n" + "\n".join(no_tc)
        assert [r for r in here if "bf16" in r.pointer_dtypes], f"sm_{arch}: no bf16 launch compiled"
    if arch < 80:
        assert not [r.label for r in here if "bf16" in r.pointer_dtypes]
    for module in MATMUL_MODULES:
        fp16 = [r for r in here if r.module == module and "fp16" in r.pointer_dtypes and r.dots]
        assert fp16, f"sm_{arch}: {module} launched no fp16 matmul"


_SAME_ON_TWINS = ("error", "shared", "registers", "stack_bytes", "spill_stores", "spill_loads", "dots", "tensor_cores")


@needs_tools
def test_sm89_compiles_as_sm86(compiled):
    """What lets the suite compile sm_89 as sm_86: the same tiles and shared memory, and one launch of every kernel
    compiled for sm_89 in full gives what it gives on sm_86, field by field."""
    if not {86, 89} <= set(REAL_ARCHS):
        pytest.skip(f"sm_86 and sm_89 are not both in KERNELS_REPORT_ARCHS={os.environ.get('KERNELS_REPORT_ARCHS')}")
    assert report.RUNTIME_ARCHS[89].tiles == report.RUNTIME_ARCHS[86].tiles
    assert report.SHARED_LIMIT[89] == report.SHARED_LIMIT[86]
    workload, _, _, results = compiled
    one_each = list({(r["module"], r["kernel"]): r for r in reversed(workload) if _low_precision(r)}.values())
    ampere = {r.label: r for r in results if r.arch == 86}
    ada = report.run_report(report.OP_MODULES, [89], launches=one_each, listed=False)
    assert len(ada) >= len(one_each)
    for r in ada:
        twin = ampere[r.label]
        assert r.error is None, r.error
        assert [getattr(r, f) for f in _SAME_ON_TWINS] == [getattr(twin, f) for f in _SAME_ON_TWINS], r.label


# ----------------------------------------------------------------------------------------------
# 3. What real launches specialise: every launch of a training step (fp32 and fp16), a cached decode, and each op at
#    the integer values Triton's JIT turns into constants (1) or marks aligned (multiples of 16), recorded under the
#    interpreter by gpt2_kernels.runtime.launch and compiled for every architecture with the tiles the launchers pick
#    there.


def _train_and_decode(dtype):
    import torch

    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", dropout=0.1), backend="triton")  # fine-tuning's dropout: in attention too
    x = torch.randint(0, model.config.vocab_size, (3, 18))  # 51 rows: no multiple of 16
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        model.eval().generate(x[:1, :5], 3, greedy=True)  # prompt of 5, then Tq = 1 with Tk = 6, 7


def _edge_values(dtype):
    """Each op at the sizes the JIT specialises: 1 (a constexpr) and multiples of 16 (aligned), dropout seeds too."""
    import torch

    from gpt2_kernels import attention as A
    from gpt2_kernels.registry import build_ops

    ops = build_ops("triton", "cpu")
    for Tq, Tk, seed, p in ((1, 1, 0, 0.0), (1, 16, 1, 0.1), (16, 16, 16, 0.1), (17, 33, 17, 0.1), (2, 17, 1, 0.0)):
        q = torch.randn(1, 1, Tq, 32, dtype=dtype)
        k = torch.randn(1, 1, Tk, 32, dtype=dtype)
        o, lse = A.attention_fwd(q, k, k, True, p, seed)
        A.attention_bwd(torch.randn_like(o), q, k, k, o, lse, True, p, seed)
        A.dropout_keep_mask(seed, 1, 1, Tq, Tk, 0.1, "cpu")
    for C in (1, 17):  # a row of one feature: C = 1 is a constant to the JIT
        x = torch.randn(3, C, dtype=dtype, requires_grad=True)
        ops.layer_norm(x, torch.ones(C), torch.zeros(C)).sum().backward()
    for n in (1, 16, 17):
        x = torch.randn(n, 32, dtype=dtype, requires_grad=True)
        ops.layer_norm(x, torch.ones(32), torch.zeros(32)).sum().backward()
        w1, w2 = torch.randn(64, 32, dtype=dtype) * 0.1, torch.randn(32, 64, dtype=dtype) * 0.1
        ops.mlp(x, w1.requires_grad_(), None, w2.requires_grad_(), None).sum().backward()
        for V in (1, 16, 17):
            w = torch.randn(V, 32, dtype=dtype, requires_grad=True)
            ops.linear_cross_entropy(x, w, torch.randint(0, V, (n,))).backward()


def _class(rec) -> tuple:
    """What decides whether a launch compiles: kernel, pointer dtypes and every constexpr but the block shapes
    (its flags and the integers the JIT made the constant 1)."""
    flags = tuple((n, v) for n, v in rec["constexprs"] if not report._is_tile(n))
    return rec["kernel"], tuple((n, t.split(":")[0]) for n, t in rec["signature"] if t.startswith("*")), flags


def select_launches(workload: list) -> list:
    """What the suite compiles: per class of the workload, its least aligned launch (the report's own run compiles the
    aligned form of every listed configuration)."""
    best = {}
    for r in workload:
        n = sum(t.endswith(":1") for _, t in r["signature"])
        if _class(r) not in best or n > best[_class(r)][0]:
            best[_class(r)] = (n, r)
    return [r for _, r in best.values()]


def recorded_launches():
    """(workload, edges): the launches to compile (``report.launches_to_json`` dicts), one per class: the training
    steps' and decodes', and the edge values' of every class the workload does not make."""
    import torch

    from gpt2_kernels import runtime

    with runtime.record_launches() as work:
        for dtype in (torch.float32, torch.float16):
            _train_and_decode(dtype)
    with runtime.record_launches() as edge:
        for dtype in (torch.float32, torch.float16):
            _edge_values(dtype)
    workload = select_launches(report.launches_to_json(work))
    classes = {_class(r) for r in workload}
    return workload, [r for r in select_launches(report.launches_to_json(edge)) if _class(r) not in classes]


@pytest.fixture(scope="module")
def recorded(compiled):
    workload, edges, _, results = compiled
    return workload + edges, results  # every row: the suite compiles recorded launches only (listed=False)


@needs_tools
def test_recorded_launches_compile_for_every_arch(recorded):
    launches, results = recorded
    kernels = {r["kernel"] for r in launches}
    assert {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_layer_norm_bwd_kernel", "_matmul_kernel",
            "_linear_cross_entropy_fwd_kernel", "_dropout_mask_kernel"} <= kernels, kernels
    assert {r.arch for r in results} == {_compiled_arch(a) for a in REAL_ARCHS}
    bad = [f"sm_{r.arch} {r.label}: {'; '.join(r.problems)}" for r in results if not r.ok]
    assert not bad, f"{len(bad)} of {len(results)} recorded launch specialisations not ready:\n" + "\n".join(bad)


@needs_tools
def test_workload_trains_with_dropout_and_every_launch_is_compiled_somewhere(compiled):
    workload, edges, plan, results = compiled
    assert any(dict(r["constexprs"]).get("DROPOUT") for r in workload if r["kernel"] == "_attn_fwd_kernel")
    assert edges and not {_class(r) for r in edges} & {_class(r) for r in workload}
    planned = [json.dumps(r, sort_keys=True) for launches in plan.values() for r in launches]
    assert set(planned) == {json.dumps(r, sort_keys=True) for r in workload + edges}
    # the fp32 launches on their architectures, the fp16 ones everywhere, every row compiled and ready
    assert all(sum(r in launches for launches in plan.values()) == len(plan) for r in workload if _low_precision(r))
    assert {r.arch for r in results} == set(plan) and any(r.kernel == "_dropout_mask_kernel" for r in results)


def test_recording_sees_the_jit_specialisation():
    """A launch records ints equal to 1 as constants, multiples of 16 and aligned pointers as aligned, and leaves the
    kernel's do_not_specialize arguments (the attention's lengths and dropout seed) unspecialised."""
    import torch

    from gpt2_kernels import attention as A
    from gpt2_kernels import runtime

    q = torch.randn(1, 1, 1, 32)
    k = torch.randn(1, 1, 17, 32)
    with runtime.record_launches() as records:
        A.attention_fwd(q, k, k, True, 0.1, 1)
    (rec,) = records
    sig, const = dict(rec.signature), dict(rec.constexprs)
    assert sig["Q"] == "*fp32:16" and sig["stride_kt"] == "i32:16"  # 32 features a row: aligned
    assert sig["stride_kb"] == "i32:16"  # a batch of 1: the launcher passes stride 0, which is divisible by 16
    for name in ("Tq", "Tk", "shift", "seed"):
        assert sig[name] == "i32:1", (name, sig[name])  # seed = 1 and Tq = 1 stay plain i32 (do_not_specialize)
    assert const["nh"] == 1 and "nh" not in sig  # one head: the JIT makes nh the constant 1
    assert const["DROPOUT"] is True and const["HEAD"] == 32


def test_configs_from_launches_takes_the_listed_tiles_and_flags_unlisted_launches():
    from gpt2_kernels import attention as A

    listed = A.launch_configs(90)
    rec = {"module": "gpt2_kernels.attention", "kernel": "_attn_fwd_kernel",
           "signature": [[n, "i32:1" if not t.startswith(("*", "fp")) else t + (":16" if t.startswith("*") else "")]
                         for n, t in next(c for c in listed if c.kernel.__name__ == "_attn_fwd_kernel"
                                          and "fp16" in c.signature["Q"]).signature.items() if n != "nh"],
           "constexprs": [["HEAD", 64], ["BLOCK_M", 32], ["BLOCK_N", 16], ["DROPOUT", False], ["nh", 1]]}
    (cfg, twin) = report.configs_from_launches([rec], listed, "gpt2_kernels.attention", 90)
    want = A._tiles("fwd", __import__("torch").float16, 64, False, None, 90)
    assert (cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"], cfg.num_warps, cfg.num_stages) == want
    assert cfg.constexprs["nh"] == 1 and "nh" not in cfg.signature and cfg.signature["Q"] == "*fp16:16"
    assert twin.signature["Q"] == "*bf16:16"
    assert len(report.configs_from_launches([rec], listed, "gpt2_kernels.attention", 75)) == 1  # no bf16 before sm_80
    odd = {**rec, "constexprs": [["HEAD", 48], ["BLOCK_M", 32], ["BLOCK_N", 16], ["DROPOUT", False], ["nh", 1]]}
    (unlisted,) = report.configs_from_launches([odd], listed, "gpt2_kernels.attention", 75)
    assert unlisted.kernel is None and "no launch_configs entry matches" in unlisted.label


# ----------------------------------------------------------------------------------------------
# 4. The tile lists are the single source of the listed tiles: every entry of every list (what a GPU may pick by
#    timing, gpt2_kernels.runtime.pick_tiles) is a configuration the report compiles, on every architecture.


def _listed_tiles(configs, kernel) -> set:
    return {(c.signature.get("Q", c.signature.get("a_ptr", c.signature.get("X"))), tuple(sorted(c.constexprs.items())),
             c.num_warps, c.num_stages) for c in configs if c.kernel is kernel}


@pytest.mark.parametrize("cc", report.ARCHS)
def test_every_tile_list_entry_is_listed(cc):
    import torch

    from gpt2_kernels import attention as A
    from gpt2_kernels import layer_norm as LN
    from gpt2_kernels import mlp as M

    names = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cc >= 80 else [])
    attention = A.launch_configs(cc)
    entries = 0
    for dtype in dtypes:
        for head in A.HEAD_SIZES:
            for name, fn in (("fwd", A._attn_fwd_kernel), ("dkdv", A._attn_bwd_dkdv_kernel),
                             ("dq", A._attn_bwd_dq_kernel)):
                listed = _listed_tiles(attention, fn)
                for dropout in (False, True):
                    for bm, bn, warps, stages in A._tile_list(name, dtype, head, dropout, torch.device("cuda"), cc):
                        entries += 1
                        ce = tuple(sorted({"HEAD": head, "BLOCK_M": bm, "BLOCK_N": bn, "DROPOUT": dropout}.items()))
                        assert (names[dtype], ce, warps, stages) in listed, (cc, name, dtype, head, dropout, bm, bn)
    row = report.RUNTIME_ARCHS[cc].tiles
    mlp = [(c.signature["a_ptr"], c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"], c.constexprs["BLOCK_K"],
            c.constexprs["GROUP_M"], c.num_warps, c.num_stages) for c in M.launch_configs(cc)]
    for dtype in dtypes:
        for role in ("main", "epilogue", "small"):
            for t in M._row_tiles(row, dtype, role):
                entries += 1
                assert (names[dtype], t.BLOCK_M, t.BLOCK_N, t.BLOCK_K, t.GROUP_M, t.num_warps, t.num_stages) in mlp, \
                    (cc, dtype, role, t)
    ln = {(c.kernel.__name__, c.constexprs["BLOCK_C"], c.constexprs["BLOCK_R"], c.num_warps)
          for c in LN.launch_configs(cc)}
    for C in LN._AOT_C:
        for backward, kernel in ((False, "_layer_norm_fwd_kernel"), (True, "_layer_norm_bwd_kernel")):
            for block_c, block_r, warps in LN._tile_list(C, backward):
                entries += 1
                assert (kernel, block_c, block_r, warps) in ln, (cc, C, backward, block_c, block_r, warps)
    if cc >= 80:  # the tensor-core rows have second entries to time
        assert len(A._tile_list("fwd", torch.float16, 64, False, torch.device("cuda"), cc)) > 1
        assert len(M._row_tiles(row, torch.float16, "main")) > 1
    assert entries
