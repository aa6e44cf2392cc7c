"""Serving many adapters from one base: AdapterBank (SHiRA, fused in place) vs what peft users pick.

A stream of requests, each naming one of ``N`` adapters (N = 2, 8, 32, drawn uniformly with a fixed
seed); each request = switch if the adapter differs from the current one, then a greedy generation of
``new_tokens`` tokens (exactly that many: EOS is disabled) from a fixed prompt. Rows, same base weights
and the same trainable count per adapter (SHiRA ``r (in + out)`` entries per layer = LoRA rank ``r``,
all linear layers of the decoder):

* ``base`` / ``base-compiled``: the bare base model, no adapter (the per-token floor, eager and compiled);
* ``bank`` / ``bank-compiled``: :class:`lightning_peft.AdapterBank` holding N SHiRA adapters; a switch
  restores the previous adapter's entries and scatters the next one's into the weights (SHiRA,
  Bhardwaj et al. 2024, section 4), so generation runs the plain base graph;
* ``bank-tile`` / ``bank-tile-compiled``: the same with tile-structured SHiRA (``tile=16``: entries in 1 x 16
  runs along each weight's input dimension, as many as the unstructured rows); a switch copies whole tiles
  back and adds the next adapter's tiles (SMT, ICLR 2025, switches blocks the same way);
* ``hotswap`` / ``hotswap-compiled``: peft's ``hotswap_adapter_from_state_dict`` (in-place copy into
  the loaded LoRA's ``lora_A``/``lora_B``; the N state dicts are held in memory, as a server would);
  the compiled row calls ``prepare_model_for_compiled_hotswap`` first (peft's recipe), and the LoRA
  stays unfused, so every token pays the LoRA branch;
* ``merge``: peft with all N LoRAs loaded, switch = ``unmerge_adapter`` + ``set_adapter`` +
  ``merge_adapter`` (dense ``B @ A`` into every weight), generation at base speed;
* ``set_adapter``: peft with all N LoRAs loaded unmerged, switch = ``set_adapter`` (free), unfused.

Reported per row: mean switch latency (over the requests that switched), per-token latency
(generation time / new tokens, prefill included), requests/s over the stream, graph recompilations
during the stream (dynamo's counter; compiled rows), and the peak bytes of one request above the
model's parameters (``harness.peak_memory``) plus the bytes the row keeps for its adapters. Ratios
are to the best peft row (highest requests/s) of the same model and N.

Models: the zoo's ``llama-v1`` (hidden 128) and random Llamas of width 512 and 1024 (4 layers,
vocabulary 4096), and one decoder layer of LLaMA-7B shapes (4096 / 11008, 32 heads); fp32 on CPU.

Run: ``python benchmarks/serving.py`` (``--quick``: one small model, N=2, few requests; ``--no-csv``:
print only; ``--models``/``--n``/``--new-tokens``/``--requests``/``--rows`` to narrow the run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
from torch import nn
from torch._dynamo.utils import counters
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from harness import _sync, append_rows, device_name, peak_memory, row, time_fn  # noqa: E402
from lightning_peft.kernels import switch_bytes  # noqa: E402
from switching import _randomize  # noqa: E402

import lightning_peft as lp  # noqa: E402

BENCH = "serving"
ROWS = ("base", "base-compiled", "bank", "bank-compiled", "bank-tile", "bank-tile-compiled", "hotswap", "hotswap-compiled",
        "merge", "set_adapter")
TILE = 16  # the bank-tile rows: SHiRA(tile=16), 64-byte fp32 runs, the same r (in + out) entries as the unstructured rows
PEFT_ROWS = ("hotswap", "hotswap-compiled", "merge", "set_adapter")


@dataclass
class Result:
    row: str
    switch_ms: float  # mean over the requests that switched (nan if none)
    token_ms: float
    requests_per_s: float
    recompiles: int
    peak_bytes: int  # one request's transient peak + the bytes kept for the adapters


def build_model(name: str) -> nn.Module:
    """A causal LM in eval mode: the zoo's ``llama-v1`` or a random Llama of the named width."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "llama-v1":
        return AutoModelForCausalLM.from_pretrained(lp.zoo.resolve("llama-v1")).eval()
    width, inter, layers, heads = {
        "llama-w512": (512, 1376, 4, 8), "llama-w1024": (1024, 2752, 4, 16), "llama7b-layer": (4096, 11008, 1, 32),
    }[name]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=width, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=4096, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compile_forward(model: nn.Module) -> Callable[[], None]:
    """Compile the HF model's ``forward`` in place (``generate`` calls it; transformers' recipe); returns undo."""
    model.forward = torch.compile(model.forward)
    return lambda: delattr(model, "forward")


