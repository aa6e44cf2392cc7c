"""Does a Trans-PEFT adapter survive a base update? The evolve protocol over the zoo, seeds and update sizes.

Runs ``lightning-peft evolve`` as a user would (Hydra multirun, the CSV logger), in two sweeps:

1. the grid: families x tasks x methods x updates (``v2``: moderate, ``v2-major``: strong), each
   job ``evolve.seeds`` seeds (default 3), the plain v1 adapters shared between the two updates
   through ``evolve.adapter_cache``;
2. the ablation of Trans-PEFT's two probabilities (``hparams_search=trans_peft_grid``: p_m in
   {0, 0.1, 0.3} x p_d in {0, 0.1, 0.2}) on the first family / task / method, moderate update.

Then it collects every job's ``results.json`` into ``benchmarks/results/trans_peft_evidence.{json,md,png}``:
the four rows (token accuracy and loss, mean ± std over seeds), the recovery ratio from the means
with the spread of the per-seed ratios, and the causal attribution of the direct-transfer drop
(share explained by putting v1's FFN / attention / outside blocks back into v2). A rerun continues:
finished seeds and cached adapters are reused.

    python benchmarks/trans_peft_evidence.py                     # the full evidence (~1-2 h on 2 CPU cores)
    python benchmarks/trans_peft_evidence.py --families llama --tasks arithmetic --methods lora --no-grid
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
ROWS = ("Fine-tune_o", "Direct transfer o->n", "Trans-PEFT o->n", "Fine-tune_n")
METRICS = {"token_acc": "test/token_acc", "loss": "test/loss"}


def evolve_multirun(sweep_dir: Path, overrides: list[str]) -> None:
    """``lightning-peft evolve -m <overrides>`` into ``sweep_dir`` (a rerun continues its jobs)."""
    cmd = [sys.executable, "-m", "lightning_peft.cli", "evolve", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    print("+", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per finished job: its settings, the four rows, recoveries and the attribution."""
    records = []
    for path in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name)):
        r = json.loads(path.read_text())
        per_seed = {
            k: [s["recovery"].get(m) for s in r["per_seed"] if s["recovery"].get(m) is not None] for k, m in METRICS.items()
        }
        records.append({
            "family": r["old"].split("-")[0], "task": r["task"].removesuffix("Task").lower(), "method": r["method"],
            "update": r["new"].split("-", 1)[1], "old": r["old"], "new": r["new"], "seeds": r["seeds"],
            "mask_p": r["trans_peft"]["mask_p"], "drop_p": r["trans_peft"]["drop_p"],
            "rows": {row: {k: r["rows"][row][m] for k, m in METRICS.items()} for row in ROWS},
            "rows_std": {row: {k: r["rows_std"][row][m] for k, m in METRICS.items()} for row in ROWS},
            "recovery": {k: r["recovery"].get(m) for k, m in METRICS.items()},
            "recovery_seed_mean": {k: statistics.fmean(v) if v else None for k, v in per_seed.items()},
            "recovery_seed_std": {k: statistics.pstdev(v) if len(v) > 1 else None for k, v in per_seed.items()},
            "attribution": r["attribution"], "drift": r["drift"], "run_dir": r["run_dir"],
        })
    return records


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(grid: list[dict[str, Any]], ablation: list[dict[str, Any]]) -> str:
    lines = ["# Trans-PEFT evidence (`python benchmarks/trans_peft_evidence.py`)", ""]
    lines += ["Token accuracy, mean ± std over seeds; recovery = (Trans-PEFT - Direct) / (Fine-tune_n - Direct) of the "
              "means, then mean ± std of the per-seed ratios.", ""]
    lines += ["| family | task | method | update | Fine-tune_o | Direct o->n | Trans-PEFT o->n | Fine-tune_n | "
              "recovery (acc) | recovery (loss) |", "|" + "---|" * 10]
    for r in grid:
        cells = [_pm(r["rows"][row]["token_acc"], r["rows_std"][row]["token_acc"]) for row in ROWS]
        rec = [f"{_pm(r['recovery'][k], None, 2)} ({_pm(r['recovery_seed_mean'][k], r['recovery_seed_std'][k], 2)})"
               for k in ("token_acc", "loss")]
        lines.append(f"| {r['family']} | {r['task']} | {r['method']} | {r['update']} | " + " | ".join(cells + rec) + " |")
    lines += ["", "Causal attribution of the direct-transfer drop (share explained by putting v1's blocks back into v2, "
              "mean over the seeds' Fine-tune_o adapters; token accuracy / loss):", ""]
    lines += ["| family | task | method | update | weight change attn / FFN | FFN | attention | outside |",
              "|" + "---|" * 8]
    for r in grid:
        a, d = r["attribution"], r["drift"]
        shares = [f"{_pm(a.get(f'explained_token_acc/{g}'), None, 2)} / {_pm(a.get(f'explained_loss/{g}'), None, 2)}"
                  for g in ("ffn", "attention", "outside")]
        change = f"{d['drift/weight_rel_change/attention']:.3f} / {d['drift/weight_rel_change/ffn']:.3f}"
        lines.append(f"| {r['family']} | {r['task']} | {r['method']} | {r['update']} | {change} | " + " | ".join(shares) + " |")
    if ablation:
        first = ablation[0]
        lines += ["", f"Ablation of p_m / p_d ({first['family']}, {first['task']}, {first['method']}, update "
                  f"{first['update']}; Hydra multirun `hparams_search=trans_peft_grid`):", ""]
        lines += ["| p_m | p_d | Trans-PEFT o->n acc | Trans-PEFT o->n loss | recovery (acc) | recovery (loss) |",
                  "|" + "---|" * 6]
        for r in sorted(ablation, key=lambda r: (r["mask_p"], r["drop_p"])):
            tp = r["rows"]["Trans-PEFT o->n"]
            tp_std = r["rows_std"]["Trans-PEFT o->n"]
            rec = [f"{_pm(r['recovery'][k], None, 2)} ({_pm(r['recovery_seed_mean'][k], r['recovery_seed_std'][k], 2)})"
                   for k in ("token_acc", "loss")]
            lines.append(f"| {r['mask_p']} | {r['drop_p']} | {_pm(tp['token_acc'], tp_std['token_acc'])} | "
                         f"{_pm(tp['loss'], tp_std['loss'])} | " + " | ".join(rec) + " |")
    return "\n".join(lines) + "\n"


