"""Tile lists (issue 21 item 2): each Triton op picks among a short list per architecture row by timing on the device
the first time a shape bucket is met (``gpt2_kernels.runtime.pick_tiles``), cached in memory and in ``tiles.json``;
under the interpreter, on the CPU and while a CUDA graph is captured only the first entry runs, untimed.

No GPU here: the tuner is driven with a stand-in CUDA device and a stub timer (``tuning.measure``); the ops
themselves run under the interpreter.
"""

from __future__ import annotations

import json

import pytest
import torch

from gpt2_kernels import layer_norm as LN
from gpt2_kernels import runtime, tuning

CUDA = torch.device("cuda", 0)
TILES = ((64, 4), (128, 8), (32, 2))  # the stub timer below makes (128, 8) the fastest


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A stand-in GPU as far as the tuner asks, a fresh cache folder, and a stub timer that reads each entry's
    time from ``times`` and counts its calls in ``timed``."""
    monkeypatch.setenv("GPT2_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(runtime, "_CHOSEN", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "device_name", lambda device: "Stand-in GPU")
    state = {"times": {(64, 4): 3e-6, (128, 8): 1e-6, (32, 2): 2e-6}, "timed": []}

    def stub_measure(fn, device, warmup=1, reps=3, clock=None):
        assert torch.device(device).type == "cuda"
        return fn()  # run() below returns the entry's time

    def run(tiles):
        state["timed"].append(tiles)
        return state["times"][tiles]

    monkeypatch.setattr(tuning, "measure", stub_measure)
    state["run"] = run
    state["path"] = tmp_path / "tiles.json"
    return state


def _pick(state, bucket=("rows", 1024), dtype=torch.float16, tiles=TILES, device=CUDA):
    return runtime.pick_tiles("test kernel", tiles, device, bucket, dtype, state["run"])


def test_the_fastest_entry_is_picked_and_cached(gpu):
    assert _pick(gpu) == (128, 8)
    assert sorted(gpu["timed"]) == sorted(TILES)  # each entry timed once
    assert _pick(gpu) == (128, 8)
    assert len(gpu["timed"]) == len(TILES), "the second call timed again"
    (key, value), = json.loads(gpu["path"].read_text()).items()
    assert "Stand-in GPU" in key and tuning.versions() in key and "test kernel" in key and "rows 1024" in key
    assert key.endswith("fp16") and value["tiles"] == str((128, 8)) and set(value["us"]) == {str(t) for t in TILES}


def test_each_bucket_and_dtype_is_timed_once(gpu):
    _pick(gpu)
    _pick(gpu, bucket=("rows", 2048))
    _pick(gpu, dtype=torch.bfloat16)
    _pick(gpu, bucket=("rows", 2048))
    assert len(gpu["timed"]) == 3 * len(TILES)
    assert len(json.loads(gpu["path"].read_text())) == 3


def test_a_new_process_reads_the_disk_cache_without_timing(gpu, monkeypatch):
    _pick(gpu)
    monkeypatch.setattr(runtime, "_CHOSEN", {})  # what a new process starts with
    gpu["times"] = {t: 1.0 for t in TILES}  # a timing now would pick the first entry
    assert _pick(gpu) == (128, 8)
    assert len(gpu["timed"]) == len(TILES)


def test_a_cached_entry_no_longer_listed_is_timed_again(gpu, monkeypatch):
    _pick(gpu)
    monkeypatch.setattr(runtime, "_CHOSEN", {})
    shorter = ((64, 4), (32, 2))  # (128, 8) left the list: the stored choice is stale
    assert _pick(gpu, tiles=shorter) == (32, 2)
    assert gpu["timed"][len(TILES):] == list(shorter)


def test_an_entry_triton_refuses_on_the_gpu_is_left_out_with_a_warning(gpu):
    """A later entry that needs more shared memory than the GPU has (what Triton raises before launching) is timed as
    infinitely slow, named in a warning, and stored as refused; the next fastest wins."""
    from triton.runtime.errors import OutOfResources

    run = gpu["run"]

    def refuse_the_fastest(tiles):
        if tiles == (128, 8):
            raise OutOfResources(232448, 101376, "shared memory")
        return run(tiles)

    gpu["run"] = refuse_the_fastest
    with pytest.warns(RuntimeWarning, match=r"test kernel tiles \(128, 8\) cannot run on Stand-in GPU.*OutOfResources"):
        assert _pick(gpu) == (32, 2)
    (value,) = json.loads(gpu["path"].read_text()).values()
    assert value["tiles"] == str((32, 2)) and value["us"][str((128, 8))] is None


def test_the_first_entry_refused_is_an_error(gpu):
    """The first entry is what every untimed launch (a CPU, a CUDA graph capture) takes: Triton refusing it raises."""
    from triton.runtime.errors import OutOfResources

    def refuse_the_first(tiles):
        if tiles == TILES[0]:
            raise OutOfResources(232448, 101376, "shared memory")
        return 1e-6

    gpu["run"] = refuse_the_first
    with pytest.raises(OutOfResources):
        _pick(gpu)
    assert not gpu["path"].exists()


@pytest.mark.parametrize("where", ["cpu", "interpreter", "capture", "one entry"])
def test_only_the_first_entry_runs_untimed(gpu, monkeypatch, where):
    device, tiles = CUDA, TILES
    if where == "cpu":
        device = torch.device("cpu")
    elif where == "interpreter":
        monkeypatch.setattr(runtime, "interpreting", lambda: True)
    elif where == "capture":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    else:
        tiles = TILES[:1]
    assert _pick(gpu, tiles=tiles, device=device) == TILES[0]
    assert gpu["timed"] == []
    assert not gpu["path"].exists()


def test_the_interpreter_launches_the_first_entry_of_each_list(monkeypatch):
    """layer_norm's lists have two entries on every device; under the interpreter the launches use the first and
    nothing is timed."""
    def no_timing(*args, **kwargs):
        raise AssertionError("the interpreter timed a tile list")

    monkeypatch.setattr(tuning, "measure", no_timing)
    C = 768  # GPT-2's width: its lists have two entries
    assert len(LN._tile_list(C)) == 2 and len(LN._tile_list(C, backward=True)) == 2
    x = torch.randn(5, C, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    with runtime.record_launches() as records:
        LN.layer_norm(x, w, b).sum().backward()
    got = {r.name: (dict(r.constexprs)["BLOCK_C"], dict(r.constexprs)["BLOCK_R"], r.num_warps) for r in records}
    assert got == {"_layer_norm_fwd_kernel": LN._tile_list(C)[0],
                   "_layer_norm_bwd_kernel": LN._tile_list(C, backward=True)[0]}


def test_layer_norm_tunes_on_a_gpu_and_keeps_its_answer(gpu, monkeypatch):
    """The launcher's own run(): every entry launched (the timing), then the fastest once more; the next call
    launches only the chosen one."""
    launched = []

    def fake_launch(kernel, grid, *args, num_warps, num_stages, **kwargs):
        launched.append((kwargs["BLOCK_C"], kwargs["BLOCK_R"], num_warps))

    slow_first = {}

    def stub_measure(fn, device, warmup=1, reps=3, clock=None):
        before = len(launched)
        fn()
        tile = launched[before]
        return slow_first.setdefault(tile, 2e-6 if not slow_first else 1e-6)  # the first entry is the slower

    monkeypatch.setattr(LN, "launch", fake_launch)
    monkeypatch.setattr(tuning, "measure", stub_measure)
    monkeypatch.setattr(LN, "_check_inputs", lambda *a, **k: None)  # CPU tensors stand in for the GPU's
    monkeypatch.setattr(LN, "pick_tiles", _on_cuda(runtime.pick_tiles))
    x = torch.randn(8, 768)
    first, second = LN._tile_list(768)
    LN.layer_norm_fwd(x, None, None)
    assert launched == [first, second, second]
    LN.layer_norm_fwd(x, None, None)
    assert launched[3:] == [second]


def _on_cuda(pick):
    """pick_tiles as if the tensors were on CUDA device 0 (they are CPU tensors here)."""
    def on_cuda(kernel, tiles, device, bucket, dtype, run):
        return pick(kernel, tiles, CUDA, bucket, dtype, run)
    return on_cuda
