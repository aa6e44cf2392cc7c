"""Adapter-aware strategies on CPU with 2 processes (gloo): same adapter as one process with the same
global batch, resume across process counts, the spawn variant's way back, registry names, early
failures of stock strategies, and the CLI under ``adapter_ddp``.

The 2-process runs of ``adapter_ddp`` share one launch (``strategy_cases.py`` run as a script:
Lightning's launcher re-runs it for rank 1); the one-process references run here.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from strategy_cases import STEPS, LazyTinyLM, TinyLM, fit, state

import lightning_peft as lp
from lightning_peft.callback import AdapterStrategyError
from lightning_peft.plugins import strategies as strategies_module

TESTS = Path(__file__).parent
NAMES = ["adapter_ddp", "adapter_ddp_spawn", "adapter_ddp_fork", "adapter_fsdp"]
TOL = {"rtol": 1e-4, "atol": 1e-6}  # fp32: an all-reduced mean vs the mean of one batch, 4 AdamW steps


def _run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _load(out: Path, name: str, rank: int = 0) -> dict:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


# ---------------------------------------------------------------------- registry and early failures
def test_registry_names_resolve_and_reimport_is_silent() -> None:
    for name in NAMES:
        assert name in StrategyRegistry and StrategyRegistry[name]["description"]
    trainer = L.Trainer(strategy="adapter_ddp", accelerator="cpu", devices=2, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, lp.AdapterDDPStrategy) and strategy._start_method == "popen"
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True}  # the graph settings are chosen at setup:
    assert strategy.ddp_graph_settings(accumulate_grad_batches=1) == {"static_graph": True, "find_unused_parameters": False}
    assert strategy.ddp_graph_settings(accumulate_grad_batches=2) == {"static_graph": False, "find_unused_parameters": True}
    spawn = L.Trainer(strategy="adapter_ddp_spawn", accelerator="cpu", devices=2, logger=False).strategy
    fork = L.Trainer(strategy="adapter_ddp_fork", accelerator="cpu", devices=2, logger=False).strategy
    assert (spawn._start_method, fork._start_method) == ("spawn", "fork")
    assert type(spawn.launcher).__name__ == "_AdapterMultiProcessingLauncher"
    fsdp = L.Trainer(strategy="adapter_fsdp", accelerator="cpu", devices=2, logger=False).strategy  # CPU allowed
    assert isinstance(fsdp, lp.AdapterFSDPStrategy) and isinstance(fsdp, FSDPStrategy)
    given = lp.AdapterDDPStrategy(find_unused_parameters=True).ddp_graph_settings(accumulate_grad_batches=1)
    assert given == {"static_graph": False, "find_unused_parameters": True}
    assert lp.AdapterDDPStrategy(static_graph=True).ddp_graph_settings(2) == {"static_graph": True,
                                                                             "find_unused_parameters": False}
    plugins = importlib.reload(importlib.import_module("lightning_peft.plugins"))  # registers the same names again
    plugins.register_strategies()  # and again: no error
    assert StrategyRegistry["adapter_ddp"]["strategy"] is lp.AdapterDDPStrategy


@pytest.mark.parametrize(
    ("strategy", "plugin"),
    [("ddp_spawn", "adapter_ddp_spawn"), ("ddp_notebook", "adapter_ddp_fork"), ("ddp_fork", "adapter_ddp_fork")],
)
def test_stock_multiprocessing_ddp_fails_in_setup_naming_the_plugin(strategy: str, plugin: str) -> None:
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    with pytest.raises(AdapterStrategyError, match=rf"silently dropped.*strategy='{plugin}'"):
        lp.LoRA(r=2).setup(trainer, TinyLM(), "fit")


def test_stock_fsdp_fails_in_setup_and_plain_ddp_is_accepted() -> None:
    class UserFSDP(FSDPStrategy):  # Lightning refuses its own FSDPStrategy on CPU; a subclass gets through
        pass

    trainer = L.Trainer(strategy=UserFSDP(), accelerator="cpu", devices=2, logger=False)
    with pytest.raises(AdapterStrategyError, match=r"gradient memory.*strategy='adapter_fsdp'"):
        lp.RoSA(r=2, density=0.1).setup(trainer, TinyLM(), "fit")
    for ok in ("ddp", DDPStrategy(find_unused_parameters=False), *NAMES):
        lp.LoRA(r=2).setup(L.Trainer(strategy=ok, accelerator="cpu", devices=2, logger=False), TinyLM(), "fit")


def test_adapter_ddp_refuses_hydra_multirun_before_launching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategies_module, "in_hydra_multirun", lambda: True)
    with pytest.raises(AdapterStrategyError, match="adapter_ddp_spawn for multirun"):
        L.Trainer(strategy="adapter_ddp", accelerator="cpu", devices=2, logger=False)
    L.Trainer(strategy="adapter_ddp_spawn", accelerator="cpu", devices=2, logger=False)  # fine


def test_adapter_fsdp_refuses_tuner_layers_that_read_the_frozen_weight() -> None:
    module = TinyLM()
    lp.RoSA(r=2, density=0.1).inject(module)
    strategy = L.Trainer(strategy="adapter_fsdp", accelerator="cpu", devices=2, logger=False).strategy
    with pytest.raises(AdapterStrategyError, match=r"net\.q_proj \(rosa\).*strategy='adapter_ddp'"):
        strategy._setup_model(module)


def test_adapter_fsdp_refuses_transpeft_dropping() -> None:
    trainer = L.Trainer(strategy="adapter_fsdp", accelerator="cpu", devices=2, logger=False,
                        callbacks=[lp.LoRA(r=2), lp.TransPEFT(mask_p=0.1, drop_p=0.1)])
    trainer.strategy.connect(TinyLM())
    with pytest.raises(AdapterStrategyError, match=r"drop_p=0.1.*strategy='adapter_ddp'"):
        trainer.strategy.setup(trainer)


def test_configure_model_wrapper_survives_pickling() -> None:
    module = LazyTinyLM()
    lp.LoRA(r=2).setup(L.Trainer(logger=False), module, "fit")
    clone = pickle.loads(pickle.dumps(module))  # what a spawn launcher does with the module
    clone.configure_model()
    clone.configure_model()  # idempotent
    assert "lora_A" in str(clone.net.q_proj) and clone.net.q_proj.lora_A["default"].weight.shape == (2, 16)
    assert module.net is None  # the original was never built


# ---------------------------------------------------------------------- adapter_ddp (one launch)
@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs ``strategy_cases.py`` on 2 processes once; returns its output folder."""
    out = tmp_path_factory.mktemp("ddp_runs")
    fit("rosa", max_steps=2, ckpt_dir=out / "single_ckpt")  # the DDP side resumes from this one
    proc = _run_script(TESTS / "strategy_cases.py", "ddp", str(out), str(out / "single_ckpt" / "last.ckpt"), cwd=out)
    assert proc.returncode == 0 and (out / "DONE").exists(), proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, torch.Tensor]]:
    """One-process runs with the same global batch, by run name (each trained on first use)."""

    class Runs(dict):
        def __missing__(self, run: str) -> dict[str, torch.Tensor]:
            self[run] = state(fit(run)[0])
            return self[run]

    return Runs()


