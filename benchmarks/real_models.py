"""The methods on a real model, side by side: SmolLM2-135M x 2 real tasks x {LoRA, RoSA, SHiRA grad/random}.

Every run is ``lightning-peft train`` as a user types it (the Hydra config composed from
``model=smollm2 task=... method=...`` and run by the same code), in its own process so its peak
memory is its own. At an equal trainable budget, each at its paper's recipe:

==============  ==============================================  ===========================================
method          settings (SmolLM2-135M: 210 adapted linears)    recipe
==============  ==============================================  ===========================================
lora            r=8, alpha 16, all linear: 2,442,240 params      the optimizer's lr
rosa            r=4 + 1.15% sparse: 1,221,120 + 1,220,880        paper: S at 2/7 of the LoRA lr, Fisher mask from
                                                                 1 step after a LoRA-only warm-up of 27% of the
                                                                 steps (paper: 64 of ~230; here 40 of 150)
shira_grad      r=8 budget (2.3% of each weight), grad mask      paper: 2.5x the LoRA lr (``lr_ratio``)
shira_random    the same, random mask (peft's default)           as shira_grad
==============  ==============================================  ===========================================

Each run trains 150 steps in ``bf16-mixed`` (``benchmarks/cpu_precision.py``): ``sarcasm`` at batch 8
(1,200 of its 4,000 training headlines), tested on 1,000 headlines (+-1.6 points); ``ner_finance`` at
batch 4 (600 of 777 sentences), tested on its 300 (greedy generations of up to 64 tokens for ROUGE-L).

1. ``sweep``: the same lr grid for every method (the optimizer's lr; RoSA's and SHiRA's recipes scale
   their parts from it) on one task and one seed;
2. ``seeds``: 3 seeds at each method's best lr of the sweep, on both tasks;
3. ``report``: tables (mean ± std over seeds; tokens/s; peak memory) and a plot, in
   ``benchmarks/results/real_models.md`` / ``.png``, rows in ``results.csv``.

Runs already in ``benchmarks/results/real_models.jsonl`` are skipped (a killed run resumes); a second
worker started with the same command takes the runs the first has not claimed
(``outputs/real_models/.claims``; delete it after killing the workers).

    python benchmarks/real_models.py sweep [--task sarcasm] [--lrs 2e-4,6e-4,2e-3]
    python benchmarks/real_models.py seeds [--seeds 0,1,2]
    python benchmarks/real_models.py report
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results" / "real_models.jsonl"
MODEL = "smollm2"
METHODS: dict[str, list[str]] = {
    "lora": ["method=lora", "method.r=8"],
    "rosa": ["method=rosa", "method.r=4", "method.density=0.0115", "method.warmup_steps=40"],
    "shira_grad": ["method=shira", "method.r=8", "method.mask=grad"],
    "shira_random": ["method=shira", "method.r=8", "method.mask=random"],
}
TASKS: dict[str, dict[str, Any]] = {  # what each task is scored by, and its run settings
    "sarcasm": {"metric": "test/exact_match", "overrides": ["task.batch_size=8", "+task.eval_batch_size=32",
                                                            "task.num_test=1000", "module.max_new_tokens=4"]},
    "ner_finance": {"metric": "test/rougeL", "also": ["test/token_acc"],
                    "overrides": ["task.batch_size=4", "+task.eval_batch_size=16", "module.max_new_tokens=64"]},
}
STEPS = 150
PRECISION = "bf16-mixed"
DEFAULT_LRS = "2e-4,6e-4,2e-3"


def run_key(task: str, method: str, lr: float, seed: int) -> str:
    return f"{task}|{method}|{lr:g}|{seed}"


def done() -> dict[str, dict[str, Any]]:
    if not RESULTS.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {run_key(r["task"], r["method"], r["lr"], r["seed"]): r for r in rows}


def overrides(task: str, method: str, lr: float, seed: int, run_dir: Path, precision: str = PRECISION) -> list[str]:
    return [f"model={MODEL}", f"task={task}", *METHODS[method], f"module.lr={lr:g}", f"seed={seed}",
            f"trainer.max_steps={STEPS}", f"trainer.precision={precision}", "logger=none", "+trainer.enable_progress_bar=false",
            "+callbacks.clock._target_=real_models.StepClock",
            f"hydra.run.dir={run_dir}", *TASKS[task]["overrides"]]


class StepClock(L.Callback):
    """Training seconds and tokens (attention-mask ones) of the steps after the first 3 (masks, allocator)."""

    last: StepClock | None = None  # the instance of this process's run

    def __init__(self) -> None:
        self.seconds, self.tokens, self._t0 = 0.0, 0, 0.0
        StepClock.last = self

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step > 3:
            self.seconds += time.perf_counter() - self._t0
            self.tokens += int(batch["attention_mask"].sum())


def one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process (called in a child process) and return its row."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from lightning_peft.cli.train import run

    run_dir = Path(spec["run_dir"])
    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        cfg = compose("train", overrides=overrides(spec["task"], spec["method"], spec["lr"], spec["seed"], run_dir,
                                                     spec.get("precision", PRECISION))
                      + spec.get("extra", []))
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)  # `${hydra:runtime.output_dir}` outside a Hydra app
    t0 = time.perf_counter()
    results = run(cfg)
    import real_models  # Hydra built the clock from this module, not from `__main__`

    clock = real_models.StepClock.last
    task = TASKS[spec["task"]]
    metrics = results["metrics"]
    return {
        **{k: spec[k] for k in ("task", "method", "lr", "seed")},
        "model": results["model"], "steps": results["steps"], "trainable_params": results["trainable_params"],
        "score": metrics[task["metric"]], "metric": task["metric"],
        **{m: metrics[m] for m in task.get("also", []) if m in metrics},
        "test_loss": metrics.get("test/loss"),
        "train_tokens_per_s": round(clock.tokens / clock.seconds, 1) if clock.seconds else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "wall_s": round(time.perf_counter() - t0, 1), "precision": str(cfg.trainer.precision),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None,
    }


def launch(specs: list[dict[str, Any]]) -> None:
    """Run the specs not yet in the results file, one child process each, appending rows as they finish."""
    from tqdm import tqdm

    have = done()
    todo = [s for s in specs if run_key(s["task"], s["method"], s["lr"], s["seed"]) not in have]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    claims = Path("outputs/real_models/.claims")  # several workers (`sweep` started twice) share the list
    claims.mkdir(parents=True, exist_ok=True)
    for spec in tqdm(todo, desc="real-model runs", unit="run"):
        key = run_key(spec["task"], spec["method"], spec["lr"], spec["seed"])
        claim = claims / key.replace("|", "_")
        try:
            claim.touch(exist_ok=False)
        except FileExistsError:
            continue  # another worker runs it
        spec = {**spec, "run_dir": str(Path("outputs/real_models") / key.replace("|", "_"))}
        proc = subprocess.run([sys.executable, __file__, "one", json.dumps(spec)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not lines:
            claim.unlink()
            tqdm.write(f"FAILED {spec}: {proc.stderr[-2000:]}")
            continue
        row = json.loads(lines[-1][4:])
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(f"{row['task']} {row['method']} lr={row['lr']:g} seed={row['seed']}: {row['metric']}={row['score']:.4f} "
                   f"{row['train_tokens_per_s']} tok/s, {row['peak_rss_mb']} MB, {row['wall_s']} s")


def best_lrs(task: str) -> dict[str, float]:
    """Each method's best lr in the sweep (highest score of seed 0 on ``task``)."""
    rows = [r for r in done().values() if r["task"] == task and r["seed"] == 0]
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["method"] not in best or r["score"] > best[r["method"]][0]:
            best[r["method"]] = (r["score"], r["lr"])
    return {m: lr for m, (_, lr) in best.items()}


