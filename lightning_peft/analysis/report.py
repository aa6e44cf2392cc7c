"""Write a :class:`DriftReport` as a folder a person can open, and log it to Lightning loggers.

Folder: ``summary.json`` (scalars), ``report.json`` (all tables), one ``<table>.csv`` per
table, and PNG plots: ``weights_heatmap.png`` (layer x module type relative change),
``weights_by_depth.png`` (attention vs FFN vs depth), ``attention_js.png`` (layer x head),
``cka.png``, ``ffn_contribution.png``, ``ffn_activation.png`` and, with an adapter,
``attribution.png`` (share of its drop explained per sub-block group, both directions).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning_peft.analysis.compare import DriftReport

_TYPE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "norm")


def write_report(report: DriftReport, folder: str | Path) -> dict[str, Path]:
    """Write the report folder; returns the PNG plots by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"old": report.old, "new": report.new, **report.summary()}, indent=2))
    (folder / "report.json").write_text(json.dumps({"old": report.old, "new": report.new, **report.tables()}, indent=2))
    for name, rows in report.tables().items():
        with (folder / f"{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return plot_report(report, folder)


def _layer_type_matrix(report: DriftReport) -> tuple[list[int], list[str], list[list[float]]]:
    cells: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in report.weights:
        if r["layer"] is not None:
            cells[r["layer"], r["type"]].append(r["rel_change"])
    layers = sorted({k[0] for k in cells})
    types = [t for t in _TYPE_ORDER if any((layer, t) in cells for layer in layers)]
    types += sorted({k[1] for k in cells} - set(types))
    nan = float("nan")
    return layers, types, [[sum(cells[l, t]) / len(cells[l, t]) if cells[l, t] else nan for t in types] for l in layers]  # noqa: E741


def plot_report(report: DriftReport, folder: Path) -> dict[str, Path]:
    """Render the PNG plots into ``folder``; returns them by name."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    title = f"{report.old} -> {report.new}"
    plots: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots[name] = path

    if report.weights:
        layers, types, matrix = _layer_type_matrix(report)
        fig, ax = plt.subplots(figsize=(1 + 0.8 * len(types), 1 + 0.5 * len(layers)))
        im = ax.imshow(matrix, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module type"), ax.set_ylabel("layer")
        ax.set_title(f"||W_n - W_o|| / ||W_o||\n{title}")
        fig.colorbar(im, ax=ax)
        save(fig, "weights_heatmap")

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for group in ("attention", "ffn"):
            by_layer: dict[int, list[float]] = defaultdict(list)
            for r in report.weights:
                if r["group"] == group and r["layer"] is not None:
                    by_layer[r["layer"]].append(r["rel_change"])
            xs = sorted(by_layer)
            ax.plot(xs, [sum(by_layer[x]) / len(by_layer[x]) for x in xs], marker="o", label=group)
        ax.set_xlabel("layer"), ax.set_ylabel("relative weight change"), ax.legend(), ax.set_title(title)
        save(fig, "weights_by_depth")
    if report.attention_js:
        layers = sorted({r["layer"] for r in report.attention_js})
        heads = sorted({r["head"] for r in report.attention_js})
        grid = [[0.0] * len(heads) for _ in layers]
        for r in report.attention_js:
            grid[layers.index(r["layer"])][heads.index(r["head"])] = r["js"]
        fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(heads), 1 + 0.5 * len(layers)))
        im = ax.imshow(grid, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(heads)), heads), ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("head"), ax.set_ylabel("layer"), ax.set_title(f"attention JS divergence\n{title}")
        fig.colorbar(im, ax=ax)
        save(fig, "attention_js")
    for name, keys, ylabel in (
        ("cka", ("cka",), "linear CKA of hidden states"),
        ("ffn_contribution", ("old", "new"), "||FFN(LN(a))|| / ||a||"),
        ("ffn_activation", ("topk_overlap", "cosine"), "FFN neuron agreement"),
    ):
        rows = getattr(report, name)
        if rows:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for key in keys:
                label = {"old": report.old, "new": report.new}.get(key, key)
                ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker="o", label=label)
            ax.set_xlabel("layer"), ax.set_ylabel(ylabel), ax.legend(), ax.set_title(title)
            save(fig, name)
    if report.attribution:
        save(_attribution_figure(report, plt, title), "attribution")
    return plots


def _attribution_figure(report: DriftReport, plt: Any, title: str) -> Any:
    """Bars of the explained share per group and direction (mean over adapters, std as error bars)."""
    import statistics

    groups = list(dict.fromkeys(r["group"] for r in report.attribution if r["direction"] != "base"))
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.7 * len(groups), 3.8), sharey=True)
    width = 0.4
    for ax, metric in zip(axes, ("token_acc", "loss"), strict=True):
        for offset, direction in ((-width / 2, "put back"), (width / 2, "only")):
            means, errors = [], []
            for group in groups:
                values = [
                    r[f"explained_{metric}"] for r in report.attribution
                    if r["group"] == group and r["direction"] == direction and r[f"explained_{metric}"] is not None
                ]
                means.append(statistics.fmean(values) if values else float("nan"))
                errors.append(statistics.pstdev(values) if len(values) > 1 else 0.0)
            label = "v_n, this group from v_o" if direction == "put back" else "v_o, only this group from v_n"
            ax.bar([i + offset for i in range(len(groups))], means, width, yerr=errors, label=label, capsize=2)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.axhline(1, color="grey", linewidth=0.6, linestyle="--")
        ax.set_xticks(range(len(groups)), groups, rotation=60, ha="right")
        ax.set_title(f"{metric}: share of the drop explained")
    axes[0].set_ylabel("explained share (1 = all of the drop)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"causal attribution of the old adapter's drop\n{title}", fontsize=9)
    return fig


def log_report(report: DriftReport, loggers: list[Any], plots: dict[str, Path], step: int | None = None) -> None:
    """Log the report: W&B gets tables + images, every logger gets the summary scalars.

    Files (CSV/JSON/PNG) are written by :func:`write_report` into the logger's folder by the
    caller; here only what each logger can show is sent.
    """
    summary = report.summary()
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            payload: dict[str, Any] = {}
            for name, rows in report.tables().items():
                columns = list(rows[0])
                payload[f"drift/{name}"] = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            for name, path in plots.items():
                payload[f"drift/plot/{name}"] = wandb.Image(str(path), caption=f"{report.old} -> {report.new}: {name}")
            logger.experiment.log(payload)
        logger.log_metrics(summary, step=step)
