"""Static GPU-readiness report: compile every Triton launch configuration ahead of time, with no GPU.

Each Triton op module lists, through ``launch_configs(cc)`` (see ``kernels/aot.py``), every
configuration its launchers may launch on compute capability ``cc``. For each architecture asked
for, this module compiles every one of them down to a cubin with Triton's own pipeline and
Triton's bundled ``ptxas``, then reads back:

- shared memory per block: Triton's dynamic allocation plus any static shared memory of the cubin,
  against the architecture's per-block opt-in limit (what the driver enforces at launch);
- registers per thread, stack frame, and register spill bytes (stores / loads) as ``ptxas -v``
  reports them (counted from the local-memory instructions of the SASS when that log is absent);
- tensor-core instructions, counted in the PTX and named by the SASS they become: ``HMMA`` (``mma.sync``,
  sm_75+) and ``HGMMA`` (Hopper's ``wgmma.mma_async``, sm_90a).

A configuration fails when it does not compile, exceeds the shared-memory limit or spills; the
command then exits non-zero. Tensor-core counts are reported, not enforced: Triton >= 3.2 lowers
``tl.dot`` to FMA below sm_80 (its MMA path there is deprecated), so sm_75 shows none.

Recorded launches (``--launches``, and ``tests/test_report.py`` on every CI run) are compiled as they were
specialised: every launch goes through ``gpt2_kernels.runtime.launch``, which records, as Triton's JIT does, which
integers were 1 (constants) and which integers and pointers were divisible by 16; ``configs_from_launches`` gives
each the tiles its op module's ``launch_configs(cc)`` picks on each architecture.

Each listed kernel is compiled as the JIT would specialize it at GPT-2 shapes: pointer and integer
arguments divisible by 16 (torch allocations are 16-byte aligned; GPT-2's sizes and strides are
multiples of 16). That variant vectorizes and software-pipelines its loads, so it is the heaviest in
shared memory. A signature type may override this per argument, as Triton's AOT tool writes it:
``"i32:16"`` (divisible by 16) or ``"i32:1"`` (no assumption). Usage::

    python -m gpt2_kernels.report                          # every op module, sm_75 sm_80 sm_86 sm_89 sm_90
    python -m gpt2_kernels.report --arch sm_80,sm_90       # some architectures
    python -m gpt2_kernels.report --module attention       # one op module alone
    python -m gpt2_kernels.report --json report.json       # also write every number as JSON
    python -m gpt2_kernels.report --launches launches.json # compile recorded launches (gpt2_kernels.runtime.record_launches)

Compilation runs in a pool of freshly spawned processes with ``TRITON_INTERPRET`` removed from
their environment: a kernel defined while the interpreter was on (as under the CPU test suite) is
an interpreted function that cannot be compiled, so each worker re-imports the op modules itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from .runtime import ARCHS as RUNTIME_ARCHS

OP_MODULES = ("gpt2_kernels.attention", "gpt2_kernels.layer_norm", "gpt2_kernels.mlp", "gpt2_kernels.linear_cross_entropy")
ARCHS = (75, 80, 86, 89, 90)

# Per-block opt-in shared memory, bytes, from the one architecture table (gpt2_kernels.runtime.ARCHS).
SHARED_LIMIT = {cc: RUNTIME_ARCHS[cc].shared for cc in ARCHS}


# The NVIDIA tools the report needs; Triton ships them in triton/backends/nvidia/bin.
TOOLS = ("ptxas", "cuobjdump")

# One SASS instruction line of cuobjdump: "/*0130*/  @!P1 STL.64 [R1+0x190], R194 ;".
_SASS_LINE = re.compile(
    r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", re.MULTILINE
)
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_TTIR_DOT = re.compile(r"\btt\.dot(?:_scaled)?\b")
# Bytes moved by one local-memory instruction, from its width suffix (plain STL/LDL move 32 bits).
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass
class Result:
    """What the report found for one launch configuration on one architecture.

    ``shared_dynamic`` is Triton's allocation (``metadata.shared``), ``shared_static`` the cubin's own
    static shared memory (the driver requires their sum to fit the opt-in limit). Spills are bytes of
    spill stores / loads per thread. ``tensor_cores`` maps SASS opcode -> instruction count (from the PTX). ``dots``
    counts ``tt.dot`` ops in the kernel's Triton IR (after inlining its helpers). ``error`` is set when
    the configuration could not be listed or compiled; the other numbers are then meaningless.
    """

    module: str
    label: str
    arch: int
    kernel: str = ""
    num_warps: int = 0
    num_stages: int = 0
    pointer_dtypes: list = field(default_factory=list)
    shared_dynamic: int = 0
    shared_static: int = 0
    shared_limit: int = 0
    registers: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    spill_source: str = ""
    tensor_cores: dict = field(default_factory=dict)
    dots: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    error: str | None = None

    @property
    def recorded(self) -> bool:
        """Whether this configuration came from a recorded launch (``configs_from_launches``), not the listing."""
        return self.label.startswith(RECORDED)

    @property
    def shared(self) -> int:
        """Shared memory one block needs, bytes."""
        return self.shared_dynamic + self.shared_static

    @property
    def tensor_core_count(self) -> int:
        return sum(self.tensor_cores.values())

    @property
    def problems(self) -> list:
        """Why this configuration is not ready for its architecture (empty when it is)."""
        if self.error is not None:
            return [self.error]
        out = []
        if self.shared > self.shared_limit:
            out.append(f"needs {self.shared} B of shared memory, sm_{self.arch} allows {self.shared_limit} B per block")
        if self.spill_stores or self.spill_loads:
            out.append(f"spills registers ({self.spill_stores} B stores / {self.spill_loads} B loads per thread)")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------------------------
# Finding the tools and naming things (parent process, which never imports the op modules).


def tool_path(name: str) -> str | None:
    """Path of NVIDIA tool ``name``: ``TRITON_<NAME>_PATH``, then Triton's bundled copy, then ``PATH``."""
    env = os.environ.get(f"TRITON_{name.upper().replace('-', '_')}_PATH")
    candidates = [env] if env else []
    spec = importlib.util.find_spec("triton")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates.append(os.path.join(root, "backends", "nvidia", "bin", name))
    candidates.append(shutil.which(name))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def missing_tools() -> list:
    """Names of the tools (and packages) the report needs but cannot find here."""
    missing = [] if importlib.util.find_spec("triton") is not None else ["the 'triton' package"]
    return missing + [t for t in TOOLS if tool_path(t) is None]


