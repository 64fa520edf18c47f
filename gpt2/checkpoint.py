"""Training checkpoints: atomic writes, safe loads, and the random-number state for exact resume.

A checkpoint (``ckpt.pt`` in a run's out dir) is one ``torch.save`` dict:

- ``model``, ``optimizer``, ``scaler``: their ``state_dict()``;
- ``step``: optimizer steps done; ``last_eval_step``, ``best_val_loss``;
- ``model_config`` (``GPTConfig`` as a dict) and ``train_args`` (the resolved options);
- ``rng``: one entry per rank with the Python, NumPy, torch CPU and CUDA generator states;
- ``data``: ``Batcher.state_dict()`` of the train and evaluation batchers;
- ``world_size`` and ``format`` (``FORMAT``).

A run sharded with FSDP (``gpt2 train --fsdp``) writes the same file: ``gather_full`` assembles whole tensors from
the shards (every process takes part, rank 0 keeps them), and on resume ``shard_optimizer_state`` cuts the whole
optimizer state back into the shards of the parameters it belongs to. So ``gpt2 sample``, ``gpt2 eval`` and
``load_model`` read any checkpoint, and a run may resume with or without ``--fsdp`` whichever way it was written.

``train_args["init_from"]`` names the folder a fine-tune took its first weights from (``--init-from``), or is None.
``open_init_source`` reads such a folder: one of these out dirs, or a Hugging Face GPT-2 folder.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the old file, so
a crash mid-save leaves the previous checkpoint whole. Loads use ``weights_only=True`` (nothing
in a checkpoint runs code) and turn every way a file can be broken into one ``CheckpointError``. A write that runs
out of space raises one ``DiskFullError`` naming the file, the filesystem's free space and the size needed (the
previous file still whole), which ``gpt2`` reports in one line with exit status 3.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2.model import GPT, ConfigError, GPTConfig

FORMAT = 1
CKPT_NAME = "ckpt.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, or from an incompatible run."""


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC or EDQUOT); the file it would have replaced is untouched."""

    def __init__(self, path: Path, needed: int | None):
        free = _free_bytes(path.parent)
        size = f", {_mb(needed)} needed" if needed else ""
        super().__init__(errno.ENOSPC, f"cannot write {path}: no space left on its filesystem ({_mb(free)} free"
                         f"{size}); the previous {path.name} is intact (free some space, then rerun; gpt2 train "
                         "--resume continues from it)")
        self.path, self.free, self.needed = path, free, needed

    def __str__(self) -> str:
        return self.strerror


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mb(n: int | None) -> str:
    return "unknown space" if n is None else f"{n / 1e6:,.1f} MB"


def _out_of_space(e: BaseException) -> bool:
    """Whether ``e`` or an exception it was raised from is ENOSPC / EDQUOT (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a nest of dicts, lists and tuples (about what ``torch.save`` writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_path(path) -> Path:
    """``path`` itself if it is a file (or ends in ``.pt``), else ``path / ckpt.pt``."""
    p = Path(path)
    return p if p.is_file() or p.suffix == ".pt" else p / CKPT_NAME


def atomic_write(path, write, needed=None) -> None:
    """Create ``path`` atomically: ``write(f)`` fills a temp file in the same folder (binary mode),
    which is fsynced and renamed over ``path``. Until the rename the old ``path`` is untouched, and
    if anything fails the temp file is removed.

    Raises:
        DiskFullError: the filesystem filled up; ``needed()`` (if given) estimates the bytes the file needs.
    """
    try:
        _atomic_write(Path(path), write)
    except Exception as e:
        if not _out_of_space(e):
            raise
        raise DiskFullError(Path(path), needed() if needed else None) from None


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not every platform lets a folder be opened for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, state: dict) -> None:
    """Atomically write a checkpoint dict (see the module docstring) to ``path``.

    The previous file at ``path`` stays intact until the new one is completely on disk.
    """
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), needed=lambda: tensor_bytes(state))


