"""``auto`` by measurement (``gpt2_kernels.auto``): the cache, its keys, broken files, concurrent writers, failing
candidates, the stub-timed pick, explicit backends, rank agreement, the model's first call and ``gpt2 tune``.

Every test times in a cache folder of its own (the ``timing`` fixture) with a tiny budget; tests/conftest.py keeps
every other test on the fixed order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from train_runs import REPO, _free_port

from gpt2_kernels import auto, registry, tuning

CASE = auto.Case(batch=1, seq=8, n_embd=32, n_head=2, vocab=64)


@pytest.fixture
def timing(monkeypatch, tmp_path, one_thread):
    """Timing switched on, a fresh cache folder, a small budget; every call of ``tuning.measure`` counted."""
    monkeypatch.setenv("GPT2_KERNELS_AUTO", "measure")
    monkeypatch.setenv("GPT2_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GPT2_KERNELS_AUTO_BUDGET", "0.05")
    registry._announce.cache_clear()
    tuning._notice.cache_clear()
    calls = []
    real = tuning.measure

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "measure", counted)
    return calls


def _stub_costs(monkeypatch, cost: dict[tuple[str, str], float] | None = None):
    """Each (op, backend) function loaded through the registry advances a fake clock by its cost (seconds, default
    1) and runs for real. Returns the clock to hand to ``auto.choose`` and the set of (op, backend) pairs that ran."""
    now, ran = [0.0], set()
    real_load = registry._load

    def load(op, backend):
        fn = real_load(op, backend)

        def timed(*args, **kwargs):
            now[0] += (cost or {}).get((op, backend), 1.0)
            ran.add((op, backend))
            return fn(*args, **kwargs)
        return timed

    monkeypatch.setattr(registry, "_load", load)
    return (lambda: now[0]), ran


def test_second_run_reads_the_cache_and_times_nothing(timing, capsys):
    first = auto.choose(registry.OPS, CASE, "cpu")
    assert timing, "the first run timed nothing"
    assert set(first) == set(registry.OPS) and set(first.values()) <= set(auto.candidates("cpu"))
    timing.clear()
    registry._announce.cache_clear()
    assert auto.choose(registry.OPS, CASE, "cpu") == first
    assert not timing, f"the second run timed {len(timing)} calls instead of reading the cache"
    err = capsys.readouterr().err
    assert err.count("gpt2_kernels: auto on ") == 2 and "from the cache" in err.splitlines()[-1]


def test_another_torch_version_measures_again(timing, monkeypatch, tmp_path):
    auto.choose(["mlp"], CASE, "cpu")
    timing.clear()
    monkeypatch.setattr(tuning, "versions", lambda: "torch=0.0.0 triton=none gpt2_kernels=0.1.0")
    auto.choose(["mlp"], CASE, "cpu")
    assert timing, "a key with other versions was read from the cache"
    keys = list(json.loads((tmp_path / "auto.json").read_text()))
    assert len(keys) == 2 and sum("torch=0.0.0" in k for k in keys) == 1


def test_another_shape_or_mode_measures_again(timing):
    auto.choose(["layer_norm"], CASE, "cpu")
    for other in (auto.Case(2, 8, 32, 2, 64), auto.Case(1, 8, 32, 2, 64, mode="eval")):
        timing.clear()
        auto.choose(["layer_norm"], other, "cpu")
        assert timing, f"{other} was taken from another case's entry"


@pytest.mark.parametrize("broken", ["corrupt", "unreadable"])
def test_a_broken_cache_file_is_a_notice_never_a_crash(timing, tmp_path, capsys, broken):
    path = tmp_path / "auto.json"
    if broken == "corrupt":
        path.write_text('{"half an entry": ')
    else:
        path.mkdir()  # reading a folder fails with an OSError, as would a file without read permission
    picks = auto.choose(["layer_norm"], CASE, "cpu")
    assert picks["layer_norm"] in auto.candidates("cpu")
    notices = [line for line in capsys.readouterr().err.splitlines() if "ignoring the cache" in line]
    assert len(notices) == 1, notices
    if broken == "corrupt":  # rewritten whole by the store
        assert len(json.loads(path.read_text())) == 1


_WRITER = textwrap.dedent("""
    import os, sys, time
    import torch
    from gpt2_kernels import auto
    torch.set_num_threads(1)
    go = sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.005)
    for batch in range(int(sys.argv[1]), int(sys.argv[1]) + 8):
        auto.decide(["layer_norm", "add_layer_norm"], auto.Case(batch, 4, 16, 2, 32), "cpu")
