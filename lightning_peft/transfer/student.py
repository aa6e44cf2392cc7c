"""The Trans-LoRA student: a fresh (or warm-started) adapter on the target, trained on the synthetic pairs.

Wang et al. 2024 (arXiv 2405.17258), section 3.3: sequence-level distillation on the teacher's
completions (tokenizers may differ), through the user's choice of adapter method
(:class:`~lightning_peft.transfer.config.StudentConfig`), evaluated on the task's real test split.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L

from lightning_peft.adapter_io import AdapterFormatError, BaseModelMismatchWarning, load_adapter
from lightning_peft.model_loader import ModelLoader
from lightning_peft.module import CausalLMModule
from lightning_peft.registry import create_method
from lightning_peft.tasks import get_task
from lightning_peft.tasks.data import Example
from lightning_peft.tasks.examples import ExamplesDataModule
from lightning_peft.transfer.config import StudentConfig, TransferConfig
from lightning_peft.transfer.provenance import SyntheticSet

__all__ = ["synthetic_examples", "train_student", "warm_start_from"]

log = logging.getLogger(__name__)


def synthetic_examples(records: list[dict[str, Any]]) -> list[Example]:
    """Training examples of accepted synthetic records: the input, then the teacher's completion."""
    return [Example(r["input"], " " + (r["output"] or "").strip(), (r["output"] or "").strip()) for r in records]


def warm_start_from(module: L.LightningModule, adapter: str) -> bool:
    """Load ``adapter`` trainable into ``module`` (built first) when it fits its shapes; ``False`` if not.

    The base mismatch warning is expected here (the adapter comes from the old base) and is
    not shown; the model is left unchanged when the shapes differ.
    """
    module.configure_model()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseModelMismatchWarning)
            load_adapter(module, adapter, is_trainable=True)
    except AdapterFormatError as exc:
        log.info("Trans-LoRA: the source adapter does not fit the target (%s); the student starts fresh", exc)
        return False
    return True


def train_student(cfg: TransferConfig, syn: SyntheticSet, student: StudentConfig | None = None, *legacy_args: Any,
                  test: bool = True, callbacks: Sequence[L.Callback] = (), **legacy: Any,
                  ) -> tuple[L.LightningModule, dict[str, float]]:
    """Train an adapter on ``cfg.target_model`` with the synthetic pairs; test on real data.

    With ``test=False`` no real data is read at all (the upgrade's data-free route): the metrics
    are empty and the examples' length comes from ``data_kwargs``/``cfg.task_kwargs``
    (``max_length``, default 128).

    The loss is the LM loss on the teacher's completions, plus the teacher's token-level KL when
    ``cfg.kl_weight > 0`` (:class:`~lightning_peft.transfer.distill.DistillationModule`).

    Args:
        cfg: The transfer.
        syn: The synthetic set (its accepted records are trained on).
        student: The student's method and training settings (default: ``lora`` with its defaults).
        test: Test on the task's real test split afterwards.
        callbacks: More callbacks for the student's trainer (the upgrade's :class:`~lightning_peft.upgrade.StudentCheck`).
        *legacy_args, **legacy: Deprecated (one release): the former ``method, method_kwargs, module_kwargs,
            trainer_kwargs, data_kwargs, test`` arguments, positional or by name.

    Returns:
        The trained module and the test metrics (``test/exact_match``, ``test/loss``, ...).

    Raises:
        ValueError: the synthetic set has no accepted examples.
    """
    if legacy_args or legacy or isinstance(student, str):
        student, test = _legacy_student(student, legacy_args, legacy, test)
    student = student or StudentConfig()
    train = synthetic_examples(syn.accepted)
    if not train:
        raise ValueError("the synthetic set has no accepted examples; raise num_synthetic or check the filter.")
    data = _student_data(cfg, train, student, test)
    module = _student_module(cfg, student)
    kw: dict[str, Any] = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False}
    kw.update(student.trainer_kwargs)
    warm = cfg.warm_start and warm_start_from(module, cfg.source_adapter)
    if warm:  # it continues a trained adapter: a gentler schedule than a fresh one's
        module.hparams.lr = cfg.warm_lr or module.hparams.lr
        kw["max_steps"] = cfg.warm_steps or kw.get("max_steps", -1)
    method = [] if warm else [create_method(student.method or "lora", **student.method_kwargs)]
    trainer = L.Trainer(callbacks=[*method, *callbacks], **kw)
    trainer.fit(module, data)
    if not test:
        return module, {}
    metrics = trainer.test(module, data, verbose=False)[0]
    return module, {k: float(v) for k, v in metrics.items()}


_LEGACY_ORDER = ("method", "method_kwargs", "module_kwargs", "trainer_kwargs", "data_kwargs", "test")


def _legacy_student(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any], test: bool) -> tuple[StudentConfig, bool]:
    """The :class:`StudentConfig` (and ``test``) of a call in the former signature, with a ``DeprecationWarning``."""
    warnings.warn("train_student(cfg, syn, method, method_kwargs, ...) is deprecated and goes in the next release: "
                  "pass train_student(cfg, syn, StudentConfig(method=..., ...), test=...)", DeprecationWarning, stacklevel=3)
    values = {**dict(zip(_LEGACY_ORDER, (method, *args))), **kwargs}
    return StudentConfig.from_dict({k: v for k, v in values.items() if k != "test"}), values.get("test", test)


def _student_data(cfg: TransferConfig, train: list[Example], student: StudentConfig, test: bool) -> ExamplesDataModule:
    """The synthetic pairs to train on, and (``test``) the task's real test split scored by the task's own rule."""
    if not test:  # a teacher's label can run away (and grow under another tokenizer): such examples are left out
        length = cfg.task_kwargs.get("max_length", 128)
        return ExamplesDataModule(cfg.target_model, train, **{"max_length": length, "truncation": "drop",
                                                              **student.data_kwargs})
    task = get_task(cfg.task, tokenizer=cfg.target_model, **cfg.task_kwargs)
    data = ExamplesDataModule(cfg.target_model, train, test=task.get_examples()["test"],
                              **{"max_length": task.max_length, **student.data_kwargs})
    data.extract_answer = task.extract_answer  # type: ignore[method-assign]  (the task's own scoring)
    return data


def _student_module(cfg: TransferConfig, student: StudentConfig) -> CausalLMModule:
    """The target model to train, with the teacher's token-level KL when ``cfg.kl_weight > 0`` (same vocabulary only;
    checked in ``configure_model``)."""
    if cfg.kl_weight <= 0:
        return CausalLMModule(model=cfg.target_model, **student.module_kwargs)
    from lightning_peft.transfer.distill import DistillationModule

    teacher = ModelLoader().load(cfg.source_model, cfg.source_adapter)
    return DistillationModule(teacher, cfg.kl_weight, cfg.kl_temperature, model=cfg.target_model, **student.module_kwargs)

