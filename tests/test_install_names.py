"""The import names this project installs are its own: none is the import name of another installed distribution
(Hugging Face's ``kernels``, which transformers 5.x depends on, took ``kernels`` from us once), and next to it the
other package still imports as itself.

The names come from the installed distributions' metadata (``top_level.txt``, else their files), the way Python finds
who owns a module, so the next clash with any dependency fails here rather than on a user's machine.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

DIST = "gpt2-kernels"
REPO = Path(__file__).resolve().parents[1]


def _ours() -> list[str]:
    try:
        top = md.distribution(DIST).read_text("top_level.txt")
    except md.PackageNotFoundError:
        pytest.fail(f"the {DIST} distribution is not installed; install it as README.md says (pip install -e '.[dev]')")
    names = sorted(set((top or "").split()))
    assert names, f"{DIST} declares no top-level import names"
    return names


def test_installed_import_names_are_ours_alone():
    owners = md.packages_distributions()
    ours = _ours()
    assert set(ours) == {"gpt2", "gpt2_kernels"}, ours
    clashes = {name: sorted(set(owners.get(name, [])) - {DIST}) for name in ours}
    clashes = {name: others for name, others in clashes.items() if others}
    assert not clashes, f"import names {DIST} installs that other installed distributions install too: {clashes}"


def test_kernels_from_the_checkout_root_is_not_ours():
    """From the checkout's root (the current directory first on sys.path, as ``python -c`` or a notebook started
    there has it), ``import kernels`` is never this project's folder: kernels/ has no __init__.py, so an installed
    package of that name wins, and ours is only ever gpt2_kernels."""
    code = ("import importlib.util, sys; spec = importlib.util.find_spec('kernels');"
            "print('regular' if spec is not None and spec.origin not in (None, 'namespace') else 'namespace-or-none');"
            "import gpt2_kernels.registry as r; print(r.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    kind, ours = out.split()
    assert ours == "gpt2_kernels.registry"
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the folder shadow `kernels`"
    if "kernels" in md.packages_distributions():  # Hugging Face's package is installed: it is what imports
        assert kind == "regular", "`import kernels` from the checkout's root does not find the installed package"
