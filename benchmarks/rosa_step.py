"""RoSA train step vs peft LoRA at the same trainable-parameter budget: time and peak memory.

Issue 4's goals: step time <= 1.3x LoRA on CPU (<= 1.15x on GPU), peak memory <= 1.05x LoRA.

Budget: RoSA with rank ``r`` and density ``d`` trains ``r (in + out) + round(d in out)`` values per
layer; the LoRA baseline gets the rank ``r_lora = round(r + d in out / (in + out))`` (the paper
compares RoSA r=16 d=0.6% with LoRA r=32 the same way). One step = forward, backward and an AdamW
step, in the joint phase (masks built: the expensive phase). Cases:

* single layers (``nn.Linear(in, out)`` on ``T`` tokens): ``1024x1024``, ``2048x1024``,
  ``1024x2048`` (and LLaMA-7B shapes on CUDA);
* the zoo's tiny Llama (``llama-v1``: hidden 128, 3 layers), all linear layers adapted, a batch of
  12 x 128 tokens: the whole model, where the frozen base dominates the time.

Peak memory is measured by ``harness.peak_memory`` (CPU: replayed from the allocator's own
records, exact per tensor) over one step, above what was allocated before it.

Run: python benchmarks/rosa_step.py [--repeats 10] [--warmup 3] [--no-csv]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, peak_memory, row, time_fn  # noqa: E402

from lightning_peft.methods._sparse import random_mask  # noqa: E402
from lightning_peft.methods.rosa.config import RosaConfig  # noqa: E402
from lightning_peft.methods.rosa.layer import RosaLayer  # noqa: E402

BENCH = "rosa_step"
R, DENSITY = 16, 0.006  # the paper's ViGGO setting
CPU_LAYERS = (((1024, 1024), 512), ((2048, 1024), 512), ((1024, 2048), 512))
GPU_LAYERS = (((4096, 4096), 4096), ((11008, 4096), 4096), ((4096, 11008), 4096))


def lora_rank(in_f: int, out_f: int, r: int = R, density: float = DENSITY) -> int:
    """LoRA rank with RoSA's trainable-parameter budget on an ``(out, in)`` layer."""
    return round(r + density * in_f * out_f / (in_f + out_f))


def adapt(model: nn.Module, method: str, targets: list[str], r_lora: int) -> nn.Module:
    """Inject RoSA (with built random masks at ``DENSITY``) or LoRA into ``model`` in place."""
    if method == "lora":
        inject_adapter_in_model(LoraConfig(r=r_lora, lora_alpha=16, target_modules=targets), model)
        return model
    inject_adapter_in_model(RosaConfig(r=R, lora_alpha=16, density=DENSITY, target_modules=targets), model)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, RosaLayer):
            w = m.base_weight_out_in()
            m.set_mask("default", random_mask((w.shape[0], w.shape[1]), DENSITY, g).to(w.device))
    return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model: nn.Module, loss_fn) -> tuple:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def measure(steps: dict, warmup: int, repeats: int, device: str) -> dict[str, tuple[float, int | None]]:
    """Median step time and peak memory per method; the methods alternate round by round, so a
    noisy neighbour (shared CPU) slows both alike instead of biasing the ratio."""
    for step in steps.values():
        step()  # optimizer state exists before memory is measured
        time_fn(step, warmup=warmup, repeats=0, device=device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            times[k].append(time_fn(step, warmup=0, repeats=1, device=device))
    return {k: (statistics.median(times[k]), peak_memory(steps[k], device=device)) for k in steps}


def bench_layer(out_f: int, in_f: int, tokens: int, device: str, dtype: torch.dtype, warmup: int, repeats: int):
    r_lora = lora_rank(in_f, out_f)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    steps, params = {}, {}
    for method in ("lora", "rosa"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(in_f, out_f, device=device, dtype=dtype))
        adapt(model, method, ["0"], r_lora)
        steps[method], _ = make_step(model, lambda m: m(x).float().square().mean())
        params[method] = trainable(model)
    results = {k: (*v, params[k]) for k, v in measure(steps, warmup, repeats, device).items()}
    case = f"linear {out_f}x{in_f} T={tokens} rosa r={R} d={DENSITY} vs lora r={r_lora} {str(dtype)[6:]}"
    return case, results


def bench_zoo(device: str, warmup: int, repeats: int):
    from lightning_peft import zoo
    from lightning_peft.targeting import find_target_modules

    ids = torch.randint(0, 1024, (12, 128), generator=torch.Generator().manual_seed(0)).to(device)
    steps, params, r_lora = {}, {}, None
    for method in ("lora", "rosa"):
        model, _ = zoo.load("llama-v1")
        model = model.to(device).train()
        targets = find_target_modules(model, "all-linear")
        if r_lora is None:  # one rank for all layers: match the whole model's budget
            shapes = [model.get_submodule(t).weight.shape for t in targets]
            rosa_budget = sum(R * (o + i) + round(DENSITY * o * i) for o, i in shapes)
            r_lora = round(rosa_budget / sum(o + i for o, i in shapes))
        adapt(model, method, targets, r_lora)
        steps[method], _ = make_step(model, lambda m: m(input_ids=ids, labels=ids).loss)
        params[method] = trainable(model)
    results = {k: (*v, params[k]) for k, v in measure(steps, warmup, repeats, device).items()}
    return f"zoo llama-v1 12x128 tokens rosa r={R} d={DENSITY} vs lora r={r_lora}", results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = [bench_layer(o, i, t, device, dtype, args.warmup, args.repeats)
             for (o, i), t in (GPU_LAYERS if device == "cuda" else CPU_LAYERS)]
    cases.append(bench_zoo(device, args.warmup, args.repeats))
    rows = []
    for case, res in cases:
        (t_l, m_l, n_l), (t_r, m_r, n_r) = res["lora"], res["rosa"]
        rows.append(row(BENCH, case, "train_step_ms_vs_lora", t_r * 1e3, t_l * 1e3, device))
        if m_l is not None and m_r is not None:
            rows.append(row(BENCH, case, "peak_bytes_vs_lora", m_r, m_l, device))
        rows.append(row(BENCH, case, "trainable_params_vs_lora", n_r, n_l, device))
        print(f"{case}: time {t_r * 1e3:.2f} ms vs {t_l * 1e3:.2f} ms ({t_r / t_l:.3f}x); "
              f"peak {m_r} vs {m_l} B ({(m_r or 0) / max(m_l or 1, 1):.3f}x); params {n_r} vs {n_l}")
    if not args.no_csv:
        append_rows(rows)


if __name__ == "__main__":
    main()
