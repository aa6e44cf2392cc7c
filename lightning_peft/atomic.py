"""Atomic writes: a crash mid-save never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], replaceable: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``path`` that replaces ``path`` only if the block succeeds.

    The folder is written beside the target (same filesystem), synced, then swapped in with
    renames; an existing ``path`` survives untouched until the new one is complete, is put
    back if the swap fails, and if the process dies between the two renames it is still
    there under a ``.<name>.old-*`` name.

    Args:
        path: The folder to (re)place.
        replaceable: File names an existing ``path`` may hold; a folder holding anything else
            is never replaced (it is not ours: a run folder, a checkpoint folder).

    Raises:
        FileExistsError: ``path`` is a file, or a folder holding files other than ``replaceable``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; an adapter is saved as a folder. Choose another path.")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in replaceable) if path.is_dir() else []
    if foreign:
        raise FileExistsError(
            f"{path} already holds other files ({', '.join(foreign[:5])}); refusing to replace it. "
            f"Save into a new or empty folder, e.g. {path / 'adapter'}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.parent / f".{path.name}.old-{tag}"
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a synced temporary file in the same folder and a rename.

    A crash mid-write leaves the previous file (or none), never a truncated one. Parent folders
    are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
