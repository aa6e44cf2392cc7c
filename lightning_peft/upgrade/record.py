"""What an adapter carries for a later base upgrade: its task, a few real seed inputs, its discriminator.

Trans-LoRA (Wang et al., NeurIPS 2024, section 3) needs, besides the adapter, only a handful of
real task inputs (5 in the paper) and, to filter synthetic inputs, a discriminator trained while
the data was still there. :class:`UpgradeRecord` collects them at the end of ``fit`` as an
:class:`~lightning_peft.adapter_folder.AdapterRecord`, and ``save_adapter(..., record=...)`` writes it
into the adapter folder (``upgrade.json`` and ``discriminator/``, see
:class:`~lightning_peft.adapter_folder.AdapterFolder`)::

    recorder = lp.UpgradeRecord(num_seeds=5)
    trainer = L.Trainer(callbacks=[lp.LoRA(r=8), recorder]); trainer.fit(module, datamodule)
    lp.save_adapter(module, "adapter", record=AdapterRecord.from_callbacks(trainer.callbacks))

``seeds`` may be empty (``num_seeds=0`` for private data); an upgrade then only has the direct
route. Plain peft loads the folder as before: it reads only its own two files.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_peft.adapter_folder import AdapterFolder, AdapterRecord

__all__ = ["AdapterRecord", "UpgradeRecord", "read_record", "set_record"]


class UpgradeRecord(L.Callback):
    """Record the task, ``num_seeds`` real seed inputs and the training-set size of the adapter being trained.

    ``Trainer(callbacks=[lp.LoRA(r=8), recorder := lp.UpgradeRecord(num_seeds=5)])``; after ``fit``,
    ``save_adapter(module, path, record=recorder.record)`` writes it (``lightning-peft train`` adds the
    callback by default, ``callbacks.upgrade_record.num_seeds``, and passes the record). At the end of
    ``fit`` it reads the datamodule (a ``lightning_peft.tasks`` datamodule: its ``task_name``, training
    prompts and ``max_length``) and how long ``fit`` took; a ``TransLoRADiscriminator`` records its folder beside it
    (:meth:`AdapterRecord.from_callbacks` merges both). ``num_seeds=0`` records the task but no inputs
    (private data).

    Args:
        num_seeds: Real training inputs to keep (Trans-LoRA's seed set: 5 in the paper).
        task_name: Overrides the datamodule's ``task_name``.

    Attributes:
        record: What was recorded (``None`` before the end of ``fit``).

    Raises:
        ValueError: ``num_seeds`` is negative or not an integer.
    """

    def __init__(self, num_seeds: int = 5, task_name: str | None = None) -> None:
        if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 0:
            raise ValueError(f"UpgradeRecord num_seeds must be an integer >= 0, got {num_seeds!r}; e.g. 5 (0: no inputs)")
        self.num_seeds, self.task_name = num_seeds, task_name
        self.record: AdapterRecord | None = None
        self._fit_start: float | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_peft.tasks.base import PromptCompletionDataModule

        dm = trainer.datamodule
        hparams = getattr(pl_module, "hparams", {}) or {}
        base = hparams.get("model") if isinstance(hparams.get("model"), str) else None
        seconds = None if self._fit_start is None else round(time.perf_counter() - self._fit_start, 3)  # ms: a short fit is not 0
        if not isinstance(dm, PromptCompletionDataModule):
            self.record = AdapterRecord(task=self.task_name, base=base, train_seconds=seconds)
            return
        train = dm.get_examples()["train"]
        self.record = AdapterRecord(task=self.task_name or dm.task_name, seeds=[e.prompt for e in train[: self.num_seeds]],
                                    train_size=len(train), task_kwargs={"max_length": dm.max_length}, base=base,
                                    train_seconds=seconds)


def read_record(folder: str | os.PathLike[str]) -> AdapterRecord:
    """Deprecated alias of ``AdapterFolder(folder).record`` (kept for one release)."""
    warnings.warn("read_record(folder) is deprecated: use lightning_peft.AdapterFolder(folder).record",
                  DeprecationWarning, stacklevel=2)
    return AdapterFolder(folder).record


def set_record(module: nn.Module, **facts: Any) -> AdapterRecord:
    """Deprecated (kept for one release): ``save_adapter`` no longer reads a record from the module.

    Returns the record the facts make; pass it on: ``save_adapter(module, path, record=AdapterRecord(**facts))``.
    """
    warnings.warn("set_record(module, ...) is deprecated and no longer attaches the record to the module: pass "
                  "save_adapter(module, path, record=AdapterRecord(...)) instead", DeprecationWarning, stacklevel=2)
    return AdapterRecord(**facts)