""")


def test_two_processes_storing_at_once_keep_every_entry(tmp_path):
    env = dict(os.environ, GPT2_KERNELS_CACHE_DIR=str(tmp_path), GPT2_KERNELS_AUTO="measure",
               GPT2_KERNELS_AUTO_BUDGET="0.001", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               GPT2_KERNELS_NO_EXT="1")  # two candidates (torch, native) are enough to store, and quicker
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(start), str(go)], env=env, stderr=subprocess.PIPE,
                              text=True) for start in (1, 100)]
    go.touch()  # both start storing together, once both have imported torch and are polling
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    data = json.loads((tmp_path / "auto.json").read_text())
    assert len(data) == 2 * 8 * 2, f"{32 - len(data)} of 32 entries lost"


def test_a_backend_that_raises_is_skipped_with_its_reason(timing, monkeypatch, capsys):
    real_load = registry._load

    def load(op, backend):
        if (op, backend) == ("mlp", "native"):
            def broken(*args, **kwargs):
                raise RuntimeError("planted failure\nsecond line")
            return broken
        return real_load(op, backend)

    monkeypatch.setattr(registry, "_load", load)
    picks = auto.choose(["mlp"], CASE, "cpu")
    assert picks["mlp"] != "native"
    err = capsys.readouterr().err
    assert "native skipped: RuntimeError: planted failure" in err and "second line" not in err
    stored = next(iter(json.loads((tuning.cache_dir() / "auto.json").read_text()).values()))
    assert stored["skipped"] == {"native": "RuntimeError: planted failure"} and "native" not in stored["seconds"]


def test_the_fastest_by_the_clock_is_picked(timing, monkeypatch, capsys):
    cands = auto.candidates("cpu")
    assert len(cands) >= 2, cands
    # A different winner per op, each the cheapest by the stub clock however slow it really is.
    winners = {op: cands[i % len(cands)] for i, op in enumerate(registry.OPS)}
    cost = {(op, b): (0.001 if b == w else 0.002 + 0.001 * j) for op, w in winners.items()
            for j, b in enumerate(cands)}
    clock, _ = _stub_costs(monkeypatch, cost)
    assert auto.choose(registry.OPS, CASE, "cpu", clock=clock) == winners
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"layer_norm={winners['layer_norm']} (1 ms) over " in line, line


def test_explicit_backends_are_never_timed_nor_replaced(timing, monkeypatch):
    _, ran = _stub_costs(monkeypatch)
    chosen = registry.resolve("auto,mlp=torch", "cpu", CASE)
    assert chosen["mlp"] == "torch"
    assert {op for op, _ in ran} == set(registry.OPS) - {"mlp"}, "mlp=torch was timed"
    ran.clear()
    timing.clear()
    assert registry.resolve("ext", "cpu", CASE) == {op: "ext" for op in registry.OPS}
    assert not timing and not ran, "an explicit backend was timed"


def test_fixed_mode_times_nothing_and_takes_the_fixed_order(timing, monkeypatch):
    monkeypatch.setenv("GPT2_KERNELS_AUTO", "fixed")
    assert registry.resolve("auto", "cpu", CASE) == {op: registry.fixed_auto("cpu") for op in registry.OPS}
    assert not timing
    monkeypatch.setenv("GPT2_KERNELS_AUTO", "sometimes")
    with pytest.raises(registry.SpecError, match="GPT2_KERNELS_AUTO must be 'measure' or 'fixed'"):
        registry.resolve("auto", "cpu", CASE)


def test_triton_is_never_a_candidate_on_the_cpu():
    assert "triton" not in auto.candidates("cpu")  # its interpreter runs there (conftest), far too slow to compete
    assert {"torch", "native"} <= set(auto.candidates("cpu"))


_RANKS = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    import gpt2_kernels.registry as registry
    from gpt2_kernels import auto
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Each rank's stub clock makes another backend the fastest: only a broadcast of rank 0's choice agrees.
    favourite = ["native", "torch"][rank]
    now, real_load = [0.0], registry._load
    def load(op, backend):
        fn = real_load(op, backend)
        def timed(*args, **kwargs):
            now[0] += 0.001 if backend == favourite else 0.01
            return fn(*args, **kwargs)
        return timed
    registry._load = load
    picks = auto.choose(registry.OPS, auto.Case(1, 8, 32, 2, 64), "cpu", clock=lambda: now[0])
    print("PICKS", rank, json.dumps(picks), flush=True)
    dist.destroy_process_group()
""")


