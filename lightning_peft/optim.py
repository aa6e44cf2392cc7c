"""Give an adapter's parameters their own learning rates inside the user's optimizer.

Methods whose papers train parts at different rates (RoSA: the sparse values at 2/7 of the LoRA
lr; SHiRA: its values at 2.5x the lr LoRA gets) cannot ask the user to write those param groups.
:func:`split_param_groups` splits each of the user's param groups into one group per part,
keeping every other hyperparameter (weight decay, betas, ...), and extends the LR schedulers of
that optimizer to the new groups: ``base_lrs`` take the new lrs and ``LambdaLR`` /
``MultiplicativeLR`` lambdas are copied from the group each part came from, so a warm-up/decay
schedule applies to every part as written. Call it in ``on_fit_start``: Lightning restores a
resumed optimizer's state after it, into the same groups.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

__all__ = ["split_param_groups"]


def split_param_groups(trainer: L.Trainer, parts: dict[int, str], lr_for: Callable[[str, float], float | None]) -> None:
    """Split every optimizer's param groups by part and set each part's lr.

    Args:
        trainer: The trainer whose optimizers and LR schedulers are changed in place.
        parts: ``id(parameter) -> part name``; parameters not named here stay in part ``"other"``.
            Each group becomes ``other`` first, then the parts in name order (only non-empty ones).
        lr_for: ``(part, the group's initial lr) -> the part's lr`` (``None``: keep the group's).
    """
    order = ["other", *sorted(set(parts.values()) - {"other"})]  # fixed: a resumed optimizer gets the same groups
    for optimizer in trainer.optimizers:
        groups, origin = [], []
        for gi, group in enumerate(optimizer.param_groups):
            by_part: dict[str, list[torch.nn.Parameter]] = {part: [] for part in order}
            for p in group["params"]:
                by_part[parts.get(id(p), "other")].append(p)
            for part, params in by_part.items():
                if not params:
                    continue
                new = {k: v for k, v in group.items() if k != "params"}
                new["params"] = params
                lr = None if part == "other" else lr_for(part, group.get("initial_lr", group["lr"]))
                if lr is not None:
                    # keep the scheduler's current factor: lr_now / initial_lr of the original group
                    factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
                    if "initial_lr" in new:
                        new["initial_lr"] = lr
                    new["lr"] = lr * factor
                groups.append(new)
                origin.append(gi)
        if len(groups) == len(optimizer.param_groups) and all(
            g["lr"] == optimizer.param_groups[o]["lr"] for g, o in zip(groups, origin, strict=True)
        ):
            continue
        optimizer.param_groups = groups
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
            if hasattr(scheduler, "lr_lambdas"):
                scheduler.lr_lambdas = [scheduler.lr_lambdas[o] for o in origin]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [g["lr"] for g in groups]
