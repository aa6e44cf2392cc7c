"""Trans-LoRA: carry a LoRA from llama-v1 to llama-v2 (same family) and to qwen2-v1 (another family and
tokenizer) on the zoo, or between real checkpoints (``--pairs smollm2-135m:qwen2.5-coder-0.5b``, the packaged
instruct models write the synthetic inputs), over seeds. Slow: run it by hand, not in CI.

Rows per (pair, task, seed), as in Wang et al. 2024 (Table 1 and the ablations):

* ``source``: the source adapter on the source base (the quality to carry over);
* ``target_base``: the target base without an adapter;
* ``trans_lora``: target + adapter trained on discriminator-filtered synthetic data;
* ``trans_lora_kl``: the same data plus the teacher's token-level KL (shared vocabulary only);
* ``unfiltered``: the same without the filter (as many examples as the filter kept);
* ``trans_lora_warm`` / ``unfiltered_warm`` / ``trans_lora_kl_warm`` (``--only warm``): those rows, the
  student starting from the source adapter instead of a fresh LoRA (same family only:
  ``TransferConfig.warm_start``, with its ``warm_lr`` / ``warm_steps`` unless ``--warm-lr`` / ``--warm-steps``);
* ``seeds_only``: target + adapter trained on the seed examples alone (real labels);
* ``no_transfer``: the source adapter loaded directly onto the target (where its shapes fit);
* ``fine_tune_n`` (``--only fine_tune_n``): the target trained on the real data (the upper bound).

The filter asks for ``--synthetic`` examples; when the generator runs out of new inputs first
(``kept`` below it), the filtered rows train on what was kept. Each row is scored twice on the
task's test split: exact match of the greedy answer and token accuracy of the reference answer
under teacher forcing (``{row}/token_acc``); the zoo's tiny models rarely get a whole SQL query
right, so token accuracy is the finer measure there. Also recorded: the filter's acceptance
rate of synthetic inputs and of real test inputs
(``disc_real_acceptance``) and the MMD of kept / rejected inputs to the seeds.

Ablations of the synthesis and the student (``--no-anchor``: the paper's free continuation instead of
:class:`~lightning_peft.transfer.synthesis.SeedFormat`; ``--generator``; ``--synthetic``; ``--student-lr``,
``--student-steps``, ``--warm-lr``, ``--warm-steps``) each write their own ``--out`` folder; ``--only`` picks the
optional rows. ``benchmarks/translora_ablation.py`` runs and gathers the recorded settings.

Run: python benchmarks/translora_experiment.py [--seeds 0 1 2] [--steps 300] [--synthetic 64] [--resume]
(about 50 minutes on 2 CPU cores). Writes benchmarks/results/translora.{json,md,png}. Real models (the
real-model sweep's LoRA lr; sarcasm answers are one token):

    python benchmarks/translora_experiment.py --pairs smollm2-135m:qwen2.5-coder-0.5b --tasks sarcasm \
        --lr 6e-4 --batch-size 8 --max-new-tokens 4 --only unfiltered fine_tune_n --out benchmarks/results/translora_real
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
PAIRS = ("llama-v1:llama-v2", "llama-v1:qwen2-v1")
TASKS = ("data2text", "sql")
# Seeds in the generator's prompt. The paper uses 5; long SQL items (about 45 tokens each) make
# a 5-item list too long for the zoo's tiny models (fitting_seeds cuts to what fits anyway).
NUM_SEEDS = {"data2text": 5, "sql": 3}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False, "enable_checkpointing": False,
         "accelerator": "cpu", "devices": 1}
COLS = ["source", "target_base", "trans_lora", "trans_lora_kl", "unfiltered", "trans_lora_warm", "unfiltered_warm",
        "trans_lora_kl_warm", "seeds_only", "no_transfer", "fine_tune_n"]


def _test(module: CausalLMModule, task: str, model: str, args) -> dict[str, float]:
    dm = get_task(task, tokenizer=model, num_train=8, num_val=0, num_test=args.test, eval_batch_size=args.eval_batch_size)
    return L.Trainer(**QUIET).test(module, dm, verbose=False)[0]


def _scores(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{name: exact match, name/token_acc: token accuracy}`` of one row."""
    return {name: float(metrics["test/exact_match"]), f"{name}/token_acc": float(metrics["test/token_acc"])}