@pytest.mark.parametrize("run", ["lora", "rosa", "shira", "transpeft_off", "lora-accumulate"])
def test_adapter_ddp_gives_the_one_process_adapter(run: str, ddp_runs: Path, single: dict) -> None:
    """``lora-accumulate``: ``accumulate_grad_batches=2`` (then ``find_unused_parameters`` instead of ``static_graph``)."""
    rank0, rank1 = _load(ddp_runs, run, 0)["state"], _load(ddp_runs, run, 1)["state"]
    expected = single[run]
    assert rank0.keys() == expected.keys() and len(expected) > 0
    for key, value in expected.items():
        torch.testing.assert_close(rank0[key], value, **TOL, msg=key)
        assert torch.equal(rank0[key], rank1[key]), f"{key}: ranks out of sync"
    if run == "rosa":  # masks: built from the all-reduced statistic, the same on both ranks and as one process
        masks = [k for k in expected if "rosa_row" in k or "rosa_col" in k]
        assert masks and all(torch.equal(rank0[k], expected[k]) and (rank0[k] >= 0).all() for k in masks)
    if run == "lora":  # `aux` is adapted but never called: its adapter got no update and broke nothing
        assert torch.count_nonzero(rank0["net.aux.lora_B.default.weight"]) == 0
        assert torch.count_nonzero(rank0["net.q_proj.lora_B.default.weight"]) > 0


