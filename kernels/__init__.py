"""Fused GPT-2 kernels behind one registry.

``kernels.ref`` is the plain-PyTorch reference (the ``torch`` backend); Triton kernels live one op
per file (``kernels/attention.py``, ``kernels/layer_norm.py``, ``kernels/mlp.py``,
``kernels/linear_cross_entropy.py``); ``kernels.ext`` wraps the optional C++/CUDA extension.
Importing this package imports neither Triton nor the extension.
"""

from kernels.registry import (
    BACKENDS,
    OPS,
    BackendError,
    Ops,
    SpecError,
    available,
    build_ops,
    parse_spec,
    resolve,
    unavailable_reason,
)

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendError",
    "Ops",
    "SpecError",
    "available",
    "build_ops",
    "parse_spec",
    "resolve",
    "unavailable_reason",
]
