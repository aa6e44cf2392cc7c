"""Why SHiRA trailed LoRA on the zoo, and what its ``lr_ratio`` default does: SHiRA vs LoRA at an equal budget.

``lightning-peft train method=shira method.r=8`` trains exactly as many parameters as ``method=lora``
(r=8: 56,064 on ``llama-v1``). Each run is that command as typed (300 steps, the CLI's CPU trainer),
3 seeds, test token accuracy (mean ± std):

1. ``sweep`` (data2text): LoRA and SHiRA with ``lr_ratio=1`` (one lr for both, the old behaviour)
   over the same lr grid, SHiRA at its default ``lr_ratio=2.5``, and SHiRA at its default
   density budget (1%, 5,535 parameters: the fleet's and evolve's old comparison);
2. ``tasks`` (arithmetic, sql, data2text at the CLI's lr 3e-3): LoRA, SHiRA ``lr_ratio=1`` and SHiRA
   at the default ``lr_ratio=2.5``;
3. ``tiles`` (arithmetic, data2text at lr 3e-3): SHiRA r=8 with unstructured masks against 1 x 16 and
   1 x 32 tile masks (``method.tile``), the same budget rounded down to whole tiles; the same for RoSA
   (Nikdan et al. 2024: ``r=4``, ``density=0.05``, ``rosa_quality.py``'s split, sparse part as large as the
   LoRA part, ``S`` at the module's lr, its better adapter on the zoo), its Fisher pooled per tile;
4. ``evolve``: ``lightning-peft evolve`` (the Trans-PEFT protocol, its defaults: arithmetic, q/k/v/o,
   150 steps, 3 seeds) with LoRA, SHiRA at an equal budget (``method.r=8``) and SHiRA at its default 1%.

Writes ``benchmarks/results/shira_lr.{jsonl,md}``; runs already recorded are skipped.

    OMP_NUM_THREADS=1 python benchmarks/shira_lr.py [sweep|tasks|tiles|evolve|report] [--seeds 0,1,2]
        [--tasks arithmetic,data2text]  (tiles: a subset of its tasks)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import mean_std  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "shira_lr.jsonl"
ROSA = ["method=rosa", "method.r=4", "method.density=0.05", "method.sparse_lr_ratio=1.0"]  # rosa_quality.py's split
ARMS = {
    "lora r=8": ["method=lora"],
    "shira r=8 lr_ratio=1": ["method=shira", "method.r=8", "method.lr_ratio=1.0"],
    "shira r=8 (default lr_ratio=2.5)": ["method=shira", "method.r=8"],
    "shira density=1% (default budget)": ["method=shira"],
    "shira r=8 tile=16": ["method=shira", "method.r=8", "method.tile=16"],
    "shira r=8 tile=32": ["method=shira", "method.r=8", "method.tile=32"],
    "rosa r=4 d=5%": ROSA,
    "rosa r=4 d=5% tile=16": [*ROSA, "method.tile=16"],
    "rosa r=4 d=5% tile=32": [*ROSA, "method.tile=32"],
}
SWEEP = {"lora r=8": (1e-3, 3e-3, 1e-2, 3e-2), "shira r=8 lr_ratio=1": (3e-3, 1e-2, 3e-2),
         "shira r=8 (default lr_ratio=2.5)": (3e-3, 1e-2), "shira density=1% (default budget)": (3e-3,)}
TASK_ARMS = ("lora r=8", "shira r=8 lr_ratio=1", "shira r=8 (default lr_ratio=2.5)")
TASKS = ("arithmetic", "sql", "data2text")
TILE_ARMS = ("shira r=8 (default lr_ratio=2.5)", "shira r=8 tile=16", "shira r=8 tile=32",  # issue 27: equal budget
             "rosa r=4 d=5%", "rosa r=4 d=5% tile=16", "rosa r=4 d=5% tile=32")
TILE_TASKS = ("arithmetic", "data2text")
EVOLVE = {"lora r=8": ["method=lora"], "shira r=8": ["method=shira", "method.r=8"],
          "shira density=1% (default budget)": ["method=shira"]}
ROWS = ("Fine-tune_o", "Direct transfer o->n", "Trans-PEFT o->n", "Fine-tune_n")


def _key(arm: str, task: str, lr: float, seed: int) -> str:
    return f"{arm}|{task}|{lr:g}|{seed}"


def _done() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {_key(r["arm"], r["task"], r["lr"], r["seed"]): r for r in map(json.loads, RESULTS.read_text().splitlines())}


def train(arm: str, task: str, lr: float, seed: int) -> None:
    if _key(arm, task, lr, seed) in _done():
        return
    run_dir = Path("outputs/shira_lr") / re.sub(r"[^\w.-]+", "_", _key(arm, task, lr, seed))
    args = [*ARMS[arm], f"task={task}", f"module.lr={lr:g}", f"seed={seed}", "trainer.max_steps=300", "logger=none",
            "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    subprocess.run([sys.executable, "-m", "lightning_peft.cli", "train", *args], check=True, capture_output=True)
    r = json.loads((run_dir / "results.json").read_text())
    row = {"arm": arm, "task": task, "lr": lr, "seed": seed, "trainable": r["trainable_params"],
           "token_acc": r["metrics"]["test/token_acc"], "exact_match": r["metrics"].get("test/exact_match"),
           "command": "lightning-peft train " + " ".join(args[:-2])}
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{arm} {task} lr={lr:g} seed={seed}: {row['token_acc']:.4f}", flush=True)


def evolve(arm: str) -> None:
    if any(r.get("evolve") and r["arm"] == arm for r in _done().values()):
        return
    run_dir = Path("outputs/shira_lr") / re.sub(r"[^\w.-]+", "_", f"evolve {arm}")
    args = [*EVOLVE[arm], "logger=none", f"hydra.run.dir={run_dir}"]
    subprocess.run([sys.executable, "-m", "lightning_peft.cli", "evolve", *args], check=True, capture_output=True)
    r = json.loads((run_dir / "results.json").read_text())
    row = {"arm": arm, "task": "evolve arithmetic", "lr": 3e-3, "seed": -1, "evolve": True,
           "token_acc": {k: [r["rows"][k]["test/token_acc"], r["rows_std"][k]["test/token_acc"]] for k in ROWS},
           "recovery": r["recovery"]["test/token_acc"], "command": "lightning-peft evolve " + " ".join(args[:-1])}
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def report() -> str:
    rows = [r for r in _done().values() if not r.get("evolve")]
    evolved = [r for r in _done().values() if r.get("evolve")]
    grid = sorted({r["lr"] for r in rows if r["task"] == "data2text"})
    lines = ["### data2text: test token accuracy by lr (llama-v1 zoo model, 300 steps, 3 seeds)", "",
             "| arm | trainable | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "|---|---:|" + "---:|" * len(grid)]
    for arm in ARMS:
        got = [r for r in rows if r["arm"] == arm and r["task"] == "data2text"]
        if got:
            cells = [mean_std(r["token_acc"] for r in got if r["lr"] == lr) if any(r["lr"] == lr for r in got) else ""
                     for lr in grid]
            lines.append(f"| {arm} | {got[0]['trainable']:,} | " + " | ".join(cells) + " |")
    lines += ["", "### every task at the CLI's lr 3e-3: test token accuracy (exact match)", "",
              "| arm | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    for arm in TASK_ARMS:
        cells = []
        for task in TASKS:
            got = [r for r in rows if r["arm"] == arm and r["task"] == task and r["lr"] == 3e-3]
            em = [r["exact_match"] for r in got if r["exact_match"] is not None]
            cells.append(f"{mean_std(r['token_acc'] for r in got)} ({statistics.fmean(em):.2f})" if got else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "### tile masks at an equal budget, lr 3e-3: test token accuracy (exact match)", "",
              "| arm | trainable | " + " | ".join(TILE_TASKS) + " |", "|---|---:|" + "---:|" * len(TILE_TASKS)]
    for arm in TILE_ARMS:
        got = {t: [r for r in rows if r["arm"] == arm and r["task"] == t and r["lr"] == 3e-3] for t in TILE_TASKS}
        if any(got.values()):
            cells = [f"{mean_std(r['token_acc'] for r in g)} ({statistics.fmean(r['exact_match'] for r in g):.2f})"
                     + (f" n={len(g)}" if len(g) < 3 else "") if g else "" for g in got.values()]
            trainable = next(g for g in got.values() if g)[0]["trainable"]
            lines.append(f"| {arm} | {trainable:,} | " + " | ".join(cells) + " |")
    if evolved:
        lines += ["", "### lightning-peft evolve (arithmetic, llama-v1 -> llama-v2, q/k/v/o, 3 seeds): token accuracy", "",
                  "| arm | " + " | ".join(ROWS) + " |", "|---|" + "---:|" * len(ROWS)]
        for r in evolved:
            lines.append(f"| {r['arm']} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in (r["token_acc"][k] for k in ROWS))
                         + " |")
    text = "\n".join(lines) + "\n"
    RESULTS.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("sweep", "tasks", "tiles", "evolve", "report"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default=",".join(TILE_TASKS), help="tiles: which of its tasks to run")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.phase == "sweep":
        for seed in seeds:
            for arm, lrs in SWEEP.items():
                for lr in lrs:
                    train(arm, "data2text", lr, seed)
    elif args.phase == "evolve":
        for arm in EVOLVE:
            evolve(arm)
    elif args.phase == "tiles":
        for seed in seeds:
            for task in (t for t in TILE_TASKS if t in args.tasks.split(",")):
                for arm in TILE_ARMS:
                    train(arm, task, 3e-3, seed)
    elif args.phase == "tasks":
        for seed in seeds:
            for task in TASKS:
                for arm in TASK_ARMS:
                    train(arm, task, 3e-3, seed)
    print(report())


if __name__ == "__main__":
    main()
