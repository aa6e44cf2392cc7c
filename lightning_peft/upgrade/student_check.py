"""Stop a Trans-LoRA student that cannot pass the upgrade's check, before its training is spent.

A student is trained only to be scored against the old base + old adapter at the end; a rejected one
is the costliest waste of an upgrade (the issue that asked for this: a SQL adapter's student ran 22
minutes, about 60x its own training, and was then rejected). :class:`StudentCheck` scores the student
``checks`` times at evenly spaced steps with the same check the fleet decides on, and stops it once the
straight line through its last two scores, continued to the last step, misses every pass line
(``agreement >= threshold`` or ``fidelity >= min_fidelity``, and ``kl <= max_kl`` when set). Learning
curves flatten, so that line overestimates the final score: a student it stops would not have passed,
up to the noise of scoring on a few dozen inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

__all__ = ["PassLine", "StudentCheck", "passes"]

PassLine = tuple[str, float, int]
"""``(score key, target, sign)``: passed when ``sign * (score[key] - target) >= 0`` (sign +1: at least, -1: at most)."""


def passes(score: dict[str, Any], line: PassLine) -> bool:
    """Whether ``score`` reaches ``line`` (an undefined score does not)."""
    key, target, sign = line
    return score.get(key) is not None and sign * (score[key] - target) >= 0


class StudentCheck(L.Callback):
    """Score a student ``checks`` times while it trains; stop it when no pass line can be reached by its last step.

    Args:
        score: ``score(model, tokenizer) -> {"agreement": ..., "fidelity": ..., "kl": ...}`` (the fleet's check).
        lines: The pass lines (:data:`PassLine`); the student passes when it reaches any of them.
        checks: How many checks, at steps ``total * i / (checks + 1)``; the first decision is at the second.

    Attributes:
        history: ``(step, score)`` of every check so far.
        stopped: Why the student was stopped (``None``: it was not).
    """

    def __init__(self, score: Callable[[nn.Module, Any], dict[str, Any]], lines: Sequence[PassLine],
                 checks: int = 3) -> None:
        self.score, self.lines, self.checks = score, list(lines), checks
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.stopped: str | None = None
        self._at: set[int] = set()
        self._total = 0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)
        self._at = {round(self._total * i / (self.checks + 1)) for i in range(1, self.checks + 1)} - {0, self._total}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step not in self._at or (self.history and self.history[-1][0] == step):
            return
        model = pl_module.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.history.append((step, self.score(model, pl_module.tokenizer)))
        model.train(was_training)
        if len(self.history) >= 2 and not any(self._reachable(line) for line in self.lines):
            trainer.should_stop = True
            self.stopped = f"stopped at step {step} of {self._total}: " + "; ".join(self._projection(line) for line in self.lines)

    def _projected(self, key: str) -> float | None:
        (s0, a), (s1, b) = self.history[-2:]
        if a.get(key) is None or b.get(key) is None:
            return None
        return b[key] + (b[key] - a[key]) / (s1 - s0) * (self._total - s1)

    def _reachable(self, line: PassLine) -> bool:
        value = self._projected(line[0])
        return value is None or passes({line[0]: value}, line)  # an undefined score cannot rule a student out

    def _projection(self, line: PassLine) -> str:
        key, target, sign = line
        now, value = self.history[-1][1].get(key), self._projected(key)
        return f"{key} {now:.3f} now, {value:.3f} projected at the end {'<' if sign > 0 else '>'} {target}"
