"""A disk that fills up during a checkpoint: one line naming the file, the free space and the size needed, exit
status 3, and the previous checkpoint whole, so ``--resume`` continues from it.

The filesystem is "filled" by a stub under ``os.fdopen`` whose files raise ENOSPC once one file passes 64 KB: the
run's small files (config.json) still fit, the checkpoint does not, and ``torch.save`` meets the error inside its
own writer, as on a real full disk (where it wraps it in ``RuntimeError: [enforce fail at inline_container.cc]``).
"""

from __future__ import annotations

import errno
import io
import os

import pytest
from test_train import make_shard, tiny_args

from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOM = 64 * 1024  # bytes one file may take before the "disk" is full


class _FullDisk(io.RawIOBase):
    """A binary file that takes ROOM bytes, then fails as a full filesystem does."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def writable(self):
        return True

    def write(self, b):
        if self.n + len(b) > ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.n += len(b)
        return self.f.write(b)

    def fileno(self):
        return self.f.fileno()

    def flush(self):
        self.f.flush()

    def close(self):
        super().close()  # flushes first
        self.f.close()


def test_disk_full_during_checkpoint_says_one_line_and_keeps_the_previous(tmp_path, monkeypatch, capsys):
    shard = make_shard(tmp_path / "toy.bin")
    out = tmp_path / "run"
    assert main(tiny_args(shard, out, "--stop-at", "8")) == 0
    good = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()

    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and "b" in mode else f

    with monkeypatch.context() as m:
        m.setattr(os, "fdopen", fdopen)
        status = main(["train", "--resume", "--out-dir", str(out), "--max-iters", "16"])
    err = capsys.readouterr().err
    assert status == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len([ln for ln in lines if "error" in ln]) == 1, err
    line = lines[-1]
    assert str(out / "ckpt.pt") in line and "no space left" in line, line
    assert " MB free" in line and " MB needed" in line, line
    assert (out / "ckpt.pt").read_bytes() == good  # the previous checkpoint, byte for byte
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    assert load_checkpoint(out)["step"] == 8

    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "16"]) == 0
    assert load_checkpoint(out)["step"] == 16
