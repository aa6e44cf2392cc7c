"""The evolve protocol: recovery ratio by hand, and `train experiment=evolve` end to end on micro models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_wandb_offline_run
from safetensors.torch import load_file

from lightning_peft.evolve import ROWS, newer_version, recovery_ratio


def test_recovery_ratio_by_hand() -> None:
    assert recovery_ratio(direct=0.2, trans_peft=0.5, fine_tune_n=0.8) == pytest.approx(0.5)
    assert recovery_ratio(direct=2.0, trans_peft=1.5, fine_tune_n=1.0) == pytest.approx(0.5)  # a loss: lower is better
    assert recovery_ratio(direct=0.2, trans_peft=0.1, fine_tune_n=0.8) == pytest.approx(-1 / 6)  # worse than direct
    assert recovery_ratio(direct=0.5, trans_peft=0.6, fine_tune_n=0.5) is None  # no gap to recover


def test_newer_version() -> None:
    assert newer_version("llama-v1") == "llama-v2" and newer_version("gpt2-micro-v1") == "gpt2-micro-v2"
    with pytest.raises(ValueError, match="evolve.new=<updated base>"):
        newer_version("Qwen/Qwen2.5-0.5B")


def test_evolve_protocol_end_to_end(tmp_path: Path) -> None:
    cmd = ["train", "experiment=evolve", "model.name_or_path=llama-micro-v1", "trainer.max_steps=3", "task.max_length=64",
           "task.num_train=32", "task.num_test=8", "module.max_new_tokens=4", "evolve.trans_peft.drop_p=0.5",
           "logger=wandb", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", *cmd],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["old"] == "llama-micro-v1" and results["new"] == "llama-micro-v2" and results["method"] == "lora"
    assert list(results["rows"]) == list(ROWS)
    for row in results["rows"].values():
        assert {"test/loss", "test/token_acc", "test/exact_match"} <= row.keys()
    rows = results["rows"]
    for metric, ratio in results["recovery"].items():
        direct, tp, ft_n = (rows[r][metric] for r in ROWS[1:])
        assert ratio == (None if abs(ft_n - direct) < 1e-9 else pytest.approx((tp - direct) / (ft_n - direct)))
    # three distinct adapters: Trans-PEFT changed training, v2 training saw another base
    weights = {name: load_file(Path(path) / "adapter_model.safetensors") for name, path in results["adapters"].items()}
    a_o, a_tp, a_n = weights["Fine-tune_o"], weights["Trans-PEFT o->n"], weights["Fine-tune_n"]
    assert a_o.keys() == a_tp.keys() == a_n.keys()
    assert any(not (a_o[k] == a_tp[k]).all() for k in a_o) and any(not (a_o[k] == a_n[k]).all() for k in a_o)
    # the same adapter on two bases: Fine-tune_o and Direct transfer differ only by the base
    assert rows["Fine-tune_o"]["test/loss"] != rows["Direct transfer o->n"]["test/loss"]
    assert json.loads((tmp_path / "drift" / "summary.json").read_text())["drift/weight_rel_change/ffn"] > 0
    assert "Direct transfer o->n" in proc.stdout and "recovery ratio" in proc.stdout

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_offline_run(run_file)
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    logged = {key(i): json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item}
    assert logged["evolve/results/_type"] == "table-file" and logged["drift/plot/weights_heatmap/_type"] == "image-file"
    assert logged["evolve/Direct transfer o->n/test/loss"] == pytest.approx(rows["Direct transfer o->n"]["test/loss"])
