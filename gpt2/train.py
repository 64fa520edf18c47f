"""Training loop for ``gpt2 train`` (work in progress)."""

from __future__ import annotations


def add_args(parser) -> None:
    """Add the ``train`` flags to ``parser``."""


def run(args) -> int:
    """Run ``gpt2 train``; returns the exit status."""
    raise NotImplementedError("gpt2 train is not implemented yet")
