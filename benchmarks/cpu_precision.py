"""Which Lightning precision should the CPU trainer use? Speed per method, and training quality.

On the code path users run (``CausalLMModule`` + an adapter callback + ``lightning.Trainer``):

1. ``speed``: tokens/s of a training step (forward, backward, AdamW) in ``32-true``, ``bf16-mixed``
   (CPU autocast) and ``bf16-true`` for LoRA (r=8), SHiRA (r=8, random mask) and RoSA (r=4, 1.15%,
   warm-up 2), batch 8, on the real SmolLM2-135M and on the zoo's ``llama-v1``; the precisions of
   one method alternate run by run, twice (the same load on the machine for each); steps 5-12 of
   each run are timed (masks are built before).
2. ``quality``: the final validation loss after ``--steps`` steps of LoRA and SHiRA on ``sarcasm``
   (SmolLM2) and ``data2text`` (zoo) over 3 seeds per candidate precision (``32-true``, ``bf16-mixed``): a precision "trains as well as
   fp32" when its mean is within the seed spread (std) of fp32's.

    python benchmarks/cpu_precision.py [--phase speed|quality|both] [--steps 40] [--seeds 0,1,2]

Writes ``benchmarks/results/cpu_precision.json`` and rows of ``results.csv`` (``cpu_precision``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, row  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.module import CausalLMModule  # noqa: E402
from lightning_peft.tasks import get_task  # noqa: E402

BENCH = "cpu_precision"
OUT = Path(__file__).parent / "results" / "cpu_precision.json"
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
DEFAULT_CANDIDATES = ("32-true", "bf16-mixed")  # float32 master weights (see `choose`)
METHODS = {
    "lora": lambda: lp.LoRA(r=8),
    "shira": lambda: lp.SHiRA(r=8, mask="random"),
    "rosa": lambda: lp.RoSA(r=4, density=0.0115, warmup_steps=2),
}
MODELS = {"smollm2-135m": ("sarcasm", 3e-4), "llama-v1": ("data2text", 3e-3)}


class StepClock(L.Callback):
    """Wall time and label tokens of each training batch after ``skip`` warm-up batches."""

    def __init__(self, skip: int) -> None:
        self.skip, self.times, self.tokens, self._t0 = skip, [], [], 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t0)
            self.tokens.append(int(batch["attention_mask"].sum()))


def fit(model: str, method: str, precision: str, steps: int, seed: int, val: bool, clock: StepClock | None = None
        ) -> dict[str, float]:
    """One ``trainer.fit``; returns the validation loss (if ``val``) and the step clock's totals."""
    task, lr = MODELS[model]
    L.seed_everything(seed, workers=True)
    dm = get_task(task, tokenizer=model, batch_size=8, num_val=200 if val else 0, num_test=0, shuffle_seed=seed)
    module = CausalLMModule(model, lr=lr, warmup_steps=min(10, steps // 5), generate_on_val=False)
    callbacks: list[L.Callback] = [METHODS[method]()] + ([clock] if clock else [])
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1.0 if val else 0, val_check_interval=steps if val else None,
                        gradient_clip_val=1.0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    out = {"val_loss": float(trainer.callback_metrics["val/loss"])} if val else {}
    return out


def speed(models: list[str], steps: int) -> list[dict[str, Any]]:
    results = []
    for model in models:
        for method in METHODS:
            clocks = {p: StepClock(skip=4) for p in PRECISIONS}
            for _ in range(2):  # alternate the precisions twice: all see the same machine load
                for p in PRECISIONS:
                    fit(model, method, p, steps // 2 + 4, seed=0, val=False, clock=clocks[p])
            for p, c in clocks.items():
                tps = sum(c.tokens) / sum(c.times)
                results.append({"phase": "speed", "model": model, "method": method, "precision": p,
                                "tokens_per_s": round(tps, 1), "step_s": round(statistics.median(c.times), 3)})
                print(json.dumps(results[-1]), flush=True)
    return results


def quality(models: list[str], steps: int, seeds: list[int]) -> list[dict[str, Any]]:
    results = []
    for model in models:
        for method in ("lora", "shira"):
            for p in DEFAULT_CANDIDATES:
                losses = [fit(model, method, p, steps, seed, val=True)["val_loss"] for seed in seeds]
                results.append({"phase": "quality", "model": model, "method": method, "precision": p, "steps": steps,
                                "val_loss": losses, "mean": statistics.fmean(losses), "std": statistics.pstdev(losses)})
                print(json.dumps(results[-1]), flush=True)
    return results


def choose(results: list[dict[str, Any]]) -> dict[str, str]:
    """Per model, the fastest precision that trains as well as ``32-true``.

    "Trains as well": for every method of the quality phase, its mean validation loss is within the
    seed spread of fp32's (``|mean - mean_fp32| <= max(std, std_fp32)``). "Fastest": the highest
    geometric mean over methods of its tokens/s relative to fp32's. fp32 itself always qualifies.
    Only precisions that keep float32 master weights are candidates (:data:`DEFAULT_CANDIDATES`):
    ``bf16-true`` stores the adapter and its AdamW state in bf16, so an update smaller than the
    weight's bf16 step (2^-8 of it: 8e-5 on a weight of 0.02) is lost, and short runs at the lr
    measured here cannot show what it does at 2e-5 (Trans-LoRA's student lr). Its speed is measured anyway.
    """
    out = {}
    for model in sorted({r["model"] for r in results}):
        speed = {(r["method"], r["precision"]): r["tokens_per_s"] for r in results
                 if r["phase"] == "speed" and r["model"] == model}
        quality = {(r["method"], r["precision"]): r for r in results if r["phase"] == "quality" and r["model"] == model}
        ok = [p for p in DEFAULT_CANDIDATES if all(
            abs(q["mean"] - quality[m, "32-true"]["mean"]) <= max(q["std"], quality[m, "32-true"]["std"])
            for (m, prec), q in quality.items() if prec == p)]
        methods = sorted({m for m, _ in speed})
        rel = {p: statistics.geometric_mean(speed[m, p] / speed[m, "32-true"] for m in methods) for p in PRECISIONS}
        out[model] = max(ok, key=rel.__getitem__)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("speed", "quality", "both"), default="both")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    models = args.models.split(",")
    old = json.loads(OUT.read_text()) if OUT.exists() else []
    new = []
    if args.phase in ("speed", "both"):
        new += speed(models, 12)
    if args.phase in ("quality", "both"):
        new += quality(models, args.steps, [int(s) for s in args.seeds.split(",")])
    keep = [r for r in old if (r["phase"], r["model"]) not in {(n["phase"], n["model"]) for n in new}]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(keep + new, indent=1) + "\n")
    if not args.no_csv:
        fp32 = {(r["model"], r["method"]): r["tokens_per_s"] for r in new if r["phase"] == "speed" and r["precision"] == "32-true"}
        append_rows(row(BENCH, f"{r['model']} {r['method']} {r['precision']} B=16 threads={torch.get_num_threads()}",
                        "train_tokens_per_s_vs_32-true", r["tokens_per_s"], fp32[r["model"], r["method"]], "cpu")
                    for r in new if r["phase"] == "speed")


if __name__ == "__main__":
    main()
