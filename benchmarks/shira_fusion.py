"""Multi-adapter fusion study: accuracy drop of fused SHiRA vs fused LoRA adapters (slow).

SHiRA (Bhardwaj et al. 2024, section 4.2; methods.md section 4) fuses adapters trained
separately (BoolQ, PIQA, ARC-e) as ``W + S1 + S2 (+ S3)`` and reports a fused-accuracy drop of
3.6-4.4% for SHiRA vs 11.1% for LoRA. The same protocol here, on the ``llama-v1`` zoo model and
three zoo tasks (arithmetic, data2text, sql):

1. per seed and task, train SHiRA-Grad (2%, ``conf/experiment/shira_fusion.yaml``) and a LoRA
   with the same trainable-parameter count (``r = nnz / sum(in + out)``), through the
   ``lightning-peft train`` pipeline (``lightning_peft.cli.train.run``);
2. load one base, put the three adapters of a method into an :class:`lightning_peft.AdapterBank`
   and, on each task's validation split, measure token accuracy with the task's adapter alone,
   with every pair that contains it fused (weights 1), and with all three fused;
3. drop = accuracy alone - accuracy fused, averaged over the tasks in the fusion; mean and std
   over seeds; mask overlap metrics AWOM/AWOR (:mod:`lightning_peft.methods.shira.fusion`) of
   each pair.

Writes ``benchmarks/results/shira_fusion.md`` (table), ``shira_fusion.png`` (bars) and
``shira_fusion.json`` (every number). Run: ``python benchmarks/shira_fusion.py`` (``--steps``,
``--seeds`` to shorten; about 1-2 min per training run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

import lightning_peft as lp
from lightning_peft.cli.train import run
from lightning_peft.methods.shira.fusion import orthogonality

TASKS = ("arithmetic", "data2text", "sql")
OUT = Path(__file__).with_name("results")
METRIC = "val/token_acc"


def _cfg(overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        return compose("train", overrides=["experiment=shira_fusion", *overrides])


def _lora_rank(cfg) -> int:
    """LoRA rank with the trainable count of SHiRA at ``cfg.method.density`` (sum nnz / sum(in + out))."""
    module = instantiate(cfg.module)
    module.configure_model()  # CausalLMModule builds its model here
    targets = lp.find_target_modules(module, "all-linear")
    layers = [module.get_submodule(t) for t in targets]
    nnz = sum(max(1, round(cfg.method.density * m.in_features * m.out_features)) for m in layers)
    return max(1, round(nnz / sum(m.in_features + m.out_features for m in layers)))


def train_all(seeds: list[int], steps: int, root: Path) -> dict[str, dict[str, dict[int, Path]]]:
    """Adapters by method, task and seed (trained once; reused if the folder exists)."""
    rank = _lora_rank(_cfg([]))
    print(f"LoRA rank with SHiRA's trainable count: r={rank}")
    folders: dict[str, dict[str, dict[int, Path]]] = {"shira": {}, "lora": {}}
    for method, task, seed in itertools.product(("shira", "lora"), TASKS, seeds):
        run_dir = root / method / task / f"seed{seed}"
        folders[method].setdefault(task, {})[seed] = run_dir / "adapter"
        if (run_dir / "adapter" / "adapter_model.safetensors").exists():
            continue
        # the experiment file sets SHiRA's keys under `method`: drop them when switching to LoRA
        drop = ["~method.density", "~method.mask", "~method.calibration_batches"]
        extra = ["method=lora", *drop, f"method.r={rank}", f"method.alpha={2 * rank}"] if method == "lora" else []
        cfg = _cfg([f"task={task}", f"seed={seed}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                    "test_after_fit=false", "logger=none", f"run_dir={run_dir}", *extra])
        run(cfg)
    return folders


def evaluate(folders: dict[str, dict[str, dict[int, Path]]], seeds: list[int]) -> list[dict]:
    """Token accuracy of each task under its adapter alone, in pairs and all fused."""
    records = []
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    datamodules = {t: instantiate(_cfg([f"task={t}"]).task) for t in TASKS}
    base = instantiate(_cfg([]).module)
    for task in TASKS:  # the base model without any adapter: what the adapters have to beat
        acc = trainer.validate(base, datamodule=datamodules[task], verbose=False)[0][METRIC]
        records.append({"method": "base", "seed": -1, "fusion": "none", "task": task, "size": 0, "acc": float(acc)})
    for method, seed in itertools.product(("shira", "lora"), seeds):
        module = instantiate(_cfg([]).module)
        module.configure_model()  # the base the bank writes into (idempotent: validate keeps it)
        bank = lp.AdapterBank(module)
        for task in TASKS:
            bank.add(task, folders[method][task][seed])
        fusions = [(t,) for t in TASKS] + list(itertools.combinations(TASKS, 2)) + [TASKS]
        for combo in fusions:
            with bank.applied({t: 1.0 for t in combo}):
                for task in combo:
                    acc = trainer.validate(module, datamodule=datamodules[task], verbose=False)[0][METRIC]
                    records.append({"method": method, "seed": seed, "fusion": "+".join(combo), "task": task,
                                    "size": len(combo), "acc": float(acc)})
        for a, b in itertools.combinations(TASKS, 2):
            o = orthogonality(bank.dense_deltas(a), bank.dense_deltas(b))
            records.append({"method": method, "seed": seed, "pair": f"{a}+{b}", **o})
        print(f"evaluated {method} seed {seed}")
    return records


def summarize(records: list[dict], seeds: list[int]) -> tuple[str, dict]:
    accs = [r for r in records if "acc" in r]
    alone = {(r["method"], r["seed"], r["task"]): r["acc"] for r in accs if r["size"] == 1}
    summary: dict = {}
    lines = [
        "| method | alone acc | pairwise fused acc | drop (pairs) | all-3 fused acc | drop (all 3) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in ("shira", "lora"):
        per_seed = {"alone": [], "pair": [], "all": [], "drop_pair": [], "drop_all": []}
        for seed in seeds:
            a = [alone[(method, seed, t)] for t in TASKS]
            pair = [r for r in accs if r["method"] == method and r["seed"] == seed and r["size"] == 2]
            full = [r for r in accs if r["method"] == method and r["seed"] == seed and r["size"] == 3]
            per_seed["alone"].append(statistics.mean(a))
            per_seed["pair"].append(statistics.mean(r["acc"] for r in pair))
            per_seed["all"].append(statistics.mean(r["acc"] for r in full))
            per_seed["drop_pair"].append(statistics.mean(alone[(method, seed, r["task"])] - r["acc"] for r in pair))
            per_seed["drop_all"].append(statistics.mean(alone[(method, seed, r["task"])] - r["acc"] for r in full))
        fmt = lambda v: f"{100 * statistics.mean(v):.1f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.1f}"  # noqa: E731
        summary[method] = {k: [float(x) for x in v] for k, v in per_seed.items()}
        lines.append(f"| {method} | {fmt(per_seed['alone'])} | {fmt(per_seed['pair'])} | {fmt(per_seed['drop_pair'])} | "
                     f"{fmt(per_seed['all'])} | {fmt(per_seed['drop_all'])} |")
    orth = [r for r in records if "pair" in r]
    lines += ["", "| method | mean AWOM | mean AWOR |", "| --- | --- | --- |"]
    for method in ("shira", "lora"):
        rs = [r for r in orth if r["method"] == method]
        summary[method]["awom"] = statistics.mean(r["awom"] for r in rs)
        summary[method]["awor"] = statistics.mean(r["awor"] for r in rs)
        lines.append(f"| {method} | {summary[method]['awom']:.4g} | {summary[method]['awor']:.4f} |")
    base = {r["task"]: r["acc"] for r in accs if r["method"] == "base"}
    if base:
        summary["base"] = base
        lines += ["", "Base model without adapters: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in base.items())]
    return "\n".join(lines), summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, method in enumerate(("shira", "lora")):
        for j, key in enumerate(("drop_pair", "drop_all")):
            v = [100 * x for x in summary[method][key]]
            err = statistics.stdev(v) if len(v) > 1 else 0
            ax.bar(j * 3 + i, statistics.mean(v), yerr=err, color=("tab:blue", "tab:orange")[i],
                   label=method if j == 0 else None)
    ax.set_xticks([0.5, 3.5], ["pairs fused", "all 3 fused"])
    ax.set_ylabel("token-accuracy drop vs alone (points)")
    ax.set_title("Fusing separately trained adapters (llama-v1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs", type=Path, default=Path(__file__).parents[1] / "outputs" / "shira_fusion_runs",
                    help="where adapters are trained (git-ignored outputs/; reused when present for the same zoo build)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # see benchmarks/switching.py: shared CPUs make OpenMP threads spin
    OUT.mkdir(exist_ok=True)
    # one folder per zoo build: adapters trained on an older build of the base are never reused
    build = lp.zoo.build(_cfg([]).model.name_or_path).name
    folders = train_all(args.seeds, args.steps, args.runs / build)
    records = evaluate(folders, args.seeds)
    table, summary = summarize(records, args.seeds)
    trainable = {m: json.loads((folders[m][TASKS[0]][args.seeds[0]].parent / "results.json").read_text())["trainable_params"]
                 for m in ("shira", "lora")}
    summary["trainable_params"] = trainable
    header = (f"# SHiRA vs LoRA fusion on llama-v1 ({', '.join(TASKS)}; {args.steps} steps; seeds {args.seeds})\n\n"
              f"SHiRA-Grad 2% ({trainable['shira']} trainable parameters, lr 5e-3) vs LoRA r={_lora_rank(_cfg([]))} "
              f"({trainable['lora']} trainable, lr 2e-3), all linear layers; fused with weight 1 each by AdapterBank.\n"
              f"Token accuracy ({METRIC}, %) mean ± std over seeds; drop = alone - fused, per task in the fusion.\n\n")
    (OUT / "shira_fusion.md").write_text(header + table + "\n")
    (OUT / "shira_fusion.json").write_text(json.dumps({"records": records, "summary": summary}, indent=1))
    plot(summary, OUT / "shira_fusion.png")
    print(header + table)


if __name__ == "__main__":
    main()