def test_every_rank_takes_rank_0_s_choice(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               GPT2_KERNELS_AUTO="measure", GPT2_KERNELS_CACHE_DIR=str(tmp_path / "cache"),
               GPT2_KERNELS_AUTO_BUDGET="0.01", GPT2_KERNELS_NO_EXT="1")  # candidates torch and native
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script)]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    picks = {int(line.split()[1]): json.loads(line.split(" ", 2)[2]) for line in res.stdout.splitlines()
             if line.startswith("PICKS")}
    assert picks[0] == picks[1] == {op: "native" for op in registry.OPS}, picks
    assert res.stderr.count("gpt2_kernels: auto on ") == 1, "more than rank 0 said what it chose"


def test_the_model_times_its_first_eager_call_once(timing, capsys):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=16))
    idx = torch.randint(0, 512, (2, 16))
    assert model._auto_pending
    _, loss = model(idx, idx)
    assert timing and not model._auto_pending
    picks = dict(model.ops.backends)
    loss.backward()
    timing.clear()
    model(idx, idx)
    assert not timing, "a second forward timed again"
    twin = GPT(GPTConfig.from_preset("tiny", block_size=16))
    twin(idx, idx)
    assert not timing and twin.ops.backends == picks, "a model of the same shapes did not take the cached choice"
    assert capsys.readouterr().err.count("gpt2_kernels: auto on ") == 2  # measured, then from the cache
    keys = json.loads((tuning.cache_dir() / "auto.json").read_text())
    assert all("| train |" in k for k in keys) and len(keys) == len(registry.OPS)


def test_the_model_times_decoding_as_decoding(timing):
    from gpt2.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_preset("tiny", block_size=16)).eval()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2, greedy=True)
    keys = list(json.loads((tuning.cache_dir() / "auto.json").read_text()))
    assert keys and all("| decode |" in k for k in keys), keys
    assert not any("linear_cross_entropy" in k for k in keys), "decoding timed the loss head it never runs"
    assert any("attention | B=1 nh=2 Tq=1 Tk=5 " in k for k in keys), keys  # one query over prompt + new tokens


def test_nothing_is_timed_while_compiling(timing):
    from gpt2.model import GPT, GPTConfig

    torch._dynamo.reset()
    model = GPT(GPTConfig.from_preset("tiny", block_size=16)).set_backend("auto")  # provisional: the fixed order
    model.check_inputs = False
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))
    torch._dynamo.reset()
    assert not timing and model._auto_pending, "timed inside torch.compile's trace"
    assert set(model.ops.backends.values()) == {registry.fixed_auto("cpu")}


def test_gpt2_tune_prints_every_op_and_backend(timing, capsys):
    from gpt2.cli import main

    assert main(["tune", "--preset", "tiny", "--batch-size", "1", "--block-size", "8", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("auto on ") and "train B=1 T=8 C=64" in out[0]
    header = out[1].split()
    assert header == ["op", *auto.candidates("cpu"), "pick"]
    rows = {line.split()[0]: line.split() for line in out[2:2 + len(registry.OPS)]}
    assert set(rows) == set(registry.OPS)
    for cells in rows.values():
        assert cells[-1] in auto.candidates("cpu") and sum(c.endswith("*") for c in cells) == 1, cells
