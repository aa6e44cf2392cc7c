"""`ExamplesDataModule`: a prompt/completion datamodule over examples held in memory.

For data made at run time rather than by a task: Trans-LoRA's synthetic sets and its yes/no
discriminator data, or a handful of seed examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_peft.tasks.base import PromptCompletionDataModule
from lightning_peft.tasks.data import Example

__all__ = ["ExamplesDataModule"]


class ExamplesDataModule(PromptCompletionDataModule):
    """A prompt/completion datamodule over examples given in memory (synthetic sets, yes/no data).

    Args:
        tokenizer: As for every task.
        train: Training examples.
        val, test: Optional evaluation examples (empty: no loader).
        **kwargs: The other :class:`PromptCompletionDataModule` arguments (``batch_size``, ...).
    """

    task_name = "examples"

    def __init__(self, tokenizer: Any, train: Sequence[Example], val: Sequence[Example] = (),
                 test: Sequence[Example] = (), **kwargs: Any) -> None:
        if not train:
            raise ValueError("ExamplesDataModule needs at least one training example; got an empty train list.")
        super().__init__(tokenizer, num_train=len(train), num_val=len(val), num_test=len(test), **kwargs)
        # save_hyperparameters (in the base) picked up the example lists: loggers cannot store
        # frozen dataclasses, and the sizes are already there as num_train/num_val/num_test
        for split in ("train", "val", "test"):
            self.hparams.pop(split, None)
            self._hparams_initial.pop(split, None)
        self._splits = {"train": list(train), "val": list(val), "test": list(test)}

    def build_splits(self) -> dict[str, list[Example]]:
        return self._splits
