"""Where and in what precision ``gpt2`` computes, and with whom: the device, the dtype, autocast and the
GradScaler, the distributed set-up under ``torchrun``, and the few collectives the training loop needs.

``start(device, dtype)`` is the one place ``gpt2`` (train, sample, eval) turns ``--device`` and ``--dtype`` into a
``Runtime``. ``--dtype auto`` is ``auto_dtype``, the one rule train, sample, eval, ``gpt2 info`` and the train-step
benchmark share: on GPUs ``gpt2_kernels.runtime.default_dtype``, bfloat16 where they compute in it natively (compute capability 8.0
or newer), float16 with a GradScaler on older GPUs (Turing, where ``torch.cuda.is_bf16_supported()`` says True but
only emulates it, and the Triton kernels refuse it); on the CPU bfloat16 autocast (the weights, gradients and
optimizer state stay float32) where the processor has bf16 arithmetic (AVX-512 BF16 or AMX-BF16 in its
``/proc/cpuinfo`` flags), else float32. Measured on the 2-core EPYC with avx512_bf16 (torch 2.13, backend ext, 2
threads, bench/bench_train_step.py, median step): bf16 autocast against float32, the shakespeare preset on 8 x 128
tokens 284 against 375 ms, GPT-2 124M on 4 x 64 tokens 0.86 against 1.70 s. Without those flags oneDNN converts
bf16 in software (not measured here), so auto keeps float32 there.

``Runtime.shard`` shards a model with FSDP2 (``gpt2 train --fsdp``): parameters, gradients and optimizer state are
split over the processes, each group of parameters gathered whole only while its module computes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import warnings
from dataclasses import dataclass

import torch

from gpt2_kernels.runtime import capability, default_dtype, has_native_bf16

__all__ = ["CPU_BF16_FLAGS", "DTYPES", "Runtime", "auto_dtype", "cpu_flags", "describe_auto_dtype", "dist_env",
           "dtype_unsupported", "fsdp_api", "peak_memory", "resolve_device", "resolve_dtype", "start"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# /proc/cpuinfo flags of x86 CPUs that compute in bfloat16 natively (bf16 dot products, conversions in hardware):
# AVX-512 BF16 (Cooper Lake, Zen 4 and newer) and AMX-BF16 (Sapphire Rapids and newer). Without them oneDNN
# converts to float32 and back around float32 math, slower than float32 alone.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them (the ``flags`` line of ``/proc/cpuinfo``), or None where they
    are unknown: another OS, an unreadable file, or a processor whose kernel lists no ``flags`` (Arm)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """What ``--dtype auto`` computes in on ``device``, and why (a few words for ``gpt2 info``).

    GPUs: ``gpt2_kernels.runtime.default_dtype``. The CPU: bfloat16 (autocast over float32 weights) when ``cpu_flags``
    holds one of ``CPU_BF16_FLAGS``, else float32, unknown flags included.
    """
    if device.type == "cuda":
        cc = capability(device)
        version = f"compute capability {cc // 10}.{cc % 10}"
        if has_native_bf16(device):
            return default_dtype(device), f"{version}: native bfloat16"
        return default_dtype(device), f"{version}: bfloat16 is emulated below 8.0"
    flags = cpu_flags()
    if flags is None:
        return torch.float32, "this CPU's features are unknown (no flags in /proc/cpuinfo)"
    have = [f for f in CPU_BF16_FLAGS if f in flags]
    if have:
        return torch.bfloat16, f"CPU has {' and '.join(have)}"
    return torch.float32, f"no native bf16 on this CPU (neither {' nor '.join(CPU_BF16_FLAGS)})"


def describe_auto_dtype(device: torch.device) -> str:
    """One line: what ``--dtype auto`` picks on ``device`` and why, e.g. ``bfloat16 autocast, float32 weights (CPU
    has avx512_bf16)``."""
    dtype, why = auto_dtype(device)
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float32:
        return f"{name} ({why})"
    scaler = " and a GradScaler" if dtype == torch.float16 else ""
    return f"{name} autocast{scaler}, float32 weights ({why})"


def dist_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when launched by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA if present else CPU. ``cuda`` without a GPU, or a local rank without a GPU of its own
    (more processes than GPUs on this machine), is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__}); "
                         "use --device cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"--device cuda: this process has local rank {local_rank} but the machine has {count} "
                         f"GPU{'s' if count != 1 else ''}; launch torchrun with --nproc_per_node <= {count}, or pass "
                         "--device cpu")
    return torch.device("cuda", local_rank)


def dtype_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``device`` cannot compute in ``dtype`` natively, or None if it can."""
    if dtype == torch.float32:
        return None
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not has_native_bf16(device):
            cc = capability(device)
            return (f"{torch.cuda.get_device_name(device)} ({device}) is compute capability {cc // 10}.{cc % 10}, "
                    "and bfloat16 needs 8.0 or newer; use --dtype float16 (or float32)")
        return None
    # CPU: autocast would emulate a dtype the processor lacks, many times slower than float32.
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        ok = bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        ok = False
    return None if ok else f"this CPU has no native {name} arithmetic; use --dtype float32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> ``auto_dtype(device)``; an explicit dtype the device lacks is an error."""
    if name == "auto":
        return auto_dtype(device)[0]
    dtype = DTYPES[name]
    why = dtype_unsupported(device, dtype)
    if why:
        raise ValueError(f"--dtype {name} on {device.type}: {why}")
    return dtype


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: allocated GPU memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return f"{rss_bytes / 2**30:.2f} GiB rss"


