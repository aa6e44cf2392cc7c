"""What a Trans-LoRA transfer is asked to do: :class:`TransferConfig`, and the student's :class:`StudentConfig`.

Both are mirrored by ``conf/transfer.yaml`` (``lightning-peft transfer``); the fleet upgrade
(``conf/upgrade.yaml``) fills a :class:`TransferConfig` per adapter and shares :class:`StudentConfig`.
What the source adapter's folder holds (its discriminator, the training-set size) is read through
:class:`~lightning_peft.adapter_folder.AdapterFolder`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from lightning_peft.adapter_folder import AdapterFolder

__all__ = ["StudentConfig", "TransferConfig", "adapter_fingerprint", "discriminator_folder", "resolve_num_synthetic"]


@dataclass
class TransferConfig:
    """What to transfer where; mirrored by ``conf/transfer.yaml``.

    Attributes:
        source_model: Base the adapter was trained on (zoo name, folder or Hub name).
        source_adapter: The trained adapter folder (peft format).
        target_model: The new base.
        task: Task name (``lightning_peft.tasks.TASKS``): seeds come from its training split,
            the evaluation from its test split; the training data is otherwise never read. With
            ``seeds`` given it is only the name the prompts use (any string).
        seeds: The real inputs shown to the generator (default: the first ``num_seeds`` training
            inputs of ``task``); an adapter's recorded seeds (:mod:`lightning_peft.upgrade`).
        discriminator: Discriminator adapter folder (default: the source adapter's own,
            :attr:`~lightning_peft.AdapterFolder.discriminator`); not needed with ``filter=False`` (the
            "unfiltered" ablation).
        generator: Model that writes new inputs (default: ``target_model``, as in the paper).
        num_seeds: Real inputs shown to the generator (paper: 5); fewer are used when they do
            not fit the generator's context, with a warning.
        num_synthetic: Synthetic examples to keep; default: the size of the original training set
            (as in the paper), as the source adapter records it (:attr:`~lightning_peft.AdapterFolder.train_size`).
        filter: Keep only what the discriminator accepts.
        anchor_format: Start every synthesised input with the seeds' common opening and end it
            with their common ending (:class:`~lightning_peft.transfer.synthesis.SeedFormat`;
            ours, not in the paper: see ``benchmarks/README.md`` for what it changes). When the
            first ``ANCHOR_PROBE_BATCHES`` generate calls of anchored items yield no accepted input,
            synthesis goes on with the paper's free continuation (logged, and recorded in the
            synthetic set's ``stats.anchor_fallback``).
        max_proposed: Give up after scoring this many proposals (default ``50 * num_synthetic``);
            sampling stops after ``4 * max_proposed / generate_batch_size`` generate calls too.
        temperature, top_p, generate_batch_size, max_new_tokens: Generator sampling.
        label_max_new_tokens: Teacher's greedy completion length.
        seed: Sampling seed (the same seed regenerates the same set).
        generator_context: Token budget of the generator's prompt + completion (default: its
            ``max_position_embeddings``). Raise it only for RoPE models, which run past it.
        cache: JSONL path of the synthetic set (default: none, nothing cached).
        kl_weight: Weight of the token-level KL to the teacher in the student's loss (0: off,
            sequence-level distillation only). Needs source and target to share a vocabulary.
        kl_temperature: Softening of that KL.
        warm_start: Start the student from the source adapter itself when it fits the target's
            shapes (a same-family update), instead of a fresh adapter; a target it does not fit
            gets a fresh one. Ours, not in the paper (which transfers across families): the
            synthetic data then only has to correct the drift, not teach the task from scratch.
        warm_lr, warm_steps: Peak learning rate and steps of a warm-started student (``None``: the
            student's own ``lr`` and ``max_steps``). Lower and fewer than a fresh student's: at a fresh
            student's 5e-3 / 300 steps it drifts away from what the source adapter knew
            (``benchmarks/README.md``, Trans-LoRA ablations).
    """

    source_model: str
    source_adapter: str
    target_model: str
    task: str
    discriminator: str | None = None
    generator: str | None = None
    seeds: list[str] | None = None
    num_seeds: int = 5
    num_synthetic: int | None = None
    filter: bool = True
    anchor_format: bool = True
    max_proposed: int | None = None
    temperature: float = 1.0
    top_p: float = 0.95
    generate_batch_size: int = 16
    max_new_tokens: int = 64
    label_max_new_tokens: int = 64
    seed: int = 0
    generator_context: int | None = None
    cache: str | None = None
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    warm_start: bool = True
    warm_lr: float | None = 5e-4
    warm_steps: int | None = 100
    task_kwargs: dict[str, Any] = field(default_factory=dict)

    def proposal_limit(self, wanted: int) -> int:
        """Most proposals scored to keep ``wanted`` more examples: ``max_proposed``, by default ``50 * wanted``."""
        return self.max_proposed or 50 * wanted


@dataclass
class StudentConfig:
    """The adapter a Trans-LoRA student trains on the target (``student:`` in ``conf/transfer.yaml`` and
    ``conf/upgrade.yaml``).

    Attributes:
        method: A registered method (``lora``, ``rosa``, ``shira``, ...); ``None``: the upgrade uses the
            adapter's own, a transfer ``lora``.
        method_kwargs: That method's arguments.
        module_kwargs: :class:`~lightning_peft.module.CausalLMModule` arguments (``lr``, ...).
        trainer_kwargs: ``lightning.Trainer`` arguments (``max_steps``, ...).
        data_kwargs: :class:`~lightning_peft.tasks.ExamplesDataModule` arguments (``batch_size``, ...).
    """

    method: str | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    def with_trainer_kwargs(self, **kwargs: Any) -> StudentConfig:
        """This student with ``kwargs`` added to its ``trainer_kwargs`` (e.g. a command's logger and run folder)."""
        return replace(self, trainer_kwargs={**self.trainer_kwargs, **kwargs})

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> StudentConfig:
        """From a config section; unknown keys fail naming the known ones.

        Raises:
            ValueError: a key that is no :class:`StudentConfig` field.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise ValueError(f"student settings {unknown} are unknown; the student takes {sorted(known)}")
        return cls(**{k: v if v is not None or k == "method" else {} for k, v in (values or {}).items()})


def adapter_fingerprint(folder: str | os.PathLike[str]) -> str:
    """sha256 of the adapter folder's weight file (first 16 hex digits)."""
    return AdapterFolder(folder).fingerprint()


def discriminator_folder(cfg: TransferConfig) -> AdapterFolder | None:
    """``cfg.discriminator``, or the source adapter's own (``None`` when it has none)."""
    return AdapterFolder(cfg.discriminator) if cfg.discriminator else AdapterFolder(cfg.source_adapter).discriminator


def resolve_num_synthetic(cfg: TransferConfig) -> int:
    """``cfg.num_synthetic``, or the source's training-set size: recorded with the source adapter, else with its
    discriminator (``TransLoRADiscriminator`` writes it there).

    Raises:
        ValueError: neither is known (no record, no discriminator, or one saved without the size).
    """
    if cfg.num_synthetic is not None:
        return cfg.num_synthetic
    disc = discriminator_folder(cfg)
    size = AdapterFolder(cfg.source_adapter).record.train_size or (
        disc.metadata.get("train_size") if disc is not None and disc.exists else None)
    if not size:
        raise ValueError(
            f"num_synthetic is not set and {cfg.source_adapter} records no training set size (UpgradeRecord and "
            "TransLoRADiscriminator write it); pass num_synthetic=N, e.g. the number of examples the source adapter "
            "was trained on."
        )
    return int(size)
