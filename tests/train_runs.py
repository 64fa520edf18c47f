"""Helpers of the test modules that run ``gpt2 train`` and read what it wrote (imported by name: pytest puts tests/
on the import path).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def records(out: Path) -> list[dict]:
    """Every record of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def metric(out: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every record of a run that has ``key`` (``loss``, ``val_loss``, ``grad_norm``, ...)."""
    return [(r["step"], r[key]) for r in records(out) if key in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv: str) -> str:
    """``torchrun --nproc_per_node=2 -m gpt2 *argv`` on the CPU (gloo, one thread each); its stdout. Fails the test,
    with the output's tail, on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "gpt2", *argv]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout
