"""Adapter-only checkpoint size vs the full model, through Lightning's own ModelCheckpoint.

For Llama-style models of growing width: one LoRA (r=8, all-linear) training step, then the
size of the ``last.ckpt`` that ``ModelCheckpoint`` wrote (adapter + AdamW state + loop state)
against the model's ``save_pretrained`` safetensors file. Appends rows to
``benchmarks/results.csv``.

Run: python benchmarks/checkpoint_size.py
"""

from __future__ import annotations

import csv
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lightning_peft as lp
from lightning_peft.data import resumable_loader

RESULTS = Path(__file__).with_name("results.csv")


class Module(L.LightningModule):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def measure(hidden: int, layers: int, tmp: Path) -> dict:
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8)
    LlamaForCausalLM(cfg).save_pretrained(tmp / f"base{hidden}")
    module = Module(str(tmp / f"base{hidden}"))
    ckpt = ModelCheckpoint(dirpath=tmp / f"ckpt{hidden}", save_last=True, save_top_k=0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 4096, (4, 16)))
    L.Trainer(max_steps=1, callbacks=[lp.LoRA(r=8), ckpt], logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, resumable_loader(data, batch_size=4))
    full = (tmp / f"base{hidden}" / "model.safetensors").stat().st_size
    adapter_only = (tmp / f"ckpt{hidden}" / "last.ckpt").stat().st_size
    return {"hidden": hidden, "layers": layers, "full_model_bytes": full, "checkpoint_bytes": adapter_only,
            "ratio": round(adapter_only / full, 4)}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for hidden, layers in ((256, 4), (512, 4), (1024, 4)):
            rows.append(measure(hidden, layers, Path(d)))
            print(rows[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": platform.processor() or platform.machine(),
            "torch": torch.__version__, "lightning": L.__version__}
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["benchmark", "case", "metric", "value", "baseline", "ratio", "device", "versions", "date"])
        for r in rows:
            writer.writerow(["checkpoint_size", f"llama h={r['hidden']} L={r['layers']} lora r=8", "checkpoint_bytes",
                             r["checkpoint_bytes"], r["full_model_bytes"], r["ratio"], meta["device"],
                             f"torch {meta['torch']}; lightning {meta['lightning']}", meta["date"]])
    print(f"appended {len(rows)} rows to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