def report(sweep_task: str) -> None:
    """Markdown tables (sweep; seeds at the best lrs) and a plot; rows of ``results.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from harness import append_rows, mean_std, row

    rows, lrs = list(done().values()), best_lrs(sweep_task)
    methods = [m for m in METHODS if m in lrs]
    grid = sorted({r["lr"] for r in rows if r["task"] == sweep_task and r["seed"] == 0})
    lines = [f"### lr sweep: {sweep_task}, seed 0 ({TASKS[sweep_task]['metric']})", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best |", "|---|" + "---:|" * (len(grid) + 1)]
    for m in methods:
        cell = {r["lr"]: r["score"] for r in rows if r["task"] == sweep_task and r["seed"] == 0 and r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(f"{cell[lr]:.4f}" if lr in cell else "" for lr in grid) + f" | {lrs[m]:g} |")
    csv_rows, fig, axes = [], *plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6))
    for ax, (task, info) in zip(axes, TASKS.items()):
        metrics = [info["metric"], *info.get("also", [])]
        lines += ["", f"### {task}: the seeds run at each method's best lr (mean ± std over n seeds)", "",
                  "| method | lr | trainable | " + " | ".join(metrics) + " | train tokens/s | peak RSS MB |",
                  "|---|---:|---:|" + "---:|" * (len(metrics) + 2)]
        lora = [r["score"] for r in rows if r["task"] == task and r["method"] == "lora" and r["lr"] == lrs.get("lora")]
        for i, m in enumerate(methods):
            got = [r for r in rows if r["task"] == task and r["method"] == m and r["lr"] == lrs[m]]
            if not got:
                continue
            vals = {k: [r["score"] if k == info["metric"] else r.get(k, float("nan")) for r in got] for k in metrics}
            tps = [r["train_tokens_per_s"] for r in got if r["train_tokens_per_s"]]
            lines.append(f"| {m} | {lrs[m]:g} | {got[0]['trainable_params']:,} | "
                         + " | ".join(f"{mean_std(vals[k])} (n={len(vals[k])})" for k in metrics)
                         + f" | {statistics.fmean(tps):.0f} | {max(r['peak_rss_mb'] for r in got):.0f} |")
            scores = vals[info["metric"]]
            ax.errorbar([i], [statistics.fmean(scores)], yerr=[statistics.pstdev(scores)], fmt="o", capsize=4)
            ax.scatter([i] * len(scores), scores, s=8, color="grey")
            if lora:
                csv_rows.append(row("real_models", f"smollm2-135m {task} {m} lr={lrs[m]:g} seeds={len(scores)}",
                                    info["metric"] + "_vs_lora", statistics.fmean(scores), statistics.fmean(lora), "cpu"))
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(f"SmolLM2-135M, {task}")
        ax.set_ylabel(info["metric"])
    fig.tight_layout()
    out = RESULTS.with_suffix("")
    fig.savefig(out.with_suffix(".png"), dpi=110)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    append_rows(csv_rows)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("sweep", "seeds", "report", "one"))
    ap.add_argument("spec", nargs="?", help="(internal) the JSON spec of one run")
    ap.add_argument("--task", default="sarcasm", help="the sweep's task")
    ap.add_argument("--lrs", default=DEFAULT_LRS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precision", default=PRECISION, help="the runs' trainer.precision (recorded in each row); "
                    "32-true on a CPU without native bf16 (no AVX512-BF16 / AMX), where bf16 GEMMs take a slow path")
    args = ap.parse_args()
    common = {} if args.precision == PRECISION else {"precision": args.precision}
    methods = args.methods.split(",")
    if args.phase == "one":
        print("ROW " + json.dumps(one(json.loads(args.spec))), flush=True)
    elif args.phase == "sweep":
        launch([{"task": args.task, "method": m, "lr": float(lr), "seed": 0, **common} for lr in args.lrs.split(",") for m in methods])
    elif args.phase == "seeds":
        lrs = best_lrs(args.task)
        missing = [m for m in methods if m not in lrs]
        if missing:
            raise SystemExit(f"no sweep result for {missing} on {args.task}: run `real_models.py sweep` first")
        launch([{"task": t, "method": m, "lr": lrs[m], "seed": int(s), **common} for t in TASKS for s in args.seeds.split(",")
                for m in methods])
    else:
        report(args.task)


if __name__ == "__main__":
    main()