def test_transpeft_with_rank_dependent_drops_keeps_ranks_in_sync(ddp_runs: Path) -> None:
    rank0, rank1 = _load(ddp_runs, "transpeft", 0)["state"], _load(ddp_runs, "transpeft", 1)["state"]
    off = _load(ddp_runs, "transpeft_off", 0)["state"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept them equal
    assert any(not torch.allclose(rank0[k], off[k]) for k in rank0)  # masking/dropping changed training


def test_shira_calibrated_masks_agree_across_ranks(ddp_runs: Path) -> None:
    rank0, rank1 = _load(ddp_runs, "shira_grad", 0)["state"], _load(ddp_runs, "shira_grad", 1)["state"]
    indices = [k for k in rank0 if "shira_indices" in k]
    assert indices and all(torch.equal(rank0[k], rank1[k]) for k in indices)


def test_bf16_true_keeps_adapters_fp32_and_the_base_bf16(ddp_runs: Path) -> None:
    dtypes = _load(ddp_runs, "rosa_bf16")["dtypes"]
    adapter = {n: d for n, d in dtypes.items() if "rosa_" in n}
    base = {n: d for n, d in dtypes.items() if "rosa_" not in n}
    assert adapter and set(adapter.values()) == {torch.float32}, adapter
    assert base and set(base.values()) == {torch.bfloat16}, base


def test_stock_ddp_trains_rosa_without_find_unused_parameters(ddp_runs: Path, single: dict) -> None:
    rank0 = _load(ddp_runs, "rosa_plain_ddp")["state"]
    for key, value in single["rosa_plain_ddp"].items():
        torch.testing.assert_close(rank0[key], value, **TOL, msg=key)


def test_stock_ddp_names_unused_adapters_at_the_first_step(ddp_runs: Path) -> None:
    for rank in (0, 1):
        message = (ddp_runs / f"stock_ddp_unused_rank{rank}.txt").read_text()
        assert "net.aux.lora_A.default.weight" in message and "strategy='adapter_ddp'" in message


def test_checkpoints_resume_across_process_counts(ddp_runs: Path, single: dict) -> None:
    uninterrupted = single["rosa"]
    ddp_ckpt = ddp_runs / "ddp_ckpt" / "last.ckpt"
    assert torch.load(ddp_ckpt, weights_only=False)["global_step"] == 2
    resumed_here = state(fit("rosa", ckpt_path=str(ddp_ckpt))[0])  # DDP -> one process
    resumed_ddp = _load(ddp_runs, "rosa_resumed_from_single")["state"]  # one process -> DDP
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed_here[key], value, **TOL, msg=key)
        torch.testing.assert_close(resumed_ddp[key], value, **TOL, msg=key)


# ---------------------------------------------------------------------- adapter_ddp_spawn
def _spawn_matches_one_process(run: str, single: dict) -> dict[str, torch.Tensor]:
    module, trainer = fit(run, "adapter_ddp_spawn", devices=2, lazy=True)  # model built in configure_model
    assert trainer.global_step == STEPS  # the loop progress came back too
    got, expected = state(module), single[run]  # the module of *this* process, after the workers finished
    assert got.keys() == expected.keys() and expected
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, **TOL, msg=key)
    return got


def test_adapter_ddp_spawn_brings_every_method_back(single: dict) -> None:
    """LoRA, RoSA, SHiRA (each on its own layer) and Trans-PEFT (p = 0) in one spawn launch (~15 s)."""
    got = _spawn_matches_one_process("stack", single)
    assert {"net.q_proj.lora_A.lora.weight", "net.mlp.up_proj.rosa_values.rosa", "net.mlp.down_proj.shira_weight.shira"} <= got.keys()
    assert (got["net.mlp.up_proj.rosa_row.rosa"] >= 0).all()  # the mask came back too


@pytest.mark.slow
@pytest.mark.parametrize("run", ["lora", "rosa", "shira", "transpeft_off"])
def test_adapter_ddp_spawn_brings_each_method_back(run: str, single: dict) -> None:
    """One spawn launch per method with ``target_modules="all-linear"`` (~15 s each)."""
    _spawn_matches_one_process(run, single)


