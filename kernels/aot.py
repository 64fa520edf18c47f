"""What a Triton op module tells the static GPU-readiness report (``python -m gpt2_kernels.report``).

Each Triton op module (``kernels/attention.py``, ``kernels/layer_norm.py``, ``kernels/mlp.py``,
``kernels/linear_cross_entropy.py``) defines

    def launch_configs(cc: int) -> list[LaunchConfig]

returning *every* configuration its launchers may launch on a GPU of compute capability ``cc``
(75, 80, 86, 89, 90): one entry per kernel x dtype x block-size / num_warps / num_stages choice
that the launcher (or its pruned autotune list) can pick there. The report compiles each one
ahead of time for that architecture, with no GPU, and checks shared memory and spills.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LaunchConfig:
    """One compilable launch of one ``@triton.jit`` kernel.

    Attributes:
        label: short human name, e.g. ``"attention fwd fp16 BLOCK_M=128 BLOCK_N=64 HEAD=64"``.
        kernel: the ``@triton.jit`` function object.
        signature: every non-constexpr argument name -> Triton type string, in the kernel's
            argument order: pointers as ``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*i64"``;
            scalars as ``"i32"``, ``"i64"``, ``"fp32"``.
        constexprs: every ``tl.constexpr`` argument name -> its value for this launch.
        num_warps, num_stages: as the launcher passes them.
    """

    label: str
    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