MODULE_KW = {"lr": 5e-3, "warmup_steps": 20, "max_new_tokens": 64, "generate_on_val": False}


def _module_kwargs(args, lr: float | None = None) -> dict:
    """The CausalLMModule settings of every training and test here (``lr``: default ``--lr``)."""
    return {**MODULE_KW, "lr": lr or args.lr, "max_new_tokens": args.max_new_tokens}


def _module(model: str, args, lr: float | None = None, adapter: Path | None = None) -> CausalLMModule:
    """A CausalLMModule on ``model``; with ``adapter``: built, that adapter loaded."""
    module = CausalLMModule(model=model, **_module_kwargs(args, lr))
    if adapter is not None:
        module.configure_model()
        lp.load_adapter(module, adapter)
    return module


def _train(model: str, task: str, args, seed: int, examples: list[Example] | None = None,
           callbacks: tuple = (), init: Path | None = None) -> tuple[CausalLMModule, dict[str, float]]:
    """A LoRA (r=8) on ``model``: on the task's real training split (``--lr``), or on ``examples`` (``--student-lr``,
    ``--student-steps``).

    ``init``: start from that adapter when it fits ``model`` (``--only warm``), else from a fresh LoRA.
    """
    L.seed_everything(seed, verbose=False)
    module = _module(model, args, None if examples is None else args.student_lr)
    warm = init is not None and transfer.pipeline.warm_start_from(module, str(init))
    if examples is None:
        dm = get_task(task, tokenizer=model, num_train=args.train, num_val=0, num_test=args.test, shuffle_seed=seed,
                      batch_size=args.batch_size)
    else:
        dm = transfer.ExamplesDataModule(model, examples, shuffle_seed=seed, batch_size=args.batch_size)
    steps = args.steps if examples is None else args.student_steps or args.steps
    if warm:  # the schedule TransferConfig gives a warm-started student
        module.hparams.lr, steps = args.warm_lr, args.warm_steps
    L.Trainer(max_steps=steps, callbacks=[*([] if warm else [lp.LoRA(r=8)]), *callbacks], **QUIET).fit(module, dm)
    return module, _test(module, task, model, args)


def _source(src: str, task: str, seed: int, args, work: Path) -> tuple[Path, dict[str, float]]:
    """The source adapter and, from the same fit, its discriminator (the only use of the task data); kept in
    ``work`` (a rerun tests a finished pair again instead of training it)."""
    folder = work / f"{src}-{task}-{seed}"
    adapter, disc_path = folder / "adapter", folder / "adapter-discriminator"
    disc = transfer.TransLoRADiscriminator(disc_path, num_real=min(128, args.train),
                                           num_seeds=NUM_SEEDS.get(task, 5),
                                           max_steps=args.disc_steps, seed=seed, anchor_format=args.anchor,
                                           trainer_kwargs={"enable_progress_bar": False})
    if adapter.is_dir() and disc_path.is_dir():
        module = _module(src, args, adapter=adapter)
        metrics = _test(module, task, src, args)
    else:
        module, metrics = _train(src, task, args, seed, callbacks=(disc,))
        lp.save_adapter(module, adapter)
    # how much of the real test inputs the discriminator lets through (its synthetic acceptance
    # means little without this)
    scorer = _module(src, args, adapter=disc_path)
    real = [e.prompt for e in get_task(task, tokenizer=src, num_train=8, num_val=0, num_test=args.test)
            .get_examples()["test"]]
    margins = transfer.completion_margins(scorer.model, scorer.tokenizer, real, task)
    metrics["disc_real_acceptance"] = float((margins > 0).float().mean())
    return adapter, metrics


