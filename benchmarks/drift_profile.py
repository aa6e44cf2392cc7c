"""Drift profile of the real update (``smollm2-135m`` -> ``smollm2-135m-v2``) against the zoo's updates.

Issue 26, item 4: is the real v2 an update like the zoo's? Per pair, on a task's test inputs
(:func:`lightning_peft.analysis.analyse`, the tables of ``lightning-peft drift``): the relative
weight change ||W_n - W_o|| / ||W_o|| per module type and per depth third, the attention
Jensen-Shannon divergence and the CKA of the layer outputs (means over layers and heads).

    python benchmarks/drift_profile.py            # all pairs (builds what is missing: the real v2 took 38 min)
    python benchmarks/drift_profile.py --pairs smollm2

Writes ``benchmarks/results/drift_profile.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_peft.analysis import analyse
from lightning_peft.data import first_batches
from lightning_peft.tasks import get_task

OUT = Path(__file__).with_name("results")
PAIRS = {  # name: (old, new, task whose test inputs the models are compared on)
    "llama-v2": ("llama-v1", "llama-v2", "arithmetic"),
    "llama-v2-major": ("llama-v1", "llama-v2-major", "arithmetic"),
    "smollm2": ("smollm2-135m", "smollm2-135m-v2", "sarcasm"),
}
TYPES = ("q", "k", "v", "o", "gate", "up", "down")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def profile(old: str, new: str, task: str, batches: int = 4) -> dict:
    """The drift profile of ``old`` -> ``new`` on ``batches`` test batches of ``task``."""
    data = get_task(task, tokenizer=old, batch_size=8, num_val=0, num_test=64)
    report = analyse(old, new, first_batches(data, "test", batches))
    layered = [r for r in report.weights if r["layer"] is not None]
    depth = max(r["layer"] for r in layered) + 1
    thirds = {name: [r for r in layered if int(3 * r["layer"] / depth) == i] for i, name in enumerate(("first", "middle", "last"))}
    return {
        "old": old, "new": new, "task": task, "layers": depth,
        "by_type": {t: _mean([r["rel_change"] for r in layered if r["type"] == t]) for t in TYPES},
        "by_group": {g: _mean([r["rel_change"] for r in layered if r["group"] == g]) for g in ("attention", "ffn")},
        "by_depth": {
            name: {g: _mean([r["rel_change"] for r in rows if r["group"] == g]) for g in ("attention", "ffn")}
            for name, rows in thirds.items()
        },
        "by_layer": {g: [_mean([r["rel_change"] for r in layered if r["layer"] == i and r["group"] == g])
                         for i in range(depth)] for g in ("attention", "ffn")},
        "attention_js": _mean([r["js"] for r in report.attention_js]),
        "cka": _mean([r["cka"] for r in report.cka]),
        "ffn_topk_overlap": _mean([r["topk_overlap"] for r in report.ffn_activation]),
    }


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| update | task inputs | " + " | ".join(TYPES) + " | attention / FFN (ratio) | FFN first / middle / last third "
        "| attention JS | CKA | FFN top-10% overlap |",
        "|---|---|" + "---:|" * (len(TYPES) + 5),
    ]
    for r in results.values():
        att, ffn = r["by_group"]["attention"], r["by_group"]["ffn"]
        thirds = " / ".join(f"{r['by_depth'][t]['ffn']:.3f}" for t in ("first", "middle", "last"))
        lines.append(
            f"| {r['old']} -> {r['new']} | {r['task']} | " + " | ".join(f"{r['by_type'][t]:.3f}" for t in TYPES)
            + f" | {att:.3f} / {ffn:.3f} ({ffn / att:.2f}) | {thirds} | {r['attention_js']:.4f} | {r['cka']:.3f} "
            f"| {r['ffn_topk_overlap']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        depth = [i / max(r["layers"] - 1, 1) for i in range(r["layers"])]
        for group, style in (("attention", "--"), ("ffn", "-")):
            ax.plot(depth, r["by_layer"][group], style, label=f"{name} {group}")
    ax.set(xlabel="relative depth (layer / last layer)", ylabel="||W_n - W_o|| / ||W_o||", yscale="log",
           title="Weight drift by depth: the zoo's updates and the real one")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated of {', '.join(PAIRS)}")
    args = ap.parse_args()
    path = OUT / "drift_profile.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.pairs.split(","):
        results[name] = profile(*PAIRS[name])
        path.write_text(json.dumps(results, indent=2) + "\n")  # each pair as it finishes
    (OUT / "drift_profile.md").write_text(markdown(results))
    plot(results, OUT / "drift_profile.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