def parse_arch(text: str) -> int:
    """``"sm_80"``, ``"80"`` or ``"8.0"`` -> 80; raises ValueError naming the supported ones."""
    t = text.strip().lower()
    t = t.removeprefix("sm_").removesuffix("a").replace(".", "")
    if not t.isdigit() or int(t) not in SHARED_LIMIT:
        supported = ", ".join(f"sm_{a}" for a in SHARED_LIMIT)
        raise ValueError(f"gpt2_kernels.report: unsupported architecture {text!r}; supported: {supported}")
    return int(t)


def module_name(text: str) -> str:
    """``"attention"`` -> ``"gpt2_kernels.attention"``; a dotted or other name is kept as it is."""
    t = text.strip()
    return f"gpt2_kernels.{t}" if f"gpt2_kernels.{t}" in OP_MODULES else t


def _load_configs(module: str, cc: int) -> list:
    """``module.launch_configs(cc)``, checked; raises with a message naming the module and the problem."""
    from .aot import LaunchConfig

    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise RuntimeError(f"cannot import op module {module!r} ({type(e).__name__}: {e})") from e
    fn = getattr(mod, "launch_configs", None)
    if not callable(fn):
        raise TypeError(f"op module {module!r} has no launch_configs(cc) function (see kernels/aot.py)")
    try:
        configs = list(fn(cc))
    except Exception as e:
        raise RuntimeError(f"{module}.launch_configs({cc}) raised {type(e).__name__}: {e}") from e
    if not configs:
        raise RuntimeError(f"{module}.launch_configs({cc}) returned no configurations")
    for c in configs:
        if not isinstance(c, LaunchConfig):
            raise TypeError(
                f"{module}.launch_configs({cc}) returned a {type(c).__name__}, not a gpt2_kernels.aot.LaunchConfig"
            )
    return configs


def _list_one(module: str, cc: int) -> tuple:
    """([(label, key), ...] of the configurations to compile, None), or (None, why they cannot be listed), where
    configurations with equal keys compile to the same kernel. Runs in a worker."""
    try:
        return [(c.label, _config_key(c)) for c in _worker_configs(module, cc)], None
    except (RuntimeError, TypeError) as e:  # a failure to list is a finding of the report, never a skip
        return None, str(e)


