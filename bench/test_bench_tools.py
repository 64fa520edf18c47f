"""Fast checks of the benchmark suite's own machinery: shapes, options, cost model, report, GPU script.

Run with ``pytest bench/test_bench_tools.py`` (``--benchmark-only`` skips them: they time nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from bench import cases, report
from bench.common import IMPL_NAMES, OPS, OpCase, Unavailable, check_forward, op_cost, reference
from bench.shapes import GRIDS, MODELS, SEQ_LENS, ShapeError, parse_shape, select_shapes

HERE = os.path.dirname(os.path.abspath(__file__))


def test_shape_table_matches_gpt2_sizes():
    widths = {name: (m.n_embd, m.n_head) for name, m in MODELS.items()}
    assert widths == {"124M": (768, 12), "350M": (1024, 16), "774M": (1280, 20), "1.5B": (1600, 25)}
    assert all(m.head_size * m.n_head == m.n_embd for m in MODELS.values())
    assert min(SEQ_LENS) == 128 and max(SEQ_LENS) == 4096
    full_attn = GRIDS["full"]["attention"]
    assert {(s.model.name, s.T) for s in full_attn} == {(m, T) for m in MODELS for T in SEQ_LENS}


def test_parse_shape_round_trips_and_rejects_bad_names():
    s = parse_shape("350M-B2-T512")
    assert (s.C, s.n_head, s.B, s.T, s.name) == (1024, 16, 2, 512, "350M-B2-T512")
    for bad in ("124M-T1024", "9B-B1-T128", "124M-B0-T128", "huge"):
        with pytest.raises(ShapeError, match="shape"):
            parse_shape(bad)


def test_select_shapes_skips_bad_names_and_keeps_good_ones():
    picked = select_shapes("attention", "cpu", ["124M-B3-T97", "bogus", "1.5B", "124M"])
    by_id = {i: (s, why) for i, s, why in picked}
    assert by_id["124M-B3-T97"][0].T == 97
    assert by_id["bogus"][0] is None and "'bogus'" in by_id["bogus"][1]
    assert by_id["1.5B"][0] is None and "1.5B" in by_id["1.5B"][1]  # no 1.5B shapes in the cpu grid
    assert {s.name for i, s, _ in picked if s is not None and s.model.name == "124M"} >= {
        s.name for s in GRIDS["cpu"]["attention"]}


def test_op_choices_turn_bad_values_into_named_skips():
    choices = cases.op_choices("layer_norm", "cpu", "cpu", False, backends=["torch", "sdpa-flash", "nope"],
                               shapes=None, dtypes=["fp32", "fp8"], modes=["fwd", "sideways"])
    skips = {c.id: c.skip for c in choices if c.skip}
    assert "'nope'" in skips["backend-nope"]
    assert "'fp8'" in skips["dtype-fp8"]
    assert "'sideways'" in skips["mode-sideways"]
    run = [c.case for c in choices if c.case is not None]
    # sdpa-flash is an attention peer, not a layer_norm one: dropped quietly, not reported as unknown.
    assert {c.impl for c in run} == {"torch"} and {c.mode for c in run} == {"fwd"}


def test_groups_differ_only_by_implementation():
    choices = cases.op_choices("attention", "cpu", "cpu", False, None, None, None, None)
    run = [c.case for c in choices if c.case is not None]
    by_group: dict[str, list] = {}
    for c in run:
        by_group.setdefault(c.group, []).append(c)
    for group, members in by_group.items():
        assert len({(c.shape, c.dtype, c.mode) for c in members}) == 1, group
        assert sorted(c.impl for c in members) == sorted(IMPL_NAMES["attention"]), group
    assert len({c.id for c in run}) == len(run)


def test_model_choices_skip_unknown_backends():
    choices = cases.model_choices("cpu", False, ["ext", "warp-drive"], None)
    assert [c.case.backend for c in choices if c.case] == ["ext"]
    old_name = cases.model_choices("cpu", False, ["cuda"], None)  # the extension's old name still selects it
    assert [c.case.backend for c in old_name if c.case] == ["ext"]
    peers = cases.model_choices("cpu", False, ["transformers", "transformers-patched"], None)
    assert [c.case.backend for c in peers if c.case] == ["transformers", "transformers-patched"]
    assert all(c.case for c in peers)  # peers are no unknown names
    assert any(c.skip and "'warp-drive'" in c.skip for c in choices)


def test_attention_flops_count_the_causal_pairs():
    shape = parse_shape("124M-B2-T37")
    pairs = int(torch.ones(37, 37).tril().sum())  # (query, key) pairs a causal mask keeps
    expect = 2 * 2 * shape.B * shape.n_head * pairs * shape.head_size  # two matmuls, 2 FLOPs per MAC
    assert op_cost("attention", shape, "fwd", torch.float16).flops == expect
    fwd, bwd = (op_cost("attention", shape, m, torch.float16) for m in ("fwd", "bwd"))
    assert op_cost("attention", shape, "fwd+bwd", torch.float16).flops == fwd.flops + bwd.flops
    assert fwd.bytes == 4 * shape.B * shape.n_head * 37 * shape.head_size * 2


def test_costs_scale_with_dtype_and_size():
    s = parse_shape("124M-B1-T64")
    for op in OPS:
        c16, c32 = op_cost(op, s, "fwd", torch.bfloat16), op_cost(op, s, "fwd", torch.float32)
        assert c32.flops == c16.flops > 0
        assert c16.bytes < c32.bytes <= 2 * c16.bytes + 8 * s.tokens
    mlp = op_cost("mlp", s, "fwd", torch.float32)
    assert mlp.flops == 2 * 2 * s.tokens * s.C * 4 * s.C  # two (N x C x 4C) products
    lce = op_cost("linear_cross_entropy", s, "fwd+bwd", torch.float32)
    assert lce.flops == 6 * s.tokens * s.C * s.vocab_size
    with pytest.raises(ValueError, match="unknown op"):
        op_cost("softmax", s, "fwd", torch.float32)


@pytest.mark.parametrize("module", ["bench_attention", "bench_layer_norm", "bench_mlp", "bench_linear_cross_entropy"])
def test_every_listed_implementation_loads_or_says_why(module):
    import importlib

    from bench.common import OpCase, load_impl

    mod = importlib.import_module(f"bench.{module}")
    shape = GRIDS["cpu"][mod.OP][0]
    for impl in IMPL_NAMES[mod.OP]:
        if impl == "torch-compile":
            continue  # compiling is the benchmark's job, and slow
        try:
            fn = load_impl(OpCase(mod.OP, impl, "fwd", "fp32", shape), torch.device("cpu"), mod.PEERS)
        except Unavailable as e:
            assert str(e), impl
        else:
            assert callable(fn), impl


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_forward_outside_the_tolerance_table_fails_the_benchmark(dtype):
    """check_forward holds each benchmark's first forward to gpt2_kernels.testing's rule for the bench dtype: the
    reference passes, a result 1e-3 off (relative) in fp32, or 5% off in bf16, fails, naming the element."""
    from bench import bench_mlp

    shape = parse_shape("124M-B1-T8")
    case = OpCase("mlp", "torch", "fwd", dtype, shape)
    inputs = bench_mlp.make_inputs(shape, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                                   torch.device("cpu"), torch.Generator().manual_seed(0))
    ref = reference("mlp")
    with torch.no_grad():
        out = ref(*inputs.args, **inputs.kwargs)
    max_err, lowp_err = check_forward(case, out, inputs, ref)
    assert (lowp_err is None) == (dtype == "fp32") and max_err <= (lowp_err or 0.0)
    off = 1e-3 if dtype == "fp32" else 5e-2
    named = r"(?s)torch mlp fwd 124M-B1-T8 .*the first, index .*--bench-no-check"
    with pytest.raises(pytest.fail.Exception, match=named):
        check_forward(case, out * (1 + off) + off, inputs, ref)


def _fake_results(tmp_path):
    def entry(group, impl, median, **info):
        base = {"op": "layer_norm", "impl": impl, "mode": "fwd", "dtype": "fp32", "shape": "124M-B1-T128",
                "model": "124M", "B": 1, "T": 128, "baseline": "torch", "device": "test CPU",
                "flops": 8e9, "bytes": 4e9, "ceiling_tflops": 1.0, "ceiling_gbps": 10.0}
        base.update(info)
        return {"group": group, "name": f"test[{impl}]", "extra_info": base,
                "stats": {"median": median, "rounds": 5}}

    g = "layer_norm fwd fp32 124M-B1-T128"
    benches = [entry(g, "torch", 2.0), entry(g, "ext", 0.5)]
    for T, t_ref, t_fast in ((128, 1e-3, 5e-4), (256, 3e-3, 1e-3)):
        ga = f"attention fwd fp32 124M-B1-T{T}"
        benches += [entry(ga, "torch", t_ref, op="attention", T=T), entry(ga, "sdpa-math", t_fast, op="attention", T=T)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"datetime": "2026-11-25T00:00:00", "machine_info": {}, "benchmarks": benches}))
    return path


def test_report_tables_and_plots(tmp_path):
    path = _fake_results(tmp_path)
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    md = (out / "bench_report.md").read_text()
    # cuda: 0.5 s against the reference's 2 s; 4e9 B / 0.5 s = 8 GB/s = 80% of the 10 GB/s ceiling.
    row = next(line for line in md.splitlines() if line.startswith("| ext "))
    assert "4.00x" in row and "| 8 |" in row and "80.0%" in row
    ref_row = next(line for line in md.splitlines() if line.startswith("| torch ") and "2 s" in line)
    assert "1.00x" in ref_row
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "attention_time_vs_T_124M_fp32.png" in pngs and "ceiling_fraction_layer_norm.png" in pngs
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_runs_as_a_script_and_rejects_foreign_json(tmp_path):
    path = _fake_results(tmp_path)
    script = os.path.join(HERE, "report.py")
    ok = subprocess.run([sys.executable, script, str(path), "--out", str(tmp_path / "o"), "--no-plots"],
                        check=False, capture_output=True, text=True, cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = subprocess.run([sys.executable, script, str(bad)], check=False, capture_output=True, text=True,
                         cwd=str(tmp_path))
    assert res.returncode == 2 and "not a pytest-benchmark JSON" in res.stderr


def test_gpu_check_script_parses_and_needs_an_outdir():
    script = os.path.join(HERE, "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    res = subprocess.run(["bash", script], check=False, capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_gpu_check_script_writes_summary_and_archive_with_every_step_skipped(tmp_path):
    """The script's own plumbing, without a GPU: each skipped step gets a summary row with its
    reason, and the archive callers copy back is written. (It used to be written inside the folder
    it archives; tar then failed now and then with "file changed as we read it" and kept none.)"""
    script = os.path.join(HERE, "gpu_check.sh")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BUDGET="60",
               GPU_CHECK_SKIP="build hazards_triton hazards_backends kernel_report tests_gpu bench tests_rest")
    res = subprocess.run(["bash", script, str(out)], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for step in ("build", "hazards_triton", "hazards_backends", "kernel_report", "tests_gpu", "bench", "tests_rest"):
        assert f"| {step} | skipped | 0 | named in GPU_CHECK_SKIP |" in summary, summary
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"summary.md", "env.log"} <= names, names


def test_gpu_check_build_step_runs_its_commands(tmp_path):
    """The build step is a shell function run under timeout(1): it must be run through bash (timeout alone answered
    "failed to run command 'build'" on the first GPU run, and nothing was built). A stand-in python records it."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"fake python $*\" >> {tmp_path / 'calls.log'}\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), GPU_CHECK_BUDGET="400", TORCH_CUDA_ARCH_LIST="9.0",
               GPU_CHECK_SKIP="hazards_triton hazards_backends kernel_report tests_gpu bench tests_rest")
    res = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(out)], check=False, capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| build | ok |" in (out / "summary.md").read_text(), (out / "build.log").read_text()
    assert "-m pip install --no-build-isolation" in (tmp_path / "calls.log").read_text()


