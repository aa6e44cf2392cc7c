"""Sweeps: W&B sweep files render into `lightning-peft train` commands that Hydra composes and that
run; `conf/hparams_search/` grids compose and expand into one multirun job per point."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lightning_peft as lp

SWEEPS = sorted((Path(__file__).parents[1] / "examples" / "sweeps").glob("*.yaml"))
# what makes any run seconds-long on the micro zoo model, per kind of run
QUICK = {
    "train": ["experiment=smoke", "trainer.max_steps=2", "logger=csv"],
    "evolve": ["model.name_or_path=llama-micro-v1", "trainer.max_steps=2", "task.max_length=64", "task.num_train=16",
               "task.num_test=4", "module.max_new_tokens=4", "evolve.seeds=1", "evolve.drift_batches=1", "logger=csv"],
}


def render(sweep: dict) -> list[list[str]]:
    """Every point of the sweep as the command W&B's agent runs (``${args_no_hyphens}`` expanded)."""
    params = sweep["parameters"]
    axes = [[(k, v) for v in (p["values"] if "values" in p else [p["value"]])] for k, p in params.items()]
    commands = []
    for point in itertools.product(*axes):
        args = [f"{k}={v}" for k, v in point]
        commands.append([a for c in sweep["command"] for a in (args if c == "${args_no_hyphens}" else [c])])
    return commands


def _overrides(command: list[str]) -> list[str]:
    assert command[0] == "lightning-peft" and command[1] in ("train", "evolve"), command
    return command[2:]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_point_composes_and_instantiates(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and "${args_no_hyphens}" in sweep["command"]
    commands = render(sweep)
    assert len(commands) >= 2
    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        for command in commands:
            cfg = compose(command[1], overrides=_overrides(command))
            method = instantiate(cfg.method)
            assert isinstance(method, lp.AdapterCallback)
            for arg in _overrides(command):  # every swept value reached the composed config
                key, value = arg.split("=", 1)
                if key not in ("method", "experiment"):
                    assert str(OmegaConf.select(cfg, key)) == value, (key, value)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_first_and_last_point_of_each_sweep_run_offline(path: Path, micro_model_dir: str, tmp_path: Path) -> None:
    commands = render(yaml.safe_load(path.read_text()))
    for i, command in enumerate((commands[0], commands[-1])):
        overrides = _overrides(command)
        run_dir = tmp_path / str(i)
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", command[1],
             *QUICK[command[1]], *overrides, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((run_dir / "results.json").read_text())
        method = dict(a.split("=", 1) for a in overrides)["method"]
        assert results["method"] == lp.get_method(method).method_name


@pytest.mark.parametrize(("name", "app", "count"), [("lora_rank", "train", 4), ("rosa_density", "train", 4),
                                                     ("trans_peft_grid", "evolve", 9)])
def test_hparams_search_grid_expands_to_one_job_per_point(name: str, app: str, count: int) -> None:
    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        cfg = compose(app, overrides=[f"hparams_search={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    points = list(itertools.product(*(str(v).split(",") for v in params.values())))
    assert len(points) == count
    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        for point in points:
            job = compose(app, overrides=[f"hparams_search={name}", *(f"{k}={v}" for k, v in zip(params, point))])
            assert isinstance(instantiate(job.method), lp.AdapterCallback)
            if app == "evolve":  # the point reached the Trans-PEFT callback of the protocol
                tp = instantiate(job.evolve.trans_peft)
                assert [tp.config.mask_p, tp.config.drop_p] == [float(v) for v in point]


def test_optimized_metric_is_what_the_run_returns_to_an_optimising_sweeper() -> None:
    from omegaconf import OmegaConf

    from lightning_peft.cli.train import objective

    results = {"metrics": {"test/loss": 1.25, "val/loss": 2.0}}
    assert objective(OmegaConf.create({"optimized_metric": None}), results) is None
    assert objective(OmegaConf.create({"optimized_metric": "test/loss"}), results) == 1.25
    with pytest.raises(KeyError, match=r"'test/acc' is not among .*'test/loss', 'val/loss'"):
        objective(OmegaConf.create({"optimized_metric": "test/acc"}), results)


def test_optuna_sweeper_optimises_the_returned_metric(micro_model_dir: str, tmp_path: Path) -> None:
    """Only where the `optuna` extra is installed (not in CI): a 2-trial Optuna sweep finishes with a best value."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", "train", "-m",
         "experiment=smoke", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "optimized_metric=test/loss",
         "method.r=choice(2,4)", "logger=none", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    runs = [json.loads((tmp_path / str(i) / "results.json").read_text()) for i in range(2)]
    assert best["best_value"] == pytest.approx(min(r["metrics"]["test/loss"] for r in runs))
