"""``lightning-peft transfer``: Trans-LoRA from the command line (Hydra config ``transfer``).

Synthesises (or reuses) the synthetic set, trains the target adapter on it, tests on the task's
real test split, and writes ``results.json`` and ``adapter/`` to the run directory.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import lightning_peft as lp
from lightning_peft.cli.run import RunContext, dataclass_fields
from lightning_peft.transfer import StudentConfig, TransferConfig, synthesize, train_student

# Keys of a task config that the transfer sets itself (tokenizer: the target's; the shuffling seed: its own).
_TASK_KEYS_SET_HERE = ("_target_", "tokenizer", "shuffle_seed")


def transfer_config(cfg: DictConfig, task_name: str) -> TransferConfig:
    """The :class:`TransferConfig` of a composed ``transfer`` config; the ``task`` group gives name and settings."""
    values = dataclass_fields(TransferConfig, cfg, exclude=("task", "task_kwargs"))
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return TransferConfig(task=task_name, task_kwargs={k: v for k, v in task.items() if k not in _TASK_KEYS_SET_HERE},
                          **values)


def run(cfg: DictConfig, task_name: str) -> dict[str, Any]:
    """Run one transfer as ``cfg`` says; returns what is written to ``results.json``."""
    tcfg = transfer_config(cfg, task_name)
    student = StudentConfig.from_dict(OmegaConf.to_container(cfg.student, resolve=True))
    with RunContext(cfg) as run:
        syn = synthesize(tcfg)
        student = student.with_trainer_kwargs(logger=run.logger or False, default_root_dir=str(run.run_dir))
        module, metrics = train_student(tcfg, syn, student)
        results = {"source_model": tcfg.source_model, "target_model": tcfg.target_model, "task": tcfg.task,
                   "method": student.method, "kl_weight": tcfg.kl_weight, "synthetic": len(syn.accepted),
                   "stats": syn.header.get("stats"), "metrics": metrics,
                   "adapter": str(lp.save_adapter(module, run.run_dir / "adapter")), "cache": tcfg.cache}
        if run.logger is not None:
            stats = {f"transfer/{k}": v for k, v in (syn.header.get("stats") or {}).items() if isinstance(v, float)}
            run.logger.log_metrics({**stats, "transfer/synthetic": float(len(syn.accepted))})
        run.write_results(results)
        _print(results)
        return results


def _print(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Trans-LoRA {results['source_model']} -> {results['target_model']} on {results['task']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted({**results["metrics"], **{k: v for k, v in (results["stats"] or {}).items()
                                                        if isinstance(v, (int, float))}}.items()):
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("synthetic examples", str(results["synthetic"]))
    Console().print(table)


@hydra.main(version_base="1.3", config_path="pkg://lightning_peft.conf", config_name="transfer")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, HydraConfig.get().runtime.choices["task"])
