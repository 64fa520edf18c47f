"""What the package measures once per device and remembers on disk: the one cache and the one timer.

Two things are decided by timing on the device at hand rather than by a fixed table: which backend ``auto`` runs
for each op (``gpt2_kernels.registry``) and which tile configuration a Triton op launches. Both keep their answers in
one JSON file per kind under the user's cache folder, keyed by what makes a measurement stale: the device's name,
the versions of torch, Triton and this package, and the case itself (op, shape, dtype, mode). A later run reads the
answer and decides at once.

The cache never breaks a run: a file that is corrupt or unreadable is ignored with a one-line notice (and rewritten
on the next store), and a store that fails says so once and carries on. Stores go through a temporary file and an
atomic rename under an advisory lock, so two processes storing at once leave a readable file holding both entries.

``GPT2_KERNELS_CACHE_DIR`` moves the folder (default ``$XDG_CACHE_HOME/gpt2_kernels``, else
``~/.cache/gpt2_kernels``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

__all__ = ["DiskCache", "cache_dir", "device_name", "measure", "versions"]

VERSION = "0.1.0"  # this package's version, part of every key (setup.py says the same)


def cache_dir() -> Path:
    """The folder of the cache files (created on the first store)."""
    explicit = os.environ.get("GPT2_KERNELS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt2_kernels"


@functools.cache
def versions() -> str:
    """``torch=X triton=Y gpt2_kernels=Z``: the part of every key that a new install changes."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no Triton (e.g. macOS): the key says so
        triton_version = "none"
    return f"torch={torch.__version__} triton={triton_version} gpt2_kernels={VERSION}"


def device_name(device) -> str:
    """A device's model as a key: ``NVIDIA H100 80GB HBM3``, or the CPU's model name and thread count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} x{torch.get_num_threads()}"


@functools.cache
def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def _notice(message: str) -> None:
    print(message, file=sys.stderr)


class DiskCache:
    """A JSON object ``{key: value}`` in ``cache_dir() / name``.

    Args:
        name: the file name, e.g. ``"auto.json"``.
        directory: where the file lives (default ``cache_dir()``, read when the cache is used).
    """

    def __init__(self, name: str, directory: Path | None = None):
        self.name = name
        self._directory = directory

    @property
    def path(self) -> Path:
        return (self._directory or cache_dir()) / self.name

    def load(self) -> dict:
        """Every entry; ``{}`` when the file is missing, and ``{}`` with a notice when it cannot be read."""
        path = self.path
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            _notice(f"gpt2_kernels: ignoring the cache {path}: cannot read it ({e.strerror or e})")
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            _notice(f"gpt2_kernels: ignoring the cache {path}: not valid JSON ({e}); it is rewritten on the next store")
            return {}
        if not isinstance(data, dict):
            _notice(f"gpt2_kernels: ignoring the cache {path}: it holds a {type(data).__name__}, not an object")
            return {}
        return data

    def get(self, key: str):
        """The value stored under ``key``, or None."""
        return self.load().get(key)

    def put(self, key: str, value) -> bool:
        """Store ``value`` (JSON-serialisable) under ``key``, keeping every other entry; True when it was written."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path.with_name(path.name + ".lock")):
                data = self.load()
                data[key] = value
                fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as e:
            _notice(f"gpt2_kernels: cannot store the cache {path} ({e.strerror or e}); measuring again next run")
            return False
        return True


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An advisory lock on ``lock_path`` where the platform has one (fcntl), so read-merge-write is not lost."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone still leaves a readable file
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measure(fn: Callable[[], object], device, warmup: int = 1, reps: int = 3,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of one call of ``fn`` on ``device``, after ``warmup`` calls.

    On a CUDA device the time is the device's (a synchronize before and after each call, so the host's queue does
    not hide or lend time); on the CPU, wall time. ``clock`` lets a test stand in its own time source.
    """
    import torch

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    times.sort()
    return times[len(times) // 2]