def fsdp_api():
    """FSDP2's ``(fully_shard, MixedPrecisionPolicy)``: in ``torch.distributed.fsdp`` from torch 2.6, in
    ``torch.distributed._composable.fsdp`` in torch 2.5."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


@dataclass(frozen=True)
class Runtime:
    """A process's device, compute dtype and place among the ``world`` processes of a run."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    distributed: bool = False  # a process group was initialised (torchrun), even of one process

    @property
    def master(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def autocast(self):
        """Autocast to the compute dtype; nothing in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled for float16 only (bfloat16 has float32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes (in place under DDP); ``x`` itself in one process. No host read."""
        if self.ddp:
            import torch.distributed as dist

            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (a host-side exchange: call it at checkpoints only)."""
        if not self.ddp:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def shard(self, model: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        """Shard ``model`` in place over this run's processes with FSDP2 (``fully_shard``): each of ``units``
        (submodules that the forward calls as modules) becomes a group of its own, gathered whole just before its
        forward and backward and freed after; the rest of the parameters form the root group, gathered for the
        whole forward. Afterwards every parameter is a DTensor holding this process's shard: build the optimizer
        after this call, so that its state is sharded too.

        Mixed precision: the units' parameters are gathered and computed in the compute dtype (halving the
        all-gathers and the gathered copies in bfloat16); the root's (embeddings, LayerNorms, the tied head) stay
        float32, so the residual stream stays float32 as under DDP with autocast. Gradients are reduced in float32.

        Raises:
            ValueError: no process group (not under torchrun), or float16, whose loss scaler would have to agree
                on overflow across the shards (not supported: use bfloat16 or float32).
        """
        if not self.distributed:
            raise ValueError("--fsdp shards the model over the processes of a torchrun launch; run under torchrun "
                             "(torchrun --nproc-per-node N -m gpt2 train --fsdp ...; N = 1 works) or leave --fsdp out")
        if self.dtype == torch.float16:
            raise ValueError("--fsdp does not support float16 (its loss scaler would have to agree on overflow "
                             "across the shards); use --dtype bfloat16 or float32")
        fully_shard, MixedPrecisionPolicy = fsdp_api()
        low = None if self.dtype == torch.float32 else self.dtype
        # The model's attention and MLP return views (dropout of p=0, .view) that FSDP2 warns could be modified
        # in place; the model never does (the residual adds are out of place, LayerNorm.add).
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for unit in units:
            fully_shard(unit, mp_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32))
        fully_shard(model, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))

    def close(self) -> None:
        """Leave the process group, if this process joined one."""
        if self.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def start(device: str = "auto", dtype: str = "auto", distributed: bool = True) -> Runtime:
    """Resolve ``--device`` and ``--dtype`` and, under torchrun (when ``distributed``), join the process group:
    NCCL on GPUs, gloo on CPUs. Every check that can fail runs before the group is joined.

    Raises:
        ValueError: no GPU for ``--device cuda`` or for this local rank; a dtype the device lacks.
    """
    env = dist_env() if distributed else None
    rank, local_rank, world = env or (0, 0, 1)
    dev = resolve_device(device, local_rank)
    rt = Runtime(dev, resolve_dtype(dtype, dev), rank, local_rank, world, distributed=env is not None)
    if env is not None:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rt