@pytest.mark.parametrize("cc, default, full", [(75, ["fp16"], ["fp16", "fp32"]),
                                               (80, ["bf16"], ["bf16", "fp16", "fp32"]),
                                               (90, ["bf16"], ["bf16", "fp16", "fp32"])])
def test_bench_dtypes_follow_the_capability(monkeypatch, cc, default, full):
    """A Turing GPU (sm_75) benchmarks fp16 by default and never bf16, which it only emulates."""
    from bench import cases
    from gpt2_kernels import runtime

    monkeypatch.setattr(runtime, "capability", lambda device: cc)
    assert cases.default_dtypes("cuda", False) == default
    assert cases.default_dtypes("cuda", True) == full
    assert cases.default_dtypes("cpu", False) == ["fp32"]


def test_bad_thread_count_is_a_usage_error():
    res = subprocess.run([sys.executable, "-m", "pytest", HERE, "--collect-only", "-q", "-p", "no:cacheprovider",
                          "--bench-threads", "0"], check=False, capture_output=True, text=True,
                         cwd=os.path.dirname(HERE))
    assert res.returncode != 0 and "--bench-threads must be >= 1, got 0" in res.stderr + res.stdout


def test_train_step_choices_cover_both_cpu_shapes_dtypes_and_peers(monkeypatch):
    from bench import bench_train_step as ts
    from gpt2 import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx512f", "avx512_bf16"}))
    run = [c.case for c in ts.train_choices("cpu", None, None, None)]
    assert {(c.preset, c.B, c.T) for c in run} == {("shakespeare", 8, 128), ("gpt2", 4, 64)}
    assert {c.dtype for c in run} == {"fp32", "bf16"}  # fp32 and what auto picks on a CPU with avx512_bf16
    by_group: dict[str, list] = {}
    for c in run:
        by_group.setdefault(c.group, []).append(c.backend)
    assert all(backends == list(ts.TRAIN_BACKENDS) for backends in by_group.values())  # rows differ by backend only
    assert {"ext", "transformers", "transformers-patched", "nanogpt-like"} <= set(ts.TRAIN_BACKENDS)
    assert sorted(g for g in by_group if g.endswith("(dtype auto)")) == [
        "train_step gpt2 B4 T64 bf16 (dtype auto)", "train_step shakespeare B8 T128 bf16 (dtype auto)"]
    assert len({c.id for c in run}) == len(run)

    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2"}))
    assert {c.case.dtype for c in ts.train_choices("cpu", None, None, None)} == {"fp32"}  # bf16 would be emulated


