"""``AdapterCheckpointIO``: checkpoints that are never half-written, even on SIGKILL.

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec
transaction. For local paths fsspec's transaction writes a temporary file made with
``tempfile.mkstemp()`` in the *system* temp folder and then ``shutil.move``s it: when that folder
is on another filesystem (``/tmp`` on tmpfs, checkpoints on a disk) the move is a copy, and a
process killed mid-copy leaves a truncated ``last.ckpt``. Nothing is fsynced either, so a power
loss can leave an empty file after the rename.

Here a local checkpoint is written to a temporary file **in the target folder**, flushed and
fsynced, then ``os.replace``d over the target (atomic on POSIX and Windows) and the folder is
fsynced. A killed run leaves the previous checkpoint intact (plus, at worst, a
``.<name>.tmp-*`` file that the next save of the same name removes). Remote paths (``s3://``
...) keep Lightning's behaviour. Checkpoint *content* is unchanged: adapter-only state dicts come
from the adapter callbacks (:mod:`lightning_peft.checkpointing`), which also store the base
model's fingerprint under ``checkpoint["lightning_peft"]``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

__all__ = ["AdapterCheckpointIO"]


def _is_local(path: str | os.PathLike[str]) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"


class AdapterCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced local checkpoint writes: ``Trainer(plugins=[AdapterCheckpointIO()])``."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed earlier save
            stale.unlink(missing_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
