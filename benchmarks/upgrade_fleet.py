"""A fleet upgrade on the zoo: which route each adapter gets, how good it is on real test data, and the threshold.

1. **Fleet**: ``lightning-peft train experiment=translora_source`` for 3 tasks x {LoRA, SHiRA} x seeds on
   llama-v1 (``--model``: another base; each adapter carries its seeds and discriminator, as every
   ``lightning-peft train`` adapter does).
2. **Fine-tune_n**: the same adapters retrained with the real data on each new base (the upper bound).
3. **Upgrade**: ``lightning-peft upgrade adapters=<fleet> new=<target> keep_candidates=true threshold=1.0`` per
   target (llama-v2, llama-v2-major, qwen2-v1): every route is scored and every candidate kept.
4. **Real test accuracy** of every candidate, the bare target and Fine-tune_n (token accuracy and loss).
5. **Calibration**: the agreement threshold above which (and the token-level KL ``max_kl`` below which, and
   the fidelity ``min_fidelity`` above which) candidates keep >= ``--goal`` of the source adapter's token
   accuracy, and each score's rank correlation with relative accuracy (all candidates, and across families alone).
6. **Decisions**: the routes taken with ``lightning-peft upgrade``'s defaults and with each calibrated rule,
   their precision (taken routes that keep >= ``--goal``) and recall (candidates that keep it and pass).

Writes ``benchmarks/results/upgrade_fleet.{json,md,png}``. Reruns continue (every step is cached in ``--work``).

    python benchmarks/upgrade_fleet.py                          # the full fleet (hours on 2 CPU cores)
    python benchmarks/upgrade_fleet.py --tasks data2text --methods lora --seeds 0 --targets llama-v2

A real fleet (SmolLM2-135M adapters to the real v2 and to another family; each training at the real-model
settings, the students too):

    python benchmarks/upgrade_fleet.py --model smollm2 --tasks sarcasm,ner_finance --targets smollm2-135m-v2,qwen2.5-coder-0.5b \
        --steps 150 --train-args module.lr=6e-4 task.batch_size=8 --upgrade student.module_kwargs.lr=6e-4 \
        --out benchmarks/results/upgrade_fleet_real
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
sys.path.insert(0, str(ROOT))
from harness import mean_std  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lightning_peft.upgrade import UpgradeConfig  # noqa: E402
from lightning_peft.upgrade.student_check import PassLine, passes  # noqa: E402

RESULTS = ROOT / "results"
CONF = ROOT.parent / "conf"
SCORE_KEYS = ("agreement", "kl", "fidelity", "fidelity_seeds", "fidelity_all", "fidelity_kl", "fidelity_ll", "fidelity_acc",
              "relative_token_acc")
DEFAULTS = UpgradeConfig(adapters="-", new="-")  # what `lightning-peft upgrade` decides with when told nothing
ROUTE_ORDER = tuple(DEFAULTS.routes)  # the routes in the order it tries them


def cli(*args: str) -> None:
    print("+ lightning-peft", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lightning_peft.cli", *args], check=True)


def train(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """``lightning-peft train`` into ``run_dir`` unless it finished there; returns its results.json."""
    if not (run_dir / "results.json").is_file():
        cli("train", *overrides, "logger=csv", "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}")
    return json.loads((run_dir / "results.json").read_text())


def evaluate(adapter: Path | None, base: str, task: str, num_test: int, cache: Path) -> dict[str, float]:
    """Real test loss / token accuracy of ``adapter`` on ``base`` (``None``: the bare base), measured as a calibration
    run of ``lightning-peft upgrade`` measures it (:func:`~lightning_peft.upgrade.calibration.test_accuracy`); cached."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from lightning_peft.model_loader import ModelLoader
    from lightning_peft.upgrade.calibration import test_accuracy

    out = test_accuracy(*ModelLoader().load(base, adapter, other_base=True), task, num_test)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def rescore(adapter: Path, source_base: str, target: str, upgraded: Path, routes: list[str], cache: Path) -> dict[str, Any]:
    """Every kept candidate of one adapter scored again by the current fidelity
    (:func:`~lightning_peft.upgrade.fleet.check_fidelity`, with the defaults' ``fidelity_on``) on the inputs its upgrade
    checked (the adapter's seeds, then the held-out synthetic inputs its synthetic set begins with, each with the
    reference's completion), by route; cached as JSON. Scores change, the candidates need not."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from lightning_peft.adapter_folder import AdapterFolder
    from lightning_peft.model_loader import ModelLoader
    from lightning_peft.transfer.provenance import SyntheticSet
    from lightning_peft.upgrade.fleet import check_fidelity, check_inputs

    loader = ModelLoader(keep=2)
    reference, ref_tok = loader.load(source_base, adapter)
    seeds = AdapterFolder(adapter).record.seeds
    synthetic = upgraded / "synthetic.jsonl"
    inputs, outputs = check_inputs(reference, ref_tok, seeds, SyntheticSet.load(synthetic) if synthetic.is_file() else None,
                                   DEFAULTS)
    out = {route: check_fidelity(reference, ref_tok, *loader.load(target, upgraded / "candidates" / route, other_base=True),
                                 inputs, outputs, len(seeds), DEFAULTS.fidelity_on) for route in routes}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def calibrate(points: list[dict[str, Any]], goal: float, key: str = "agreement") -> float | None:
    """Smallest threshold on the score ``key`` above which every candidate keeps >= ``goal`` of its source's token
    accuracy (``None``: no threshold does); candidates without that score are left out."""
    points = [p for p in points if p.get(key) is not None]
    for t in sorted({round(p[key], 3) for p in points}):
        above = [p for p in points if p[key] >= t]
        if above and all(p["relative_acc"] >= goal for p in above):
            return t
    return None


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation of two equally long lists (average ranks for ties); ``None`` below 3 pairs."""
    if len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in order[i : j + 1]:
                out[k] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else None