_REQUIRED = ("model", "model_config", "step")


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Read a checkpoint written by ``save_checkpoint``.

    Args:
        path: the ``.pt`` file, or a run's out dir holding ``ckpt.pt``.
        map_location: where tensors are loaded (``torch.load``'s argument).
        mmap: map the file instead of reading it: tensors are read when first touched (cheap when only the
            configuration or the weights, not the optimizer state, are wanted).
    Returns:
        The checkpoint dict.
    Raises:
        FileNotFoundError: there is no checkpoint at ``path``.
        CheckpointError: the file is truncated, corrupt, or not one of ours.
    """
    p = checkpoint_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}: nothing to resume or load (train into that --out-dir first)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged file fails in many ways: EOF, unpickling, zip errors
        raise CheckpointError(f"checkpoint {p} is corrupt or truncated and cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        raise CheckpointError(f"{p} is not a gpt2 training checkpoint (it lacks {', '.join(_REQUIRED)})")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {p} has format {ckpt.get('format')!r}; this version reads format {FORMAT}")
    return ckpt


def config_from_checkpoint(ckpt: dict, path="checkpoint") -> GPTConfig:
    """The ``GPTConfig`` a checkpoint was trained with."""
    try:
        return GPTConfig(**ckpt["model_config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: its model configuration is invalid ({e})") from e


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def shape_differences(saved: GPTConfig, wanted: GPTConfig) -> list[str]:
    """``"field=saved (asked wanted)"`` for every shape field (``SHAPE_FIELDS``; not dropout) that differs."""
    return [f"{k}={getattr(saved, k)} (asked {getattr(wanted, k)})" for k in SHAPE_FIELDS
            if getattr(saved, k) != getattr(wanted, k)]


def check_same_shape(saved: GPTConfig, wanted: GPTConfig, path="checkpoint") -> None:
    """Raise ``ConfigError`` naming every shape field where ``wanted`` differs from ``saved``."""
    diff = shape_differences(saved, wanted)
    if diff:
        raise ConfigError(f"checkpoint {path} holds a model of another shape: {', '.join(diff)}; resume with the "
                          "checkpoint's --preset or train into a new --out-dir")


def load_model(path, backend: str = "auto", device="cpu") -> tuple[GPT, dict]:
    """Build the model stored in a training checkpoint.

    Args:
        path: a ``.pt`` file or a run's out dir.
        backend: kernel backend spec for the model, resolved here on ``device`` (an unavailable backend fails now).
        device: where to put it.
    Returns:
        ``(model, checkpoint dict)``; the model is in eval mode.
    """
    p = checkpoint_path(path)
    ckpt = load_checkpoint(p)
    config = config_from_checkpoint(ckpt, p)
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {p}: its weights do not fit its own configuration ({e})") from e
    return model.to(device).eval().set_backend(backend), ckpt


def load_inference_model(ckpt: str | None, pretrained: str | None, backend: str, device) -> GPT:
    """The model of ``gpt2 sample`` / ``gpt2 eval``: a training checkpoint (``ckpt``) or a Hugging Face GPT-2 folder
    (``pretrained``), on ``device`` in eval mode with ``backend`` resolved there."""
    if ckpt:
        return load_model(ckpt, backend=backend, device=device)[0]
    return GPT.from_pretrained(pretrained).to(device).eval().set_backend(backend)


# ----------------------------------------------------------------------------- FSDP: whole tensors from shards


def _is_dtensor(x) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


@torch.no_grad()
def gather_full(state, keep: bool, _seen: dict | None = None):
    """``state`` (a state dict: nested dicts and lists of tensors and plain values) with every DTensor replaced by
    the whole tensor, on the CPU. A collective: every process calls it with the same structure (the same
    ``state_dict()`` of the same sharded model or optimizer), in the same order.

    Args:
        state: e.g. ``model.state_dict(keep_vars=True)`` (so tied parameters are one object, gathered once and
            stored once) or ``optimizer.state_dict()``.
        keep: this process keeps the result (rank 0); the others take part in the gathers and get None.
    """
    seen = {} if _seen is None else _seen
    if isinstance(state, dict):
        out = {k: gather_full(v, keep, seen) for k, v in state.items()}
    elif isinstance(state, (list, tuple)):
        out = type(state)(gather_full(v, keep, seen) for v in state)
    elif _is_dtensor(state):
        if id(state) not in seen:
            whole = state.full_tensor()  # an all-gather
            seen[id(state)] = (state, whole.detach().cpu() if keep else None)  # the key object kept alive
        out = seen[id(state)][1]
    else:
        out = state.detach() if isinstance(state, torch.Tensor) else state
    return out if keep else None


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state dict (``optimizer.state_dict()`` of an unsharded run, or ``gather_full`` of a sharded
    one) made loadable by ``optimizer``, whose parameters are FSDP's DTensors: each per-parameter tensor of its
    parameter's shape is cut like that parameter (scalars such as Adam's ``step`` stay as they are). Parameters are
    matched by position, as ``Optimizer.load_state_dict`` matches them."""
    from torch.distributed.tensor import distribute_tensor

    # Each process holds the whole tensor, so it can take its own piece without a scatter (torch >= 2.6).
    local = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
    saved_ids = [i for g in state["param_groups"] for i in g["params"]]
    params = dict(zip(saved_ids, (p for g in optimizer.param_groups for p in g["params"])))
    out = {}
    for i, per_param in state["state"].items():
        p = params.get(i)

        def cut(v, p=p):
            if p is None or not _is_dtensor(p) or not isinstance(v, torch.Tensor) or v.shape != p.shape:
                return v
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, **local)

        out[i] = {k: cut(v) for k, v in per_param.items()}
    return {**state, "state": out}


