"""Adapter-only checkpoint size, through Lightning's own ModelCheckpoint: against the full model, and (sparse
methods) against what the checkpoint must hold, the trainable values + optimizer state.

A Lightning checkpoint of a RoSA or SHiRA run holds the trainable values, AdamW's two moments per value, the
sparse positions and the loop/callback state. The positions are the overhead: stored as int32 rows and
columns they cost 8 bytes per entry (more than the 4-byte value); the compact code of
``lightning_peft.methods._sparse.storage`` stores CSR offsets + int16 columns or a flat int32 index,
whichever is smaller for the shape (the RoSA paper stores CSR with int16 columns). Goal: checkpoint
<= 1.3x (trainable values + optimizer state) bytes.

For each base (the zoo's tiny Llama, 0.8 M parameters, and a random Llama at hidden 512, 4 layers) and
method (LoRA r=8; RoSA r=4 and SHiRA at densities 0.5%, 1%, 5%): 2 AdamW steps with ``ModelCheckpoint``,
then the ``last.ckpt`` bytes against the model's ``save_pretrained`` file and against values + AdamW
state, and the bytes the positions take.

    python benchmarks/checkpoint_size.py [--no-csv]

Run it on two checkouts (before/after a storage change) to compare: rows carry the package version line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, row  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft import zoo  # noqa: E402

BENCH = "checkpoint_size"
DENSITIES = (0.005, 0.01, 0.05)


class _LM(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def _bases() -> dict[str, callable]:
    wide = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1365, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=8)
    return {
        "zoo llama-v1 (0.8M)": lambda: AutoModelForCausalLM.from_pretrained(zoo.resolve("llama-v1")),
        "llama h512 L4": lambda: (torch.manual_seed(0), LlamaForCausalLM(wide))[1],
    }


def _index_bytes(path: Path) -> int:
    """Bytes of the stored sparse positions (zip entries of tensors whose key names a position)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    keys = [k for k in state if any(s in k for s in ("rosa_row", "rosa_col", "shira_indices"))]
    return sum(state[k].numel() * state[k].element_size() for k in keys)


def measure(base: str, make, method: str, density: float | None, work: Path) -> dict[str, float]:
    model = make()
    model.save_pretrained(work / "full")
    full = (work / "full" / "model.safetensors").stat().st_size
    vocab = model.config.vocab_size
    module = _LM(model)
    callback = {"lora": lambda: lp.LoRA(r=8), "rosa": lambda: lp.RoSA(r=4, density=density, warmup_steps=0,
                                                                     mask_criterion="random"),
                "shira": lambda: lp.SHiRA(density=density, mask="random")}[method]()
    ckpt = ModelCheckpoint(dirpath=work, save_last=True, save_top_k=0)
    ids = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=2, callbacks=[callback, ckpt], accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4))
    path = work / "last.ckpt"
    assert zipfile.is_zipfile(path)
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    opt = sum(t.numel() * t.element_size() for s in trainer.optimizers[0].state.values() for t in s.values()
              if torch.is_tensor(t) and t.numel() > 1)
    size = path.stat().st_size
    return {"checkpoint_bytes": size, "needed_bytes": trainable + opt, "ratio": size / (trainable + opt),
            "index_bytes": _index_bytes(path), "full_model_bytes": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    rows, lines = [], []
    cases = [(b, m, d) for b in _bases() for m, ds in (("lora", (None,)), ("rosa", DENSITIES), ("shira", DENSITIES))
             for d in ds]
    for base, method, density in tqdm(cases, desc="checkpoints"):
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(base, _bases()[base], method, density, Path(tmp))
        case = f"{base} {method}" + (f" d={density:g}" if density else " r=8")
        rows.append(row(BENCH, case, "checkpoint_bytes_vs_full_model", r["checkpoint_bytes"], r["full_model_bytes"], "cpu"))
        rows.append(row(BENCH, case, "checkpoint_bytes_vs_values_and_optimizer", r["checkpoint_bytes"],
                        r["needed_bytes"], "cpu"))
        rows.append(row(BENCH, case, "index_bytes", r["index_bytes"], None, "cpu"))
        lines.append(f"| {base} | {method} | {density or '-'} | {r['checkpoint_bytes'] / 2**20:.3f} | "
                     f"{r['checkpoint_bytes'] / r['full_model_bytes']:.3f} | {r['needed_bytes'] / 2**20:.3f} | "
                     f"{r['ratio']:.2f} | {r['index_bytes'] / 2**20:.3f} |")
    print("| base | method | density | checkpoint MiB | / full model | values + AdamW MiB | ratio | positions MiB |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if not args.no_csv:
        append_rows(rows)


if __name__ == "__main__":
    main()
