"""Data loading that resumes exactly, mid-epoch and across epoch boundaries.

Lightning saves and restores the state of any train dataloader that has
``state_dict``/``load_state_dict`` (``torchdata``'s ``StatefulDataLoader``). Its default
shuffling restores the current epoch but draws later epochs from a generator state that
differs from an uninterrupted run (measured: the first batch after the epoch boundary
differs). :class:`ResumableRandomSampler` makes the permutation of epoch ``e`` a pure
function of ``(seed, e)``, so a run resumed at any step sees the same batches as one that
never stopped.

:func:`first_batches` takes a fixed handful of batches of a datamodule's split, as the drift
analyses compare models on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


class ResumableRandomSampler(Sampler[int]):
    """Shuffles ``range(n)`` with ``randperm(seed + epoch)``; state = (epoch, position).

    Args:
        n: Dataset length.
        seed: Shuffling seed (the permutation of epoch ``e`` uses ``seed + e``).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        while self.position < self.n:
            self.position += 1
            yield order[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def resumable_loader(dataset: Dataset, batch_size: int, seed: int = 0, **kwargs: Any) -> StatefulDataLoader:
    """A shuffling ``StatefulDataLoader`` whose order survives a resume at any step."""
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=ResumableRandomSampler(len(dataset), seed), **kwargs)


def first_batches(datamodule: L.LightningDataModule, split: str, num_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_batches`` batches of ``datamodule``'s ``split`` loader, tensors only, on CPU.

    Args:
        datamodule: Any LightningDataModule (set up here for the split's stage).
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_batches: How many batches (fewer if the split is shorter).

    Raises:
        ValueError: an unknown split, or the split is empty.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    datamodule.setup("fit" if split in ("train", "val") else "test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    batches = list(itertools.islice(loader, num_batches))
    if not batches:
        raise ValueError(
            f"the datamodule's {split!r} split is empty; choose another split (e.g. split=train) or give it examples "
            f"(e.g. task.num_{split}=64)"
        )
    return [{k: v.cpu() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches]
