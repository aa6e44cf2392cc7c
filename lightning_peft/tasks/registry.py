"""The task registry: names -> `PromptCompletionDataModule` classes."""

from __future__ import annotations

import difflib
from typing import Any

from lightning_peft.tasks.arithmetic import ArithmeticTask
from lightning_peft.tasks.base import PromptCompletionDataModule
from lightning_peft.tasks.data2text import Data2TextTask
from lightning_peft.tasks.hf_dataset import HFDatasetTask
from lightning_peft.tasks.packaged import NERFinanceTask, SarcasmTask
from lightning_peft.tasks.sql import SQLTask

TASKS: dict[str, type[PromptCompletionDataModule]] = {
    "arithmetic": ArithmeticTask,
    "data2text": Data2TextTask,
    "hf_dataset": HFDatasetTask,
    "ner_finance": NERFinanceTask,
    "sarcasm": SarcasmTask,
    "sql": SQLTask,
}


def get_task(name: str, **kwargs: Any) -> PromptCompletionDataModule:
    """Instantiate the task registered under ``name`` with ``kwargs``.

    Example:
        >>> dm = get_task("arithmetic", tokenizer="llama-v1", num_train=100)  # doctest: +SKIP

    Raises:
        ValueError: No task has that name; the message lists the names, closest first.
    """
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=len(TASKS), cutoff=0.0)
        raise ValueError(
            f"task name must be one of the registered tasks, got {name!r}; available (closest first): "
            f"{', '.join(close)}. Pick one of them (e.g. `task=arithmetic`) or add your "
            "PromptCompletionDataModule subclass to lightning_peft.tasks.TASKS"
        )
    return TASKS[name](**kwargs)