# ----------------------------------------------------------------------------- --init-from sources

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class InitSource:
    """Where ``gpt2 train --init-from`` takes its first weights from.

    Attributes:
        path: the ``ckpt.pt`` of a training out dir, or a Hugging Face GPT-2 folder.
        kind: ``"checkpoint"`` or ``"huggingface"``.
        config: the model's shape (dropout 0: a training run sets its own).
    """

    path: Path
    kind: str
    config: GPTConfig

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under ``GPT.state_dict()``'s names and shapes (the vocabulary padded as ``GPT`` pads it);
        only the weights are read, never the optimizer state."""
        if self.kind == "checkpoint":
            return load_checkpoint(self.path, mmap=True)["model"]
        return GPT.from_pretrained(str(self.path), backend="torch").state_dict()


def open_init_source(path) -> InitSource:
    """Find out what an ``--init-from`` path holds and the shape of its model, reading no weights yet.

    A path holding ``ckpt.pt`` (or a ``.pt`` file) is a training checkpoint; else a folder with ``config.json``
    (``model_type`` ``gpt2``) and ``model.safetensors`` or ``pytorch_model.bin`` is a Hugging Face GPT-2.

    Raises:
        FileNotFoundError, ConfigError, CheckpointError: one line starting ``--init-from PATH:``.
    """
    p, flag = Path(path), f"--init-from {path}"
    if not p.exists():
        raise FileNotFoundError(f"{flag}: no such folder")
    if p.is_file() and p.suffix != ".pt":
        raise ConfigError(f"{flag}: expected a folder (a training out dir or a Hugging Face GPT-2 folder) or a "
                          ".pt checkpoint, got another file")
    ckpt_file = checkpoint_path(p)
    if ckpt_file.is_file():
        try:
            ckpt = load_checkpoint(ckpt_file, mmap=True)
        except CheckpointError as e:
            raise CheckpointError(f"{flag}: {e}") from e
        return InitSource(ckpt_file, "checkpoint", config_from_checkpoint(ckpt, ckpt_file))
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{flag}: neither a training out dir (no {CKPT_NAME}) nor a Hugging Face GPT-2 folder "
                          "(no config.json)")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag}: config.json is not valid JSON ({e})") from e
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if kind is None:
        raise ConfigError(f"{flag}: config.json names no model_type, so this is not a Hugging Face GPT-2 folder; "
                          f"nor is it a training out dir (no {CKPT_NAME})")
    if kind != "gpt2":
        raise ConfigError(f"{flag}: config.json describes a {kind!r} model, not a GPT-2 (model_type 'gpt2')")
    if not any((p / name).is_file() for name in HF_WEIGHTS):
        raise ConfigError(f"{flag}: the folder has config.json but no weights ({' or '.join(HF_WEIGHTS)})")
    try:
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"])
    except (KeyError, ConfigError) as e:
        raise ConfigError(f"{flag}: config.json does not describe a usable GPT-2 ({type(e).__name__}: {e})") from e
    return InitSource(p, "huggingface", config)


# ----------------------------------------------------------------------------- random state

def rng_state() -> dict:
    """Every generator this process draws from: Python, NumPy's global, torch CPU and CUDA."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _tuplify(x):
    # random.setstate wants tuples all the way down; a round trip may have turned them into lists.
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
