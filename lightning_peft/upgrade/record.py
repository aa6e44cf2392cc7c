"""What an adapter carries for a later base upgrade: its task, a few real seed inputs, its discriminator.

Trans-LoRA (Wang et al., NeurIPS 2024, section 3) needs, besides the adapter, only a handful of
real task inputs (5 in the paper) and, to filter synthetic inputs, a discriminator trained while
the data was still there. :class:`UpgradeRecord` collects them at the end of ``fit`` and
:func:`lightning_peft.save_adapter` writes them into the adapter folder::

    adapter/
        adapter_config.json, adapter_model.safetensors   (peft's files, unchanged)
        upgrade.json            {"task", "seeds", "train_size", "task_kwargs", "base"}
        discriminator/          (when trained with TransLoRADiscriminator: its peft folder)

``seeds`` may be empty (``num_seeds=0`` for private data); an upgrade then only has the direct
route. Plain peft loads the folder as before: it reads only its own two files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

__all__ = ["DISCRIMINATOR_DIR", "RECORD_ATTR", "RECORD_FILE", "AdapterRecord", "UpgradeRecord", "read_record",
           "set_record", "write_record"]

RECORD_FILE = "upgrade.json"
DISCRIMINATOR_DIR = "discriminator"
RECORD_ATTR = "lightning_peft_record"  # the module attribute save_adapter picks the record up from


@dataclass
class AdapterRecord:
    """What :func:`read_record` returns.

    Attributes:
        task: Task name (the Trans-LoRA prompts name it; a ``lightning_peft.tasks`` name when it is one).
        seeds: Real task inputs (prompts only, never completions).
        train_size: Training examples the adapter saw (Trans-LoRA's default synthetic-set size).
        task_kwargs: Task settings a student needs (``max_length``).
        base: The base the adapter was trained on, as its user named it (zoo name, folder, Hub name).
        discriminator: The discriminator folder inside the adapter folder, if any.
    """

    task: str | None = None
    seeds: list[str] = field(default_factory=list)
    train_size: int | None = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    discriminator: str | None = None


def set_record(module: nn.Module, **facts: Any) -> dict[str, Any]:
    """Add ``facts`` to the record ``module`` carries until :func:`~lightning_peft.save_adapter` writes it."""
    record = dict(getattr(module, RECORD_ATTR, None) or {})
    record.update({k: v for k, v in facts.items() if v is not None})
    object.__setattr__(module, RECORD_ATTR, record)  # plain attribute, not a submodule or a buffer
    return record


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write ``record`` into an adapter folder being saved: ``upgrade.json`` and a copy of its discriminator.

    Raises:
        FileNotFoundError: the record names a discriminator folder that does not exist.
    """
    facts = {k: v for k, v in record.items() if k != "discriminator"}
    disc = record.get("discriminator")
    if disc:
        if not (Path(disc) / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"the adapter's record names the discriminator {disc!r}, which holds no adapter_config.json; "
                "train it with TransLoRADiscriminator, or drop it from the record"
            )
        shutil.copytree(disc, folder / DISCRIMINATOR_DIR)
    (folder / RECORD_FILE).write_text(json.dumps(facts, indent=2) + "\n")


def read_record(folder: str | Path) -> AdapterRecord:
    """The record of an adapter folder (an empty one when it carries none: saved by plain peft or before)."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    facts = json.loads(path.read_text()) if path.is_file() else {}
    known = {k: facts[k] for k in asdict(AdapterRecord()) if k in facts and k != "discriminator"}
    disc = folder / DISCRIMINATOR_DIR
    return AdapterRecord(**known, discriminator=str(disc) if (disc / "adapter_config.json").is_file() else None)


class UpgradeRecord(L.Callback):
    """Record the task, ``num_seeds`` real seed inputs and the training-set size with the adapter.

    ``Trainer(callbacks=[lp.LoRA(r=8), lp.UpgradeRecord(num_seeds=5)])``; ``lightning-peft train``
    adds it by default (``callbacks.upgrade_record.num_seeds``). At the end of ``fit`` it reads the
    datamodule (a ``lightning_peft.tasks`` datamodule: its ``task_name``, training prompts and
    ``max_length``) and leaves the record on the LightningModule, where
    :func:`lightning_peft.save_adapter` writes it; a ``TransLoRADiscriminator`` adds its folder to
    the same record. ``num_seeds=0`` records the task but no inputs (private data).

    Args:
        num_seeds: Real training inputs to keep (Trans-LoRA's seed set: 5 in the paper).
        task_name: Overrides the datamodule's ``task_name``.

    Raises:
        ValueError: ``num_seeds`` is negative or not an integer.
    """

    def __init__(self, num_seeds: int = 5, task_name: str | None = None) -> None:
        if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 0:
            raise ValueError(f"UpgradeRecord num_seeds must be an integer >= 0, got {num_seeds!r}; e.g. 5 (0: no inputs)")
        self.num_seeds, self.task_name = num_seeds, task_name

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_peft.tasks.base import PromptCompletionDataModule

        dm = trainer.datamodule
        hparams = getattr(pl_module, "hparams", {}) or {}
        base = hparams.get("model") if isinstance(hparams.get("model"), str) else None
        if not isinstance(dm, PromptCompletionDataModule):
            set_record(pl_module, task=self.task_name, base=base)
            return
        train = dm.get_examples()["train"]
        set_record(pl_module, task=self.task_name or dm.task_name, seeds=[e.prompt for e in train[: self.num_seeds]],
                   train_size=len(train), task_kwargs={"max_length": dm.max_length}, base=base)
