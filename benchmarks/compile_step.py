"""Training step time under ``torch.compile`` vs eager, per method, on the layers users train.

The zoo's tiny Llama (``llama-v1``) and a 2-layer Llama at hidden 512, each with LoRA (r=8), SHiRA
(1%, random mask) and RoSA (r=4, 1%, random mask built at step 0): one AdamW step (forward, backward,
update) eager and with the model compiled (inductor; the sparse op is a custom op, so the compiled graph
has no break in the sparse layers). Compilation time is excluded (3 warm-up steps).

    python benchmarks/compile_step.py [--repeats 10] [--no-csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, row, time_fn  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft import zoo  # noqa: E402
from lightning_peft.methods._sparse import random_mask  # noqa: E402

BENCH = "compile_step"
METHODS = {
    "lora": lambda: lp.LoRA(r=8),
    "shira": lambda: lp.SHiRA(density=0.01, mask="random"),
    "rosa": lambda: lp.RoSA(r=4, density=0.01, warmup_steps=0, mask_criterion="random"),
}


def _model(base: str) -> torch.nn.Module:
    if base == "zoo llama-v1":
        return AutoModelForCausalLM.from_pretrained(zoo.resolve("llama-v1"))
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=8))


def step_time(base: str, method: str, compiled: bool, repeats: int) -> float:
    torch.manual_seed(0)
    model = _model(base).train()
    METHODS[method]().inject(model)
    for m in model.modules():  # RoSA: the random mask now (the callback builds it at the first batch)
        if hasattr(m, "rosa_values"):
            m.set_mask("default", random_mask(tuple(m.base_weight_out_in().shape), 0.01, torch.Generator().manual_seed(1)))
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch._dynamo.reset()
    fwd = torch.compile(model) if compiled else model

    def step() -> None:
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_fn(step, 3, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    rows = []
    for base in ("zoo llama-v1", "llama h512 L2"):
        for method in METHODS:
            eager, compiled = (step_time(base, method, c, args.repeats) for c in (False, True))
            case = f"{base} {method} B=4 T=64 fp32 threads={torch.get_num_threads()}"
            rows.append(row(BENCH, case, "train_step_ms_compiled_vs_eager", compiled * 1e3, eager * 1e3, "cpu"))
            print(f"| {base} | {method} | {eager * 1e3:.1f} | {compiled * 1e3:.1f} | {compiled / eager:.2f} |", flush=True)
    if not args.no_csv:
        append_rows(rows)


if __name__ == "__main__":
    main()