def _config_key(cfg) -> str | None:
    """What the compiled kernel depends on, with every alignment assumption spelled out (None: not compilable)."""
    if cfg.kernel is None or not hasattr(cfg.kernel, "arg_names"):
        return None
    sig = []
    for i, n in enumerate(cfg.kernel.arg_names):
        if n in cfg.signature:
            ty, hint = _split_type(cfg.signature[n])
            sig.append([n, ty, hint if hint is not None else _aligned_by_default(cfg.kernel, i, ty)])
    const = sorted((n, str(v)) for n, v in cfg.constexprs.items())
    return json.dumps([cfg.kernel.__name__, sig, const, cfg.num_warps, cfg.num_stages])


# ----------------------------------------------------------------------------------------------
# Compiling one configuration (worker process; the Triton interpreter is off there).


_LAUNCHES: list | dict | None = None  # in a worker: recorded launches to compile (a dict: per architecture)
_LISTED = True  # in a worker: compile the listed configurations too


def _init_worker(cache_dir: str, launches: list | None = None, listed: bool = True) -> None:
    global _LAUNCHES, _LISTED
    _LAUNCHES, _LISTED = launches, listed
    os.environ.pop("TRITON_INTERPRET", None)
    # A fresh cache makes every compile run ptxas, whose -v log (registers, spills) Triton prints on request.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    warnings.filterwarnings("ignore", category=UserWarning, module=r"triton(\.|$)")
    import triton.compiler  # noqa: F401 - paid once here rather than inside the first job's timing


@functools.cache
def _worker_configs(module: str, cc: int) -> tuple:
    configs = _load_configs(module, cc)
    launches = _LAUNCHES.get(cc, []) if isinstance(_LAUNCHES, dict) else _LAUNCHES
    recorded = [] if launches is None else configs_from_launches(
        [r for r in launches if r["module"] == module], configs, module, cc)
    return tuple((configs if _LISTED else []) + recorded)


# ----------------------------------------------------------------------------------------------
# Recorded launches (gpt2_kernels.runtime.record_launches): what real launches specialise, compiled with the tiles
# the op module's launch_configs(cc) picks on each architecture.


def launches_to_json(records) -> list:
    """``gpt2_kernels.runtime.LaunchRecord`` s -> distinct JSON-able dicts, in a stable order."""
    rows = {}
    for r in records:
        row = {"module": r.kernel.fn.__module__, "kernel": r.name, "signature": [list(x) for x in r.signature],
               "constexprs": [list(x) for x in r.constexprs]}
        rows[json.dumps(row, sort_keys=True)] = row
    return [rows[k] for k in sorted(rows)]


def _is_tile(name: str) -> bool:
    # Block shapes differ between the interpreter and each GPU; everything else must match the real launch.
    return name.startswith(("BLOCK_", "GROUP_"))


def _pointer_types(signature) -> dict:
    return {n: _split_type(t)[0] for n, t in dict(signature).items() if str(t).startswith("*")}


RECORDED = "recorded: "  # the label prefix of a configuration made from a recorded launch


def _with_bf16_twins(launches: list) -> list:
    """Each fp16 launch, plus the same launch in bf16: what a bf16 run on the GPU specialises (same shapes and
    alignment) but the interpreter, which has no bf16, cannot record."""
    out = list(launches)
    for rec in launches:
        if any(str(t).startswith("*fp16") for _, t in rec["signature"]):
            sig = [[n, str(t).replace("*fp16", "*bf16", 1)] for n, t in rec["signature"]]
            out.append({**rec, "signature": sig})
    return out