# ---------------------------------------------------------------------- the CLI
def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lightning-peft")  # the console script users run; `python -m lightning_peft.cli` otherwise
    cmd = [exe] if exe else [sys.executable, "-m", "lightning_peft.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_trains_on_two_processes_into_one_run_dir(micro_model_dir: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _cli(["train", "experiment=smoke", "trainer.strategy=adapter_ddp", "trainer.devices=2",
                 "trainer.accelerator=cpu", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr  # rank 1 joined the process group
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 4 and {"test/loss", "val/loss"} <= results["metrics"].keys()
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # rank 1 re-ran `train` with the same overrides into the same folder (Lightning names its Hydra job)
    rank0, rank1 = (run / "train.log").read_text(), (run / "train_ddp_process_1.log").read_text()
    adapted = [line.split(" - ")[-1] for line in rank0.splitlines() if "adapted" in line]
    assert adapted and adapted == [line.split(" - ")[-1] for line in rank1.splitlines() if "adapted" in line]


@pytest.mark.slow
def test_cli_multirun_with_adapter_ddp_spawn(micro_model_dir: str, tmp_path: Path) -> None:
    """Two sweep points, each fit and test on 2 spawned processes (~80 s)."""
    proc = _cli(["train", "-m", "experiment=smoke", "logger=none", "trainer.strategy=adapter_ddp_spawn",
                 "trainer.devices=2", "method.r=2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in range(2)]
    assert [r["steps"] for r in runs] == [4, 4] and runs[1]["trainable_params"] == 2 * runs[0]["trainable_params"]
    assert all(Path(r["adapter"], "adapter_model.safetensors").is_file() for r in runs)


# ---------------------------------------------------------------------- adapter_fsdp on CPU (one launch)
@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs ``strategy_cases.py fsdp`` on 2 CPU processes once; returns its output folder."""
    out = tmp_path_factory.mktemp("fsdp_runs")
    fit("lora", max_steps=2, ckpt_dir=out / "single_ckpt")  # adapter_fsdp resumes from this one
    proc = _run_script(TESTS / "strategy_cases.py", "fsdp", str(out), str(out / "single_ckpt" / "last.ckpt"), cwd=out)
    assert proc.returncode == 0 and (out / "DONE").exists(), proc.stderr[-4000:]
    return out


def _ckpt_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_adapter_fsdp_frozen_units_get_no_gradient_memory(fsdp_runs: Path) -> None:
    for rank in (0, 1):
        units = _load(fsdp_runs, "fsdp_lora", rank)["units"]
        frozen = {n: u for n, u in units.items() if not u["requires_grad"]}
        adapters = {n: u for n, u in units.items() if u["requires_grad"]}
        assert list(frozen) == ["<root>"] and frozen["<root>"]["grad"] is None  # the whole base: no .grad
        assert len(adapters) == 10 and all(".lora_A.default" in n or ".lora_B.default" in n for n in adapters)
        for name, unit in adapters.items():  # `aux` never runs: its units get no gradient either
            assert unit["grad"] == (None if ".aux." in name else (unit["numel"], torch.float32)), name
        base = sum(p.numel() for p in TinyLM().parameters())
        assert frozen["<root>"]["numel"] == -(-base // 2)  # a half shard per rank (padded)


def test_adapter_fsdp_bf16_true_keeps_adapter_units_fp32(fsdp_runs: Path) -> None:
    record = _load(fsdp_runs, "fsdp_lora_bf16")
    assert record["units"]["<root>"]["dtype"] == torch.bfloat16
    assert {u["dtype"] for n, u in record["units"].items() if n != "<root>"} == {torch.float32}
    assert {d for n, d in record["dtypes"].items() if "lora_" in n} == {torch.float32}


def test_adapter_fsdp_checkpoint_is_the_one_process_adapter_and_resumes_both_ways(fsdp_runs: Path, single: dict) -> None:
    expected = single["lora"]
    final = _ckpt_state(fsdp_runs / "fsdp_ckpt" / "last.ckpt")
    assert final.keys() == expected.keys()  # adapter-only: no base weight, no FSDP names
    resumed_here = state(fit("lora", ckpt_path=str(fsdp_runs / "fsdp_ckpt" / "epoch=0-step=2.ckpt"))[0])
    resumed_fsdp = _ckpt_state(fsdp_runs / "fsdp_resumed" / "last.ckpt")
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, **TOL, msg=key)
        torch.testing.assert_close(resumed_here[key], value, **TOL, msg=key)  # FSDP -> one process
        torch.testing.assert_close(resumed_fsdp[key], value, **TOL, msg=key)  # one process -> FSDP