def fill_bank(base: nn.Module, n: int, r: int, tile: int | None) -> lp.AdapterBank:
    """An AdapterBank over ``base`` holding ``a0 ... a{n-1}``: random-mask SHiRA, ``r (in + out)`` random values."""
    bank = lp.AdapterBank(base)
    for i in range(n):
        src = copy.deepcopy(base)
        lp.SHiRA(r=r, mask="random", seed=i, tile=tile).inject(src)
        _randomize(src, i)
        bank.add(f"a{i}", src)
        del src
    return bank


def setup_row(kind: str, base: nn.Module, n: int, r: int):
    """``(model to generate with, switch(i), kept() -> bytes held for the adapters, cleanup())`` for one row."""
    names = [f"a{i}" for i in range(n)]
    if kind.startswith("base"):
        undo = _compile_forward(base) if kind == "base-compiled" else lambda: None
        return base, lambda i: None, lambda: 0, undo
    if kind.startswith("bank"):
        bank = fill_bank(base, n, r, TILE if kind.startswith("bank-tile") else None)

        def kept() -> int:  # values + positions (with the offsets cached by the switches)
            return sum(bank.held_bytes(a) for a in names)

        undo = _compile_forward(base) if kind.endswith("compiled") else lambda: None
        return base, lambda i: bank.activate(names[i]), kept, lambda: (bank.deactivate(), undo())
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=lp.find_target_modules(base, "all-linear"))
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    if kind.startswith("hotswap"):
        states = []
        for i in range(n):
            _randomize(model, i)
            states.append({k: v.clone() for k, v in model.state_dict().items() if "lora_" in k})
        held = _bytes(t for s in states for t in s.values()) + _bytes(p for k, p in model.named_parameters() if "lora_" in k)
        if kind == "hotswap-compiled":
            prepare_model_for_compiled_hotswap(model, target_rank=r)
            _compile_forward(model.get_base_model())

        def swap(i: int) -> None:
            hotswap_adapter_from_state_dict(model, states[i], adapter_name=names[0], config=config)

        return model, swap, lambda: held, lambda: None
    for a in names[1:]:
        model.add_adapter(a, config)
    for i, a in enumerate(names):
        _randomize(model, i, (f".{a}.",))
    held = _bytes(p for k, p in model.named_parameters() if "lora_" in k)
    if kind == "set_adapter":
        return model, lambda i: model.set_adapter(names[i]), lambda: held, lambda: None

    def merge_switch(i: int) -> None:
        model.unmerge_adapter()
        model.set_adapter(names[i])
        model.merge_adapter()

    return model, merge_switch, lambda: held, lambda: None