def configs_from_launches(launches: list, listed: list, module: str, cc: int) -> list:
    """One ``LaunchConfig`` per recorded launch (and its bf16 twin from sm_80), with the tiles this architecture
    would give it.

    The launch gives the specialisation: its signature (alignment as the JIT saw it) and its integers equal to 1
    (constexprs). The block shapes, warps and stages come from the configuration ``launch_configs(cc)`` lists for the
    same kernel, pointer dtypes and non-tile constexprs (HEAD, DROPOUT, EPILOGUE, ...), preferring one listed with
    the same integers equal to 1 (a launcher may pick tiles by size), else the first: the launcher's own choice for
    such a launch. Every listed configuration is compiled in its aligned form by the listing pass anyway.
    A launch that nothing listed matches becomes a config with ``kernel=None``, which the report shows as an error:
    ``launch_configs`` misses a launch the op really makes.
    """
    from .aot import LaunchConfig
    from .runtime import _params

    out, seen = [], set()
    for rec in _with_bf16_twins(launches) if cc >= 80 else launches:
        const_names = {n for n, const, *_ in _params(_kernel_named(module, rec["kernel"])) if const}
        flags = {n: v for n, v in rec["constexprs"] if n in const_names and not _is_tile(n)}
        ones = {n: v for n, v in rec["constexprs"] if n not in const_names}
        pointers = _pointer_types(rec["signature"])
        same = [c for c in listed if getattr(c.kernel, "__name__", None) == rec["kernel"]
                and _pointer_types(c.signature) == pointers and all(c.constexprs.get(n) == v for n, v in flags.items())]
        # the launcher picks tiles by size too (one row: the small tiles): prefer a listing with the same constants 1
        match = next((c for c in same if {n for n in c.constexprs if n not in const_names} == set(ones)),
                     same[0] if same else None)
        spec = " ".join(f"{n}=1" for n in ones) or "no ints = 1"
        unaligned = [n for n, t in rec["signature"] if str(t).endswith(":1")]
        what = (f"{rec['kernel']} {'/'.join(sorted(set(pointers.values())))} "
                f"{' '.join(f'{n}={v}' for n, v in flags.items())} [{spec}; unaligned: {','.join(unaligned) or '-'}]")
        if match is None:
            out.append(LaunchConfig(label=f"{RECORDED}{what}: no launch_configs entry matches this recorded launch",
                                    kernel=None, signature={}))
            continue
        tiles = {n: v for n, v in match.constexprs.items() if _is_tile(n)}
        key = json.dumps([rec["kernel"], rec["signature"], sorted({**flags, **ones, **tiles}.items())], default=str)
        if key in seen:
            continue
        seen.add(key)
        label = (f"{RECORDED}{what} {' '.join(f'{n}={v}' for n, v in tiles.items())} "
                 f"w{match.num_warps}s{match.num_stages}")
        out.append(LaunchConfig(label=label, kernel=match.kernel, signature=dict(rec["signature"]),
                                constexprs={**flags, **ones, **tiles}, num_warps=match.num_warps,
                                num_stages=match.num_stages))
    return out


