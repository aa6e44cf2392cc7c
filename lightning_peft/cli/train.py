"""``lightning-peft train``: compose model + method + task + trainer with Hydra, fit, test, save.

The run directory (Hydra's output dir) ends up holding ``checkpoints/`` (adapter-only),
``adapter/`` (peft format), ``results.json`` and the logger's files (``wandb/`` offline
by default).

Several processes: ``trainer=ddp`` (or ``trainer.strategy=adapter_ddp trainer.devices=N``): rank 0
is this process, the others re-run the same command with the same overrides and write into the
same run directory (:func:`lightning_peft.cli.relaunchable`); rank 0 alone writes ``results.json``
and ``adapter/``. Under multirun (``-m``) use ``trainer.strategy=adapter_ddp_spawn``.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

import lightning_peft as lp
from lightning_peft.adapter_folder import AdapterRecord
from lightning_peft.cli.run import RunContext

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns the results written to ``results.json``.

    Raises:
        ValueError: the config has an ``evolve`` section: that protocol is ``lightning-peft evolve``.
    """
    if cfg.get("evolve") is not None:
        raise ValueError(
            "this config has an `evolve` section, but `lightning-peft train` trains one adapter; the Trans-PEFT "
            "protocol is its own command now: run `lightning-peft evolve` with the same overrides (without experiment=evolve)"
        )
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.task)
    module = instantiate(cfg.module)
    method = instantiate(cfg.method)
    callbacks = [method, *(instantiate(c) for c in cfg.get("callbacks", {}).values())]
    trans_peft = cfg.get("trans_peft")  # `trans_peft=default` (Trans-PEFT stacks with any method)
    if trans_peft and "_target_" in trans_peft:
        callbacks.append(instantiate(trans_peft))
    with RunContext(cfg) as run:
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=run.logger or False,
                                         default_root_dir=str(run.run_dir))
        _refuse_relaunch_in_multirun(trainer)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        adapter = None
        if cfg.save_adapter and trainer.is_global_zero:  # with what UpgradeRecord / TransLoRADiscriminator recorded
            adapter = lp.save_adapter(module, run.run_dir / "adapter", record=AdapterRecord.from_callbacks(callbacks))
        if cfg.test_after_fit:
            tests = trainer.test(module, datamodule=datamodule, verbose=False)  # [] when the task has no test split
            metrics.update({k: float(v) for k, v in (tests[0] if tests else {}).items()})
        results = _results(cfg, type(method).method_name, trainer, module, datamodule, metrics, run.run_dir)
        if adapter is not None:
            results["adapter"] = str(adapter)
        if trainer.is_global_zero:
            run.write_results(results)
            print_results(results)
        return results


def _results(cfg: DictConfig, method: str, trainer: L.Trainer, module: L.LightningModule, datamodule: Any,
             metrics: dict[str, float], run_dir: Path) -> dict[str, Any]:
    """What ``results.json`` holds (besides the adapter folder)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    base_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return {
        "model": cfg.model.name_or_path,
        "method": method,
        "task": type(datamodule).task_name,
        "steps": trainer.global_step,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "metrics": metrics,
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        # adapter-only checkpoint (adapter + optimizer + loop state) vs all model weights
        "checkpoint_mb": round(ckpt.stat().st_size / 2**20, 3) if ckpt.exists() else None,
        "model_mb": round(base_bytes / 2**20, 3),
    }


def resume_path(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path`` as ``trainer.fit`` takes it: ``last`` means this run dir's ``checkpoints/last.ckpt``.

    Raises:
        FileNotFoundError: ``ckpt_path`` names a checkpoint that is not there (the message says where it looked).
        ValueError: the file is not a complete checkpoint (truncated or corrupt).
    """
    value = cfg.get("ckpt_path")
    if not value:
        return None
    path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt" if value == "last" else Path(value)
    if not path.is_file():
        hint = (
            "`ckpt_path=last` resumes the run whose folder this is: pass that run's folder as hydra.run.dir=<dir>"
            if value == "last" else "pass the path of an existing .ckpt file, or ckpt_path=last with hydra.run.dir=<run dir>"
        )
        raise FileNotFoundError(f"ckpt_path={value!r}: no checkpoint at {path}; {hint}")
    if not zipfile.is_zipfile(path) or zipfile.ZipFile(path).testzip() is not None:  # torch.save writes a zip
        raise ValueError(
            f"ckpt_path={value!r}: {path} is not a complete checkpoint (truncated or corrupt: not a valid torch zip "
            "archive); resume from another .ckpt (e.g. an earlier step's) or start the run again without ckpt_path"
        )
    return str(path)


def _refuse_relaunch_in_multirun(trainer: L.Trainer) -> None:
    """A launcher that re-runs the command line would re-run the whole sweep in every rank.

    Raises:
        ValueError: Hydra multirun with a subprocess launcher (``ddp``, ``adapter_ddp``) on several processes.
    """
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    from lightning_peft.plugins.strategies import in_hydra_multirun

    launcher = getattr(trainer.strategy, "launcher", None)
    if in_hydra_multirun() and isinstance(launcher, _SubprocessScriptLauncher) and trainer.world_size > 1:
        raise ValueError(
            f"trainer.strategy={type(trainer.strategy).__name__} starts ranks 1..{trainer.world_size - 1} by re-running "
            "the command line, which under multirun (-m) re-runs the whole sweep; use trainer.strategy=adapter_ddp_spawn"
        )


def print_results(results: dict[str, Any]) -> None:
    """Print the results table and where the run's files are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['method']} on {results['task']} ({results['model']}, {results['steps']} steps)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(results["metrics"]):
        table.add_row(key, f"{results['metrics'][key]:.4f}")
    table.add_row("trainable params", f"{results['trainable_params']:,}")
    if results.get("checkpoint_mb") is not None:
        table.add_row("checkpoint / model size", f"{results['checkpoint_mb']:.2f} / {results['model_mb']:.2f} MB")
    console = Console()
    console.print(table)
    console.print(f"run files: {results['run_dir']}")
    if "adapter" in results:
        console.print(f"adapter (peft format): {results['adapter']}")


def objective(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    """The value of ``cfg.optimized_metric`` in ``results`` (what an optimising sweeper such as Optuna minimises).

    Raises:
        KeyError: the run did not produce that metric (the message lists the ones it did).
    """
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in results["metrics"]:
        raise KeyError(f"optimized_metric={name!r} is not among this run's metrics {sorted(results['metrics'])}; "
                       "pick one of them (test/* needs test_after_fit=true and a test split)")
    return float(results["metrics"][name])


@hydra.main(version_base="1.3", config_path="pkg://lightning_peft.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from lightning_peft.cli import relaunchable

    with relaunchable("train"):
        return objective(cfg, run(cfg))