def test_train_step_choices_take_peer_names_and_skip_bad_ones():
    from bench import bench_train_step as ts

    choices = ts.train_choices("cpu", ["cuda", "nanogpt-like", "warp-drive"], ["fp32", "fp8"], ["124M"])
    run = [c.case for c in choices if c.case is not None]
    assert {c.backend for c in run} == {"ext", "nanogpt-like"}  # cuda: the extension's old name
    assert {(c.preset, c.B, c.T, c.dtype) for c in run} == {("gpt2", 4, 64, "fp32")}
    skips = {c.id: c.skip for c in choices if c.skip}
    assert "'warp-drive'" in skips["backend-warp-drive"] and "'fp8'" in skips["dtype-fp8"]


def test_nanogpt_like_peer_computes_our_loss_and_gradients():
    from bench.common import NanoGPTLike
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset("tiny"), backend="torch").train()
    peer = NanoGPTLike.from_gpt(ours)
    assert peer.lm_head.weight is peer.transformer.wte.weight  # tied
    idx = torch.randint(0, ours.config.vocab_size, (2, 37))
    targets = torch.randint(0, ours.config.vocab_size, (2, 37))
    targets[0, :5] = -1  # ignored, as ours
    loss, peer_loss = ours(idx, targets)[1], peer(idx, targets)[1]
    torch.testing.assert_close(peer_loss, loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    peer_loss.backward()
    grads = dict(peer.named_parameters())
    V = ours.config.vocab_size
    for name, p in ours.named_parameters():
        g = p.grad[:V] if name == "transformer.wte.weight" else p.grad  # ours pads the vocabulary
        torch.testing.assert_close(grads[name].grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_matmul_median_is_the_median_rate(monkeypatch):
    from bench import common

    monkeypatch.setattr(common, "_times", lambda fn, device, reps: [4.0, 1.0, 2.0, 8.0, 3.0, 9.0, 5.0, 7.0, 6.0])
    rate = common.Ceilings(torch.device("cpu")).matmul_median(torch.bfloat16)
    assert rate["tflops"] == pytest.approx(2 * 2048**3 / 5.0 / 1e12)
    assert rate["how"] == "median of 9 matmuls 2048x2048x2048 in bfloat16"


def test_report_train_step_rows_compare_with_transformers(tmp_path):
    def entry(impl, median, **info):
        base = {"op": "train_step", "impl": impl, "dtype": "bf16", "preset": "gpt2", "B": 4, "T": 64, "tokens": 256,
                "flops": 2e11, "baseline": "torch", "device": "test CPU", "ceiling_tflops": 0.2,
                "ceiling_tflops_how": "median of 9 matmuls 2048x2048x2048 in bfloat16", "matmul_fp32_tflops": 0.1,
                "matmul_fp32_how": "median of 9 matmuls 2048x2048x2048 in float32"}
        return {"group": "train_step gpt2 B4 T64 bf16 (dtype auto)", "name": f"test[{impl}]",
                "extra_info": {**base, **info}, "stats": {"median": median, "rounds": 3}}

    path = tmp_path / "r.json"
    benches = [entry("torch", 3.0), entry("ext", 1.0, auto_backend=True), entry("transformers", 1.5),
               entry("nanogpt-like", 2.0)]
    path.write_text(json.dumps({"datetime": "2026-11-26T00:00:00", "machine_info": {}, "benchmarks": benches}))
    md = report.markdown(report.load([str(path)]))
    row = next(line for line in md.splitlines() if line.startswith("| ext (auto) "))
    # 1 s against transformers' 1.5 s; 2e11 FLOP / 1 s = 0.2 TFLOP/s = 100% of the measured bf16 matmul rate.
    assert "| 3.00x | 1.50x | 0.2 | 100.0% |" in row, row
    assert "| 0.75x |" in next(line for line in md.splitlines() if line.startswith("| nanogpt-like "))
    assert "matmul fp32: 0.1 TFLOP/s (median of 9" in md and "matmul bf16: 0.2 TFLOP/s (median of 9" in md


# ------------------------------------------------------------------------------------- the headline run (issue 21)

TINY_HEADLINE = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq", "32", "--steps", "2",
                 "--op-shape", "124M-B1-T16", "--ops", "layer_norm", "--reps", "2", "--decode-preset", "tiny",
                 "--prompt", "6", "--new-tokens", "5"]


def test_headline_writes_its_json_and_tables_and_a_failing_row_records_its_error(tmp_path, monkeypatch):
    """A tiny preset through every section: the rows that run have their numbers (MFU against the measured matmul
    rate), the rows that cannot run on a CPU record why (Triton, the CUDA graph) and the rest runs on."""
    from bench import common, headline

    monkeypatch.setattr(common, "_times", lambda fn, device, reps: [4.0, 1.0, 2.0, 8.0, 3.0, 9.0, 5.0, 7.0, 6.0])
    rows = "train:auto,train:triton,train:nanogpt-like,ops:triton,ops:native,decode:eager,decode:static,decode:graph"
    assert headline.main(["--out", str(tmp_path), *TINY_HEADLINE, "--rows", rows, "--budget", "300"]) == 0
    result = json.loads((tmp_path / "headline.json").read_text())
    by = {(r["section"], r.get("op"), r["name"]): r for r in result["rows"]}
    mm = result["matmul"]["tflops"]
    assert mm == pytest.approx(2 * 2048**3 / 5.0 / 1e12)  # the median of the nine fake times
    for name in ("auto", "nanogpt-like"):
        r = by[("train", None, name)]
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["ms_per_step"] / 1e3))
        assert r["mfu_vs_measured"] == pytest.approx(r["tflops"] / mm) and r["peak_mem_mib"] > 0
    assert "triton runs on the CPU only" in by[("train", None, "triton")]["error"]
    assert "triton runs on the CPU only" in by[("ops", "layer_norm", "triton")]["error"]
    native = by[("ops", "layer_norm", "native")]
    assert "skipped" in native or native["host_ms"] > 0 and native["bound"] in ("host", "device")
    assert "graph=True needs use_cache, a model on a CUDA device" in by[("decode", None, "graph")]["error"]
    assert by[("decode", None, "static")]["same_tokens_as_eager"] is True
    assert by[("decode", None, "eager")]["tokens_per_s"] > 0
    assert set(result["goals"]) == set(headline.GOALS)
    assert result["goals"]["decode_graph_tokens_per_s"]["value"] is None  # the graph row did not run
    md = (tmp_path / "headline.md").read_text()
    for header in ("| row | ms/step | tokens/s | MFU (measured matmul) | peak MiB | vs nanogpt-like compiled | note |",
                   "| op | impl | host ms | device ms | bound | vs torch-compile | note |",
                   "| row | tokens/s | ms/call | vs transformers | same tokens as eager | note |",
                   "| goal | measured | target | met |"):
        assert header in md, md
    auto = next(line for line in md.splitlines() if line.startswith("| auto |"))
    assert f"{100 * by[('train', None, 'auto')]['mfu_vs_measured']:.1f}%" in auto, auto


