"""The Trans-PEFT evaluation protocol: does an adapter survive a base-model update v_o -> v_n?

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
into the same folder (``hydra.run.dir=...``) skips the seeds it finished with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

import lightning_peft as lp
from lightning_peft.atomic import atomic_write_text

log = logging.getLogger(__name__)

ROWS = ("Fine-tune_o", "Direct transfer o->n", "Trans-PEFT o->n", "Fine-tune_n")
METRICS = ("test/loss", "test/token_acc", "test/exact_match")
HEADLINE = ("test/loss", "test/token_acc")  # metrics whose mean ± std the test split resolves
SEED_FILE = "rows.json"


def newer_version(name: str, update: str = "v2") -> str:
    """``llama-v1`` -> ``llama-v2`` (or ``llama-v2-major`` with ``update="v2-major"``) for zoo names.

    Anything else must be given as ``evolve.new``.

    Raises:
        ValueError: ``name`` is not a ``*-v1`` zoo name, or the zoo has no such update of it.
    """
    from lightning_peft import zoo

    if not (zoo.is_zoo_name(name) and name.endswith("-v1")):
        raise ValueError(f"evolve.new is not set and {name!r} is not a '-v1' zoo name; set evolve.new=<updated base>")
    new = name[: -len("v1")] + update
    if not zoo.is_zoo_name(new):
        raise ValueError(
            f"evolve.update={update!r} names no zoo model ({new!r}); the zoo's updates of a v1 are "
            f"{[v for v in zoo.VERSIONS if v != 'v1']}, or set evolve.new=<updated base>"
        )
    return new


def recovery_ratio(direct: float, trans_peft: float, fine_tune_n: float) -> float | None:
    """(TransPEFT_o->n - Direct_o->n) / (FineTune_n - Direct_o->n); ``None`` when the gap is ~0.

    The formula holds for lower-is-better metrics (loss) too: both differences change sign.
    """
    gap = fine_tune_n - direct
    return None if abs(gap) < 1e-9 else (trans_peft - direct) / gap


def seed_list(seeds: int | Sequence[int], first: int = 0) -> list[int]:
    """``evolve.seeds`` as a list: a count ``n`` means ``first, ..., first + n - 1``; a list is taken as is.

    Raises:
        ValueError: a count below 1, an empty list, repeated or negative seeds.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)) or isinstance(seeds, str):
        raise ValueError(f"evolve.seeds must be a count (e.g. 3) or a list of seeds (e.g. [0,1,2]), got {seeds!r}")
    out = list(range(first, first + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(
            f"evolve.seeds must give at least one distinct non-negative seed, got {seeds!r}; e.g. evolve.seeds=3"
        )
    return out


def aggregate(per_seed: Sequence[dict[str, dict[str, float]]]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Mean and population std over seeds of every ``row -> metric`` value present in all seeds.

    Args:
        per_seed: One ``{row: {metric: value}}`` per seed.

    Returns:
        ``(means, stds)`` with the same ``{row: {metric: value}}`` layout.
    """
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}
    for row in per_seed[0]:
        common = set.intersection(*(set(rows[row]) for rows in per_seed))
        values = {m: [rows[row][m] for rows in per_seed] for m in sorted(common)}
        means[row] = {m: statistics.fmean(v) for m, v in values.items()}
        stds[row] = {m: statistics.pstdev(v) for m, v in values.items()}
    return means, stds


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``rate`` observed on ``n`` trials (``(0, 1)`` for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        root = Path(cache) / _digest({"base": base, "seed": seed, "trans_peft": tp, **_training_settings(cfg)})
        if (root / "adapter" / "adapter_config.json").is_file():
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


def run_seed(cfg: DictConfig, seed: int, old: str, new: str, root: Path) -> dict[str, Any]:
    """The four rows of one seed (reused from ``root/rows.json`` when it holds the same settings)."""
    digest = _digest({
        "old": old, "new": new, "seed": seed, "trans_peft": OmegaConf.to_container(cfg.evolve.trans_peft, resolve=True),
        **_training_settings(cfg),
    })
    done = root / SEED_FILE
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("settings_digest") == digest:
            log.info("evolve: seed %d already finished in %s, reusing it", seed, root)
            return saved
        log.warning("evolve: %s was written with other settings; seed %d runs again", done, seed)
    a_o = _cached_adapter(cfg, old, root / "fine_tune_o", seed)
    a_tp = _cached_adapter(cfg, old, root / "trans_peft_o", seed, trans_peft=cfg.evolve.trans_peft)
    a_n = _cached_adapter(cfg, new, root / "fine_tune_n", seed)
    rows = {
        ROWS[0]: evaluate_adapter(cfg, a_o, old, root / "eval" / "fine_tune_o"),
        ROWS[1]: evaluate_adapter(cfg, a_o, new, root / "eval" / "direct"),
        ROWS[2]: evaluate_adapter(cfg, a_tp, new, root / "eval" / "trans_peft"),
        ROWS[3]: evaluate_adapter(cfg, a_n, new, root / "eval" / "fine_tune_n"),
    }
    result = {
        "seed": seed, "rows": rows, "settings_digest": digest,
        "recovery": {m: recovery_ratio(*(rows[r][m] for r in ROWS[1:])) for m in METRICS if all(m in r for r in rows.values())},
        "adapters": {ROWS[0]: str(a_o), ROWS[2]: str(a_tp), ROWS[3]: str(a_n)},
    }
    atomic_write_text(done, json.dumps(result, indent=2))
    return result


def exact_match_resolution(means: dict[str, dict[str, float]], n_answers: int) -> dict[str, Any]:
    """Wilson intervals of every row's exact match and whether Direct vs Fine-tune_n is resolved."""
    metric = "test/exact_match"
    if not all(metric in r for r in means.values()):
        return {}
    ci = {row: wilson_interval(means[row][metric], n_answers) for row in ROWS}
    direct, upper = ci[ROWS[1]], ci[ROWS[3]]
    resolved = direct[1] < upper[0] or upper[1] < direct[0]
    return {"answers": n_answers, "ci95": ci, "resolved": resolved}


def run_evolve(cfg: DictConfig) -> dict[str, Any]:
    """Run the protocol ``cfg.evolve`` describes; returns what ``results.json`` holds."""
    from lightning_peft.analysis import analyse, write_report
    from lightning_peft.data import first_batches

    start = time.perf_counter()
    ev = cfg.evolve
    old = ev.old or cfg.model.name_or_path
    new = ev.new or newer_version(old, ev["update"])
    seeds = seed_list(OmegaConf.to_container(ev.seeds) if isinstance(ev.seeds, ListConfig) else ev.seeds, cfg.seed)
    run_dir = Path(cfg.run_dir)
    per_seed = []
    for i, seed in enumerate(seeds):
        log.info("evolve: seed %d (%d of %d)", seed, i + 1, len(seeds))
        per_seed.append(run_seed(cfg, seed, old, new, run_dir / f"seed{seed}"))
    means, stds = aggregate([s["rows"] for s in per_seed])
    metrics = [m for m in METRICS if all(m in r for r in means.values())]
    recovery = {m: recovery_ratio(*(means[r][m] for r in ROWS[1:])) for m in metrics}
    n_answers = len(seeds) * int(cfg.task.get("num_test") or 0)
    em = exact_match_resolution(means, n_answers)
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
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
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
    flat.update({f"evolve/{row}/{m}_std": v for row, r in results["rows_std"].items() for m, v in r.items() if m in metrics})
    flat.update({f"evolve/recovery/{m}": v for m, v in results["recovery"].items() if v is not None})
    logger.log_metrics(flat)
    wandb_run = type(logger).__name__ == "WandbLogger"
    if wandb_run:
        import wandb

        columns = ["row", *(c for m in metrics for c in (m, f"{m}_std"))]
        data = [[row, *(v for m in metrics for v in (results["rows"][row][m], results["rows_std"][row][m]))] for row in ROWS]
        seeds = [[s["seed"], row, *(s["rows"][row][m] for m in metrics)] for s in results["per_seed"] for row in ROWS]
        logger.experiment.log({
            "evolve/results": wandb.Table(columns=columns, data=data),
            "evolve/per_seed": wandb.Table(columns=["seed", "row", *metrics], data=seeds),
        })
    log_report(report, [logger], plots)
    if wandb_run:
        import wandb

        wandb.finish()
    else:
        logger.finalize("success")


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
