"""What skipping one FFN block costs a base model: the loss with layer l's FFN dropped, for every l.

Trans-PEFT's cross-layer knowledge dropping (Gu et al., ACL 2025; `lp.TransPEFT(drop_p=...)`) skips each
layer's whole FFN with probability p_d per micro-batch while the adapter trains. This measures, on a task's
test batches, the base model's completion loss with exactly one FFN skipped (`lightning_peft.ffn_sites`, the
sites Trans-PEFT uses), next to the intact model's: which layers the method can drop without breaking the model.

    python benchmarks/ffn_skip.py --model smollm2-135m --task sarcasm
    python benchmarks/ffn_skip.py --model llama-v1 --task arithmetic

Writes ``benchmarks/results/ffn_skip_<model>.json`` and prints the layers sorted by cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_peft.analysis.evaluation import evaluate_lm, load_base
from lightning_peft.data import first_batches
from lightning_peft.ffn_sites import find_ffn_sites
from lightning_peft.tasks import get_task

OUT = Path(__file__).with_name("results")


def skip_costs(model_name: str, task: str, batches: int = 4) -> dict:
    model = load_base(model_name)
    data = first_batches(get_task(task, tokenizer=model_name, batch_size=8, num_val=0, num_test=64), "test", batches)
    intact = evaluate_lm(model, data)
    rows = []
    for layer, site in enumerate(find_ffn_sites(model)):
        handles = [m.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)) for m in site.skip]
        try:
            rows.append({"layer": layer, "site": site.name, **evaluate_lm(model, data)})
        finally:
            for handle in handles:
                handle.remove()
    return {"model": model_name, "task": task, "intact": intact, "skipped": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sarcasm")
    args = ap.parse_args()
    result = skip_costs(args.model, args.task)
    (OUT / f"ffn_skip_{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} on {args.task}: intact loss {result['intact']['loss']:.3f}, token acc {result['intact']['token_acc']:.3f}")
    for r in sorted(result["skipped"], key=lambda r: -r["loss"]):
        print(f"  layer {r['layer']:2d} skipped: loss {r['loss']:.3f}  token acc {r['token_acc']:.3f}")


if __name__ == "__main__":
    main()
