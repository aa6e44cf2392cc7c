"""Where the zoo keeps what it builds or fetches: ``$LIGHTNING_PEFT_CACHE/zoo``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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
