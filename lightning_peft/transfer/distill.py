"""Token-level distillation for Trans-LoRA when teacher and student share a vocabulary.

Trans-LoRA (Wang et al. 2024, section 3.3) distils on the teacher's *generated* completions
(sequence-level: works across tokenizers). When the source and the target tokenize alike (same
family, v1 -> v2), the teacher's full next-token distribution is available too, and
:class:`DistillationModule` adds Hinton et al.'s (2015) soft-target term on the completion
tokens::

    loss = CE(student, teacher's completion) + kl_weight * tau^2 * KL(p_teacher^tau || p_student^tau)

with ``p^tau = softmax(logits / tau)``, logits ``(B, T, V)`` shifted like the LM loss and the KL
averaged over the completion tokens (``labels != -100``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_peft.module import IGNORE_INDEX, CausalLMModule

__all__ = ["DistillationModule", "check_same_vocabulary", "token_kl"]


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(teacher || student)`` per completion token, averaged.

    Args:
        student_logits, teacher_logits: ``(B, T, V)`` logits over the same vocabulary.
        labels: ``(B, T)`` LM labels; position ``t`` predicts ``labels[:, t + 1]`` and counts
            when that label is not ``-100``.
        temperature: Softening ``tau > 0``.

    Returns:
        A scalar (0 when no position counts).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"token_kl needs logits of one shape, got student {tuple(student_logits.shape)} and "
                         f"teacher {tuple(teacher_logits.shape)}; teacher and student must share the vocabulary.")
    keep = labels[:, 1:] != IGNORE_INDEX
    s = F.log_softmax(student_logits[:, :-1][keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1][keep].float() / temperature, dim=-1)
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any, teacher: str, student: str) -> None:
    """Raise unless both tokenizers map every token string to the same id."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"token-level KL needs one vocabulary, but {teacher!r} and {student!r} tokenize differently "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); set kl_weight=0 to distil on the "
            "teacher's generated completions only (works across tokenizers)."
        )


class DistillationModule(CausalLMModule):
    """:class:`CausalLMModule` whose training loss adds the teacher's token-level KL.

    Args:
        teacher: ``(model, tokenizer)`` of the source base with its adapter; kept frozen, in eval
            mode and out of this module's ``state_dict`` and optimizer.
        kl_weight: Weight of the KL term (``> 0``).
        kl_temperature: Softening ``tau``.
        **kwargs: :class:`CausalLMModule` arguments (``model=`` the target).
    """

    def __init__(self, teacher: tuple[torch.nn.Module, Any], kl_weight: float = 1.0, kl_temperature: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for saved in (self._hparams, self._hparams_initial):  # save_hyperparameters saw it: a model, not an hparam
            saved.pop("teacher", None)
        if kl_weight <= 0 or kl_temperature <= 0:
            raise ValueError(f"DistillationModule needs kl_weight > 0 and kl_temperature > 0, got {kl_weight} and "
                             f"{kl_temperature}; use CausalLMModule for sequence-level distillation only.")
        model, tokenizer = teacher
        self._teacher = [model.eval().requires_grad_(False)]  # a list: not a submodule, never saved or optimised
        self.teacher_tokenizer = tokenizer
        self.kl_weight, self.kl_temperature = kl_weight, kl_temperature

    def configure_model(self) -> None:
        super().configure_model()
        check_same_vocabulary(self.teacher_tokenizer, self.tokenizer, "the teacher", str(self.hparams.get("model")))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._teacher[0].to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """CE on the teacher's completion plus ``kl_weight`` times the token KL; logs both."""
        out = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.no_grad():
            teacher_logits = self._teacher[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl = token_kl(out.logits, teacher_logits, batch["labels"], self.kl_temperature)
        n = len(batch["input_ids"])
        self.log("train/ce", out.loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/kl", kl, on_step=True, on_epoch=False, batch_size=n)
        loss = out.loss + self.kl_weight * kl
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        return loss