def one_run(src: str, tgt: str, task: str, seed: int, args, work: Path, sources: dict) -> dict:
    if (src, task, seed) not in sources:  # shared by every target of this source
        sources[src, task, seed] = _source(src, task, seed, args, work)
    adapter, source_metrics = sources[src, task, seed]
    row: dict = {**_scores("source", source_metrics), **_scores("target_base", _test(_module(tgt, args), task, tgt, args)),
                 "disc_real_acceptance": source_metrics["disc_real_acceptance"]}
    common = {"source_model": src, "source_adapter": str(adapter), "target_model": tgt, "task": task, "seed": seed,
              "num_synthetic": args.synthetic, "num_seeds": NUM_SEEDS.get(task, 5),
              "max_proposed": args.max_proposed_factor * args.synthetic, "anchor_format": args.anchor,
              "generator": args.generator,
              "label_max_new_tokens": args.max_new_tokens,
              "task_kwargs": {"num_train": 8, "num_val": 0, "num_test": args.test}}  # the test split of _test
    same_vocab = _vocabulary(src) == _vocabulary(tgt)
    kept = args.synthetic
    for name, filt in (("trans_lora", True), ("unfiltered", False))[: 2 if "unfiltered" in args.only else 1]:
        cfg = transfer.TransferConfig(**common, filter=filt, cache=str(work / f"{src}-{tgt}-{task}-{seed}-{name}.jsonl"))
        try:
            syn = transfer.synthesize(cfg)
        except transfer.SynthesisShortError as e:  # the generator ran out of new inputs first: train on what was kept
            print(f"{name}: {e}", file=sys.stderr)
            syn = transfer.SyntheticSet.load(cfg.cache)
        # the unfiltered ablation trains on as many examples as the filter kept: same count, no filter
        records = syn.accepted if filt else syn.accepted[:kept]
        if filt:
            kept = row["kept"] = len(records)
        if len(records) < 8:  # too few to train on: record it, do not invent a number
            row[name] = float("nan")
            continue
        examples = transfer.pipeline.synthetic_examples(records)
        row.update(_scores(name, _train(tgt, task, args, seed, examples)[1]))
        if "warm" in args.only and same_vocab:  # the same data, the student starting from the source adapter
            row.update(_scores(f"{name}_warm", _train(tgt, task, args, seed, examples, init=adapter)[1]))
        if filt:
            stats = syn.header["stats"]
            row.update(acceptance=stats["acceptance_rate"], mmd_kept=stats["mmd_kept_vs_seeds"],
                       mmd_rejected=stats["mmd_rejected_vs_seeds"])
            if same_vocab and "trans_lora_kl" in args.only:  # the same filtered set, plus the teacher's token-level KL
                for kl_name, warm in (("trans_lora_kl", False), ("trans_lora_kl_warm", True))[: 2 if "warm" in args.only else 1]:
                    kl_cfg = transfer.TransferConfig(**{**cfg.__dict__, "kl_weight": 1.0, "warm_start": warm,
                                                        "warm_lr": args.warm_lr, "warm_steps": args.warm_steps})
                    L.seed_everything(seed, verbose=False)
                    row.update(_scores(kl_name, transfer.train_student(
                        kl_cfg, syn, "lora", {"r": 8}, _module_kwargs(args, args.student_lr),
                        {"max_steps": args.student_steps or args.steps, **QUIET},
                        {"shuffle_seed": seed, "batch_size": args.batch_size})[1]))
    if "seeds_only" in args.only:
        seeds = get_task(task, tokenizer=tgt, num_train=8).get_examples()["train"][: NUM_SEEDS.get(task, 5)]
        row.update(_scores("seeds_only", _train(tgt, task, args, seed, seeds)[1]))
    direct = _module(tgt, args)
    if transfer.pipeline.warm_start_from(direct, str(adapter)):  # the shapes fit: the old adapter loads directly
        row.update(_scores("no_transfer", _test(direct, task, tgt, args)))
    if "fine_tune_n" in args.only:  # the upper bound: the target trained on the real data
        row.update(_scores("fine_tune_n", _train(tgt, task, args, seed)[1]))
    return row