def plot(grid: list[dict[str, Any]], ablation: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = [f"{r['family']}/{r['task'][:5]}/{r['method']}/{r['update']}" for r in grid]
    xs = range(len(grid))
    for offset, key in ((-0.2, "token_acc"), (0.2, "loss")):
        means = [r["recovery_seed_mean"][key] or 0.0 for r in grid]
        errs = [r["recovery_seed_std"][key] or 0.0 for r in grid]
        axes[0].bar([x + offset for x in xs], means, 0.4, yerr=errs, capsize=2, label=f"recovery ({key})")
    axes[0].axhline(0, color="black", linewidth=0.6)
    axes[0].axhline(0.5, color="grey", linestyle="--", linewidth=0.6, label="goal 0.5")
    axes[0].set_xticks(list(xs), labels, rotation=70, ha="right", fontsize=7)
    axes[0].set_title("Trans-PEFT recovery of the direct-transfer gap (per-seed mean ± std)")
    axes[0].legend(fontsize=7)
    bottom = [0.0] * len(grid)
    for group in ("ffn", "attention", "outside"):
        values = [r["attribution"].get(f"explained_token_acc/{group}", 0.0) for r in grid]
        axes[1].bar(list(xs), values, 0.6, label=group)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[1].set_xticks(list(xs), labels, rotation=70, ha="right", fontsize=7)
    axes[1].set_title("share of the token-accuracy drop explained by\nputting v1's blocks back (not additive)")
    axes[1].legend(fontsize=7)
    if ablation:
        for key, marker in (("token_acc", "o"), ("loss", "s")):
            for drop in sorted({r["drop_p"] for r in ablation}):
                pts = sorted((r["mask_p"], r["recovery"][key]) for r in ablation if r["drop_p"] == drop and r["recovery"][key] is not None)
                axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{key}, p_d={drop}")
        axes[2].axhline(0, color="black", linewidth=0.6)
        axes[2].set_xlabel("p_m (masking)"), axes[2].set_ylabel("recovery ratio (of the means)")
        axes[2].set_title("ablation of p_m / p_d")
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama,qwen2")
    parser.add_argument("--tasks", default="arithmetic,data2text")
    parser.add_argument("--methods", default="lora,shira")
    parser.add_argument("--updates", default="v2,v2-major")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="adapter training steps (the main job's default)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "trans_peft_evidence", help="sweep folders + adapter cache")
    parser.add_argument("--no-grid", action="store_true", help="skip the p_m/p_d ablation")
    parser.add_argument("--out", type=Path, default=RESULTS / "trans_peft_evidence")
    args = parser.parse_args()
    common = [f"evolve.seeds={args.seeds}", f"trainer.max_steps={args.steps}", f"evolve.adapter_cache={args.work / 'adapters'}",
              "evolve.drift_batches=4", "logger=csv", "+trainer.enable_progress_bar=false"]
    evolve_multirun(args.work / "grid", [f"model={args.families}", f"task={args.tasks}", f"method={args.methods}",
                                         f"evolve.update={args.updates}", *common])
    grid = collect(args.work / "grid")
    ablation: list[dict[str, Any]] = []
    if not args.no_grid:
        first = [v.split(",")[0] for v in (args.families, args.tasks, args.methods, args.updates)]
        evolve_multirun(args.work / "ablation", ["hparams_search=trans_peft_grid", f"model={first[0]}", f"task={first[1]}",
                                                 f"method={first[2]}", f"evolve.update={first[3]}", *common])
        ablation = collect(args.work / "ablation")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"grid": grid, "ablation": ablation}, indent=2))
    text = markdown(grid, ablation)
    args.out.with_suffix(".md").write_text(text)
    plot(grid, ablation, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
