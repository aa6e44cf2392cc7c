"""``lightning-peft upgrade adapters=DIR new=MODEL``: upgrade a fleet (Hydra config ``upgrade``), and
``lightning-peft upgrade-report [DIR]``: merge the reports of a sharded sweep."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_peft.cli.run import RunContext, dataclass_fields
from lightning_peft.upgrade import UpgradeConfig, upgrade_fleet
from lightning_peft.upgrade.report import log_report, merge_reports, write_report


def upgrade_config(cfg: DictConfig) -> UpgradeConfig:
    """The :class:`UpgradeConfig` of a composed ``upgrade`` config."""
    return UpgradeConfig(**dataclass_fields(UpgradeConfig, cfg))


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Upgrade the fleet ``cfg`` names; write, log and print the report; returns its rows."""
    ucfg = upgrade_config(cfg)
    with RunContext(cfg) as run:
        rows = upgrade_fleet(ucfg)
        deciding = ucfg.min_fidelity if ucfg.score == "fidelity" else ucfg.threshold
        files = write_report(rows, ucfg.out, deciding, ucfg.score)
        if run.logger is not None:
            log_report(rows, run.logger, files["png"])
        print_report(rows, files["md"])
        return rows


def print_report(rows: list[dict[str, Any]], where: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fleet upgrade: {len(rows)} adapters")
    for column in ("adapter", "route", "agreement", "fidelity", "seconds"):
        table.add_column(column, justify="left" if column in ("adapter", "route") else "right", no_wrap=True)
    for r in rows:
        scores = ["" if r.get(key) is None else f"{r[key]:.3f}" for key in ("agreement", "fidelity")]
        table.add_row(r["adapter"], r["route"], *scores, f"{r.get('seconds', 0):.1f}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(table)
    console.print(f"report: {where.with_suffix('')}.{{json,csv,md,png}}")


@hydra.main(version_base="1.3", config_path="pkg://lightning_peft.conf", config_name="upgrade")
def hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def report_main(args: list[str]) -> int:
    """``upgrade-report [DIR]``: merge the shard reports below DIR (default: the newest upgrade sweep)."""
    if len(args) > 1 or args[:1] in (["-h"], ["--help"]):
        print("usage: lightning-peft upgrade-report [SWEEP_DIR]  (default: the newest multirun/upgrade/*/* folder)")
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    if args:
        folder = Path(args[0])
    else:
        sweeps = sorted(Path("multirun/upgrade").glob("*/*"))
        if not sweeps:
            print("no multirun/upgrade/*/* folder here; pass the sweep folder: lightning-peft upgrade-report DIR",
                  file=sys.stderr)
            return 2
        folder = sweeps[-1]
    try:
        rows = merge_reports(folder)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    files = write_report(rows, folder)
    print_report(rows, files["md"])
    return 0
