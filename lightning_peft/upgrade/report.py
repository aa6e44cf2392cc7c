"""The fleet report: ``upgrade_report.{json,csv,md,png}``, the W&B table, and merging the shards of one fleet.

``upgrade_report.json`` is a list of ``{adapter, route, agreement, fidelity, seconds, output, ...}`` rows,
one per adapter (with ``retrain_seconds``, what its own training took, and ``timings``, the seconds spent on
synthesis, labelling, student and scoring): ``agreement`` and ``fidelity`` are the taken candidate's (else the best
of the scored ones), and ``scores`` holds every scored candidate's scores by route (agreement, exact, kl; fidelity,
its basis, both of its forms and the per-byte log-likelihoods behind them:
:class:`~lightning_peft.upgrade.fidelity.Fidelity`). A calibration run (``num_test > 0``) adds the real test token
accuracy: ``source_test_acc`` (the old adapter on the old base), each candidate's ``test_acc`` and ``relative_acc``
(in ``scores``) and the taken route's (in the row). ``lightning-peft upgrade-report DIR`` merges
every ``upgrade_report.json`` below ``DIR`` (the jobs of a ``lightning-peft upgrade -m shard=...`` sweep) into one report in ``DIR``.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from lightning_peft.atomic import atomic_write_text

__all__ = ["REPORT", "COLUMNS", "log_report", "merge_reports", "write_report"]

REPORT = "upgrade_report"
COLUMNS = ("adapter", "route", "agreement", "fidelity", "seconds", "output", "method", "old", "new", "reason",
           "retrain_seconds", "timings", "budget_ran_out", "test_acc", "relative_acc", "source_test_acc")
_COLOURS = {"direct": "tab:green", "translora": "tab:blue", "needs_data": "tab:orange", "failed": "tab:red"}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # seconds per phase
        return " ".join(f"{k} {v:g}" for k, v in value.items())
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The report as a markdown table, with the count of each route."""
    counts = Counter(r["route"] for r in rows)
    real = any(r.get("source_test_acc") is not None for r in rows)  # a calibration run (num_test > 0)
    lines = [f"# Fleet upgrade: {len(rows)} adapters (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")",
             "", "| adapter | route | agreement | fidelity | " + ("real test accuracy: route (x source) / source | " if real else "")
             + "seconds | retrain seconds | seconds spent on | method | old -> new | output / reason |",
             "|" + "---|" * (11 if real else 10)]
    for r in rows:
        detail = r.get("output") or (r.get("reason") or "").replace("|", "/")
        spent = _cell(r.get("timings")) + (f" (budget ran out in {r['budget_ran_out']})" if r.get("budget_ran_out") else "")
        accuracy = ""
        if real:
            taken = f"{r['test_acc']:.3f} ({r['relative_acc']:.2f}x)" if r.get("relative_acc") is not None else "-"
            accuracy = f" {taken} / {_cell(r.get('source_test_acc'))} |"
        lines.append(f"| {r['adapter']} | {r['route']} | {_cell(r.get('agreement'))} | {_cell(r.get('fidelity'))} |{accuracy} "
                     f"{_cell(r.get('seconds'))} | {_cell(r.get('retrain_seconds'))} | {spent} | "
                     f"{r.get('method') or ''} | {r.get('old') or ''} -> {r.get('new') or ''} | {detail} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, threshold: float | None = None, score: str = "agreement") -> None:
    """Bars of each adapter's ``score`` (the deciding one), coloured by the route it got (PNG); values outside
    [0, 1] (a fidelity can be) are drawn at the edge."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.8))
    values = [min(max(r.get(score) or 0.0, 0.0), 1.0) for r in rows]
    ax.bar(range(len(rows)), values, color=[_COLOURS.get(r["route"], "grey") for r in rows])
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"threshold {threshold}")
    for route, colour in _COLOURS.items():
        if any(r["route"] == route for r in rows):
            ax.bar([0], [0], color=colour, label=route)
    ax.set_xticks(range(len(rows)), [r["adapter"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{score} with old base + old adapter")
    ax.set_title(f"fleet upgrade: route and {score} per adapter")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], folder: str | Path, threshold: float | None = None,
                 score: str = "agreement") -> dict[str, Path]:
    """Write ``upgrade_report.{json,csv,md,png}`` into ``folder`` (the plot shows ``score`` against ``threshold``);
    returns the files by suffix."""
    folder = Path(folder)
    files = {ext: folder / f"{REPORT}.{ext}" for ext in ("json", "csv", "md", "png")}
    atomic_write_text(files["json"], json.dumps(rows, indent=2))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "timings": _cell(r.get("timings"))} for r in rows)
    atomic_write_text(files["csv"], buffer.getvalue())
    atomic_write_text(files["md"], markdown(rows))
    plot(rows, files["png"], threshold, score)
    return files


def log_report(rows: list[dict[str, Any]], logger: Any, png: Path | None = None) -> None:
    """The report as a W&B table (plus the PNG) and route counts as metrics for any Lightning logger."""
    counts = Counter(r["route"] for r in rows)
    logger.log_metrics({f"upgrade/route/{k}": float(v) for k, v in counts.items()} | {"upgrade/adapters": float(len(rows))})
    if type(logger).__name__ == "WandbLogger":
        import wandb

        data = [[r.get(c) if not isinstance(r.get(c), (dict, list)) else json.dumps(r.get(c)) for c in COLUMNS] for r in rows]
        payload: dict[str, Any] = {"upgrade/report": wandb.Table(columns=list(COLUMNS), data=data)}
        if png is not None:
            payload["upgrade/plot"] = wandb.Image(str(png))
        logger.experiment.log(payload)


def merge_reports(folder: str | Path) -> list[dict[str, Any]]:
    """Every ``upgrade_report.json`` below ``folder`` (not the merged one in ``folder`` itself), adapters de-duplicated.

    Raises:
        FileNotFoundError: none found.
    """
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob(f"{REPORT}.json") if p.parent != folder)
    if not paths:
        raise FileNotFoundError(f"no {REPORT}.json below {folder}; pass the sweep folder of `lightning-peft upgrade -m ...`")
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in json.loads(path.read_text()):
            merged[row["adapter"]] = row
    return [merged[k] for k in sorted(merged)]
