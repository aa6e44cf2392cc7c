"""Loading the bases the drift analysis compares, and scoring a causal LM on task batches."""

from __future__ import annotations

import torch
from torch import nn

from lightning_peft.model_loader import ModelLoader

__all__ = ["evaluate_lm", "load_base"]


def load_base(name: str) -> nn.Module:
    """A zoo name / local folder / Hub name as an eval-mode causal LM with eager attention."""
    return ModelLoader(tokenizer=False, attn_implementation="eager").load(name)[0]


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean completion loss and next-token accuracy over ``batches`` (``labels`` -100 = ignored)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        logits, target = logits[:, :-1].float(), batch["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
        valid = target != -100
        total_loss += float(torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="sum"))
        correct += int((logits.argmax(-1) == target)[valid].sum())
        count += int(valid.sum())
    return {"loss": total_loss / max(count, 1), "token_acc": correct / max(count, 1)}