def correlations(points: list[dict[str, Any]]) -> dict[str, tuple[float | None, int]]:
    """Each score's rank correlation with relative token accuracy, and over how many candidates: all, and across
    families (targets of another family than the fleet's base) alone."""
    out = {}
    for key in SCORE_KEYS:
        for name, subset in (("", points), (" across families", [p for p in points if p["cross_family"]])):
            have = [p for p in subset if p.get(key) is not None]
            out[key + name] = (spearman([p[key] for p in have], [p["relative_acc"] for p in have]), len(have))
    return out


def calibrate_kl(points: list[dict[str, Any]], goal: float) -> float | None:
    """Largest token-level KL below which every candidate keeps >= ``goal`` (same vocabulary only); ``None``: none."""
    best = None
    for p in sorted((p for p in points if p.get("kl") is not None), key=lambda p: p["kl"]):
        if p["relative_acc"] < goal:
            break
        best = p["kl"]
    return None if best is None else round(best + 5e-4, 3)  # rounded up: the last qualifying candidate stays in



def family(model: str) -> str:
    """``llama-v2`` -> ``llama``, ``qwen2.5-coder-0.5b`` -> ``qwen2.5``: models of one family share a vocabulary."""
    return model.split("-")[0]


def describe(lines: list[PassLine]) -> str:
    """``agreement >= 0.8 or kl <= 0.26``: pass lines as text."""
    return " or ".join(f"{key} {'>=' if sign > 0 else '<='} {target}" for key, target, sign in lines)


def route_of(row: dict[str, Any], lines: list[PassLine]) -> str:
    """The route ``lightning-peft upgrade`` takes with these pass lines: the first that passes, else ``needs_data``."""
    return next((route for route in ROUTE_ORDER if route in row and any(passes(row[route], line) for line in lines)),
                "needs_data")