def test_headline_rows_stop_at_their_sections_cap(monkeypatch):
    """A row still running at its section's end is stopped by the alarm and says so; once the time is up the rows
    after it are skipped with that reason; an unknown row name is a usage error."""
    from bench import headline

    cpu = torch.device("cpu")
    slow = headline._run_row("train", "slow", time.monotonic() + 2.5, cpu, lambda: time.sleep(6) or {"ms": 1.0})
    assert slow["error"].startswith("RowTimeout: stopped after") and slow["seconds"] < 5, slow
    late = headline._run_row("train", "late", time.monotonic() + 1.0, cpu, lambda: {"ms": 1.0})
    assert late["skipped"] == "the section's time cap was reached" and "ms" not in late
    with pytest.raises(SystemExit, match="unknown row 'train:warp'"):
        headline._wanted(["train:warp"])
    assert headline._wanted(["decode", "train:auto"]) == {"train": ("auto",), "ops": (), "decode": headline.DECODE_ROWS}


def test_gpu_headline_script_runs_the_headline_and_prints_its_table(tmp_path):
    script = os.path.join(HERE, "gpu_headline.sh")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    res = subprocess.run(["bash", script], check=False, capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr
    out = tmp_path / "hl"
    env = dict(os.environ, PYTHON=sys.executable, HEADLINE_BUDGET="120")
    res = subprocess.run(["bash", script, str(out), *TINY_HEADLINE, "--rows", "train:auto,decode:eager",
                          "--matmul", "skip"], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:] + (out / "headline.log").read_text()[-2000:]
    assert "## Train step tiny 2 x 32" in res.stdout and "| eager |" in res.stdout
    result = json.loads((out / "headline.json").read_text())
    assert result["budget_s"] == 120 and [r["name"] for r in result["rows"]] == ["auto", "eager"]
    assert all("error" not in r for r in result["rows"]), result["rows"]


def test_gpu_check_runs_the_headline_first(tmp_path):
    """The headline is gpu_check's first step, with its own budget out of the whole; a stand-in python records it."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"fake python $*\" >> {tmp_path / 'calls.log'}\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), GPU_CHECK_BUDGET="400", GPU_CHECK_HEADLINE_BUDGET="200",
               GPU_CHECK_SKIP="hazards_triton hazards_backends kernel_report tests_gpu bench tests_rest")
    res = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(out)], check=False, capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "| headline | ok |" in summary and summary.index("| headline |") < summary.index("| build |"), summary
    calls = (tmp_path / "calls.log").read_text().splitlines()
    first = next(i for i, c in enumerate(calls) if "-m bench.headline" in c)
    assert f"--out {out / 'headline'} --budget 200" in calls[first]
    assert first < next(i for i, c in enumerate(calls) if "-m pip install" in c)