def serve(kind: str, base: nn.Module, n: int, r: int, requests: int, new_tokens: int, prompt: torch.Tensor) -> Result:
    """Run one row's request stream, timed with ``time.perf_counter`` (synchronising CUDA before each reading)."""
    model, switch, kept, cleanup = setup_row(kind, base, n, r)
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None,
           "pad_token_id": 0}
    current: list[int | None] = [None]

    def request(i: int) -> tuple[float, float]:
        _sync(prompt.device)
        t0 = time.perf_counter()
        if current[0] != i:
            switch(i)
            current[0] = i
        _sync(prompt.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **gen)
        _sync(prompt.device)
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"{kind}: generated {out.shape[1] - prompt.shape[1]} tokens, expected {new_tokens}")
        return t1 - t0, time.perf_counter() - t1

    for i in (1 % n, 0, 1 % n):  # warm-up: compilation, first switches, the allocator
        request(i)
    rng = random.Random(n)
    order = [rng.randrange(n) for _ in range(requests)]
    graphs_before = counters["stats"]["unique_graphs"]
    switches, gens = [], []
    t_start = time.perf_counter()
    for i in order:
        switched = current[0] != i
        s, g = request(i)
        gens.append(g)
        if switched:
            switches.append(s)
    total = time.perf_counter() - t_start
    recompiles = counters["stats"]["unique_graphs"] - graphs_before
    peak = peak_memory(lambda: request((current[0] + 1) % n), prompt.device) or 0
    cleanup()
    return Result(kind, 1e3 * sum(switches) / len(switches) if switches and not kind.startswith("base") else float("nan"),
                  1e3 * sum(gens) / (len(gens) * new_tokens), requests / total, recompiles, peak + kept())


