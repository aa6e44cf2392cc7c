"""Real test accuracy in a calibration run: ``lightning-peft upgrade ... num_test=128``.

An upgrade decides without task data; to check (or calibrate) that decision, a provider who still has the data
asks the upgrade to measure, besides the data-free scores, the real accuracy of the old adapter on the old base and
of every candidate on the new base, on the first ``num_test`` examples of the test split of the task each adapter
recorded (:class:`~lightning_peft.adapter_folder.AdapterRecord`). The measure is :class:`~lightning_peft.module.CausalLMModule`'s
``test/loss`` and ``test/token_acc`` (teacher-forced, completion tokens only), so ``benchmarks/upgrade_fleet.py`` and a
``lightning-peft train`` run report the same number.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.tasks.data import IGNORE_INDEX

__all__ = ["test_accuracy"]


@torch.no_grad()
def test_accuracy(model: nn.Module, tokenizer: Any, task: str, num_test: int,
                  task_kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """Teacher-forced ``loss`` (mean over examples) and ``token_acc`` (over completion tokens) of ``model`` on the
    first ``num_test`` test examples of the packaged ``task``, tokenised with ``tokenizer``.

    Raises:
        ValueError: ``task`` is not a registered task (the message lists them).
    """
    from lightning_peft.tasks import get_task

    kwargs = {**(task_kwargs or {}), "num_train": 8, "num_val": 0, "num_test": num_test}
    datamodule = get_task(task, tokenizer=tokenizer, **kwargs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, examples, right, tokens = 0.0, 0, 0, 0
    for batch in datamodule.test_dataloader():
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        target = labels[:, 1:]  # position t predicts token t + 1
        counted = target != IGNORE_INDEX
        right += int(((out.logits[:, :-1].argmax(-1) == target) & counted).sum())
        tokens += int(counted.sum())
        loss_sum += float(out.loss) * len(ids)  # as Lightning's epoch mean of test/loss, weighted by batch size
        examples += len(ids)
    model.train(was_training)
    return {"loss": loss_sum / max(examples, 1), "token_acc": right / max(tokens, 1)}
