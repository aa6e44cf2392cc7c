"""The README's two set-up commands and CI's command stay in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    if not (ROOT / "README.md").is_file():
        pytest.skip("not a source checkout")
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands_ci_runs_the_test_one() -> None:
    install_and_run, install_and_test = _readme_commands()
    assert install_and_run.startswith("pip install torch==2.13.0 && ") and install_and_run.endswith("lightning-peft evolve")
    assert install_and_test.startswith("pip install torch==2.13.0 && ") and install_and_test.endswith("pytest")
    assert install_and_test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(re.findall(r'"(lightning_peft[\w.]*)"', (ROOT / "pyproject.toml").read_text()))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lightning_peft").rglob("__init__.py")}
    found |= {"lightning_peft.kernels", "lightning_peft.conf"}
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"


def test_the_kernels_folder_never_shadows_hugging_faces_kernels() -> None:
    """From a checkout's root `kernels/` is importable as top-level `kernels`: transformers must still get its own.

    transformers >= 5.25 depends on Hugging Face's `kernels` and imports it with `transformers`; run from the
    root (`python -m ...`, a REPL) that import used to find this folder and fail on a missing name.
    """
    import subprocess
    import sys

    code = (
        "import importlib.metadata, os, lightning_peft, transformers.integrations.hub_kernels, kernels\n"
        "import lightning_peft.kernels as k\n"
        "assert hasattr(k, 'sddmm') and not hasattr(kernels, 'sddmm')\n"
        "try:\n    importlib.metadata.distribution('kernels')\nexcept importlib.metadata.PackageNotFoundError:\n"
        "    pass\nelse:  # Hugging Face's package is installed: `kernels` is it\n"
        f"    assert not os.path.abspath(kernels.__file__).startswith({str(ROOT / 'kernels')!r}), kernels.__file__\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "zoo", "list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0 and "llama-v1" in cli.stdout, cli.stderr[-2000:]