def decisions(rows: list[dict[str, Any]], lines: list[PassLine], goal: float) -> dict[str, Any]:
    """How right a decision rule is against real accuracy: of the routes it takes, how many keep >= ``goal`` of the
    source's accuracy (precision); of the candidates that keep it, how many it lets pass (recall, per candidate) and
    of the adapters with such a candidate, how many get a route (per adapter)."""
    taken = [r[route] for r in rows if (route := route_of(r, lines)) != "needs_data"]
    good = [r[route] for r in rows for route in ROUTE_ORDER if route in r and r[route]["relative_acc"] >= goal]
    adapters = [r for r in rows if any(route in r and r[route]["relative_acc"] >= goal for route in ROUTE_ORDER)]
    return {"taken": len(taken), "taken_good": sum(c["relative_acc"] >= goal for c in taken),
            "good": len(good), "good_passed": sum(any(passes(c, line) for line in lines) for c in good),
            "adapters_good": len(adapters), "adapters_good_routed": sum(route_of(r, lines) != "needs_data" for r in adapters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="arithmetic,data2text,sql")
    parser.add_argument("--methods", default="lora,shira")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--targets", default="llama-v2,llama-v2-major,qwen2-v1")
    parser.add_argument("--model", default="llama", help="the fleet's model config (conf/model/NAME.yaml: its base)")
    parser.add_argument("--train-args", nargs="*", default=[], help="extra overrides of every training (fleet, Fine-tune_n)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=128)
    parser.add_argument("--goal", type=float, default=0.9, help="relative token accuracy a taken route must keep")
    parser.add_argument("--upgrade", nargs="*", default=[], help="extra `lightning-peft upgrade` overrides")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "upgrade_fleet")
    parser.add_argument("--out", type=Path, default=RESULTS / "upgrade_fleet")
    parser.add_argument("--rescore", action="store_true",
                        help="score every kept candidate again with the current fidelity (no upgrade is rerun)")
    parser.add_argument("--include", type=Path, nargs="*", default=[],
                        help="earlier upgrade_fleet.json files (same settings) whose rows join the table, e.g. other seeds")
    args = parser.parse_args()
    tasks, methods, targets = args.tasks.split(","), args.methods.split(","), args.targets.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [f"trainer.max_steps={args.steps}", f"task.num_train={args.num_train}", f"task.num_test={args.num_test}",
              *args.train_args]
    source_base = OmegaConf.load(CONF / "model" / f"{args.model}.yaml").name_or_path
    fleet = args.work / "fleet"
    sources: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for method in methods:
            for seed in seeds:
                name = f"{task}-{method}-s{seed}"
                r = train(fleet / name, "experiment=translora_source", f"model={args.model}", f"task={task}", f"method={method}", f"seed={seed}",
                          *common)
                sources[name] = {"task": task, "method": method, "seed": seed, "acc": r["metrics"]["test/token_acc"],
                                 "loss": r["metrics"]["test/loss"]}
    rows: list[dict[str, Any]] = []
    for target in targets:
        model = family(target) if (CONF / "model" / f"{family(target)}.yaml").is_file() else "hf"  # else any HF model
        model_args = [f"model={model}", f"model.name_or_path={target}"]
        upgrade_dir = args.work / "upgrade" / target
        if not (upgrade_dir / "upgraded" / "upgrade_report.json").is_file():
            # every candidate scored and trained to the end (no threshold, no early stop, no budget): the calibration
            cli("upgrade", f"adapters={fleet}", f"new={target}", "keep_candidates=true", "threshold=1.0", "student_checks=0",
                "time_budget=null", "logger=csv", *args.upgrade, f"hydra.run.dir={upgrade_dir}")
        report = {r["adapter"]: r for r in json.loads((upgrade_dir / "upgraded" / "upgrade_report.json").read_text())}
        for name, src in sources.items():
            task = src["task"]
            done = report[f"{name}__adapter"]
            row = {"adapter": name, "target": target, "cross_family": family(target) != family(source_base), **src,
                   "seconds": done["seconds"], "timings": done.get("timings")}
            bare = evaluate(None, target, task, args.num_test, args.work / "eval" / target / f"bare-{task}.json")
            fine = train(args.work / "fine_tune_n" / target / name, *model_args, f"task={task}", f"method={src['method']}",
                         f"seed={src['seed']}", *common)
            row.update(bare_acc=bare["token_acc"], fine_tune_n_acc=fine["metrics"]["test/token_acc"])
            scores = report[f"{name}__adapter"].get("scores", {})
            if args.rescore and scores:
                fresh = rescore(fleet / name / "adapter", source_base, target, upgrade_dir / "upgraded" / f"{name}__adapter",
                                list(scores), args.work / "rescore" / target / f"{name}.json")
                scores = {route: {**score, **fresh[route]} for route, score in scores.items()}
            for route, score in scores.items():
                cand = upgrade_dir / "upgraded" / f"{name}__adapter" / "candidates" / route
                real = evaluate(cand, target, task, args.num_test, args.work / "eval" / target / f"{name}-{route}.json")
                row[route] = {**score, "acc": real["token_acc"], "loss": real["loss"],
                              "relative_acc": real["token_acc"] / src["acc"]}
            rows.append(row)
    have = {(r["adapter"], r["target"]) for r in rows}
    for path in args.include:
        rows += [r for r in json.loads(path.read_text())["rows"] if (r["adapter"], r["target"]) not in have]
    points = [{**{key: r[route].get(key) for key in SCORE_KEYS},
               "fidelity_basis": r[route].get("fidelity_basis"), "relative_acc": r[route]["relative_acc"],
               "route": route, "target": r["target"], "cross_family": r["cross_family"]} for r in rows for route in ROUTE_ORDER if route in r]
    threshold, max_kl = calibrate(points, args.goal), calibrate_kl(points, args.goal)
    threshold = 1.0 if threshold is None else threshold  # route nothing
    min_fidelity = calibrate(points, args.goal, "fidelity")
    default = DEFAULTS.pass_lines()
    rules = {"defaults (" + describe(default) + ")": default,
             f"calibrated agreement (threshold={threshold} max_kl={max_kl})":
                 [("agreement", threshold, 1)] + ([("kl", max_kl, -1)] if max_kl is not None else []),
             f"calibrated fidelity (score=fidelity min_fidelity={min_fidelity})":
                 [("fidelity", min_fidelity, 1)] if min_fidelity is not None else []}
    for key in ("fidelity_acc", "relative_token_acc"):  # the forms reported beside the deciding one
        if any(p.get(key) is not None for p in points):
            line = calibrate(points, args.goal, key)
            rules[f"calibrated {key} >= {line}"] = [(key, line, 1)] if line is not None else []
    for r in rows:  # the routing with the default settings: the first route that passes, else needs data
        r["route"] = route_of(r, default)
        r["route_acc"] = r[r["route"]]["acc"] if r["route"] != "needs_data" else None
    quality = {name: decisions(rows, lines, args.goal) for name, lines in rules.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"threshold": threshold, "max_kl": max_kl, "goal": args.goal,
                                                        "min_fidelity": min_fidelity, "decisions": quality, "rows": rows,
                                                        "points": points},
                                                       indent=2))
    text = markdown(rows, points, threshold, max_kl, args.goal, min_fidelity, quality)
    args.out.with_suffix(".md").write_text(text)
    plot(rows, points, {"agreement": threshold, "fidelity": min_fidelity}, args.out.with_suffix(".png"))
    print(text)


