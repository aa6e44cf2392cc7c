"""``lightning-peft evolve``: the Trans-PEFT evaluation protocol over seeds (Hydra app, config ``evolve``).

Does an adapter survive a base-model update v_o -> v_n?

``lightning-peft evolve method=lora`` (any registered method) trains three adapters per seed and
evaluates four rows (Gu et al., ACL 2025, arXiv 2506.06844, section 4):

=====================  ==========================================  ===================
row                    adapter                                     evaluated on
=====================  ==========================================  ===================
Fine-tune_o            plain, trained on v_o                       v_o
Direct transfer o->n   the same adapter, nothing re-trained         v_n
Trans-PEFT o->n        trained on v_o with the TransPEFT callback   v_n
Fine-tune_n            plain, trained on v_n (upper bound)          v_n
=====================  ==========================================  ===================

plus the recovery ratio per metric, (TransPEFT_o->n - Direct_o->n) / (FineTune_n - Direct_o->n):
1 = Trans-PEFT closes the whole transfer gap, 0 = no better than direct transfer. Within a seed
every training uses that seed, so Fine-tune_o and Trans-PEFT o->n start from the same adapter
initialisation and see the same batches; they differ only by the callback. ``evolve.seeds``
seeds (default 3) are run and each row is reported as mean ± std (population std over seeds);
the recovery ratio is computed from the means. Exact match is reported with a 95% Wilson
interval over all test answers of all seeds, and its recovery only where the intervals of
Direct transfer and Fine-tune_n do not overlap (a few dozen answers near zero cannot resolve it).

Writes ``results.json``, ``seed<k>/<row>/adapter`` folders and the drift report (``drift/``) of
v_o vs v_n with the causal attribution of the drop (:mod:`lightning_peft.analysis.attribution`),
prints the table and logs everything to the configured logger (W&B: tables and plots). A rerun
into the same folder (``hydra.run.dir=...``) skips the seeds it finished with the same settings and refuses
seeds finished with other settings, naming them (``evolve.redo_changed=true`` redoes those;
:mod:`lightning_peft.resume`). The statistics are :mod:`lightning_peft.analysis.evolve_stats`. Composes the
same groups as ``lightning-peft train`` (model, method, task, trainer, logger) plus ``evolve.*``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, ListConfig, OmegaConf

import lightning_peft as lp
from lightning_peft.adapter_folder import AdapterFolder
from lightning_peft.analysis import analyse, log_report, write_report
from lightning_peft.analysis.evolve_stats import (
    METRICS,
    ROWS,
    aggregate,
    exact_match_resolution,
    newer_version,
    recovery_ratio,
    seed_list,
)
from lightning_peft.atomic import atomic_write_text
from lightning_peft.cli.run import RunContext
from lightning_peft.data import first_batches
from lightning_peft.resume import FinishedFile, settings_digest

log = logging.getLogger(__name__)

SEED_FILE = "rows.json"


def _training_settings(cfg: DictConfig) -> dict[str, Any]:
    """The config sections that determine what an adapter becomes (besides base, seed and Trans-PEFT)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("method", "task", "module", "trainer") if k in cfg}


def _cached_adapter(cfg: DictConfig, base: str, root: Path, seed: int, trans_peft: DictConfig | None = None) -> Path:
    """`train_adapter`, or its earlier result from ``evolve.adapter_cache`` when trained with the same settings.

    With a cache folder, adapters live in ``<cache>/<digest>/adapter`` (digest of base, seed,
    Trans-PEFT and the training config), so a multirun over Trans-PEFT settings trains the
    plain Fine-tune_o / Fine-tune_n adapters once.
    """
    cache = cfg.evolve.get("adapter_cache")
    if cache:
        tp = OmegaConf.to_container(trans_peft, resolve=True) if trans_peft is not None else None
        root = Path(cache) / settings_digest({"base": base, "seed": seed, "trans_peft": tp, **_training_settings(cfg)})
        if AdapterFolder(root / "adapter").exists:
            log.info("evolve: reusing the cached adapter %s", root / "adapter")
            return root / "adapter"
    return train_adapter(cfg, base, root, trans_peft, seed)


def _trainer(cfg: DictConfig, callbacks: list[L.Callback], root: Path) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=CSVLogger(root, name="csv"), default_root_dir=str(root),
        enable_checkpointing=False,
    )


def train_adapter(cfg: DictConfig, base: str, root: Path, trans_peft: DictConfig | None = None, seed: int = 0) -> Path:
    """Train ``cfg.method`` on ``base`` with ``seed`` (with Trans-PEFT if given); returns the adapter folder."""
    L.seed_everything(seed, workers=True)
    callbacks: list[L.Callback] = [instantiate(cfg.method)]
    if trans_peft is not None:
        callbacks.append(instantiate(trans_peft, seed=seed))
    module = instantiate(cfg.module, model=base)
    trainer = _trainer(cfg, callbacks, root)
    trainer.fit(module, datamodule=instantiate(cfg.task, shuffle_seed=seed))
    return lp.save_adapter(module, root / "adapter")


