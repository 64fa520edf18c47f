"""The extension's CUDA sources compile with nvcc alone, for every GPU generation we target.

``csrc/*.cu`` include only the plain CUDA kernels and launchers (``csrc/*.cuh``, no torch
headers), so this needs the CUDA toolkit but neither a GPU nor a CUDA build of torch. One nvcc
call per .cu file builds device code for sm_75, sm_80, sm_86, sm_89 and sm_90; the test for each
architecture then checks that ptxas compiled every kernel for it without register spills and
within the 48 KiB of static shared memory a block may use. Skipped when nvcc is not found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ARCHS = (75, 80, 86, 89, 90)
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
MAX_STATIC_SMEM = 48 * 1024


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        cand = Path(home) / "bin" / "nvcc"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    """{source name: {arch: [(kernel, ptxas info lines)]}} from one nvcc call per .cu file."""
    assert SOURCES, f"no .cu files in {CSRC}"
    out_dir = tmp_path_factory.mktemp("nvcc")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    reports = {}
    for src in SOURCES:
        # Host code at nvcc's default -O0 (only the device code matters here); ptxas optimises at -O3.
        cmd = [NVCC, "-std=c++17", "-c", str(src), "-o", str(out_dir / (src.stem + ".o")), f"-I{CSRC}",
               "-Xptxas", "-v", "--threads", "2", *gencode]
        proc = subprocess.run(cmd, check=False, cwd=out_dir, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"nvcc failed on {src.name}:\n{proc.stderr[-6000:]}"
        per_arch: dict[int, list] = {a: [] for a in ARCHS}
        current = None
        for line in proc.stderr.splitlines():
            m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
            if m:
                current = (m.group(1), int(m.group(2)))
                per_arch.setdefault(current[1], []).append((current[0], []))
            elif current is not None and ("ptxas info" in line or "spill" in line):
                per_arch[current[1]][-1][1].append(line)
        reports[src.name] = per_arch
    return reports


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_cuda_sources_compile(arch, ptxas_reports):
    for name, per_arch in ptxas_reports.items():
        kernels = per_arch[arch]
        assert kernels, f"{name}: ptxas compiled no kernel for sm_{arch}"
        for kernel, lines in kernels:
            assert lines, f"{name}: no ptxas report for {kernel} on sm_{arch}"
            text = "\n".join(lines)
            spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
            assert not any(spills), f"{name}: {kernel} spills registers on sm_{arch}:\n{text}"
            smem = [int(n) for n in re.findall(r"(\d+) bytes smem", text)]
            assert all(s <= MAX_STATIC_SMEM for s in smem), f"{name}: {kernel} uses {smem} bytes of smem on sm_{arch}"
