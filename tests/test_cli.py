"""The ``gpt2`` command's info and prepare subcommands, and its one-line errors."""

import os
import subprocess
import sys

import numpy as np

from gpt2.cli import main
from gpt2.data import read_shard


def test_info_prints_versions_device_and_table():
    out = subprocess.run([sys.executable, "-m", "gpt2", "info"], capture_output=True, text=True, check=True).stdout
    import torch

    assert f"torch   {torch.__version__}" in out
    assert "triton  " in out and "device  " in out
    for op in ("layer_norm", "attention", "mlp", "linear_cross_entropy"):
        assert op in out
    assert "torch   triton  ext     native  auto" in out


def test_prepare_writes_shards_that_load(tmp_path, capsys):
    src = tmp_path / "book.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["prepare", str(src), "--out", str(tmp_path / "shards"), "--shard-size", "1000"]) == 0
    files = sorted((tmp_path / "shards").glob("*.bin"))
    assert any("val" in f.name for f in files) and sum("train" in f.name for f in files) >= 2
    toks = np.concatenate([read_shard(f) for f in files if "train" in f.name])
    from gpt2.tokenizer import decode

    assert decode(toks[:10].tolist()).startswith("The quick brown fox")


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gpt2", "prepare", str(tmp_path / "missing.txt"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_sets_huge_pages_before_torch_loads():
    """`gpt2` must import without torch, so that its THP_MEM_ALLOC_ENABLE default reaches torch's
    allocator (read once, at torch's first allocation); a value the user set is kept."""
    code = ("import os, sys; import gpt2.cli; assert 'torch' not in sys.modules, 'gpt2.cli imported torch'; "
            "gpt2.cli.allocator_defaults(); print(os.environ['THP_MEM_ALLOC_ENABLE'])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "0", res.stderr
