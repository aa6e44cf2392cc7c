"""Adapter switching and training cost: SHiRA (AdapterBank, our layer) vs peft LoRA and peft shira.

SHiRA's claim (methods.md section 4; Bhardwaj et al. 2024, section 4): switching a sparse
adapter is a scatter of ``nnz`` values into the fused weights, 5-16x faster on CPU than a LoRA
fuse. Measured here in ONE process, same weights, same trainable-parameter count
(SHiRA ``r * (in + out)`` entries per layer = LoRA rank ``r``):

* ``switch`` A -> B, steady state (alternating):
    - ``AdapterBank.activate``: restore A's saved originals, ``scatter_add`` B (no dense delta);
    - peft LoRA: ``unmerge_adapter()`` + ``set_adapter(B)`` + ``merge_adapter()`` (dense ``B @ A``
      GEMM and a dense add over every weight element, twice);
    - peft shira (its built-in layer): ``unmerge_adapter()`` + ``set_adapter(B)`` + ``merge_adapter()``
      (a ``sparse_coo`` delta added into the dense weight, twice);
* training step (forward + backward + AdamW) and its peak memory: our SHiRA layer (sparse-core
  forward, no dense dW) vs peft LoRA at the same trainable count.

Models: the ``llama-v1`` zoo model (hidden 128) and a stack of real LLaMA-7B layer shapes
(4096x4096 attention projections, 4096<->11008 MLP), fp32 on CPU (~0.6 GB of weights).

Run: ``python benchmarks/switching.py`` (add ``--quick`` for a smoke run; ``--no-csv`` to not append rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from peft import LoraConfig, ShiraConfig, inject_adapter_in_model
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, peak_memory, row, time_fn  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.methods.shira.layer import PEFT_SHIRA_LINEAR, ShiraLinear  # noqa: E402

BENCH = "switching"


class Stack(nn.Module):
    """``n`` blocks of LLaMA-7B linear shapes: q, o (4096x4096), up (4096->11008), down (11008->4096)."""

    def __init__(self, hidden: int = 4096, inter: int = 11008, blocks: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(blocks):
            self.layers.append(nn.ModuleDict({
                "q_proj": nn.Linear(hidden, hidden, bias=False), "o_proj": nn.Linear(hidden, hidden, bias=False),
                "up_proj": nn.Linear(hidden, inter, bias=False), "down_proj": nn.Linear(inter, hidden, bias=False),
            }))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layers:
            h = blk["o_proj"](blk["q_proj"](x)) + x
            x = blk["down_proj"](torch.relu(blk["up_proj"](h))) + h
        return x


def _randomize(model: nn.Module, seed: int, markers: tuple[str, ...] = ("shira_weight", "lora_")) -> None:
    """Adapter tensors (names containing one of ``markers``) to ``N(0, 0.01^2)`` from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(m in n for m in markers):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _targets(model: nn.Module) -> list[str]:
    return lp.find_target_modules(model, "all-linear")


def _peft_merge_switch(layers: list[nn.Module]):
    """Switch to adapter ``a`` as peft does it: unmerge the current one, merge ``a`` into W."""

    def switch(a: str) -> None:
        for m in layers:
            if m.merged:
                m.unmerge()
            m.set_adapter(a)
            m.merge(adapter_names=[a])

    return switch


def _alternate(step):
    state = {"i": 0}

    def run() -> None:
        state["i"] ^= 1
        step("b" if state["i"] else "a")

    return run


