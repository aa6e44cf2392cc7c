"""The evolve protocol: recovery ratio, seed aggregation and intervals by hand, and `lightning-peft evolve` end to end."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_wandb_offline_run
from safetensors.torch import load_file

from lightning_peft.analysis.evolve_stats import (
    ROWS,
    aggregate,
    newer_version,
    recovery_ratio,
    seed_list,
    wilson_interval,
)


def test_recovery_ratio_by_hand() -> None:
    assert recovery_ratio(direct=0.2, trans_peft=0.5, fine_tune_n=0.8) == pytest.approx(0.5)
    assert recovery_ratio(direct=2.0, trans_peft=1.5, fine_tune_n=1.0) == pytest.approx(0.5)  # a loss: lower is better
    assert recovery_ratio(direct=0.2, trans_peft=0.1, fine_tune_n=0.8) == pytest.approx(-1 / 6)  # worse than direct
    assert recovery_ratio(direct=0.5, trans_peft=0.6, fine_tune_n=0.5) is None  # no gap to recover


def test_newer_version() -> None:
    assert newer_version("llama-v1") == "llama-v2" and newer_version("gpt2-micro-v1") == "gpt2-micro-v2"
    assert newer_version("qwen2-v1", "v2-major") == "qwen2-v2-major"
    with pytest.raises(ValueError, match="evolve.new=<updated base>"):
        newer_version("Qwen/Qwen2.5-0.5B")
    with pytest.raises(ValueError, match="v2-major"):
        newer_version("llama-v1", "v7")


def test_seed_list() -> None:
    assert seed_list(3) == [0, 1, 2] and seed_list(2, first=5) == [5, 6] and seed_list([4, 1]) == [4, 1]
    for bad in (0, [], [1, 1], [-1], "3", True):
        with pytest.raises(ValueError, match="evolve.seeds"):
            seed_list(bad)  # type: ignore[arg-type]


def test_aggregate_by_hand() -> None:
    per_seed = [{"A": {"m": 1.0, "only_here": 9.0}, "B": {"m": 0.5}}, {"A": {"m": 2.0}, "B": {"m": 0.5}},
                {"A": {"m": 4.0}, "B": {"m": 0.5}}]
    means, stds = aggregate(per_seed)
    assert means == {"A": {"m": pytest.approx(7 / 3)}, "B": {"m": 0.5}}  # a metric missing in one seed is dropped
    assert stds["A"]["m"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3))
    assert stds["B"]["m"] == 0.0


def test_wilson_interval_by_hand() -> None:
    low, high = wilson_interval(0.5, 100)  # the textbook case: 50 of 100
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    low, high = wilson_interval(0.0, 64)  # nothing right: the upper end is z^2 / (n + z^2)
    assert low == 0.0 and high == pytest.approx(1.96**2 / (64 + 1.96**2))
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def _evolve(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = ["evolve", "model.name_or_path=llama-micro-v1", "trainer.max_steps=3", "task.max_length=64",
           "task.num_train=32", "task.num_test=8", "module.max_new_tokens=4", "evolve.trans_peft.drop_p=0.5",
           "evolve.seeds=2", "evolve.drift_batches=1", f"hydra.run.dir={tmp_path}", *overrides]
    return subprocess.run([sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", *cmd],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_evolve_command_end_to_end_over_two_seeds(tmp_path: Path) -> None:
    """`lightning-peft evolve` as typed (default trainer config, progress bars on), then a rerun that reuses the seeds."""
    proc = _evolve(tmp_path, "logger=wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["old"] == "llama-micro-v1" and results["new"] == "llama-micro-v2" and results["method"] == "lora"
    assert results["seeds"] == [0, 1] and [s["seed"] for s in results["per_seed"]] == [0, 1]
    assert list(results["rows"]) == list(ROWS) and list(results["rows_std"]) == list(ROWS)
    # rows are the means of the per-seed rows, rows_std their population std, recovery from the means
    for row in ROWS:
        for metric in ("test/loss", "test/token_acc", "test/exact_match"):
            values = [s["rows"][row][metric] for s in results["per_seed"]]
            assert results["rows"][row][metric] == pytest.approx(statistics.fmean(values))
            assert results["rows_std"][row][metric] == pytest.approx(statistics.pstdev(values))
    for metric in ("test/loss", "test/token_acc"):
        direct, tp, ft_n = (results["rows"][r][metric] for r in ROWS[1:])
        assert results["recovery"][metric] == pytest.approx(recovery_ratio(direct, tp, ft_n))
    em = results["exact_match"]
    assert em["answers"] == 16 and set(em["ci95"]) == set(ROWS)  # 8 test answers x 2 seeds
    if not em["resolved"]:
        assert results["recovery"]["test/exact_match"] is None
    # the released recipe: LoRA on the attention projections only; two seeds train different adapters
    a0 = load_file(Path(results["adapters"]["0"]["Fine-tune_o"]) / "adapter_model.safetensors")
    a1 = load_file(Path(results["adapters"]["1"]["Fine-tune_o"]) / "adapter_model.safetensors")
    assert {k.split(".")[-3] for k in a0} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert any(not (a0[k] == a1[k]).all() for k in a0)
    # drift report with the causal attribution of both seeds' adapters
    attribution = json.loads((tmp_path / "drift" / "report.json").read_text())["attribution"]
    assert {r["adapter"] for r in attribution} == {0, 1} and (tmp_path / "drift" / "attribution.png").exists()
    assert set(results["attribution"]) >= {"explained_loss/ffn", "explained_loss/attention", "explained_loss/outside"}
    assert "Direct transfer o->n" in proc.stdout and "recovery ratio" in proc.stdout and "±" in proc.stdout

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_offline_run(run_file)
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    logged = {key(i): json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item}
    assert logged["evolve/results/_type"] == "table-file" and logged["evolve/per_seed/_type"] == "table-file"
    assert logged["drift/attribution/_type"] == "table-file" and logged["drift/plot/attribution/_type"] == "image-file"
    assert logged["evolve/Direct transfer o->n/test/loss"] == pytest.approx(results["rows"]["Direct transfer o->n"]["test/loss"])

    # a rerun into the same folder reuses both finished seeds (same numbers, no training)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("seed*/rows.json")}
    again = _evolve(tmp_path, "logger=none")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("seed*/rows.json")} == stamps
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]


def test_train_refuses_an_evolve_section(tmp_path: Path) -> None:
    cmd = ["train", "experiment=smoke", "+evolve.seeds=2", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", *cmd],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "lightning-peft evolve" in proc.stderr


def test_adapter_cache_shares_the_plain_rows_between_trans_peft_settings(tmp_path: Path) -> None:
    """A second run with other Trans-PEFT settings trains and evaluates only the Trans-PEFT row: the plain
    adapters and their three evaluations come from `evolve.adapter_cache`, with the first run's numbers."""
    cache = tmp_path / "cache"
    for run in "ab":
        (tmp_path / run).mkdir()
    first = _evolve(tmp_path / "a", "logger=none", "evolve.seeds=1", f"evolve.adapter_cache={cache}")
    assert first.returncode == 0, first.stderr[-3000:]
    adapters = {p.parent for p in cache.glob("*/adapter")}
    evaluations = set(cache.glob("eval/*.json"))
    assert len(adapters) == 3 and len(evaluations) == 4  # Fine-tune_o, Trans-PEFT, Fine-tune_n; four rows
    second = _evolve(tmp_path / "b", "logger=none", "evolve.seeds=1", f"evolve.adapter_cache={cache}",
                     "evolve.trans_peft.drop_p=0.2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert len({p.parent for p in cache.glob("*/adapter")} - adapters) == 1  # only the new Trans-PEFT adapter
    assert len(set(cache.glob("eval/*.json")) - evaluations) == 1  # only its evaluation
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in "ab")
    assert all(a[row] == b[row] for row in ROWS if row != "Trans-PEFT o->n")
    assert "reusing the cached evaluation" in second.stderr or "reusing the cached evaluation" in second.stdout
