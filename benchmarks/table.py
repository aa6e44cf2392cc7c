"""Print the latest rows of one benchmark from ``results.csv`` as a markdown table.

The latest run is the set of rows with the newest ``date`` for that benchmark and device
(``harness.RUN_STARTED``: one value per benchmark process).

Run: python benchmarks/table.py sparse_ops [--metric train_step] [--device x86_64]
"""

from __future__ import annotations

import argparse
import csv

from harness import RESULTS


def latest(benchmark: str, metric: str = "", device: str = "") -> list[dict[str, str]]:
    rows = [r for r in csv.DictReader(RESULTS.open()) if r["benchmark"] == benchmark
            and metric in r["metric"] and device in r["device"]]
    newest = max((r["date"] for r in rows), default=None)
    return [r for r in rows if r["date"] == newest]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmark")
    p.add_argument("--metric", default="", help="keep metrics containing this text")
    p.add_argument("--device", default="", help="keep devices containing this text")
    args = p.parse_args()
    rows = latest(args.benchmark, args.metric, args.device)
    if not rows:
        raise SystemExit(f"no rows for benchmark {args.benchmark!r} in {RESULTS}; run benchmarks/{args.benchmark}.py first")
    print("| case | metric | value | baseline | ratio |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['metric']} | {r['value']} | {r['baseline']} | {r['ratio']} |")
    print(f"\n{rows[0]['device']}; {rows[0]['versions']}; {rows[0]['date']}")


if __name__ == "__main__":
    main()
