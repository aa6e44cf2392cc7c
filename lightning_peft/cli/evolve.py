"""``lightning-peft evolve``: the Trans-PEFT evaluation protocol over seeds (Hydra app, config ``evolve``).

Composes the same groups as ``lightning-peft train`` (model, method, task, trainer, logger) plus
``evolve.*`` and runs :func:`lightning_peft.evolve.run_evolve`.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://lightning_peft.conf", config_name="evolve")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    from lightning_peft.cli import relaunchable
    from lightning_peft.evolve import run_evolve

    with relaunchable("evolve"):
        return run_evolve(cfg)
