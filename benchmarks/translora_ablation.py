"""Trans-LoRA ablations on the zoo: what the synthesis and the student change, side by side.

Each setting is one run of ``translora_experiment.py`` (its flags below) into its own folder; this
script runs those not yet there, then gathers them into one table: token accuracy on the real test
split, mean ± std over seeds, per (setting, pair, task), for a fresh student (filtered / unfiltered),
a student warm-started from the source adapter (filtered / unfiltered), direct reuse of the old
adapter and the source adapter itself.

    python benchmarks/translora_ablation.py             # runs what is missing (about 20 min per setting, 1 thread)
    python benchmarks/translora_ablation.py --report    # only rebuild the table and plot

Writes ``benchmarks/results/translora_ablation.{json,md,png}`` and keeps each setting's own
``translora.{json,md}`` in ``benchmarks/results/translora_ablation/<setting>/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from harness import mean_std  # noqa: E402

RESULTS = ROOT / "results"
SAME_FAMILY = ["--pairs", "llama-v1:llama-v2", "--only", "unfiltered", "warm"]
# setting -> (what it changes, translora_experiment.py flags); the first is the paper's recipe of the last round
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "paper": ("free continuation of the seed list, fresh students (lr 5e-3, 300 steps)", ["--no-anchor"]),
    "anchored": ("inputs anchored to the seeds' opening and ending; warm students at the fresh students' 5e-3 / 300",
                 [*SAME_FAMILY, "--warm-lr", "5e-3", "--warm-steps", "300"]),
    "anchored_default": ("anchored; warm students at the default warm_lr 5e-4 / warm_steps 100 (fresh ones too)",
                         [*SAME_FAMILY, "--student-lr", "5e-4", "--student-steps", "100"]),
    "free_default": ("free continuation (as `paper`); warm students at the default warm_lr 5e-4 / warm_steps 100",
                     ["--no-anchor", *SAME_FAMILY, "--student-lr", "5e-4", "--student-steps", "100"]),
    "anchored_qwen2": ("anchored, to another family (no warm start, no direct reuse); SQL rerun with the fallback to "
                       "the free continuation (`--tasks sql`)",
                       ["--pairs", "llama-v1:qwen2-v1", "--only", "unfiltered"]),
}
COLS = {"fresh": "trans_lora", "fresh unfiltered": "unfiltered", "warm": "trans_lora_warm",
        "warm unfiltered": "unfiltered_warm", "direct reuse": "no_transfer", "source": "source",
        "target base": "target_base"}


def folder(name: str) -> Path:
    return RESULTS if name == "paper" else RESULTS / "translora_ablation" / name  # "paper": the committed run


def run(name: str, flags: list[str], seeds: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "translora_experiment.py"), *flags, "--seeds", *seeds, "--out", str(folder(name)),
           "--resume"]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)



def gather() -> list[dict]:
    """One row per (setting, pair, task): the seeds' token accuracies per column."""
    rows = []
    for name, (what, _) in SETTINGS.items():
        path = folder(name) / "translora.json"
        if not path.is_file():
            continue
        groups: dict[tuple[str, str, str], list[dict]] = {}
        for r in json.loads(path.read_text())["rows"]:
            groups.setdefault((r["source_model"], r["target_model"], r["task"]), []).append(r)
        for (src, tgt, task), rs in groups.items():
            rows.append({"setting": name, "what": what, "pair": f"{src} -> {tgt}", "task": task,
                         "seeds": [r["seed"] for r in rs],
                         **{col: [r[f"{key}/token_acc"] for r in rs if f"{key}/token_acc" in r]
                            for col, key in COLS.items()}})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# Trans-LoRA ablations on the zoo (`python benchmarks/translora_ablation.py`)", "",
             "Token accuracy on 64 real test examples, mean ± std over seeds (n = seeds run).", "",
             "| setting | pair | task | n | " + " | ".join(COLS) + " |", "|" + "---|" * (4 + len(COLS))]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['pair']} | {r['task']} | {len(r['seeds'])} | "
                     + " | ".join(mean_std(r[c]) for c in COLS) + " |")
    lines += ["", "Settings:", ""] + [f"- `{k}`: {w} (`translora_experiment.py {' '.join(f)}`)"
                                      for k, (w, f) in SETTINGS.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in COLS if c != "target base"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(cols)
    for i, col in enumerate(cols):
        means = [statistics.fmean(r[col]) if r[col] else 0.0 for r in rows]
        stds = [statistics.pstdev(r[col]) if len(r[col]) > 1 else 0.0 for r in rows]
        ax.bar([x + (i - len(cols) / 2 + 0.5) * width for x in range(len(rows))], means, width, yerr=stds, label=col,
               capsize=2)
    ax.set_xticks(range(len(rows)), [f"{r['setting']}\n{r['pair'].split(' -> ')[1]}\n{r['task']}" for r in rows],
                  fontsize=7)
    ax.set_ylabel("real test token accuracy")
    ax.set_title("Trans-LoRA ablations (mean ± std over seeds; missing bars: row not run in that setting)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    if not args.report:
        for name in args.settings:
            run(name, SETTINGS[name][1], args.seeds)
    rows = gather()
    out = RESULTS / "translora_ablation"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    text = markdown(rows)
    out.with_suffix(".md").write_text(text)
    plot(rows, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