def _kernel_named(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _check_config(cfg, cc: int) -> list:
    """The kernel's argument names in order; raises ValueError on a config that does not fit its kernel."""
    kernel = cfg.kernel
    if kernel is None:
        raise ValueError(cfg.label)
    if type(kernel).__name__ == "InterpretedFunction":
        raise ValueError(f"{cfg.label!r}: kernel was defined under TRITON_INTERPRET=1 and cannot be compiled")
    names = list(getattr(kernel, "arg_names", None) or [])
    if not names or not hasattr(kernel, "fn"):
        raise ValueError(f"{cfg.label!r}: kernel {kernel!r} is not a @triton.jit function")
    sig, const = dict(cfg.signature), dict(cfg.constexprs)
    given = list(sig) + list(const)
    missing = [n for n in names if n not in sig and n not in const]
    unknown = [n for n in given if n not in names]
    twice = [n for n in sig if n in const]
    if missing or unknown or twice:
        raise ValueError(
            f"{cfg.label!r}: signature/constexprs do not match {kernel.__name__}({', '.join(names)}):"
            f" missing {missing}, unknown {unknown}, in both {twice}"
        )
    if cc < 80 and any("bf16" in _split_type(t)[0] for t in sig.values()):
        raise ValueError(f"{cfg.label!r}: bf16 argument listed for sm_{cc}, which has no bf16 support (use fp16)")
    return names


def _split_type(ty: str) -> tuple:
    """``"i32:16"`` -> (``"i32"``, True); ``"*fp16:1"`` -> (``"*fp16"``, False); ``"i32"`` -> (``"i32"``, None)."""
    base, _, hint = str(ty).partition(":")
    return base.strip(), (hint.strip() == "16") if hint else None


def _aligned_by_default(kernel, index: int, ty: str) -> bool:
    """Whether the JIT would specialize this argument as divisible by 16 when the value allows it.

    Pointers from torch allocations are 16-byte aligned and the strides and sizes of GPT-2 are multiples
    of 16, so a launch at those shapes runs the "divisible by 16" variant (the one that vectorizes and
    software-pipelines its loads, the heaviest in shared memory). Floats are never specialized, nor are
    arguments marked ``do_not_specialize``.
    """
    if not (ty.startswith("*") or ty[:1] in ("i", "u")):
        return False
    params = getattr(kernel, "params", None)
    param = params[index] if params and index < len(params) else None
    if getattr(param, "do_not_specialize", False):
        return False
    return not (ty.startswith("*") and getattr(param, "do_not_specialize_on_alignment", False))


def _compile(cfg, cc: int, names: list) -> tuple:
    """Compile ``cfg`` for ``sm_<cc>`` (``sm_90a`` for 90, as Triton picks); returns (compiled, ptxas log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    divisible = backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]
    # Triton >= 3.3 wants every argument in the signature, constexprs typed "constexpr", keyed by position.
    signature, attrs = {}, {}
    for i, n in enumerate(names):
        if n in cfg.constexprs:
            signature[n] = "constexpr"
            continue
        ty, hint = _split_type(cfg.signature[n])
        signature[n] = ty
        if hint if hint is not None else _aligned_by_default(cfg.kernel, i, ty):
            attrs[(i,)] = divisible
    constexprs = {(names.index(n),): v for n, v in cfg.constexprs.items()}
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target, options=options)
    return compiled, log.getvalue()


# PTX matrix instructions and the SASS tensor-core opcodes ptxas turns them into (f16/bf16 operands).
_PTX_TENSOR_CORE = {"HMMA": re.compile(r"^\s*mma\.sync\.", re.MULTILINE),
                    "HGMMA": re.compile(r"^\s*wgmma\.mma_async\.", re.MULTILINE)}


def ptx_tensor_core_ops(ptx: str) -> dict:
    """Tensor-core instructions of a kernel, counted in its PTX: ``mma.sync`` (HMMA in the SASS) and
    ``wgmma.mma_async`` (HGMMA). Read from the PTX rather than a SASS dump, which costs a quarter of a compile."""
    counts = {op: len(rx.findall(ptx)) for op, rx in _PTX_TENSOR_CORE.items()}
    return {op: n for op, n in counts.items() if n}


def sass_opcodes(sass: str) -> dict:
    """Count SASS instructions by opcode (without modifiers); local-memory bytes under ``"STL bytes"``/``"LDL bytes"``."""
    counts: dict = {}
    for op, mods in _SASS_LINE.findall(sass):
        counts[op] = counts.get(op, 0) + 1
        if op in ("STL", "LDL"):
            width = next((_WIDTH[m] for m in mods.split(".") if m in _WIDTH), 4)
            key = f"{op} bytes"
            counts[key] = counts.get(key, 0) + width
    return counts


def _cuobjdump(cubin: bytes, sass: bool) -> str:
    """``cuobjdump -res-usage`` (and ``-sass``, which runs nvdisasm: ~0.2 CPU s) of one cubin."""
    path = tool_path("cuobjdump")
    if path is None:
        raise RuntimeError("cuobjdump not found (looked in triton/backends/nvidia/bin and PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        cmd = [path, "-res-usage", *(["-sass"] if sass else []), f.name]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({out.returncode}): {out.stderr.strip()[:500]}")
    return out.stdout


def _cpu_time() -> float:
    """CPU seconds used so far by this process and its finished children (ptxas, cuobjdump)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _compile_one(job: tuple) -> Result:
    module, cc, index, label = job
    res = Result(module=module, label=label, arch=cc, shared_limit=SHARED_LIMIT[cc])
    start, cpu_start = time.perf_counter(), _cpu_time()
    try:
        cfg = _worker_configs(module, cc)[index]
        if cfg.label != label:
            raise RuntimeError(f"{module}.launch_configs({cc}) is not deterministic: {label!r} became {cfg.label!r}")
        res.kernel = getattr(cfg.kernel, "__name__", str(cfg.kernel))
        res.num_warps, res.num_stages = cfg.num_warps, cfg.num_stages
        types = [_split_type(t)[0] for t in cfg.signature.values()]
        res.pointer_dtypes = sorted({t[1:] for t in types if t.startswith("*")})
        names = _check_config(cfg, cc)
        compiled, log = _compile(cfg, cc, names)
        res.shared_dynamic = int(compiled.metadata.shared)
        ttir = compiled.asm.get("ttir")
        res.dots = len(_TTIR_DOT.findall(ttir or ""))
        spills = _PTXAS_SPILLS.search(log)
        # Triton emits tensor-core instructions only for tt.dot: a kernel without one needs no SASS dump, unless
        # the spills must be counted from it.
        # The SASS dump (nvdisasm, a quarter of a compile's time) only when ptxas logged no spill counts.
        dump = _cuobjdump(compiled.asm["cubin"], sass=spills is None)
        usage = _RESOURCES.search(dump)
        if usage is None:
            raise RuntimeError("cuobjdump printed no resource usage for the cubin")
        res.registers, res.stack_bytes, res.shared_static = int(usage[1]), int(usage[2]), int(usage[3])
        ops = sass_opcodes(dump)
        res.tensor_cores = ptx_tensor_core_ops(compiled.asm.get("ptx", ""))
        if spills is not None:
            res.spill_stores, res.spill_loads, res.spill_source = int(spills[1]), int(spills[2]), "ptxas"
        else:  # no ptxas log from this Triton: every local-memory access of a Triton kernel is a spill
            res.spill_stores, res.spill_loads = ops.get("STL bytes", 0), ops.get("LDL bytes", 0)
            res.spill_source = "sass"
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a finding of the report
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        res.error = f"{type(e).__name__}: " + (" | ".join(lines[:3]) if lines else repr(e))[:600]
    res.seconds, res.cpu_seconds = time.perf_counter() - start, _cpu_time() - cpu_start
    return res


# ----------------------------------------------------------------------------------------------
# Running the whole report.


@contextlib.contextmanager
def _interpreter_off():
    """Keep TRITON_INTERPRET out of the environment the spawned workers inherit."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def run_report(
    modules: Iterable = OP_MODULES,
    archs: Iterable = ARCHS,
    workers: int | None = None,
    progress: Callable | None = None,
    launches: list | None = None,
    listed: bool = True,
) -> list:
    """Compile every launch configuration of ``modules`` for every arch in ``archs``.

    Args:
        modules: importable module names, each defining ``launch_configs(cc)``.
        archs: compute capabilities, e.g. ``(75, 80, 86, 89, 90)``.
        workers: size of the process pool (default ``os.cpu_count()``).
        progress: called with each ``Result`` as it completes (e.g. to print a dot).
        launches: recorded launches (``launches_to_json``), compiled with the tiles each module's
            ``launch_configs(cc)`` picks (``configs_from_launches``); their results have ``recorded`` set. A dict
            ``{cc: launches}`` compiles other launches for each architecture (none for an arch it leaves out).
        listed: compile the listed configurations too. A recorded launch that compiles to the same kernel as a
            listed configuration is compiled once and reported under both labels.

    Returns:
        list of ``Result``: listing errors first, then one per (config, arch) in listing order.

    The workers are spawned processes, which re-import the caller's main module: a script that calls
    this needs the usual ``if __name__ == "__main__":`` guard.
    """
    modules, archs = [module_name(m) for m in modules], [parse_arch(str(a)) for a in archs]
    workers = max(1, workers or os.cpu_count() or 1)
    ctx = multiprocessing.get_context("spawn")  # a fork would inherit interpreted kernels
    results, done = [], {}
    with contextlib.ExitStack() as stack:  # (one "with" of three managers needs Python >= 3.10)
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="kernels-report-"))
        stack.enter_context(_interpreter_off())
        pool = stack.enter_context(
            concurrent.futures.ProcessPoolExecutor(workers, ctx, _init_worker, (cache, launches, listed)))
        # The configurations are listed in a worker too: an op module may pick other tiles under the interpreter.
        listing = {(m, cc): pool.submit(_list_one, m, cc) for m in modules for cc in archs}
        jobs, same_as = [], {}
        for (module, cc), fut in listing.items():
            entries, error = fut.result()
            if error is not None:
                results.append(Result(module=module, label=f"{module} (launch_configs)", arch=cc, error=error))
                continue
            first = {}
            for i, (label, key) in enumerate(entries):
                job = (module, cc, i, label)
                jobs.append(job)
                if key is not None and key in first:
                    same_as[job] = first[key]  # compiles to the same kernel: compiled once
                elif key is not None:
                    first[key] = job
        futures = {pool.submit(_compile_one, job): job for job in jobs if job not in same_as}
        for fut in concurrent.futures.as_completed(futures):
            job = futures[fut]
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 - the worker died (e.g. a crash inside the compiler)
                res = Result(module=job[0], label=job[3], arch=job[1], error=f"worker failed: {e!r}")
            done[job] = res
            if progress is not None:
                progress(res)
    for job, first in same_as.items():
        done[job] = dataclasses.replace(done[first], label=job[3])
    return results + [done[job] for job in jobs]


def _fmt_tc(res: Result) -> str:
    return " ".join(f"{op}:{n}" for op, n in res.tensor_cores.items()) or "-"


def format_table(results: list) -> str:
    """The report as a text table, one row per (config, arch), then every problem spelled out."""
    head = ("config", "arch", "shared used/limit", "regs", "spill st/ld", "tensor cores", "status")
    rows = []
    for r in results:
        if r.error is not None:
            rows.append((r.label, f"sm_{r.arch}", "-", "-", "-", "-", "ERROR"))
            continue
        pct = 100.0 * r.shared / r.shared_limit
        shared = f"{r.shared}/{r.shared_limit} ({pct:.0f}%)"
        status = (
            "ok"
            if r.ok
            else ",".join(
                s for s, bad in (("SMEM", r.shared > r.shared_limit), ("SPILL", r.spill_stores or r.spill_loads)) if bad
            )
        )
        spill = f"{r.spill_stores}/{r.spill_loads}"
        rows.append((r.label, f"sm_{r.arch}", shared, str(r.registers), spill, _fmt_tc(r), status))
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    bad = [r for r in results if not r.ok]
    if bad:
        lines.append("")
        lines.append("problems:")
        lines.extend(f"  {r.label} on sm_{r.arch}: {'; '.join(r.problems)}" for r in bad)
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2_kernels.report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=",".join(f"sm_{a}" for a in ARCHS), help="comma-separated, e.g. sm_80,sm_90")
    p.add_argument(
        "--module",
        action="append",
        help="op module to check alone (attention, layer_norm, mlp, linear_cross_entropy, or a dotted module name);"
        " repeatable or comma-separated; default: all four",
    )
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON to FILE")
    p.add_argument("--launches", metavar="FILE",
                   help="compile these recorded launches (JSON from launches_to_json of gpt2_kernels.runtime."
                        "record_launches()) with each architecture's tiles, instead of the listed configurations")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: os.cpu_count())")
    args = p.parse_args(argv)
    try:
        archs = [parse_arch(a) for a in args.arch.split(",") if a.strip()]
    except ValueError as e:
        p.error(str(e))
    modules = [m for spec in args.module or [",".join(OP_MODULES)] for m in spec.split(",") if m.strip()]
    missing = missing_tools()
    if missing:
        print(f"gpt2_kernels.report: cannot compile for NVIDIA GPUs here, missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    launches = None
    if args.launches:
        try:
            with open(args.launches) as f:
                launches = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--launches {args.launches}: {e}")
        if not isinstance(launches, list) or not all(isinstance(r, dict) and "kernel" in r for r in launches):
            p.error(f"--launches {args.launches}: not a list of recorded launches (gpt2_kernels.report.launches_to_json)")
    results = run_report(
        modules, archs, workers=args.workers, progress=lambda r: print(".", end="", file=sys.stderr, flush=True),
        launches=launches, listed=launches is None,
    )
    wall = time.perf_counter() - start
    print(file=sys.stderr)
    print(format_table(results))
    n_bad = sum(not r.ok for r in results)
    workers = max(1, min(args.workers or os.cpu_count() or 1, len(results)))
    print(
        f"\n{len(results)} configurations x architectures, {n_bad} with problems;"
        f" {wall:.1f} s wall on {workers} worker processes ({sum(r.cpu_seconds for r in results):.1f} CPU s of compiling)"
    )
    if args.json:
        with open(args.json, "w") as f:
            rows = [dict(asdict(r), shared=r.shared, ok=r.ok, problems=r.problems) for r in results]
            json.dump({"archs": archs, "modules": [module_name(m) for m in modules], "results": rows}, f, indent=1)
    return 1 if n_bad else 0


if __name__ == "__main__":
    # Run the importable copy of this module, so the worker processes unpickle gpt2_kernels.report.* names.
    sys.exit(importlib.import_module("gpt2_kernels.report").main())