def markdown(rows: list[dict[str, Any]], points: list[dict[str, Any]], threshold: float, max_kl: float | None,
             goal: float, min_fidelity: float | None, quality: dict[str, dict[str, Any]]) -> str:
    with_kl = sum(p.get("kl") is not None for p in points)
    corr = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'} (n={n})" for k, (v, n) in correlations(points).items())
    lines = ["# Fleet upgrade (`python benchmarks/upgrade_fleet.py`)", "",
             f"Calibrated threshold: agreement >= {threshold} (every candidate above it keeps >= {goal} of its source "
             f"adapter's token accuracy; {len(points)} candidates).", "",
             f"Calibrated max_kl: token-level KL <= {max_kl} (every candidate below it keeps >= {goal}; {with_kl} "
             "candidates share the old base's vocabulary). The calibrated agreement rule below uses both, as `lightning-peft upgrade "
             f"threshold={threshold} max_kl={max_kl}` would.", "",
             f"Calibrated min_fidelity (`score=fidelity`): fidelity >= {min_fidelity}.", "",
             f"Rank correlation (Spearman) of each score with relative token accuracy: {corr}.", "",
             f"Decisions against real accuracy (a route is right when it keeps >= {goal} of the source's token accuracy; "
             "the calibrated rules are fitted on these same candidates, the defaults are not):", "",
             "| rule | routes taken | right (precision) | candidates >= goal passed (recall) | adapters >= goal routed |",
             "|---|---|---|---|---|",
             *(f"| {name} | {q['taken']} | {q['taken_good']}/{q['taken']} | {q['good_passed']}/{q['good']} | "
               f"{q['adapters_good_routed']}/{q['adapters_good']} |" for name, q in quality.items()), "",
             "The taken route below is the defaults'.", "",
             "Token accuracy on the target's real test split, mean ± std over seeds:", "",
             "| target | task | method | n | source (on v1) | bare target | direct reuse | Trans-LoRA | taken route | "
             "Fine-tune_n | routes (direct / translora / needs data) | agreement direct / translora | s per adapter |",
             "|" + "---|" * 13]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["task"], r["method"]), []).append(r)
    for (target, task, method), rs in groups.items():
        def vals(route: str, key: str, rs: list = rs) -> list[float]:
            return [r[route][key] for r in rs if route in r]
        counts = "/".join(str(sum(r["route"] == k for r in rs)) for k in ("direct", "translora", "needs_data"))
        taken = [r["route_acc"] for r in rs if r["route_acc"] is not None]
        lines.append(f"| {target} | {task} | {method} | {len(rs)} | {mean_std([r['acc'] for r in rs])} | {mean_std([r['bare_acc'] for r in rs])} | "
                     f"{mean_std(vals('direct', 'acc'))} | {mean_std(vals('translora', 'acc'))} | {mean_std(taken)} | "
                     f"{mean_std([r['fine_tune_n_acc'] for r in rs])} | {counts} | {mean_std(vals('direct', 'agreement'))} / "
                     f"{mean_std(vals('translora', 'agreement'))} | {mean_std([r['seconds'] for r in rs])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], points: list[dict[str, Any]], lines: dict[str, float | None], path: Path) -> None:
    """Each score (``lines``: score -> its calibrated line) against relative real accuracy, then the routes' accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lines) + 1, figsize=(6 * (len(lines) + 1), 4.5))
    for ax, (key, line) in zip(axes, lines.items()):
        for route, colour in (("direct", "tab:green"), ("translora", "tab:blue")):
            for target in dict.fromkeys(p["target"] for p in points):
                pts = [p for p in points if p["route"] == route and p["target"] == target and p.get(key) is not None]
                ax.scatter([p[key] for p in pts], [p["relative_acc"] for p in pts], c=colour,
                           marker="^" if target.startswith("qwen") else "s" if "major" in target else "o",
                           label=f"{route} -> {target}", alpha=0.7)
        if line is not None:
            ax.axvline(line, color="black", linestyle="--", linewidth=0.8, label=f"calibrated {line}")
        ax.set_xlabel(f"data-free {key} (old base + old adapter as the reference)")
        ax.set_ylabel("real test token accuracy / source adapter's")
        ax.set_title(f"calibration: {key} vs real accuracy")
        ax.legend(fontsize=6)
    bx = axes[-1]
    labels, series = [], {k: [] for k in ("bare", "direct", "translora", "fine_tune_n")}
    for target in dict.fromkeys(r["target"] for r in rows):
        for task in dict.fromkeys(r["task"] for r in rows):
            rs = [r for r in rows if r["target"] == target and r["task"] == task]
            labels.append(f"{target}\n{task}")
            series["bare"].append(statistics.fmean(r["bare_acc"] for r in rs))
            series["fine_tune_n"].append(statistics.fmean(r["fine_tune_n_acc"] for r in rs))
            for route in ("direct", "translora"):
                v = [r[route]["acc"] for r in rs if route in r]
                series[route].append(statistics.fmean(v) if v else 0.0)
    width = 0.2
    for i, (key, values) in enumerate(series.items()):
        bx.bar([x + (i - 1.5) * width for x in range(len(labels))], values, width, label=key)
    bx.set_xticks(range(len(labels)), labels, fontsize=6)
    bx.set_ylabel("real test token accuracy")
    bx.set_title("routes vs bare target and Fine-tune_n (mean over methods and seeds)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
