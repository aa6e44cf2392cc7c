"""Every config group option and experiment composes with Hydra and instantiates."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lightning_peft as lp
from lightning_peft.cli import main as cli_main

CONF = files("lightning_peft.conf")
GROUPS = ["model", "method", "trans_peft", "task", "trainer", "logger", "experiment", "hparams_search"]
# options that need a value only a user can give (a real checkpoint or dataset)
REQUIRED = {
    ("model", "hf"): ["model.name_or_path=llama-micro-v1"],
    ("task", "hf_dataset"): ["task.path=json", "task.prompt_template='{q}'", "task.completion_template='{a}'"],
}


def options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


def _compose(overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        return compose("train", overrides=[*overrides, "run_dir=/tmp/unused"])


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group: str, option: str) -> None:
    cfg = _compose([f"{group}={option}", *REQUIRED.get((group, option), [])])
    OmegaConf.resolve(cfg)  # no missing or broken interpolation
    assert cfg.module._target_ and cfg.method._target_ and cfg.task._target_


@pytest.mark.parametrize("option", options("method"))
def test_methods_instantiate_to_registered_callbacks(option: str) -> None:
    method = instantiate(_compose([f"method={option}"]).method)
    assert lp.get_method(option) is type(method)


@pytest.mark.parametrize("method", ["rosa", "rosa_sparse", "shira"])
def test_tile_override_composes_into_the_method(method: str) -> None:
    callback = instantiate(_compose([f"method={method}", "method.tile=16"]).method)
    assert callback.config.tile == 16


@pytest.mark.parametrize("option", options("trainer"))
def test_trainers_instantiate(option: str) -> None:
    if option == "gpu":
        pytest.skip("no GPU in CI: the gpu trainer composes (above) but cannot be built here")
    assert isinstance(instantiate(_compose([f"trainer={option}"]).trainer, logger=False), L.Trainer)


@pytest.mark.parametrize("option", [o for o in options("logger") if o != "none"])
def test_loggers_instantiate(option: str, tmp_path: Path) -> None:
    cfg = _compose([f"logger={option}", f"hydra.run.dir={tmp_path}"])
    cfg.logger.save_dir = str(tmp_path)
    logger = instantiate(cfg.logger)
    assert type(logger).__name__ == {"wandb": "WandbLogger", "csv": "CSVLogger"}[option]


@pytest.mark.parametrize("option", options("task"))
def test_tasks_instantiate_with_the_micro_tokenizer(option: str, micro_model_dir: str, tmp_path: Path) -> None:
    overrides = ["model.name_or_path=llama-micro-v1", f"task={option}"]
    if option == "hf_dataset":
        data = tmp_path / "qa.jsonl"
        data.write_text("\n".join(json.dumps({"q": f"{i} plus {i}?", "a": str(2 * i)}) for i in range(30)))
        overrides += [f"task.data_files={data}", "task.path=json", "task.prompt_template='{q}'", "task.completion_template=' {a}'", "task.num_val=5", "task.num_test=5"]
    datamodule = instantiate(_compose(overrides).task)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape


def test_unknown_option_names_the_choices() -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)method/lorax.*Available options in 'method'.*lora"):
        _compose(["method=lorax"])


def test_cli_without_command_prints_usage(capsys) -> None:
    assert cli_main([]) == 2 and "usage: lightning-peft" in capsys.readouterr().out
    assert cli_main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


def test_cli_train_smoke_run(micro_model_dir: str, tmp_path: Path) -> None:
    proc = _cli(["train", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 4 and results["method"] == "lora"
    assert {"test/loss", "test/exact_match"} <= results["metrics"].keys()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert "run files:" in proc.stdout and "test/loss" in proc.stdout


def test_cli_multirun_runs_one_job_per_value(micro_model_dir: str, tmp_path: Path) -> None:
    proc = _cli(["train", "-m", "experiment=smoke", "method.r=2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in range(2)]
    assert [r["steps"] for r in runs] == [4, 4]
    assert runs[1]["trainable_params"] == 2 * runs[0]["trainable_params"]  # LoRA size is linear in r
    assert all(Path(r["adapter"]).is_dir() for r in runs)


def test_cli_without_a_test_split_still_saves(micro_model_dir: str, tmp_path: Path) -> None:
    proc = _cli(["train", "experiment=smoke", "task.num_test=0", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not any(k.startswith("test/") for k in results["metrics"]) and Path(results["adapter"]).is_dir()


def test_cli_logs_offline_to_wandb(micro_model_dir: str, tmp_path: Path) -> None:
    from helpers import read_wandb_offline_run

    proc = _cli(["train", "experiment=smoke", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_offline_run(run_file)
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731  ("a/b" arrives as nested_key)
    rows = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    config = {key(u): json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sum("train/loss" in row for row in rows) == 4  # one per step (log_every_n_steps=1)
    (test_row,) = [row for row in rows if "test/exact_match" in row]
    assert test_row["test/loss"] == pytest.approx(results["metrics"]["test/loss"])
    assert config["method"]["_target_"] == "lightning_peft.LoRA" and config["method"]["r"] == 8


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("method=lorax", "Could not find 'method/lorax'"),
        ("model.name_or_path=llama-micro-v9", "unknown zoo model 'llama-micro-v9'"),
        ("task=sqll", "Could not find 'task/sqll'"),
        ("method.r=0", "r=0"),
    ],
)
def test_cli_bad_input_fails_clearly_and_writes_nothing(override: str, match: str, tmp_path: Path) -> None:
    proc = _cli(["train", "experiment=smoke", override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0 and match in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_cli_run_killed_mid_training_resumes_to_the_uninterrupted_result(micro_model_dir: str, tmp_path: Path) -> None:
    """SIGKILL a `lightning-peft train` run once it has checkpointed, rerun it with `ckpt_path=last`: the adapter and
    the losses logged after the checkpoint equal those of a run that was never interrupted."""
    import csv
    import os
    import signal
    import time

    from safetensors.torch import load_file

    args = ["experiment=smoke", "trainer.max_steps=60", "task.num_train=256", "callbacks.checkpoint.every_n_train_steps=5",
            "trainer.val_check_interval=1000", "trainer.limit_val_batches=0"]

    def losses(run: Path) -> dict[int, float]:
        rows = [r for f in sorted(run.glob("**/metrics.csv")) for r in csv.DictReader(f.open())]
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    full = _cli(["train", *args, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", "train", *args,
           f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "results.json").exists(), "the run finished before the kill"
    saved_step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < saved_step < 60

    resumed = _cli(["train", *args, "ckpt_path=last", f"hydra.run.dir={run}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["steps"] == 60
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_losses, resumed_losses = losses(tmp_path / "full"), losses(run)
    after = [s for s in full_losses if s >= saved_step]
    assert after and all(resumed_losses[s] == full_losses[s] for s in after)


def test_cli_resume_errors_name_the_file_and_the_fix(micro_model_dir: str, tmp_path: Path) -> None:
    proc = _cli(["train", "experiment=smoke", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'new'}"], tmp_path)
    assert proc.returncode != 0 and "no checkpoint at" in proc.stderr and "hydra.run.dir=<dir>" in proc.stderr
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    proc = _cli(["train", "experiment=smoke", f"ckpt_path={broken}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0 and f"{broken} is not a complete checkpoint" in proc.stderr, proc.stderr[-2000:]


def test_readme_own_data_command_runs_on_a_200_row_file(micro_model_dir: str, tmp_path: Path) -> None:
    """The README's `task=hf_dataset` command as typed (progress bars on), on a small train.jsonl, with short steps."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```text\n(.*?)```", readme, flags=re.S) if "task=hf_dataset" in b]
    args = shlex.split(block.replace("\\\n", " "))
    assert args[:2] == ["lightning-peft", "train"]
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(200)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    proc = _cli([*args[1:], "model.name_or_path=llama-micro-v1", "task.max_length=64", "module.max_new_tokens=4",
                 "trainer.max_steps=2", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == "hf_dataset" and "test/loss" in results["metrics"]


DEFAULT_OPTIONS = {"method=lora", "method=rosa", "method=shira", "trans_peft=default"}


def _init_params(cls: type) -> dict:
    """Named ``__init__`` parameters along the MRO (a subclass's ``**kwargs`` passes on to its base's)."""
    import inspect

    params: dict = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith("lightning."):
            continue
        sig = inspect.signature(klass.__init__).parameters
        params.update({k: p for k, p in sig.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                       and k not in params})
        if not any(p.kind == p.VAR_KEYWORD for p in sig.values()):
            break
    return params


@pytest.mark.parametrize("option", sorted(
    f"{group}={p.name.removesuffix('.yaml')}" for group in ("method", "trans_peft")
    for p in files("lightning_peft.conf").joinpath(group).iterdir() if p.name.endswith(".yaml") and p.name != "none.yaml"
))
def test_yaml_dataclass_and_callback_signature_agree(option: str) -> None:
    """Each method's three descriptions of its settings (the composed YAML, the typed dataclass, the callback's
    __init__) name the same keys; the default YAML, the callback and the dataclass have the same defaults."""
    import dataclasses

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        cfg = compose("train", overrides=[option])
    raw = OmegaConf.to_container(cfg[option.split("=")[0]])
    cls = get_class(raw.pop("_target_"))
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    params = _init_params(cls)
    assert set(raw) == set(fields) == set(params), (set(raw) ^ set(fields), set(fields) ^ set(params))
    for key, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if "__init__" in vars(cls) and key in _init_params(cls.__mro__[1]):
            continue  # a variant (RoSA's sparse-only) sets its own defaults for some keys
        assert params[key].default == default, f"{cls.__name__}.__init__({key}=...) vs {cls.config_cls.__name__}"
        if option in DEFAULT_OPTIONS:
            same = raw[key] == pytest.approx(default) if isinstance(default, float) else raw[key] == default
            assert same, f"{option}: {key}={raw[key]!r} in YAML, {default!r} in {cls.config_cls.__name__}"


def test_the_cpu_trainer_precision_of_each_model_is_the_measured_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer=cpu takes the model group's `cpu_precision`: what benchmarks/cpu_precision.py's rule picks from its
    recorded results (the fastest precision with float32 master weights whose losses are within fp32's spread)."""
    bench = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    from cpu_precision import choose

    import lightning_peft.config as config

    chosen = choose(json.loads((bench / "results" / "cpu_precision.json").read_text()))
    expected = {"llama": chosen["llama-v1"], "qwen2": chosen["llama-v1"], "gpt2": chosen["llama-v1"],  # the zoo
                "smollm2": chosen["smollm2-135m"], "hf": chosen["smollm2-135m"]}  # real checkpoints
    assert chosen["smollm2-135m"] != "32-true"  # a real model trains faster in bf16 on a bf16 CPU (else drop the key)
    for native in (True, False):  # without native bf16 (an AVX2-only CPU) a bf16 choice falls back to 32-true
        monkeypatch.setattr(config, "native_cpu_bf16", lambda native=native: native)
        for model, precision in expected.items():
            cfg = _compose([f"model={model}", *(["model.name_or_path=x"] if model == "hf" else [])])
            assert cfg.trainer.precision == (precision if native or "bf16" not in precision else "32-true"), model
        cfg = _compose(["model=smollm2", "trainer.precision=bf16-mixed"])  # what the user types is kept
        assert cfg.trainer.precision == "bf16-mixed"
