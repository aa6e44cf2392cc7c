"""One adapter folder and everything it holds, read and written here only.

A folder written by :func:`lightning_peft.save_adapter`::

    adapter/
        adapter_config.json         the peft config (peft's own file)
        adapter_model.safetensors   the tensors, keys ``base_model.model.<module>.<tensor>`` (peft's layout);
                                    the header's ``lightning_peft`` entry holds the metadata: adapter name,
                                    base fingerprint, the caller's facts (an upgrade's route and scores, ...)
        upgrade.json                the record a later base upgrade needs (:class:`AdapterRecord`): task,
                                    seed inputs, training-set size, task settings, the base's name
        discriminator/              the Trans-LoRA discriminator (an adapter folder of its own)

Plain ``peft.PeftModel.from_pretrained`` reads only its two files. Folders written before the folder
had this one owner still read: their discriminator may be the sibling folder ``<adapter>-discriminator``
(``TransLoRADiscriminator``'s ``out_dir``) with the training-set size in its own metadata
(:attr:`AdapterFolder.discriminator`, :attr:`AdapterFolder.train_size`). Only JSON and safetensors are
read; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lightning_peft.atomic import atomic_directory

__all__ = ["AdapterFolder", "AdapterFormatError", "AdapterRecord"]

_CONFIG = "adapter_config.json"
_WEIGHTS_STEM = "adapter_model"
_WEIGHTS = f"{_WEIGHTS_STEM}.safetensors"
_PICKLED = f"{_WEIGHTS_STEM}.bin"
_RECORD = "upgrade.json"
_DISCRIMINATOR = "discriminator"
_SIBLING_SUFFIX = "-discriminator"  # before the nested discriminator: TransLoRADiscriminator's out_dir convention
_METADATA_KEY = "lightning_peft"
_PEFT_PREFIX = "base_model.model."  # peft's key prefix of the model's own module names
_FIX = "point to a folder written by lightning_peft.save_adapter or PeftModel.save_pretrained"


class AdapterFormatError(ValueError):
    """An adapter folder is missing, incomplete, corrupted or made for other shapes."""


@dataclass
class AdapterRecord:
    """What an adapter carries for a later base upgrade (``upgrade.json`` and ``discriminator/``).

    Attributes:
        task: Task name (the Trans-LoRA prompts name it; a ``lightning_peft.tasks`` name when it is one).
        seeds: Real task inputs (prompts only, never completions).
        train_size: Training examples the adapter saw (Trans-LoRA's default synthetic-set size).
        task_kwargs: Task settings a student needs (``max_length``).
        base: The base the adapter was trained on, as its user named it (zoo name, folder, Hub name).
        train_seconds: How long its ``fit`` took (what retraining it with its data would cost; an upgrade reports it).
        discriminator: Its Trans-LoRA discriminator folder (when writing: copied into the adapter folder).
    """

    task: str | None = None
    seeds: list[str] = field(default_factory=list)
    train_size: int | None = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    train_seconds: float | None = None
    discriminator: str | None = None

    @classmethod
    def merge(cls, *records: AdapterRecord | None) -> AdapterRecord | None:
        """One record of what several callbacks recorded (a later one's facts win where it has any); ``None`` if
        none did."""
        known = [r for r in records if r is not None]
        if not known:
            return None
        empty = asdict(cls())
        facts: dict[str, Any] = {}
        for record in known:
            facts.update({k: v for k, v in asdict(record).items() if v != empty[k]})
        return cls(**facts)

    @classmethod
    def from_callbacks(cls, callbacks: Iterable[Any]) -> AdapterRecord | None:
        """The merged ``record`` of the callbacks that keep one (``UpgradeRecord``, ``TransLoRADiscriminator``)."""
        return cls.merge(*(r for r in (getattr(cb, "record", None) for cb in callbacks) if isinstance(r, AdapterRecord)))

    def facts(self) -> dict[str, Any]:
        """What ``upgrade.json`` holds: the known facts, the discriminator aside (it is a folder)."""
        return {k: v for k, v in asdict(self).items() if k != "discriminator" and v is not None}


class AdapterFolder:
    """An adapter folder (see the module docstring): its peft config and tensors, metadata, record, discriminator.

    Args:
        path: The folder (need not exist yet: :attr:`exists` says whether it holds an adapter).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"AdapterFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ what it holds
    @property
    def exists(self) -> bool:
        """Whether the folder holds an adapter (its peft config)."""
        return (self.path / _CONFIG).is_file()

    def check(self) -> None:
        """Raise :class:`AdapterFormatError` unless the folder holds a peft config and safetensors weights."""
        if not self.path.is_dir():
            raise AdapterFormatError(f"adapter folder {str(self.path)!r} does not exist; {_FIX}")
        for name in (_CONFIG, _WEIGHTS):
            if not (self.path / name).is_file():
                pickled = name == _WEIGHTS and (self.path / _PICKLED).is_file()
                extra = f" (its pickled {_PICKLED} is not read: re-save it as safetensors)" if pickled else ""
                raise AdapterFormatError(f"adapter folder {str(self.path)!r} has no {name}{extra}; {_FIX}")

    def read(self) -> tuple[PeftConfig, dict[str, torch.Tensor], dict[str, Any]]:
        """(peft config, tensors with peft keys, lightning_peft metadata or ``{}``).

        Raises:
            AdapterFormatError: folder or files missing, JSON or safetensors corrupted.
        """
        self.check()
        return self.config, *self._weights(tensors=True)

    @property
    def config(self) -> PeftConfig:
        """The peft config (:class:`AdapterFormatError` when missing or corrupted)."""
        try:
            return PeftConfig.from_peft_type(**json.loads((self.path / _CONFIG).read_text()))
        except FileNotFoundError as exc:
            raise AdapterFormatError(f"adapter folder {str(self.path)!r} has no {_CONFIG}; {_FIX}") from exc
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            raise AdapterFormatError(
                f"{self.path / _CONFIG} is corrupted or not a peft config ({exc}); re-save the adapter") from exc

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``lightning_peft`` metadata in the weights' header (``{}`` for folders saved by plain peft)."""
        return self._weights(tensors=False)[1]

    def _weights(self, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        try:
            with safe_open(str(self.path / _WEIGHTS), framework="pt") as f:
                found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118  (not iterable)
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFormatError(f"{self.path / _WEIGHTS} is corrupted ({exc}); re-save the adapter") from exc
        return found, json.loads(header[_METADATA_KEY]) if _METADATA_KEY in header else {}

    def fingerprint(self) -> str:
        """sha256 of the weight file (first 16 hex digits): which adapter, whatever its folder is called.

        Raises:
            FileNotFoundError: no ``adapter_model.*`` file.
        """
        files = sorted(self.path.glob(f"{_WEIGHTS_STEM}.*"))
        if not files:
            raise FileNotFoundError(f"{self.path} holds no {_WEIGHTS_STEM}.* file; pass a folder written by save_adapter.")
        return hashlib.sha256(files[0].read_bytes()).hexdigest()[:16]

    # ------------------------------------------------------------------ the record and the discriminator
    @property
    def record(self) -> AdapterRecord:
        """The folder's record (an empty one when it carries none: saved by plain peft or before records)."""
        path = self.path / _RECORD
        facts = json.loads(path.read_text()) if path.is_file() else {}
        known = {f.name: facts[f.name] for f in fields(AdapterRecord) if f.name in facts and f.name != "discriminator"}
        disc = self.discriminator
        return AdapterRecord(**known, discriminator=str(disc.path) if disc is not None else None)

    @property
    def discriminator(self) -> AdapterFolder | None:
        """Its Trans-LoRA discriminator: ``discriminator/`` inside, else (older folders) the sibling
        ``<adapter>-discriminator``; ``None`` when it has neither."""
        for candidate in (self.path / _DISCRIMINATOR, self.path.with_name(self.path.name + _SIBLING_SUFFIX)):
            if AdapterFolder(candidate).exists:
                return AdapterFolder(candidate)
        return None

    @property
    def train_size(self) -> int | None:
        """Training examples the adapter saw: its record's, else what its discriminator's metadata holds (older
        folders); ``None`` when neither knows."""
        size = self.record.train_size
        if size is None and self.discriminator is not None:
            size = self.discriminator.metadata.get("train_size")
        return int(size) if size else None

    # ------------------------------------------------------------------ writing
    @classmethod
    def write(cls, path: str | os.PathLike[str], config: PeftConfig, tensors: dict[str, torch.Tensor],
              metadata: dict[str, Any], record: AdapterRecord | None = None) -> AdapterFolder:
        """Write a complete folder atomically (a folder of ours at ``path`` is replaced only once it is done).

        Raises:
            FileNotFoundError: the record names a discriminator folder that holds no adapter.
        """
        disc = record.discriminator if record is not None else None
        if disc and not AdapterFolder(disc).exists:
            raise FileNotFoundError(
                f"the adapter's record names the discriminator {disc!r}, which holds no {_CONFIG}; "
                "train it with TransLoRADiscriminator, or drop it from the record"
            )
        ours = {_CONFIG, _WEIGHTS, "README.md", _RECORD, _DISCRIMINATOR}
        with atomic_directory(path, replaceable=ours) as tmp:
            config.save_pretrained(str(tmp))
            save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt", _METADATA_KEY: json.dumps(metadata)})
            if record is not None:
                if disc:
                    shutil.copytree(disc, tmp / _DISCRIMINATOR)
                (tmp / _RECORD).write_text(json.dumps(record.facts(), indent=2) + "\n")
        return cls(path)

    # ------------------------------------------------------------------ folders of adapters, tensor keys
    @staticmethod
    def find(root: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None) -> list[Path]:
        """Adapter folders below ``root``, sorted; discriminators (inside an adapter, or a sibling
        ``*-discriminator``) and everything under ``exclude`` left out."""
        skip = Path(exclude).resolve() if exclude is not None else None
        return sorted(p.parent for p in Path(root).rglob(_CONFIG)
                      if p.parent.name != _DISCRIMINATOR and not p.parent.name.endswith(_SIBLING_SUFFIX)
                      and not (skip is not None and p.resolve().is_relative_to(skip)))

    @staticmethod
    def tensor_key(module_key: str) -> str:
        """The folder's key of a tensor named ``module_key`` relative to the base model (peft's layout)."""
        return _PEFT_PREFIX + module_key

    @staticmethod
    def module_key(tensor_key: str) -> str:
        """Inverse of :meth:`tensor_key`."""
        return tensor_key[len(_PEFT_PREFIX):]
