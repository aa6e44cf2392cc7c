"""``lightning-peft drift old=... new=...``: the drift report of two base versions (Hydra app)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_peft.analysis import DriftReport, analyse, log_report, write_report
from lightning_peft.cli.run import RunContext
from lightning_peft.data import first_batches


def run(cfg: DictConfig) -> DriftReport:
    """Build, write, log and print the report ``cfg`` asks for."""
    batches = first_batches(instantiate(cfg.task), cfg.split, cfg.num_batches)
    report = analyse(cfg.old, cfg.new, batches, topk=cfg.topk, adapter_dirs=cfg.adapter, per_layer=cfg.per_layer)
    plots = write_report(report, cfg.out_dir)
    with RunContext(cfg) as run:
        if run.logger is not None:
            log_report(report, [run.logger], plots)
    print_summary(report, Path(cfg.out_dir))
    return report


def print_summary(report: DriftReport, folder: Path) -> None:
    """Print the summary scalars and where the report is."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"drift {report.old} -> {report.new}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in report.summary().items():
        table.add_row(key.removeprefix("drift/"), f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"report: {folder} (summary.json, *.csv, *.png)")


@hydra.main(version_base="1.3", config_path="pkg://lightning_peft.conf", config_name="drift")
def hydra_main(cfg: DictConfig) -> None:
    run(cfg)
