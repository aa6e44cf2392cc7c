"""Train the Trans-LoRA discriminator: the source base plus a LoRA answering "is this real?".

Wang et al. 2024, section 3.1: while the task data is still available, a LoRA on the source
model learns ``max log p(yes | t(x_real)) + log p(no | t(x_syn))`` with ``x_syn`` synthesised by
the source model. It is trained here with the same pieces as any task (``CausalLMModule``, the
``LoRA`` callback, Lightning's ``Trainer``) and saved with :func:`lightning_peft.save_adapter`
next to the source adapter, so the transfer later needs no task data at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_peft.adapter_folder import AdapterRecord
from lightning_peft.adapter_io import save_adapter
from lightning_peft.methods.lora import LoRA
from lightning_peft.module import CausalLMModule
from lightning_peft.tasks.base import PromptCompletionDataModule
from lightning_peft.tasks.examples import ExamplesDataModule
from lightning_peft.transfer.models import completion_margins, discriminator_examples

__all__ = ["TransLoRADiscriminator", "discriminator_accuracy", "train_discriminator"]


def train_discriminator(
    source_model: str | os.PathLike[str],
    real: Sequence[str],
    synthetic: Sequence[str],
    task_name: str,
    out_dir: str | os.PathLike[str],
    *,
    r: int = 8,
    lr: float = 1e-3,
    max_steps: int = 100,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[CausalLMModule, Path]:
    """Train a yes/no LoRA on the source model and save it to ``out_dir`` (peft folder format).

    Args:
        source_model: Zoo name, folder or Hub name of the source base.
        real: Real task inputs (answer " yes").
        synthetic: Inputs synthesised by the source model (answer " no").
        task_name: Named in the discriminator prompt ``t(x)``.
        out_dir: Where the adapter folder is written (atomically).
        r, lr, max_steps, batch_size, max_length: LoRA rank and training settings.
        seed: Seeds Lightning (``seed_everything``) and the data order.
        trainer_kwargs: Extra ``lightning.Trainer`` arguments.
        metadata: Stored with the adapter (:func:`~lightning_peft.save_adapter`), e.g.
            ``{"train_size": 500}``, the transfer's default synthetic-set size.

    Returns:
        The trained module (its ``.model`` holds the discriminator) and the adapter folder.

    Raises:
        ValueError: ``real`` or ``synthetic`` is empty.
    """
    if not real or not synthetic:
        raise ValueError(
            f"train_discriminator needs real and synthetic inputs, got {len(real)} real and {len(synthetic)} synthetic; "
            "synthesise inputs with sample_candidates from the source model first."
        )
    L.seed_everything(seed, workers=True, verbose=False)
    module = CausalLMModule(model=str(source_model), lr=lr, warmup_steps=min(10, max_steps // 10),
                            generate_on_val=False)
    data = ExamplesDataModule(str(source_model), discriminator_examples(real, synthetic, task_name),
                              batch_size=batch_size, max_length=max_length, shuffle_seed=seed)
    kw: dict[str, Any] = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
                          "enable_model_summary": False, "max_steps": max_steps}
    kw.update(trainer_kwargs or {})
    callbacks: list[L.Callback] = [LoRA(r=r, alpha=2 * r, adapter_name="default")]
    if kw.get("enable_progress_bar", True):
        # tqdm, not rich: this Trainer may run inside another fit (TransLoRADiscriminator.on_fit_end) whose
        # RichProgressBar holds the console's live display; a second rich bar would unbalance its stack and
        # crash the outer fit's teardown ("pop from empty list") before the source adapter is saved.
        callbacks.append(TQDMProgressBar(leave=False))
    L.Trainer(callbacks=callbacks, **kw).fit(module, data)
    return module, save_adapter(module, out_dir, metadata=metadata)


def discriminator_accuracy(module: CausalLMModule, real: Sequence[str], synthetic: Sequence[str],
                           task_name: str) -> float:
    """Share of ``real`` scored ``> 0`` and ``synthetic`` scored ``<= 0`` by the discriminator."""
    tok = module.tokenizer
    m_real = completion_margins(module.model, tok, real, task_name)
    m_syn = completion_margins(module.model, tok, synthetic, task_name)
    correct = int((m_real > 0).sum()) + int((m_syn <= 0).sum())
    return correct / max(1, len(real) + len(synthetic))



class TransLoRADiscriminator(L.Callback):
    """After the source adapter is trained, train and save its Trans-LoRA discriminator.

    ``Trainer(callbacks=[LoRA(...), TransLoRADiscriminator("out/adapter-discriminator")])``:
    at the end of ``fit`` it takes ``num_real`` real inputs from the datamodule's training
    split, lets the source *base* (adapters switched off by
    :func:`~lightning_peft.transfer.models.adapters_disabled`, as the target base will generate
    later) synthesise as many inputs from a numbered list of ``num_seeds`` of them
    (:func:`~lightning_peft.transfer.models.sample_candidates`), and trains the yes/no LoRA on the
    source base (:func:`train_discriminator`), recording the training set's size with it (the
    transfer's default ``num_synthetic``). The task data is needed only here, while it is still
    available (Wang et al. 2024, section 3.1). Its :attr:`record` hands the folder to
    ``save_adapter(..., record=)``, which copies it into the adapter folder (``discriminator/``).

    Args:
        out_dir: Where the discriminator adapter folder is written (``lightning-peft train
            experiment=translora_source``: ``adapter-discriminator`` beside the run's ``adapter``).
        task_name: Named in the prompts (default: the datamodule's ``task_name``).
        num_real: Real inputs used (and synthetic inputs made).
        num_seeds: Seeds shown to the source model when synthesising.
        max_new_tokens: Most tokens per synthesised input.
        anchor_format: Synthesise as the transfer does by default (the seeds' common opening
            and ending, :class:`~lightning_peft.transfer.synthesis.SeedFormat`), so the
            discriminator learns to tell real inputs from well-formed synthetic ones.
        **train_kwargs: Passed to :func:`train_discriminator` (``r``, ``lr``, ``max_steps``, ...).
    """

    def __init__(self, out_dir: str | os.PathLike[str], task_name: str | None = None, num_real: int = 64,
                 num_seeds: int = 5, max_new_tokens: int = 64, anchor_format: bool = True, **train_kwargs: Any) -> None:
        self.out_dir, self.task_name, self.anchor_format = Path(out_dir), task_name, anchor_format
        self.num_real, self.num_seeds, self.max_new_tokens = num_real, num_seeds, max_new_tokens
        self.train_kwargs = train_kwargs
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_peft.transfer.filtering import rejection_sample
        from lightning_peft.transfer.models import adapters_disabled, sample_candidates

        dm = trainer.datamodule
        if not isinstance(dm, PromptCompletionDataModule):
            raise TypeError(
                f"TransLoRADiscriminator needs a PromptCompletionDataModule to read real inputs from, got "
                f"{type(dm).__name__}; pass the task's datamodule to trainer.fit, or call train_discriminator yourself."
            )
        if not trainer.is_global_zero:
            return
        task = self.task_name or dm.task_name
        real = [e.prompt for e in dm.get_examples()["train"][: self.num_real]]
        model, tok = pl_module.model, dm.tokenizer
        batch = min(16, len(real))
        stream = sample_candidates(model, tok, real[: self.num_seeds], task, max_new_tokens=self.max_new_tokens,
                                   batch_size=batch, max_batches=max(4, 8 * len(real) // batch),
                                   anchor_format=self.anchor_format)
        with adapters_disabled(model):  # the source base synthesises (the stream is lazy: consume it here)
            fake = rejection_sample(stream, lambda b: torch.ones(len(b)), len(real), max_proposed=20 * len(real)).kept
        source = getattr(model, "name_or_path", None) or model.config._name_or_path
        size = {"train_size": len(dm.get_examples()["train"])}  # the transfer makes as many synthetic examples
        _, self.path = train_discriminator(source, real, fake, task, self.out_dir, metadata=size, **self.train_kwargs)

    @property
    def record(self) -> AdapterRecord | None:
        """The discriminator as part of the adapter's record (``save_adapter(..., record=)`` copies it into the
        adapter folder); ``None`` before it is trained."""
        return AdapterRecord(discriminator=str(self.path)) if self.path is not None else None