def cached_evaluation(cfg: DictConfig, adapter: Path, base: str, root: Path) -> dict[str, float]:
    """`evaluate_adapter`, or its earlier result from ``evolve.adapter_cache`` for the same adapter weights,
    base and settings (``<cache>/eval/<digest>.json``), so a sweep over Trans-PEFT settings evaluates the
    Fine-tune_o, Direct transfer and Fine-tune_n rows once per seed."""
    cache = cfg.evolve.get("adapter_cache")
    if not cache:
        return evaluate_adapter(cfg, adapter, base, root)
    key = {"adapter": AdapterFolder(adapter).fingerprint(), "base": base, **_training_settings(cfg)}
    file = Path(cache) / "eval" / f"{settings_digest(key)}.json"
    if file.is_file():
        log.info("evolve: reusing the cached evaluation %s", file)
        return json.loads(file.read_text())["metrics"]
    metrics = evaluate_adapter(cfg, adapter, base, root)
    atomic_write_text(file, json.dumps({"settings": key, "metrics": metrics}, indent=1, default=str))
    return metrics


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


def _seed_file(root: Path) -> FinishedFile:
    return FinishedFile(root / SEED_FILE, override="evolve.redo_changed=true", elsewhere="hydra.run.dir",
                        digest_key="settings_digest")


def _seed_settings(cfg: DictConfig, seed: int, old: str, new: str) -> dict[str, Any]:
    """What determines a seed's four rows."""
    return {"old": old, "new": new, "seed": seed, "trans_peft": OmegaConf.to_container(cfg.evolve.trans_peft, resolve=True),
            **_training_settings(cfg)}


def run_seed(cfg: DictConfig, seed: int, old: str, new: str, root: Path) -> dict[str, Any]:
    """The four rows of one seed (reused from ``root/rows.json`` when it holds the same settings).

    Raises:
        SettingsChangedError: ``root/rows.json`` was written with other settings (and not ``evolve.redo_changed``).
    """
    settings = _seed_settings(cfg, seed, old, new)
    done = _seed_file(root).read(settings, bool(cfg.evolve.get("redo_changed", False)))
    if done is not None:
        log.info("evolve: seed %d already finished in %s, reusing it", seed, root)
        return done
    a_o = _cached_adapter(cfg, old, root / "fine_tune_o", seed)
    a_tp = _cached_adapter(cfg, old, root / "trans_peft_o", seed, trans_peft=cfg.evolve.trans_peft)
    a_n = _cached_adapter(cfg, new, root / "fine_tune_n", seed)
    rows = {
        ROWS[0]: cached_evaluation(cfg, a_o, old, root / "eval" / "fine_tune_o"),
        ROWS[1]: cached_evaluation(cfg, a_o, new, root / "eval" / "direct"),
        ROWS[2]: cached_evaluation(cfg, a_tp, new, root / "eval" / "trans_peft"),
        ROWS[3]: cached_evaluation(cfg, a_n, new, root / "eval" / "fine_tune_n"),
    }
    result = {
        "seed": seed, "rows": rows,
        "recovery": {m: recovery_ratio(*(rows[r][m] for r in ROWS[1:])) for m in METRICS if all(m in r for r in rows.values())},
        "adapters": {ROWS[0]: str(a_o), ROWS[2]: str(a_tp), ROWS[3]: str(a_n)},
    }
    _seed_file(root).write(settings, result)
    return result


def run_evolve(cfg: DictConfig) -> dict[str, Any]:
    """Run the protocol ``cfg.evolve`` describes; returns what ``results.json`` holds.

    Raises:
        SettingsChangedError: a seed of this run folder was finished with other settings (before any work starts).
    """
    start = time.perf_counter()
    ev = cfg.evolve
    old = ev.old or cfg.model.name_or_path
    new = ev.new or newer_version(old, ev["update"])
    seeds = seed_list(OmegaConf.to_container(ev.seeds) if isinstance(ev.seeds, ListConfig) else ev.seeds, cfg.seed)
    run_dir = Path(cfg.run_dir)
    for seed in seeds:  # changed settings are refused before anything runs, naming the keys
        _seed_file(run_dir / f"seed{seed}").read(_seed_settings(cfg, seed, old, new), bool(ev.get("redo_changed", False)))
    per_seed = []
    for i, seed in enumerate(seeds):
        log.info("evolve: seed %d (%d of %d)", seed, i + 1, len(seeds))
        per_seed.append(run_seed(cfg, seed, old, new, run_dir / f"seed{seed}"))
    means, stds = aggregate([s["rows"] for s in per_seed])
    metrics = [m for m in METRICS if all(m in r for r in means.values())]
    recovery = {m: recovery_ratio(*(means[r][m] for r in ROWS[1:])) for m in metrics}
    em = exact_match_resolution(means, len(seeds) * int(cfg.task.get("num_test") or 0))
    if em and not em["resolved"]:
        recovery["test/exact_match"] = None  # the test split cannot resolve it: not a number to report
    batches = first_batches(instantiate(cfg.task), "test", ev.drift_batches)
    adapters = [Path(s["adapters"][ROWS[0]]) for s in per_seed]
    report = analyse(old, new, batches, topk=ev.topk, adapter_dirs=adapters, per_layer=ev.per_layer)
    plots = write_report(report, run_dir / "drift")
    results: dict[str, Any] = {
        "old": old, "new": new, "method": type(instantiate(cfg.method)).method_name,
        "task": cfg.task._target_.rsplit(".", 1)[-1], "steps": cfg.trainer.max_steps,
        "seed": seeds[0], "seeds": seeds,
        "trans_peft": OmegaConf.to_container(ev.trans_peft, resolve=True),
        "rows": means, "rows_std": stds, "recovery": recovery, "exact_match": em,
        "per_seed": [{k: s[k] for k in ("seed", "rows", "recovery")} for s in per_seed],
        "drift": report.summary(), "attribution": report.attribution_summary(),
        "adapters": {str(s["seed"]): s["adapters"] for s in per_seed},
        "run_dir": str(run_dir), "wall_s": round(time.perf_counter() - start, 1),
    }
    with RunContext(cfg) as run:
        run.write_results(results)
        if run.logger is not None:
            _log(run.logger, results, report, plots, metrics)
    print_table(results, metrics)
    return results


