"""Text generation for ``gpt2 sample`` (work in progress)."""

from __future__ import annotations


def add_args(parser) -> None:
    """Add the ``sample`` flags to ``parser``."""


def run(args) -> int:
    """Run ``gpt2 sample``; returns the exit status."""
    raise NotImplementedError("gpt2 sample is not implemented yet")