def bench_switching(name: str, make, r: int, repeats: int) -> list[list]:
    """Time an A -> B switch three ways on the same base weights."""
    base = make()
    targets = _targets(base)
    nnz = sum(r * (m.in_features + m.out_features) for n, m in base.named_modules() if n in targets)

    # AdapterBank over SHiRA adapters trained elsewhere (here: our layer, random values, r-budget masks)
    bank = lp.AdapterBank(base)
    for seed, a in ((1, "a"), (2, "b")):
        src = copy.deepcopy(base)
        lp.SHiRA(r=r, mask="random", seed=seed).inject(src)
        _randomize(src, seed)
        bank.add(a, src)
        del src
    bank.activate("a")
    t_bank = time_fn(_alternate(bank.activate), warmup=2, repeats=repeats)
    bank.deactivate()

    # peft LoRA with both adapters injected, merge/unmerge as peft does it
    lora = copy.deepcopy(base)
    for seed, a in ((1, "a"), (2, "b")):
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), lora, adapter_name=a)
        _randomize(lora, seed)
    lora_layers = [m for m in lora.modules() if hasattr(m, "lora_A")]
    lora_switch = _peft_merge_switch(lora_layers)
    lora_switch("a")
    t_lora = time_fn(_alternate(lora_switch), warmup=2, repeats=repeats)
    lora_layers.clear()  # free the LoRA copy before the next model
    del lora

    # peft's built-in shira layer (plain peft injection builds it), merge/unmerge as peft does it
    shira = copy.deepcopy(base)
    for seed, a in ((1, "a"), (2, "b")):
        inject_adapter_in_model(ShiraConfig(r=r, random_seed=seed, target_modules=targets), shira, adapter_name=a)
    _randomize(shira, 3)
    shira_layers = [m for m in shira.modules() if type(m) is PEFT_SHIRA_LINEAR]
    shira_switch = _peft_merge_switch(shira_layers)
    shira_switch("a")
    t_shira = time_fn(_alternate(shira_switch), warmup=2, repeats=repeats)
    shira_layers.clear()
    del shira

    case = f"{name} r={r} nnz/switch={nnz} fp32 threads={torch.get_num_threads()}"
    print(f"{case}: bank {t_bank * 1e3:.2f} ms, peft LoRA {t_lora * 1e3:.2f} ms ({t_lora / t_bank:.1f}x), "
          f"peft shira {t_shira * 1e3:.2f} ms ({t_shira / t_bank:.1f}x)")
    return [
        row(BENCH, case, "switch_ms_bank_vs_peft_lora", t_bank * 1e3, t_lora * 1e3, "cpu"),
        row(BENCH, case, "switch_ms_bank_vs_peft_shira", t_bank * 1e3, t_shira * 1e3, "cpu"),
    ]


def bench_training(name: str, make, r: int, tokens: int, repeats: int) -> list[list]:
    """One AdamW step (forward, backward, update): our SHiRA layer vs peft LoRA, same trainable count."""
    base = make()
    targets = _targets(base)
    hidden = base.layers[0]["q_proj"].in_features if isinstance(base, Stack) else None
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0))

    def step_fn(model: nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, sum(p.numel() for p in params)

    shira = copy.deepcopy(base)
    lp.SHiRA(r=r, mask="random").inject(shira)
    assert all(isinstance(shira.get_submodule(t), ShiraLinear) for t in targets)
    lora = copy.deepcopy(base)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), lora)
    s_step, s_n = step_fn(shira)
    l_step, l_n = step_fn(lora)
    s_step(), l_step()  # optimizer state allocated before measuring
    t_s, t_l = time_fn(s_step, warmup=1, repeats=repeats), time_fn(l_step, warmup=1, repeats=repeats)
    m_s, m_l = peak_memory(s_step), peak_memory(l_step)
    case = f"{name} T={tokens} r={r} trainable shira={s_n} lora={l_n} fp32 threads={torch.get_num_threads()}"
    print(f"{case}: step SHiRA {t_s * 1e3:.1f} ms vs LoRA {t_l * 1e3:.1f} ms ({t_s / t_l:.2f}x); "
          f"peak SHiRA {m_s / 2**20:.1f} MiB vs LoRA {m_l / 2**20:.1f} MiB ({m_s / m_l:.2f}x)")
    return [
        row(BENCH, case, "train_step_ms_shira_vs_peft_lora", t_s * 1e3, t_l * 1e3, "cpu"),
        row(BENCH, case, "train_peak_MiB_shira_vs_peft_lora", m_s / 2**20, m_l / 2**20, "cpu"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    ap.add_argument("--no-csv", action="store_true", help="print only, do not append to results.csv")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see below)")
    args = ap.parse_args()
    # On a shared, oversubscribed CPU (load average ~9 on 2 cores when measured) OpenMP threads
    # spin-wait for each other: a (352x4)@(4x128) matmul took 28 ms with 2 threads, 0.01 ms with 1.
    # One thread gives stable medians for every method alike.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    repeats = 3 if args.quick else 10
    from transformers import AutoModelForCausalLM

    from lightning_peft import zoo

    def zoo_model() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(zoo.resolve("llama-v1")).eval()

    big = (lambda: Stack(512, 1376)) if args.quick else (lambda: Stack(4096, 11008))
    big_name = "stack 512/1376" if args.quick else "llama7b-shapes 4096/11008 x1 block"
    rows = []
    with torch.no_grad():
        rows += bench_switching("zoo llama-v1", zoo_model, r=4, repeats=repeats)
        rows += bench_switching(big_name, big, r=16, repeats=repeats)
    rows += bench_training(big_name, big, r=16, tokens=64 if args.quick else 256, repeats=max(2, repeats // 3))
    if not args.no_csv:
        append_rows(rows)
        print(f"appended {len(rows)} rows to benchmarks/results.csv")


if __name__ == "__main__":
    main()