def _log(logger: Logger, results: dict[str, Any], report: Any, plots: dict[str, Path], metrics: list[str]) -> None:
    """The rows, their std and the recovery as metrics; W&B also gets the tables; then the drift report."""
    flat = {f"evolve/{row}/{m}": v for row, r in results["rows"].items() for m, v in r.items() if m in metrics}
    flat.update({f"evolve/{row}/{m}_std": v for row, r in results["rows_std"].items() for m, v in r.items() if m in metrics})
    flat.update({f"evolve/recovery/{m}": v for m, v in results["recovery"].items() if v is not None})
    logger.log_metrics(flat)
    if isinstance(logger, WandbLogger):
        import wandb

        columns = ["row", *(c for m in metrics for c in (m, f"{m}_std"))]
        data = [[row, *(v for m in metrics for v in (results["rows"][row][m], results["rows_std"][row][m]))] for row in ROWS]
        seeds = [[s["seed"], row, *(s["rows"][row][m] for m in metrics)] for s in results["per_seed"] for row in ROWS]
        logger.experiment.log({
            "evolve/results": wandb.Table(columns=columns, data=data),
            "evolve/per_seed": wandb.Table(columns=["seed", "row", *metrics], data=seeds),
        })
    log_report(report, [logger], plots)


def _cell(results: dict[str, Any], row: str, metric: str) -> str:
    mean, std = results["rows"][row][metric], results["rows_std"][row][metric]
    if metric == "test/exact_match" and results.get("exact_match"):
        low, high = results["exact_match"]["ci95"][row]
        return f"{mean:.3f} [{low:.2f}, {high:.2f}]"
    return f"{mean:.4f} ± {std:.4f}"


def print_table(results: dict[str, Any], metrics: list[str]) -> None:
    """Print the four protocol rows (mean ± std over seeds), the recovery ratio and the attribution (rich)."""
    from rich.console import Console
    from rich.table import Table

    seeds = results["seeds"]
    table = Table(
        title=f"{results['method']} on {results['task']}: {results['old']} -> {results['new']} "
        f"({results['steps']} steps, mean ± std over {len(seeds)} seeds {seeds})"
    )
    table.add_column("row", no_wrap=True)
    for m in metrics:
        label = m.removeprefix("test/") + (" [95% CI]" if m == "test/exact_match" and results.get("exact_match") else "")
        table.add_column(label, justify="right")
    for row in ROWS:
        table.add_row(row, *(_cell(results, row, m) for m in metrics))

    def ratio(m: str) -> str:
        value = results["recovery"].get(m)
        if value is not None:
            return f"{value:.2f}"
        return "n/a (not resolved)" if m == "test/exact_match" and results.get("exact_match") else "n/a"

    table.add_row("recovery ratio (of the means)", *(ratio(m) for m in metrics))
    console = Console()
    if not console.is_terminal:  # redirected output: a log file, not an 80-column screen
        console = Console(width=150)
    console.print(table)
    attribution = results.get("attribution") or {}
    if attribution:
        shares = ", ".join(f"{g} {v:+.2f}" for g, v in attribution.items() if g.startswith("explained_token_acc/"))
        console.print(f"direct-transfer drop in token accuracy explained by putting v_o's blocks back: {shares.replace('explained_token_acc/', '')}")
    console.print(
        f"results: {results['run_dir']}/results.json, drift report: {results['run_dir']}/drift ({results['wall_s']} s)"
    )


@hydra.main(version_base="1.3", config_path="pkg://lightning_peft.conf", config_name="evolve")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    from lightning_peft.cli import relaunchable

    with relaunchable("evolve"):
        return run_evolve(cfg)
