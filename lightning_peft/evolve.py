"""The Trans-PEFT evaluation protocol: does an adapter survive a base-model update v_o -> v_n?

``lightning-peft train experiment=evolve method=lora`` (any registered method) trains three
adapters and evaluates four rows (Gu et al., ACL 2025, arXiv 2506.06844, section 4):

=====================  ==========================================  ===================
row                    adapter                                     evaluated on
=====================  ==========================================  ===================
Fine-tune_o            plain, trained on v_o                       v_o
Direct transfer o->n   the same adapter, nothing re-trained         v_n
Trans-PEFT o->n        trained on v_o with the TransPEFT callback   v_n
Fine-tune_n            plain, trained on v_n (upper bound)          v_n
=====================  ==========================================  ===================

plus the recovery ratio per metric, (TransPEFT_o->n - Direct_o->n) / (FineTune_n - Direct_o->n):
1 = Trans-PEFT closes the whole transfer gap, 0 = no better than direct transfer. The same
seed is used for every training, so Fine-tune_o and Trans-PEFT o->n start from the same adapter
initialisation and see the same batches; they differ only by the callback. Writes
``results.json``, ``<row>/adapter`` folders and the drift report (``drift/``) of v_o vs v_n,
prints the table and logs everything to the configured logger (W&B: tables and plots).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lightning_peft as lp

log = logging.getLogger(__name__)

ROWS = ("Fine-tune_o", "Direct transfer o->n", "Trans-PEFT o->n", "Fine-tune_n")
METRICS = ("test/loss", "test/token_acc", "test/exact_match")


def newer_version(name: str) -> str:
    """``llama-v1`` -> ``llama-v2`` (zoo names); anything else must be given as ``evolve.new``.

    Raises:
        ValueError: ``name`` is not a ``*-v1`` zoo name.
    """
    from lightning_peft import zoo

    if zoo.is_zoo_name(name) and name.endswith("-v1"):
        return name[: -len("v1")] + "v2"
    raise ValueError(f"evolve.new is not set and {name!r} is not a '-v1' zoo name; set evolve.new=<updated base>")


def recovery_ratio(direct: float, trans_peft: float, fine_tune_n: float) -> float | None:
    """(TransPEFT_o->n - Direct_o->n) / (FineTune_n - Direct_o->n); ``None`` when the gap is ~0.

    The formula holds for lower-is-better metrics (loss) too: both differences change sign.
    """
    gap = fine_tune_n - direct
    return None if abs(gap) < 1e-9 else (trans_peft - direct) / gap


def _trainer(cfg: DictConfig, callbacks: list[L.Callback], root: Path) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=CSVLogger(root, name="csv"), default_root_dir=str(root),
        enable_checkpointing=False,
    )


def train_adapter(cfg: DictConfig, base: str, root: Path, trans_peft: DictConfig | None = None) -> Path:
    """Train ``cfg.method`` on ``base`` (with Trans-PEFT if given); returns the adapter folder."""
    L.seed_everything(cfg.seed, workers=True)
    callbacks: list[L.Callback] = [instantiate(cfg.method)]
    if trans_peft is not None:
        callbacks.append(instantiate(trans_peft))
    module = instantiate(cfg.module, model=base)
    trainer = _trainer(cfg, callbacks, root)
    trainer.fit(module, datamodule=instantiate(cfg.task))
    return lp.save_adapter(module, root / "adapter")


def evaluate_adapter(cfg: DictConfig, adapter: Path, base: str, root: Path) -> dict[str, float]:
    """Load ``adapter`` onto ``base`` (transfer: nothing is trained) and run the task's test split."""
    module = instantiate(cfg.module, model=base)
    module.configure_model()
    with warnings.catch_warnings():
        # transfer onto another base is the point here: the fingerprint warning is expected
        warnings.simplefilter("ignore", lp.BaseModelMismatchWarning)
        lp.load_adapter(module, adapter)
    trainer = _trainer(cfg, [], root)
    (metrics,) = trainer.test(module, datamodule=instantiate(cfg.task), verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def run_evolve(cfg: DictConfig) -> dict[str, Any]:
    """Run the protocol ``cfg.evolve`` describes; returns what ``results.json`` holds."""
    from lightning_peft.analysis import analyse, write_report
    from lightning_peft.cli.drift import task_batches

    start = time.perf_counter()
    ev = cfg.evolve
    old = ev.old or cfg.model.name_or_path
    new = ev.new or newer_version(old)
    run_dir = Path(cfg.run_dir)
    a_o = train_adapter(cfg, old, run_dir / "fine_tune_o")
    a_tp = train_adapter(cfg, old, run_dir / "trans_peft_o", trans_peft=ev.trans_peft)
    a_n = train_adapter(cfg, new, run_dir / "fine_tune_n")
    rows = {
        ROWS[0]: evaluate_adapter(cfg, a_o, old, run_dir / "eval" / "fine_tune_o"),
        ROWS[1]: evaluate_adapter(cfg, a_o, new, run_dir / "eval" / "direct"),
        ROWS[2]: evaluate_adapter(cfg, a_tp, new, run_dir / "eval" / "trans_peft"),
        ROWS[3]: evaluate_adapter(cfg, a_n, new, run_dir / "eval" / "fine_tune_n"),
    }
    metrics = [m for m in METRICS if all(m in r for r in rows.values())]
    recovery = {m: recovery_ratio(rows[ROWS[1]][m], rows[ROWS[2]][m], rows[ROWS[3]][m]) for m in metrics}
    report = analyse(old, new, task_batches(cfg.task, "test", ev.drift_batches), topk=ev.topk, adapter_dir=a_o)
    plots = write_report(report, run_dir / "drift")
    results: dict[str, Any] = {
        "old": old, "new": new, "method": type(instantiate(cfg.method)).method_name,
        "task": cfg.task._target_.rsplit(".", 1)[-1],
        "steps": cfg.trainer.max_steps, "seed": cfg.seed,
        "trans_peft": OmegaConf.to_container(ev.trans_peft, resolve=True),
        "rows": rows, "recovery": recovery, "drift": report.summary(),
        "adapters": {"Fine-tune_o": str(a_o), "Trans-PEFT o->n": str(a_tp), "Fine-tune_n": str(a_n)},
        "run_dir": str(run_dir), "wall_s": round(time.perf_counter() - start, 1),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    _log(cfg, results, report, plots, metrics)
    print_table(results, metrics)
    return results


def _log(cfg: DictConfig, results: dict[str, Any], report: Any, plots: dict[str, Path], metrics: list[str]) -> None:
    from lightning_peft.analysis import log_report

    logger_cfg = cfg.get("logger")
    if not (logger_cfg and "_target_" in logger_cfg):
        return
    logger = instantiate(logger_cfg)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    flat = {f"evolve/{row}/{m}": v for row, r in results["rows"].items() for m, v in r.items() if m in metrics}
    flat.update({f"evolve/recovery/{m}": v for m, v in results["recovery"].items() if v is not None})
    logger.log_metrics(flat)
    if type(logger).__name__ == "WandbLogger":
        import wandb

        columns = ["row", *metrics]
        data = [[row, *(results["rows"][row][m] for m in metrics)] for row in ROWS]
        logger.experiment.log({"evolve/results": wandb.Table(columns=columns, data=data)})
    log_report(report, [logger], plots)
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
    else:
        logger.finalize("success")


def print_table(results: dict[str, Any], metrics: list[str]) -> None:
    """Print the four protocol rows and the recovery ratio (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{results['method']} on {results['task']}: {results['old']} -> {results['new']} "
        f"({results['steps']} steps, seed {results['seed']})"
    )
    table.add_column("row")
    for m in metrics:
        table.add_column(m.removeprefix("test/"), justify="right")
    for row in ROWS:
        table.add_row(row, *(f"{results['rows'][row][m]:.4f}" for m in metrics))
    table.add_row(
        "recovery ratio", *("n/a" if results["recovery"][m] is None else f"{results['recovery'][m]:.2f}" for m in metrics)
    )
    console = Console()
    console.print(table)
    console.print(f"results: {results['run_dir']}/results.json, drift report: {results['run_dir']}/drift ({results['wall_s']} s)")
