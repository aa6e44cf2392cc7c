"""Trans-PEFT overhead: one LoRA training step with the TransPEFT callback's hooks vs without.

Goal (issue 6): <= 1.05x with masking, and dropping should make the step cheaper (a skipped
FFN runs no GEMMs). Cases: mask only (p_m=0.1), drop only (p_d=0.1), both. Each case and the
baseline are timed in the same process, interleaved round by round so a noisy neighbour hits
both; the ratio is median(case) / median(baseline).

    python benchmarks/trans_peft.py                      # CPU: hidden 256, 4 layers, B=8, T=128
    python benchmarks/trans_peft.py --hidden 2048 --layers 8 --batch 8 --seq 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import append_rows, row
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft as lp

CASES = {"mask p_m=0.1": (0.1, 0.0), "drop p_d=0.1": (0.0, 0.1), "mask+drop 0.1/0.1": (0.1, 0.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to results.csv")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()
    lp.LoRA(r=8).inject(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1024, (args.batch, args.seq), device=device)
    callbacks = {name: lp.TransPEFT(mask_p=m, drop_p=d, seed=0) for name, (m, d) in CASES.items()}

    def step(tp: lp.TransPEFT | None) -> float:
        if tp is not None:
            tp.attach(model)
            tp.next_micro_batch()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if tp is not None:
            tp.detach()
        return elapsed

    times: dict[str, list[float]] = {"baseline": [], **{name: [] for name in CASES}}
    for r in range(args.warmup + args.rounds):
        for name in times:  # interleaved: every round times every case once
            t = step(callbacks.get(name))
            if r >= args.warmup:
                times[name].append(t)
    base = statistics.median(times["baseline"])
    case = f"llama h={args.hidden} L={args.layers} B={args.batch} T={args.seq} {args.dtype} lora r=8"
    rows = [row("trans_peft_step", case, "seconds", base, None, device)]
    print(f"{case}: baseline {base * 1e3:.2f} ms")
    for name in CASES:
        t = statistics.median(times[name])
        rows.append(row("trans_peft_step", f"{case} {name}", "seconds", t, base, device))
        print(f"  {name:20s} {t * 1e3:8.2f} ms  ratio {t / base:.3f}")
    if not args.no_write:
        append_rows(rows)


if __name__ == "__main__":
    main()
