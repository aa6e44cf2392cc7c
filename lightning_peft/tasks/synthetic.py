"""`SyntheticTask`: tasks generated in code from the zoo's world.

A seeded stream of candidate examples is split by a hash of each prompt: an example always
lands in the same split whatever ``data_seed`` and the split sizes are, so splits are
disjoint across seeds too, and the test set does not move when ``num_train`` changes.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from lightning_peft.tasks.base import PromptCompletionDataModule
from lightning_peft.tasks.data import Example
from lightning_peft.zoo.world import World, make_world

# Share of the prompt space that belongs to each split (by prompt hash).
SPLIT_SHARES = (("test", 0.1), ("val", 0.1), ("train", 0.8))


def split_of(task_name: str, prompt: str) -> str:
    """The split a prompt belongs to: a pure function of the task name and the prompt."""
    digest = hashlib.sha256(f"{task_name}\x00{prompt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, share in SPLIT_SHARES:
        edge += share
        if u < edge:
            return split
    return SPLIT_SHARES[-1][0]


class SyntheticTask(PromptCompletionDataModule):
    """A task whose examples are generated from `lightning_peft.zoo.world.make_world`.

    Subclasses implement `generate` (one random example). See
    `PromptCompletionDataModule` for the arguments.

    Raises:
        ValueError: ``num_train`` is None, or the world has too few distinct examples for
            the requested sizes (the message says how many were found).
    """

    task_name = "synthetic"

    def __init__(self, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        if self.num_train is None:
            raise ValueError(
                f"num_train must be a number for the generated task {self.task_name!r}, got None; "
                "None (all rows) only applies to hf_dataset"
            )
        self._world: World | None = None

    @property
    def world(self) -> World:
        """The world the examples talk about."""
        if self._world is None:
            self._world = make_world(self.world_version, self.world_seed, self.world_scale)  # type: ignore[arg-type]
        return self._world

    def generate(self, rng: random.Random) -> Example:
        """Draw one random example about `world` using only ``rng``."""
        raise NotImplementedError(f"{type(self).__name__} must implement generate()")

    def build_splits(self) -> dict[str, list[Example]]:
        """Fill each split with distinct examples from the seeded stream, by prompt hash."""
        want = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        splits: dict[str, list[Example]] = {s: [] for s in want}
        seen: set[str] = set()
        rng = random.Random(f"{self.task_name}/{self.data_seed}")
        total = sum(want.values())  # type: ignore[arg-type]
        max_draws = 20 * total + 10_000
        stale_limit = 20_000  # draws without a new prompt before the space counts as exhausted
        draws = since_new = 0
        while draws < max_draws and since_new < stale_limit:
            if all(len(splits[s]) >= want[s] for s in want):  # type: ignore[operator]
                break
            draws += 1
            ex = self.generate(rng)
            if ex.prompt in seen:
                since_new += 1
                continue
            since_new = 0
            seen.add(ex.prompt)
            split = split_of(self.task_name, ex.prompt)
            if len(splits[split]) < want[split]:  # type: ignore[operator]
                splits[split].append(ex)
        short = {s: len(splits[s]) for s in want if len(splits[s]) < want[s]}  # type: ignore[operator]
        if short:
            raise ValueError(
                f"task {self.task_name!r} asks for {want} examples but world {self.world_version} (scale "
                f"{self.world_scale}) yields only {short} distinct ones after {draws} draws; "
                "lower num_train/num_val/num_test or raise world_scale"
            )
        return splits
