"""What every command does around its work, written once: the logger, the logged config, ``results.json``.

Each Hydra command (``train``, ``transfer``, ``upgrade``, ``drift``, ``evolve``) runs its work inside
``with RunContext(cfg) as run:``:

* ``run.logger``: the configured Lightning logger (``logger=wandb|csv|none``; ``None`` for ``none``), with the
  composed config logged as its hyperparameters on entry;
* ``run.write_results(results)``: ``<run dir>/results.json``, written atomically (a crash leaves the old file);
* on exit the logger is finished: W&B's run is closed (``WandbLogger.finalize`` leaves it open, and the next
  job of a multirun would log into it), other loggers are finalized.

Work finished into the same folder with other settings is refused naming the keys, with one override per
command (:mod:`lightning_peft.resume`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_peft.atomic import atomic_write_text

__all__ = ["RESULTS_FILE", "RunContext", "dataclass_fields"]

RESULTS_FILE = "results.json"


class RunContext:
    """The logger and the results file of one command run (see the module docstring).

    Args:
        cfg: The composed config (its ``logger`` group and ``run_dir``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.logger: Logger | None = None

    def __enter__(self) -> RunContext:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logger_cfg = self.cfg.get("logger")
        self.logger = instantiate(logger_cfg) if logger_cfg and "_target_" in logger_cfg else None
        if self.logger is not None:
            self.logger.log_hyperparams(OmegaConf.to_container(self.cfg, resolve=True))
        return self

    def write_results(self, results: dict[str, Any]) -> Path:
        """``results`` as ``<run dir>/results.json`` (indented JSON), atomically."""
        return atomic_write_text(self.run_dir / RESULTS_FILE, json.dumps(results, indent=2))

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(self.logger, WandbLogger):
            import wandb

            wandb.finish()  # WandbLogger.finalize does not; needed between multirun jobs
        elif self.logger is not None:
            self.logger.finalize("success" if kind is None else "failed")


def dataclass_fields(cls: type, cfg: DictConfig, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The keys of a composed config that are fields of the dataclass ``cls`` (but not ``exclude``), resolved to
    plain Python values: what ``cls(**...)`` takes (``TransferConfig``, ``UpgradeConfig``)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k in names}
