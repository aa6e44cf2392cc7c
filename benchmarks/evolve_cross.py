"""Every adapter of a finished ``lightning-peft evolve`` run on both bases: is a drop the transfer's or the adapter's?

The evolve protocol (Gu et al., ACL 2025, section 4) tests the Trans-PEFT adapter on v_n only. When it does no
better than direct transfer, two readings remain: the method did not protect the transfer, or it weakened the
adapter on v_o already. This evaluates each seed's Fine-tune_o and Trans-PEFT adapters on v_o and v_n with the run's own settings (its ``.hydra/config.yaml``) and the run's evaluation
(:func:`lightning_peft.cli.evolve.evaluate_adapter`: generated answers on the task's test split); combinations
the run already evaluated come from its ``evolve.adapter_cache``.

    python benchmarks/evolve_cross.py outputs/evolve_smollm2_v2 [outputs/evolve_smollm2_v2_mask ...]

Writes ``benchmarks/results/evolve_cross.json`` and prints label accuracy / token accuracy / loss, mean ± std
over the seeds, per run, adapter and base.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import lightning_peft.conf  # noqa: F401  (registers the resolvers the saved config uses)
from omegaconf import OmegaConf

from lightning_peft.cli.evolve import cached_evaluation

OUT = Path(__file__).with_name("results") / "evolve_cross.json"
ADAPTERS = ("Fine-tune_o", "Trans-PEFT o->n")
METRICS = ("test/exact_match", "test/token_acc", "test/loss")


def cross(run_dir: Path) -> dict:
    """``{adapter row: {"old"|"new": [metrics per seed]}}`` of one evolve run folder."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.run_dir = str(run_dir.resolve())  # the saved config names Hydra's output dir by interpolation
    seeds = [json.loads(f.read_text()) for f in sorted(run_dir.glob("seed*/rows.json"))]  # the finished seeds
    bases = {side: seeds[0]["settings"][side] for side in ("old", "new")}
    out: dict = {row: {"old": [], "new": []} for row in ADAPTERS}
    for s in seeds:
        for row in ADAPTERS:
            for side, base in bases.items():
                root = run_dir / f"seed{s['seed']}" / "cross" / f"{row.split()[0].lower()}_{side}"
                metrics = cached_evaluation(cfg, Path(s["adapters"][row]), base, root)
                out[row][side].append({m: metrics[m] for m in METRICS})
    return {**bases, "trans_peft": seeds[0]["settings"]["trans_peft"], "seeds": [s["seed"] for s in seeds], "rows": out}


def _cell(values: list[dict], metric: str) -> str:
    xs = [v[metric] for v in values]
    return f"{statistics.fmean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="evolve run folders (hydra.run.dir): their finished seeds")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    report = {str(run): cross(run) for run in args.runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| run (Trans-PEFT p_m / p_d) | adapter | on v_o: label acc / token acc / loss | on v_n: label acc / token acc / loss |")
    print("|---|---|---|---|")
    for run, r in report.items():
        tp = f"{r['trans_peft']['mask_p']} / {r['trans_peft']['drop_p']}"
        for row, sides in r["rows"].items():
            cells = [" / ".join(_cell(sides[s], m) for m in METRICS) for s in ("old", "new")]
            print(f"| {Path(run).name} ({tp}) | {row} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
