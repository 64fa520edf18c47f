"""GPT-2's byte-pair-encoding tokenizer, built offline from ranks shipped with the package.

tiktoken normally downloads the GPT-2 ranks on first use; here they ship as package data
(``gpt2/assets/gpt2.tiktoken``) and are checked against their known sha256 before use, so
tokenization needs no network at all.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import tiktoken

# sha256 of the GPT-2 ("r50k_base") ranks file, the hash tiktoken itself expects.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, other, whitespace).
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _load_ranks(data: bytes) -> dict[bytes, int]:
    import base64

    ranks = {}
    for line in data.splitlines():
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, ``<|endoftext|>`` = 50256), built with no network.

    Raises:
        RuntimeError: the shipped ranks file is missing or its hash does not match.
    """
    try:
        data = resources.files("gpt2").joinpath("assets/gpt2.tiktoken").read_bytes()
    except FileNotFoundError as e:
        raise RuntimeError("gpt2 tokenizer: the packaged ranks file assets/gpt2.tiktoken is missing; "
                           "reinstall the package") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"gpt2 tokenizer: assets/gpt2.tiktoken has sha256 {digest}, expected {RANKS_SHA256}; "
                           "the file is corrupt")
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=_PAT,
        mergeable_ranks=_load_ranks(data),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )
    return enc


def encode(text: str) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` in the text is encoded as the special token."""
    return get_encoding().encode(text, allowed_special={EOT_TOKEN})


def decode(ids) -> str:
    """Text of a sequence of token ids (invalid UTF-8 is replaced, as when streaming)."""
    return get_encoding().decode(list(ids), errors="replace")
