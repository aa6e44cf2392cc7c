"""Data loading that resumes exactly, mid-epoch and across epoch boundaries.

Lightning saves and restores the state of any train dataloader that has
``state_dict``/``load_state_dict`` (``torchdata``'s ``StatefulDataLoader``). Its default
shuffling restores the current epoch but draws later epochs from a generator state that
differs from an uninterrupted run (measured: the first batch after the epoch boundary
differs). :class:`ResumableRandomSampler` makes the permutation of epoch ``e`` a pure
function of ``(seed, e)``, so a run resumed at any step sees the same batches as one that
never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
