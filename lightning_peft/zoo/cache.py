"""Where the zoo keeps what it builds or fetches: ``$LIGHTNING_PEFT_CACHE/zoo``."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from lightning_peft.atomic import atomic_directory

ZOO_JSON = "zoo.json"  # written last into a built model's folder: its presence means the build finished
WEIGHTS = "model.safetensors"


def cache_root() -> Path:
    """``$LIGHTNING_PEFT_CACHE`` (default ``~/.cache/lightning_peft``): the zoo, fetched data, upgrades."""
    return Path(os.environ.get("LIGHTNING_PEFT_CACHE") or "~/.cache/lightning_peft").expanduser()


def cache_dir() -> Path:
    """The zoo cache: ``$LIGHTNING_PEFT_CACHE/zoo`` (default ``~/.cache/lightning_peft/zoo``)."""
    return cache_root() / "zoo"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def locked_build(target: Path, marker: str, force: bool = False) -> Iterator[Path | None]:
    """Build ``target`` once across processes: yields a temporary folder to write it into, or ``None``.

    Under the per-folder file lock ``.<name>.lock`` beside ``target``: ``None`` when ``target/marker``
    exists (another process finished it while we waited; not with ``force``); otherwise the leftovers
    of killed builds (``.<name>.tmp-*``: we hold the lock) are removed and the block writes into a
    temporary folder that replaces ``target`` only if it succeeds (`atomic_directory`).

    Args:
        target: The cache folder to build.
        marker: The file written last into a finished folder (``zoo.json``, ``source.json``).
        force: Build again even if ``target`` is finished (whatever files it holds are ours).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not force and (target / marker).is_file():
            yield None
            return
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        owned = {p.name for p in target.iterdir()} if target.is_dir() else set()
        with atomic_directory(target, replaceable=owned) as tmp:
            yield tmp
