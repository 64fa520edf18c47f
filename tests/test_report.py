"""Tests of the static GPU-readiness report (``kernels/report.py``).

Two parts:

1. The report itself, on toy kernels defined here (this test module is its own "op module": it has
   a ``launch_configs(cc)`` the report's worker processes import by name): a small fp16 matmul that
   fits, one whose pipeline buffers exceed the shared memory of some architectures, one whose fp32
   accumulator spills, and a bf16 config listed for sm_75, which the report must refuse.
2. The real thing: every configuration of every Triton op module compiles for sm_75..sm_90, fits the
   shared memory, does not spill, and the fp16/bf16 matmul kernels (attention, mlp) use tensor cores.

Compiling needs no GPU, only Triton's NVIDIA backend tools (ptxas, cuobjdump); tests that compile
skip when those are absent.
"""

from __future__ import annotations

import json
import os

import pytest
import triton
import triton.language as tl

from kernels import report
from kernels.aot import LaunchConfig

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
    results = report.run_report([__name__], TOY_ARCHS)
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
    assert not over86.ok
    assert any("shared memory" in p for p in over86.problems), over86.problems
    assert "SMEM" in report.format_table([over86])


@needs_tools
def test_toy_spilling_config_is_flagged(toy):
    r = toy[("toy spills", 80)]
    assert r.error is None, r.error
    assert r.spill_stores > 0 and r.spill_loads > 0
    assert r.spill_source == "ptxas"
    assert not r.ok
    assert any("spills" in p for p in r.problems), r.problems
    assert "SPILL" in report.format_table([r])


@needs_tools
def test_bf16_config_on_sm75_is_refused(toy):
    r = toy[("toy bf16", 75)]
    assert r.error is not None and "bf16" in r.error and "sm_75" in r.error, r.error
    assert not r.ok


@needs_tools
def test_missing_module_and_missing_launch_configs_are_errors(tmp_path):
    results = report.run_report(["kernels.no_such_op", "kernels.testing"], [80])
    by_module = {r.module: r for r in results}
    assert set(by_module) == {"kernels.no_such_op", "kernels.testing"}
    assert "cannot import" in by_module["kernels.no_such_op"].error
    assert "no launch_configs" in by_module["kernels.testing"].error
    out = tmp_path / "report.json"
    assert report.main(["--module", "kernels.no_such_op", "--arch", "sm_80", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["archs"] == [80] and not data["results"][0]["ok"]


def test_arguments_are_checked():
    assert report.parse_arch("sm_90a") == report.parse_arch("9.0") == report.parse_arch("90") == 90
    with pytest.raises(ValueError, match="unsupported architecture 'sm_70'.*sm_75"):
        report.parse_arch("sm_70")
    with pytest.raises(SystemExit):
        report.main(["--arch", "sm_70"])
    assert report.module_name("attention") == "kernels.attention"


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
# 2. The real thing: every op module on every architecture.

MATMUL_MODULES = ("kernels.attention", "kernels.mlp")
# Compiling every configuration for all five architectures takes minutes on a 2-core machine; CI may narrow it,
# e.g. KERNELS_REPORT_ARCHS=sm_80,sm_90 (the other architectures' tests then skip, saying so).
REAL_ARCHS = (
    tuple(report.parse_arch(a) for a in os.environ.get("KERNELS_REPORT_ARCHS", "").split(",") if a.strip())
    or report.ARCHS
)


@pytest.fixture(scope="module")
def real():
    """Every op module compiled for REAL_ARCHS, in one process pool."""
    return report.run_report(report.OP_MODULES, REAL_ARCHS)


@needs_tools
@pytest.mark.parametrize("arch", report.ARCHS)
def test_op_modules_ready_for_arch(arch, request):
    if arch not in REAL_ARCHS:
        pytest.skip(f"sm_{arch} is not in KERNELS_REPORT_ARCHS={os.environ.get('KERNELS_REPORT_ARCHS')}")
    real = request.getfixturevalue("real")
    here = [r for r in real if r.arch == arch]
    bad = [f"{r.label}: {'; '.join(r.problems)}" for r in here if not r.ok]
    assert not bad, f"sm_{arch}: {len(bad)} configuration(s) not ready:\n" + "\n".join(bad)
    modules = {r.module for r in here}
    assert modules == set(report.OP_MODULES), f"sm_{arch}: no configurations from {set(report.OP_MODULES) - modules}"
    # Triton >= 3.2 lowers tl.dot to FMA below sm_80 (its MMA path there is deprecated): no tensor cores on sm_75.
    lowp_dots = [r for r in here if r.module in MATMUL_MODULES and r.dots and {"fp16", "bf16"} & set(r.pointer_dtypes)]
    no_tc = [f"{r.label} ({r.dots} tt.dot)" for r in lowp_dots if not r.tensor_core_count]
    if arch >= 80:
        assert not no_tc, f"sm_{arch}: fp16/bf16 matmul kernels without tensor-core instructions:\n" + "\n".join(no_tc)
    if arch < 80:
        assert not [r.label for r in here if "bf16" in r.pointer_dtypes]
    for module in MATMUL_MODULES:
        fp16 = [r for r in here if r.module == module and "fp16" in r.pointer_dtypes and r.dots]
        assert fp16, f"sm_{arch}: {module} lists no fp16 matmul configuration"
