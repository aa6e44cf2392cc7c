"""Trans-LoRA on the zoo: carry a LoRA from llama-v1 to llama-v2 (same family) and to qwen2-v1
(another family and tokenizer), on two tasks, over seeds. Slow: run it by hand, not in CI.

Rows per (pair, task, seed), as in Wang et al. 2024 (Table 1 and the ablations):

* ``source``: the source adapter on the source base (the quality to carry over);
* ``target_base``: the target base without an adapter;
* ``trans_lora``: target + adapter trained on discriminator-filtered synthetic data;
* ``unfiltered``: the same without the filter;
* ``seeds_only``: target + adapter trained on the seed examples alone (real labels);
* ``no_transfer``: the source adapter loaded directly onto the target (same family only).

Run: python benchmarks/translora_experiment.py [--seeds 0 1 2] [--steps 300] [--synthetic 128]
Writes benchmarks/results/translora.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
from tqdm import tqdm

import lightning_peft as lp
from lightning_peft import transfer
from lightning_peft.module import CausalLMModule
from lightning_peft.tasks import get_task
from lightning_peft.tasks.data import Example

OUT = Path(__file__).parent / "results"  # --out overrides
PAIRS = (("llama-v1", "llama-v2"), ("llama-v1", "qwen2-v1"))
TASKS = ("arithmetic", "data2text")
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False, "enable_checkpointing": False,
         "accelerator": "cpu", "devices": 1}


def _test(module: CausalLMModule, task: str, model: str, n_test: int) -> float:
    dm = get_task(task, tokenizer=model, num_train=8, num_val=0, num_test=n_test)
    return float(L.Trainer(**QUIET).test(module, dm, verbose=False)[0]["test/exact_match"])


def _train(model: str, task: str, steps: int, seed: int, n_train: int, n_test: int, examples=None) -> tuple:
    L.seed_everything(seed, verbose=False)
    module = CausalLMModule(model=model, lr=3e-3, warmup_steps=20, max_new_tokens=64, generate_on_val=False)
    if examples is None:
        dm = get_task(task, tokenizer=model, num_train=n_train, num_val=0, num_test=n_test, shuffle_seed=seed)
    else:
        dm = transfer.ExamplesDataModule(model, examples, shuffle_seed=seed)
    L.Trainer(max_steps=steps, callbacks=[lp.LoRA(r=8)], **QUIET).fit(module, dm)
    return module, _test(module, task, model, n_test)


def one_run(src: str, tgt: str, task: str, seed: int, args, work: Path, sources: dict) -> dict[str, float]:
    key = (src, task, seed)
    if key not in sources:  # source adapter + discriminator, shared by every target of this source
        module, acc = _train(src, task, args.steps, seed, args.train, args.test)
        adapter = lp.save_adapter(module, work / f"{src}-{task}-{seed}" / "adapter")
        disc_cb = transfer.TransLoRADiscriminator(str(adapter) + "-discriminator", num_real=min(128, args.train),
                                                  max_steps=args.disc_steps)
        disc_cb.on_fit_end(_FakeTrainer(get_task(task, tokenizer=src, num_train=args.train)), module)
        sources[key] = (adapter, acc)
    adapter, source_acc = sources[key]
    row = {"source": source_acc}
    base = CausalLMModule(model=tgt, max_new_tokens=64)
    row["target_base"] = _test(base, task, tgt, args.test)
    # the zoo's tiny models have a 128-token context: 1-3 seeds fit with 40 new tokens (past it they
    # only emit EOS); fitting_seeds keeps as many as fit
    common = {"source_model": src, "source_adapter": str(adapter), "target_model": tgt, "task": task, "seed": seed,
              "num_synthetic": args.synthetic, "max_new_tokens": 40}
    for name, filt in (("trans_lora", True), ("unfiltered", False)):
        cfg = transfer.TransferConfig(**common, filter=filt, cache=str(work / f"{src}-{tgt}-{task}-{seed}-{name}.jsonl"))
        try:
            syn = transfer.synthesize(cfg)
        except RuntimeError as e:  # too few accepted: record it, do not invent a number
            print(f"{name}: {e}", file=sys.stderr)
            row[name] = float("nan")
            continue
        examples = [Example(r["input"], " " + r["output"].strip(), r["output"].strip())
                    for r in syn.accepted]
        row[name] = _train(tgt, task, args.steps, seed, 0, args.test, examples)[1]
        if filt:
            row["acceptance"] = syn.header["stats"]["acceptance_rate"]
    seeds = get_task(task, tokenizer=tgt, num_train=8).get_examples()["train"][:5]
    row["seeds_only"] = _train(tgt, task, args.steps, seed, 0, args.test, seeds)[1]
    if src.split("-")[0] == tgt.split("-")[0]:  # same family: shapes fit
        direct = CausalLMModule(model=tgt, max_new_tokens=64)
        direct.configure_model()
        lp.load_adapter(direct, adapter)
        row["no_transfer"] = _test(direct, task, tgt, args.test)
    return row


class _FakeTrainer:
    """The two attributes TransLoRADiscriminator.on_fit_end reads, for calling it outside a fit."""

    is_global_zero = True

    def __init__(self, datamodule) -> None:
        self.datamodule = datamodule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--disc-steps", type=int, default=100)
    p.add_argument("--train", type=int, default=500)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--synthetic", type=int, default=128)
    p.add_argument("--out", type=Path, default=OUT, help="folder for translora.{json,md,png}")
    args = p.parse_args()
    out = args.out
    rows = []
    sources: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(s, t, task, seed) for task in TASKS for seed in args.seeds for s, t in PAIRS]
        for src, tgt, task, seed in tqdm(jobs, desc="translora"):
            rows.append({"source_model": src, "target_model": tgt, "task": task, "seed": seed,
                         **one_run(src, tgt, task, seed, args, Path(tmp), sources)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "translora.json").write_text(json.dumps({"args": {**vars(args), "out": str(out)}, "rows": rows}, indent=2))
    cols = ["source", "target_base", "trans_lora", "unfiltered", "seeds_only", "no_transfer", "acceptance"]
    lines = ["| source -> target | task | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    groups = {}
    for r in rows:
        groups.setdefault((r["source_model"], r["target_model"], r["task"]), []).append(r)
    for (s, t, task), rs in groups.items():
        cells = []
        for c in cols:
            vals = [r[c] for r in rs if c in r and r[c] == r[c]]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if vals else "n/a")
        lines.append(f"| {s} -> {t} | {task} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "translora.md").write_text(f"Exact match, mean ± std over seeds {args.seeds}; {vars(args)}\n\n{table}\n")
    print(table)
    _plot(groups, cols[:-1], out / "translora.png")


def _plot(groups: dict, cols: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(cols)
    for j, c in enumerate(cols):
        means = [statistics.mean([r[c] for r in rs if c in r and r[c] == r[c]] or [float("nan")])
                 for rs in groups.values()]
        ax.bar([i + j * width for i in range(len(groups))], means, width, label=c)
    ax.set_xticks([i + 0.4 for i in range(len(groups))])
    ax.set_xticklabels([f"{s}->{t}\n{task}" for s, t, task in groups], fontsize=8)
    ax.set_ylabel("exact match")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
