"""``adapter_ddp`` on 2 processes vs 1 process: step time, and adapter-only vs full checkpoint size.

The same LoRA fine-tuning step (r=8, all-linear) on the zoo's tiny Llama (``llama-v1``: hidden 128,
3 layers, 0.8 M parameters), sequence length 128, through Lightning, each run in a fresh process:

* ``single b``: one process, batch ``b`` (the DDP run's per-process batch);
* ``single 2b``: one process, batch ``2 b`` (the DDP run's global batch rows);
* ``adapter_ddp 2 x b``: two processes (gloo), batch ``b`` each.

A step is forward + backward (+ DDP's all-reduce of the adapter gradients) + AdamW, timed from
``on_train_batch_start`` to ``on_train_batch_end`` on rank 0, median over ``--steps`` after
``--warmup``. On CPU the two processes share the machine: Lightning gives each
``cpu_count / 2`` intra-op threads, the single process keeps all of them, so on 2 idle cores the
ideal is ``ddp 2 x b`` = ``single b`` (ratio 1.0, pure communication overhead above it) and half of
``single 2b`` (ratio 0.5: the speed-up at the same global batch).

Checkpoint: the ``last.ckpt`` that ``ModelCheckpoint`` wrote under ``adapter_ddp`` (adapter-only
state dict + AdamW state + loop state) vs the same checkpoint holding the model's full state dict,
which is what Lightning writes for a peft-injected model without lightning-peft (Lightning #19281).

Run: python benchmarks/ddp_step.py [--batch 8] [--steps 30] [--warmup 5] [--no-csv]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, row  # noqa: E402

import lightning_peft as lp  # noqa: E402

BENCH = "ddp_step"
MODEL, RANK, SEQ = "llama-v1", 8, 128


class ZooLM(L.LightningModule):
    """The zoo model's causal-LM loss; AdamW over the trainable (adapter) parameters."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_peft import zoo

        self.model = zoo.load(MODEL)[0].train()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch  # (B, T)
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


class StepTimer(L.Callback):
    """Wall time of each training step (forward, backward, gradient sync, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, i: int) -> None:
        self.times.append(time.perf_counter() - self._t0)


def measure(role: str, batch: int, steps: int, warmup: int, out: Path) -> None:
    """One run (``single`` or ``ddp``); rank 0 writes ``{"step_ms", "threads", ...}`` to ``out``."""
    devices = 2 if role == "ddp" else 1
    total = warmup + steps
    ids = torch.randint(0, 1024, (total * batch * devices, SEQ), generator=torch.Generator().manual_seed(0))
    timer = StepTimer()
    ckpt_dir = out.with_suffix(".ckpt.d")
    trainer = L.Trainer(
        max_steps=total, accelerator="cpu", devices=devices, strategy="adapter_ddp" if role == "ddp" else "auto",
        callbacks=[lp.LoRA(r=RANK), timer, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    module = ZooLM()
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=batch))
    if trainer.global_rank != 0:
        return
    result: dict[str, Any] = {"step_ms": statistics.median(timer.times[warmup:]) * 1e3, "threads": torch.get_num_threads(),
                              "world_size": trainer.world_size}
    last = ckpt_dir / "last.ckpt"
    result["checkpoint_bytes"] = last.stat().st_size
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in module.model.state_dict().items()}  # base + adapter
    full = ckpt_dir / "full.ckpt"
    torch.save(checkpoint, full)
    result["full_checkpoint_bytes"] = full.stat().st_size
    out.write_text(json.dumps(result))


def run_role(role: str, batch: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """``measure`` in a fresh process (rank 1 of a DDP run is started by Lightning from this command line)."""
    out = tmp / f"{role}_{batch}.json"
    cmd = [sys.executable, __file__, "--role", role, "--batch", str(batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="per-process batch b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--role", choices=["single", "ddp"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        measure(args.role, args.batch, args.steps, args.warmup, args.out)
        return
    b = args.batch
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        single_b, single_2b, ddp = run_role("single", b, args, tmp), run_role("single", 2 * b, args, tmp), run_role("ddp", b, args, tmp)
    case = f"{MODEL} lora r={RANK} T={SEQ} b={b}/process, cpu x{os.cpu_count()}"
    rows = [
        row(BENCH, case, "step_ms_ddp2_vs_single_same_per_process_batch", ddp["step_ms"], single_b["step_ms"], "cpu"),
        row(BENCH, case, "step_ms_ddp2_vs_single_same_global_batch", ddp["step_ms"], single_2b["step_ms"], "cpu"),
        row(BENCH, case, "checkpoint_bytes_adapter_only_vs_full", ddp["checkpoint_bytes"], ddp["full_checkpoint_bytes"], "cpu"),
    ]
    print(f"{case}\n"
          f"  step: adapter_ddp 2 x {b}: {ddp['step_ms']:.1f} ms ({ddp['threads']} threads/process) | "
          f"single {b}: {single_b['step_ms']:.1f} ms | single {2 * b}: {single_2b['step_ms']:.1f} ms "
          f"({single_b['threads']} threads)\n"
          f"  ratios: vs same per-process batch {ddp['step_ms'] / single_b['step_ms']:.3f}, "
          f"vs same global batch {ddp['step_ms'] / single_2b['step_ms']:.3f}\n"
          f"  checkpoint: adapter-only {ddp['checkpoint_bytes']:,} B vs full {ddp['full_checkpoint_bytes']:,} B "
          f"({ddp['checkpoint_bytes'] / ddp['full_checkpoint_bytes']:.4f})")
    if not args.no_csv:
        append_rows(rows)


if __name__ == "__main__":
    main()
