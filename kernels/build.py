"""How the C++/CUDA extension ``gpt2_kernels._C`` is built: its sources and flags, in one place.

Two ways use this module, and both build the same library:

- ``setup.py`` when torch is importable at install time (``pip install --no-build-isolation -e .``): an ahead-of-time
  build into ``kernels/`` (setup.py loads this file by path, so nothing here imports torch at module level);
- ``gpt2_kernels.ext`` on first use otherwise (a plain ``pip install -e .`` builds in an isolated environment without
  torch): ``build_on_first_use`` compiles the extension once with ``torch.utils.cpp_extension.load`` into torch's
  extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and loads it from there on
  every later import, with a one-line notice the first time.

The library must use the C++ standard library that torch uses: a linker that embeds a static copy (seen on a GPU
machine whose ``CC``/``CXX`` pointed at a wrapper compiler that links libstdc++ statically) gives the process two
copies, and the first error message the extension formats crashes the process. ``link_flags`` names torch's shared
libstdc++ to the linker, which prevents that; ``embeds_libstdcxx`` detects such a build anyway, and ``gpt2_kernels.ext``
refuses it with the reason instead of crashing.

``GPT2_KERNELS_NO_EXT=1`` turns off both builds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("ops.cpp", "cpu_kernels.cpp")
CUDA_SOURCES = ("cuda_ops.cpp", "kernels.cu")
# The arches of an ahead-of-time CUDA build when TORCH_CUDA_ARCH_LIST is unset (Turing to Hopper). A build on
# first use compiles for the GPUs present instead (torch's default).
CUDA_ARCHES = "7.5 8.0 8.6 8.9 9.0"
# The module name of a build on first use: unique in torch's shared extension cache.
JIT_NAME = "gpt2_kernels_C"


def disabled() -> bool:
    """True when ``GPT2_KERNELS_NO_EXT`` asks for no extension at all."""
    return os.environ.get("GPT2_KERNELS_NO_EXT", "0") not in ("", "0")


def cxx_flags(with_cuda: bool) -> list[str]:
    """Host compiler flags: -O3 with -fno-trapping-math / -fno-math-errno (not -ffast-math: no reassociation, NaN
    and inf are kept), which let GCC vectorise the kernels' branch-free exp, min / max and selects; OpenMP, since
    ``at::parallel_for`` is an OpenMP region compiled into the caller (serial without it)."""
    if sys.platform == "win32":
        flags = ["/O2", "/openmp"]
    else:
        flags = ["-O3", "-g0", "-fno-trapping-math", "-fno-math-errno"]
        if sys.platform.startswith("linux"):
            flags.append("-fopenmp")
    return flags + (["-DGPT2K_WITH_CUDA"] if with_cuda else [])


def link_flags() -> list[str]:
    """Linker flags: OpenMP on Linux (the extension then uses the libgomp that torch has already loaded), and the
    shared libstdc++ this process has loaded (torch's), named ahead of the driver's own ``-lstdc++`` so that a
    compiler whose default is a static libstdc++ still links the shared one (``embeds_libstdcxx``)."""
    if not sys.platform.startswith("linux"):
        return []
    libstdcxx = _loaded_libstdcxx()
    return ["-fopenmp"] + ([libstdcxx] if libstdcxx else [])


def _loaded_libstdcxx() -> str | None:
    """Path of the libstdc++ shared library mapped into this process, if any (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


NVCC_FLAGS = ["-O3", "-lineinfo"]


def sources(with_cuda: bool) -> list[str]:
    """Absolute paths of the sources (the CUDA ones only ``with_cuda``)."""
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(CSRC / n) for n in names]


def cuda_build_possible() -> tuple[bool, str]:
    """(whether this torch and machine can compile the CUDA kernels, why not if not)."""
    import torch
    import torch.utils.cpp_extension as cpp_ext

    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if cpp_ext.CUDA_HOME is None:
        return False, "no CUDA toolkit (CUDA_HOME) was found"
    return True, ""


def build_on_first_use(log=None):
    """Compile (once, cached by torch) and load the extension from ``csrc/``; returns the module.

    Args:
        log: where the one-line notice goes (default stderr); the compiler's own output is shown only on failure.
    Raises:
        RuntimeError: no sources (an install without the source tree), or the compiler failed (with its reason).
    """
    import torch.utils.cpp_extension as cpp_ext

    log = log or sys.stderr
    if not (CSRC / CPU_SOURCES[0]).is_file():
        raise RuntimeError(f"the C++ sources are not in {CSRC} (an install without the source tree)")
    with_cuda, _ = cuda_build_possible()
    try:  # a private helper of torch's: only the notice depends on it
        build_dir = Path(cpp_ext._get_build_directory(JIT_NAME, verbose=False))
        built = any(build_dir.glob(f"{JIT_NAME}*.so")) or any(build_dir.glob(f"{JIT_NAME}*.pyd"))
    except Exception:  # noqa: BLE001
        build_dir, built = "torch's extension cache", False
    if not built:
        what = "CPU and CUDA kernels" if with_cuda else "CPU kernels"
        print(f"gpt2_kernels: building the C++ extension's {what} once (cached in {build_dir})",
              file=log, flush=True)
    return cpp_ext.load(name=JIT_NAME, sources=sources(with_cuda), extra_cflags=cxx_flags(with_cuda),
                        extra_ldflags=link_flags(), extra_cuda_cflags=NVCC_FLAGS, with_cuda=with_cuda,
                        verbose=False)


def embeds_libstdcxx(path: str) -> bool:
    """True when the shared library ``path`` carries its own copy of the C++ standard library's stream code
    (``std::ostream::_M_insert<long>`` defined inside it) instead of using the one the process shares with torch."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    lib = ctypes.CDLL(path)
    try:
        addr = ctypes.cast(lib["_ZNSo9_M_insertIlEERSoT_"], ctypes.c_void_p).value
    except (AttributeError, KeyError):
        return False

    class _DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    info = _DlInfo()
    libdl = ctypes.CDLL(None)
    if not libdl.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or info.dli_fname is None:
        return False
    return os.path.realpath(info.dli_fname.decode()) == os.path.realpath(path)