def _vocabulary(model: str) -> dict[str, int]:
    """The model's tokenizer vocabulary (the teacher's token-level KL needs the same one on both sides)."""
    from lightning_peft.tasks.base import load_tokenizer

    return load_tokenizer(model).get_vocab()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--disc-steps", type=int, default=100)
    p.add_argument("--train", type=int, default=500)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--synthetic", type=int, default=64)
    p.add_argument("--max-proposed-factor", type=int, default=24,
                   help="give up a filtered synthesis after this many proposals per requested example")
    p.add_argument("--student-steps", type=int, default=None, help="steps of the students (default: --steps)")
    p.add_argument("--no-anchor", dest="anchor", action="store_false",
                   help="synthesise as the paper does (free continuation), not anchored to the seeds' format")
    p.add_argument("--lr", type=float, default=MODULE_KW["lr"], help="learning rate of the trainings on real data")
    p.add_argument("--student-lr", type=float, default=None, help="learning rate of the students (default: --lr)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size (real data and students)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="test batch size (default: the task's)")
    p.add_argument("--max-new-tokens", type=int, default=MODULE_KW["max_new_tokens"],
                   help="greedy answer length when testing (and the teacher's label length)")
    defaults = transfer.TransferConfig("", "", "", "")
    p.add_argument("--warm-lr", type=float, default=defaults.warm_lr, help="lr of the warm-started students")
    p.add_argument("--warm-steps", type=int, default=defaults.warm_steps, help="steps of the warm-started students")
    p.add_argument("--generator", default=None, help="zoo model that writes the inputs (default: the target)")
    p.add_argument("--only", nargs="+", default=["unfiltered", "trans_lora_kl", "seeds_only"],
                   choices=["unfiltered", "trans_lora_kl", "seeds_only", "warm", "fine_tune_n", "none"],
                   help="optional rows to run (warm: also students that start from the source adapter; fine_tune_n: "
                        "the target trained on the real data; none: none)")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS),
                   help="source:target names (zoo or packaged real models, e.g. smollm2-135m:qwen2.5-coder-0.5b)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--out", type=Path, default=OUT, help="folder for translora.{json,md,png}")
    p.add_argument("--work", type=Path, default=None,
                   help="keep adapters and synthetic JSONL sets here (default: a temporary folder)")
    p.add_argument("--resume", action="store_true", help="keep the rows of an earlier translora.json, run the rest")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from translora.json")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "translora.json"
    rows = json.loads(saved.read_text())["rows"] if (args.resume or args.report) and saved.exists() else []
    done = {(r["source_model"], r["target_model"], r["task"], r["seed"]) for r in rows}
    sources: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) if args.work is None else args.work
        jobs = [] if args.report else [(*pair.split(":"), task, seed) for task in args.tasks for seed in args.seeds
                                       for pair in args.pairs]
        for src, tgt, task, seed in tqdm(jobs, desc="translora"):
            if (src, tgt, task, seed) in done:
                continue
            rows.append({"source_model": src, "target_model": tgt, "task": task, "seed": seed,
                         **one_run(src, tgt, task, seed, args, work, sources)})
            args_json = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            saved.write_text(json.dumps({"args": args_json, "rows": rows}, indent=2))  # after every job
    groups: dict = {}
    for r in sorted(rows, key=lambda r: (r["task"], r["target_model"], r["seed"])):
        groups.setdefault((r["source_model"], r["target_model"], r["task"]), []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    settings = json.loads(saved.read_text())["args"] if args.report else vars(args)
    tables = [f"Exact match, mean ± std over seeds {seeds}:\n\n" + _table(groups, [*COLS, "kept", "acceptance",
                                                                                     "disc_real_acceptance", "mmd_kept",
                                                                                     "mmd_rejected"]),
              "Token accuracy (teacher forcing):\n\n" + _table(groups, [f"{c}/token_acc" for c in COLS])]
    (out / "translora.md").write_text(f"Settings: {settings}\n\n" + "\n\n".join(tables) + "\n")
    print("\n\n".join(tables))
    _plot(groups, out / "translora.png")


def _values(rs: list[dict], col: str) -> list[float]:
    return [r[col] for r in rs if r.get(col) is not None and r[col] == r[col]]  # drops missing and NaN


def _table(groups: dict, cols: list[str]) -> str:
    lines = ["| source -> target | task | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (s, t, task), rs in groups.items():
        cells = [f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" if (v := _values(rs, c)) else "n/a"
                 for c in cols]
        lines.append(f"| {s} -> {t} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(groups: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    width = 0.8 / len(COLS)
    for ax, suffix, label in ((axes[0], "", "exact match"), (axes[1], "/token_acc", "token accuracy")):
        for j, c in enumerate(COLS):
            vals = [_values(rs, c + suffix) for rs in groups.values()]
            means = [statistics.mean(v) if v else float("nan") for v in vals]
            errs = [statistics.pstdev(v) if v else 0.0 for v in vals]
            ax.bar([i + j * width for i in range(len(groups))], means, width, yerr=errs, capsize=2, label=c)
        ax.set_xticks([i + 0.4 for i in range(len(groups))])
        ax.set_xticklabels([f"{s}->{t}\n{task}" for s, t, task in groups], fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Trans-LoRA (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