def run_model(
    name: str, ns: list[int], r: int, requests: int, new_tokens: int, rows: list[str], device: str = "cpu"
) -> tuple[list[list], list[dict]]:
    """All rows for one model; prints a table per N and returns the CSV rows and the table records."""
    base = build_model(name).to(device)
    prompt = torch.randint(1, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    csv, records = [], []
    for n in ns:
        results = []
        for kind in tqdm(rows, desc=f"{name} N={n}", leave=False):
            torch._dynamo.reset()
            results.append(serve(kind, base, n, r, requests, new_tokens, prompt))
            changed = [k for k, v in base.state_dict().items() if not torch.equal(v, before[k])]
            if changed:
                raise RuntimeError(f"{kind} left the base changed at {changed[:3]}")
        csv += report(name, n, r, new_tokens, results, device)
        records += [{"model": name, "N": n, **dataclasses.asdict(x)} for x in results]
    return csv, records


def report(name: str, n: int, r: int, new_tokens: int, results: list[Result], device: str) -> list[list]:
    """Print one table (model, N) and return its CSV rows: each of our rows as a ratio to the best peft row."""
    peft = [x for x in results if x.row in PEFT_ROWS]
    best = max(peft, key=lambda x: x.requests_per_s) if peft else None
    where = device_name(device) if device != "cpu" else f"threads={torch.get_num_threads()}"
    case = f"{name} N={n} r={r} tokens={new_tokens} fp32 {where}"
    print(f"\n{case} (ratios to the best peft row: {best.row if best else '-'})")
    print(f"{'row':<17}{'switch ms':>10}{'token ms':>10}{'vs floor':>9}{'req/s':>8}{'vs best':>9}{'recompiles':>11}"
          f"{'peak MiB':>10}")
    rows = []
    floors = {x.row: x for x in results if x.row.startswith("base")}
    for x in results:
        bare = floors.get("base-compiled" if x.row.endswith("compiled") else "base")
        floor = x.token_ms / bare.token_ms if bare else float("nan")
        if bare is not None and x is not bare:
            rows.append(row(BENCH, case, f"token_ms_{x.row}_vs_{bare.row}", x.token_ms, bare.token_ms, device))
        ratio = x.requests_per_s / best.requests_per_s if best else float("nan")
        print(f"{x.row:<17}{x.switch_ms:>10.2f}{x.token_ms:>10.2f}{floor:>8.2f}x{x.requests_per_s:>8.2f}{ratio:>8.2f}x"
              f"{x.recompiles:>11}{x.peak_bytes / 2**20:>10.1f}")
        if best is not None and x.row not in PEFT_ROWS:
            for metric, ours, theirs in (("switch_ms", x.switch_ms, best.switch_ms), ("token_ms", x.token_ms, best.token_ms),
                                         ("requests_per_s", x.requests_per_s, best.requests_per_s),
                                         ("peak_MiB", x.peak_bytes / 2**20, best.peak_bytes / 2**20)):
                rows.append(row(BENCH, case, f"{metric}_{x.row}_vs_{best.row}", ours, theirs, device))
    return rows


SWITCH_ROWS = ("bank", "bank-tile16", "bank-tile32", "bank-tile64", "hotswap")  # bank-tileB: SHiRA(tile=B)


def copy_ms(nbytes: int, repeats: int, device: str) -> float:
    """Median ms of ``dst.copy_(src)`` moving ``nbytes`` in all (``nbytes / 2`` read, as many written)."""
    src = torch.randn(max(1, nbytes // 8), device=device)  # fp32: 4 B read + 4 B written per element
    dst = torch.empty_like(src)
    return 1e3 * time_fn(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device)


def _alternating(switch: Callable[[int], None]) -> Callable[[], None]:
    """``switch(1)``, ``switch(0)``, ``switch(1)``, ... one per call."""
    state = {"i": 0}

    def step() -> None:
        state["i"] ^= 1
        switch(state["i"])

    return step


def measure_switches(name: str, r: int, repeats: int, device: str = "cpu") -> list[dict]:
    """Switch latency alone (A -> B, alternating, no generation) of the bank rows and eager hotswap on one model:
    unstructured SHiRA, tile SHiRA at b = 16, 32 and 64 (where b divides every in_features) (as many values as the LoRA), peft's hotswap.

    ``bytes`` is what one switch moves: for the bank, restore + gather + add of ``S`` value bytes
    (:func:`lightning_peft.kernels.switch_bytes`, ``7 S`` in fp32; the unstructured bank also reads its int32 and
    cached int64 positions, not counted); for hotswap, each LoRA tensor read once and written once (``2 S``).
    ``copy_fraction`` is the time a contiguous ``copy_`` of as many bytes takes, over the switch's time.
    """
    base = build_model(name).to(device)
    found = []
    for kind in SWITCH_ROWS:
        if kind.startswith("bank"):
            tile = int(kind.removeprefix("bank-tile")) if "tile" in kind else None
            if tile and any(m.in_features % tile for m in base.modules() if isinstance(m, nn.Linear)):
                print(f"{name}: {kind} skipped, tile={tile} does not divide every in_features")
                continue
            bank = fill_bank(base, 2, r, tile)
            switch = lambda i, bank=bank: bank.activate(f"a{i}")  # noqa: E731
            terms = [t for _, t in bank.adapters["a0"]]
            nbytes = sum(switch_bytes(t.values, 4) for t in terms)
            count = sum(t.values.numel() for t in terms)
        else:
            model, switch, kept, _ = setup_row(kind, base, 2, r)
            lora = [p for k, p in model.named_parameters() if "lora_" in k]
            count, nbytes = sum(p.numel() for p in lora), 2 * _bytes(lora)
        switch(0)
        t = 1e3 * time_fn(_alternating(switch), warmup=2, repeats=repeats, device=device)
        if kind.startswith("bank"):
            bank.deactivate()
        c = copy_ms(nbytes, repeats, device)
        found.append({"model": name, "row": kind, "switch_ms": t, "values": count, "bytes": nbytes, "copy_ms": c,
                      "copy_fraction": c / t})
    hot = next(x for x in found if x["row"] == "hotswap")
    for x in found:
        x["vs_hotswap"] = x["switch_ms"] / hot["switch_ms"]
    return found


def report_switches(records: list[dict], r: int, repeats: int, device: str, out: str) -> list[list]:
    """Print the switch table, write ``OUT_switch.{json,md}`` and return the CSV rows (tile and bank vs hotswap)."""
    where = device_name(device) if device != "cpu" else f"threads={torch.get_num_threads()}"
    lines = ["| model | row | values/adapter | switch ms | vs hotswap | MB moved | copy_ of as many bytes, ms | "
             "copy bandwidth fraction |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['model']} | {x['row']} | {x['values']} | {x['switch_ms']:.3f} | {x['vs_hotswap']:.2f}x | "
              f"{x['bytes'] / 1e6:.2f} | {x['copy_ms']:.3f} | {x['copy_fraction']:.0%} |" for x in records]
    print(f"\nswitch only, r={r}, fp32, {where}, median of {repeats}\n" + "\n".join(lines))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + "_switch.json").write_text(json.dumps({"r": r, "repeats": repeats, "device": device,
                                                          "threads": torch.get_num_threads(), "records": records}, indent=1))
        Path(out + "_switch.md").write_text("\n".join(lines) + "\n")
    by = {(x["model"], x["row"]): x for x in records}
    rows = []
    for (model, kind), x in by.items():
        if kind != "hotswap":
            case = f"{model} switch-only r={r} values/adapter={x['values']} fp32 {where}"
            rows.append(row(BENCH, case, f"switch_ms_{kind}_vs_hotswap", x["switch_ms"], by[(model, "hotswap")]["switch_ms"],
                            device))
            rows.append(row(BENCH, case, f"switch_ms_{kind}_vs_copy_of_its_bytes", x["switch_ms"], x["copy_ms"], device))
    return rows


def write_results(out: Path, records: list[dict], args: argparse.Namespace) -> None:
    """``out.json`` (every record and the settings), ``out.md`` (one table) and ``out.png`` (requests/s, switch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_csv", "quick")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "records": records}, indent=1))
    lines = ["| model | N | row | switch ms | token ms | req/s | recompiles | peak MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['model']} | {x['N']} | {x['row']} | {x['switch_ms']:.2f} | {x['token_ms']:.2f} | "
              f"{x['requests_per_s']:.2f} | {x['recompiles']} | {x['peak_bytes'] / 2**20:.1f} |" for x in records]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    groups = sorted({(x["model"], x["N"]) for x in records}, key=lambda g: (args.models.index(g[0]), g[1]))
    kinds = [k for k in ROWS if any(x["row"] == k for x in records)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        by = {(x["model"], x["N"]): x for x in records if x["row"] == kind}
        xs = [i + j * width for i in range(len(groups))]
        axes[0].bar(xs, [by[g]["requests_per_s"] if g in by else 0 for g in groups], width, label=kind)
        axes[1].bar(xs, [by[g]["switch_ms"] if g in by else 0 for g in groups], width, label=kind)
    for ax, title in zip(axes, ("requests/s (higher is better)", "switch latency, ms (lower is better)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{m}\nN={n}" for m, n in groups], fontsize=7)
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"serving: {args.requests} requests x {args.new_tokens} new tokens, r={args.r}, {args.device}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="llama-v1 only, N=2, 4 requests of 8 tokens (smoke run)")
    ap.add_argument("--no-csv", action="store_true", help="print only, do not append to results.csv")
    ap.add_argument("--models", nargs="+", default=["llama-v1", "llama-w512", "llama-w1024", "llama7b-layer"])
    ap.add_argument("--n", nargs="+", type=int, default=[2, 8, 32])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--switch-only", action="store_true",
                    help="time switches alone (bank, bank-tile, eager hotswap; N=2) against a copy_ of their bytes")
    ap.add_argument("--repeats", type=int, default=20, help="timed switches per row with --switch-only (median)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving"),
                    help="writes OUT.json, OUT.md and OUT.png ('' to skip)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.n, args.requests, args.new_tokens = ["llama-v1"], [2], 4, 8
        args.out = "" if args.out == ap.get_default("out") else args.out
    torch.set_num_threads(args.threads)
    if args.switch_only:
        found = [x for name in args.models for x in measure_switches(name, args.r, args.repeats, args.device)]
        csv = report_switches(found, args.r, args.repeats, args.device, args.out)
        if not args.no_csv:
            print(f"appended {append_rows(csv)} rows to benchmarks/results.csv")
        return
    csv, records = [], []
    for name in args.models:
        rows, recs = run_model(name, args.n, args.r, args.requests, args.new_tokens, args.rows, args.device)
        csv, records = csv + rows, records + recs
    if args.out:
        write_results(Path(args.out), records, args)
    if not args.no_csv:
        print(f"appended {append_rows(csv)} rows to benchmarks/results.csv")


if __name__ == "__main__":
    main()
