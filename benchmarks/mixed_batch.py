"""Mixed-adapter batches: one generation whose rows name different adapters, tile SHiRA vs peft's mixed LoRA batch.

Multi-LoRA serving batches requests for different adapters into one forward (Punica, S-LoRA, vLLM; peft's
``generate(..., adapter_names=[...])``): the base GEMM runs once over the batch and each adapter's unmerged
branch on its own rows. :meth:`lightning_peft.AdapterBank.generate` does the same for sparse adapters
(``adapters=[...]``): each row's tile delta ``x S^T`` added on its rows by a C loop over whole tiles
(:func:`lightning_peft.kernels.tile_linear_add`). Rows, same base weights, same trainable count per adapter
(LoRA rank ``r`` on every linear layer of the decoder = SHiRA ``r (in + out)`` entries per layer, ``tile=16``):

* ``base``: the bare base model on the batch (the floor: no adapter at all);
* ``peft-mixed``: ``PeftModel`` holding the N LoRA adapters, ``generate(ids, adapter_names=rows)``;
* ``bank-mixed``: an ``AdapterBank`` holding N tile SHiRA adapters, ``bank.generate(ids, adapters=rows)``.

Row ``i`` of a batch of ``B`` names adapter ``i % N`` (``B / N`` rows each). Each generation: a prompt of 16
tokens per row, ``--new-tokens`` greedy tokens (EOS disabled). The rows are timed in turn, ``--repeats`` rounds,
median per row; tokens/s = ``B * new_tokens`` over the median time, by the wall clock and by this process's CPU time
(the machine may be shared: with ``--threads 1`` the CPU time is what the work costs, whatever runs beside it).
Ratios are to ``peft-mixed`` of the same model and batch.

Run: ``python benchmarks/mixed_batch.py`` (``--quick``: llama-w512, B=16 N=8, 2 rounds; ``--no-csv``: print only).
Writes ``benchmarks/results/mixed_batch.{json,md,png}`` and rows to ``results.csv``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, row  # noqa: E402
from serving import build_model, fill_bank  # noqa: E402
from switching import _randomize  # noqa: E402

import lightning_peft as lp  # noqa: E402

BENCH = "mixed_batch"
ROWS = ("base", "peft-mixed", "bank-mixed")
TILE = 16


def peft_model(base, n: int, r: int):
    """``PeftModel`` over a copy of ``base`` with LoRA adapters ``a0 .. a{n-1}`` (rank ``r``, random weights)."""
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=lp.find_target_modules(base, "all-linear"))
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0").eval()
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    for i in range(n):
        _randomize(model, i, (f".a{i}.",))
    return model


def generators(base, n: int, r: int, batch: int, new_tokens: int):
    """``{row: generate()}`` for one model, N and batch (each call generates the whole batch)."""
    names = [f"a{i % n}" for i in range(batch)]
    prompt = torch.randint(1, base.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None,
           "pad_token_id": 0}
    bank = fill_bank(base, n, r, TILE)
    lora = peft_model(base, n, r)

    def check(out: torch.Tensor) -> torch.Tensor:
        if out.shape != (batch, 16 + new_tokens):
            raise RuntimeError(f"generated {tuple(out.shape)}, expected {(batch, 16 + new_tokens)}")
        return out

    with torch.no_grad():
        return {
            "base": lambda: check(base.generate(prompt, **gen)),
            "peft-mixed": lambda: check(lora.generate(input_ids=prompt, adapter_names=names, **gen)),
            "bank-mixed": lambda: check(bank.generate(prompt, adapters=names, **gen)),
        }


def measure(fns: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Median ``(wall s, CPU s)`` per row, the rows timed in turn each round (after one untimed round)."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            with torch.no_grad():
                fn()
            if r:
                times[k].append((time.perf_counter() - w, time.process_time() - c))
    return {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama-w512", "llama-w1024", "llama7b-layer"])
    ap.add_argument("--cases", nargs="+", default=["16x8", "8x2", "32x8", "32x32"], help="BATCHxADAPTERS")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mixed_batch"))
    args = ap.parse_args()
    if args.quick:
        args.models, args.cases, args.repeats, args.out = ["llama-w512"], ["16x8"], 2, ""
    torch.set_num_threads(args.threads)
    records, csv = [], []
    for name in args.models:
        base = build_model(name)
        for case in tqdm(args.cases, desc=name):
            batch, n = (int(v) for v in case.split("x"))
            found = measure(generators(base, n, args.r, batch, args.new_tokens), args.repeats)
            tokens = batch * args.new_tokens
            rec = {"model": name, "batch": batch, "adapters": n,
                   **{f"{k}_tok_s": tokens / w for k, (w, _) in found.items()},
                   **{f"{k}_cpu_tok_s": tokens / c for k, (_, c) in found.items()}}
            records.append(rec)
            label = f"{name} B={batch} N={n} r={args.r} tokens={args.new_tokens} fp32 threads={args.threads}"
            for clock in ("", "cpu_"):
                for k in ("bank-mixed", "base"):
                    csv.append(row(BENCH, label, f"{clock}tok_s_{k}_vs_peft-mixed", rec[f"{k}_{clock}tok_s"],
                                   rec[f"peft-mixed_{clock}tok_s"], "cpu"))
            print(f"{label}: " + ", ".join(f"{k} {rec[f'{k}_tok_s']:.1f} tok/s (CPU {rec[f'{k}_cpu_tok_s']:.1f})"
                                         for k in ROWS)
                  + f"; bank/peft {rec['bank-mixed_tok_s'] / rec['peft-mixed_tok_s']:.2f}x wall, "
                  f"{rec['bank-mixed_cpu_tok_s'] / rec['peft-mixed_cpu_tok_s']:.2f}x CPU")
    if args.out:
        write(Path(args.out), records, args)
    if not args.no_csv:
        print(f"appended {append_rows(csv)} rows to benchmarks/results.csv")


def write(out: Path, records: list[dict], args: argparse.Namespace) -> None:
    """``out.json``, ``out.md`` (one table) and ``out.png`` (tokens/s ratio to peft per case, both clocks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_csv", "quick")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "records": records}, indent=1))
    lines = ["| model | batch | adapters | base tok/s | peft-mixed tok/s | bank-mixed tok/s | bank / peft (wall) "
             "| bank / peft (CPU) | base / peft (CPU) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in records:
        lines.append(f"| {x['model']} | {x['batch']} | {x['adapters']} | {x['base_tok_s']:.1f} | "
                     f"{x['peft-mixed_tok_s']:.1f} | {x['bank-mixed_tok_s']:.1f} | "
                     f"{x['bank-mixed_tok_s'] / x['peft-mixed_tok_s']:.2f}x | "
                     f"{x['bank-mixed_cpu_tok_s'] / x['peft-mixed_cpu_tok_s']:.2f}x | "
                     f"{x['base_cpu_tok_s'] / x['peft-mixed_cpu_tok_s']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{x['model']}\nB={x['batch']} N={x['adapters']}" for x in records]
    for j, (key, name) in enumerate((("bank-mixed", "bank-mixed (tile SHiRA)"), ("base", "bare base (floor)"))):
        ax.bar([i + 0.4 * j for i in range(len(records))],
               [x[f"{key}_cpu_tok_s"] / x["peft-mixed_cpu_tok_s"] for x in records], 0.4, label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.2 for i in range(len(records))], labels, fontsize=7)
    ax.set_ylabel("tokens/s / peft mixed LoRA (CPU time)")
    ax.set_title(f"mixed-adapter batches, r={args.r}, {args.new_tokens} new tokens, fp32, {args.threads} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
