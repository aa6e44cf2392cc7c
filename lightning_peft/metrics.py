"""Small torchmetrics helpers for generation-based evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import ROUGEScore


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends (how answers are compared)."""
    return " ".join(text.split())


class ExactMatch(Metric):
    """Share of predicted strings equal to their references (whitespace-normalised).

    Strings cannot be synced across processes, so the metric keeps two counts, which
    torchmetrics sums over DDP ranks.

    Example:
        >>> m = ExactMatch()
        >>> m.update(["9", " The cat "], ["9", "The  cat"])
        >>> m.update(["10"], ["11"])
        >>> round(float(m.compute()), 4)
        0.6667
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], target: Sequence[str]) -> None:
        """Count matches of one batch.

        Raises:
            ValueError: ``preds`` and ``target`` differ in length or hold non-strings.
        """
        if len(preds) != len(target):
            raise ValueError(
                f"ExactMatch needs one prediction per reference, got {len(preds)} predictions and "
                f"{len(target)} references; pass lists of equal length"
            )
        if not all(isinstance(s, str) for s in (*preds, *target)):
            raise ValueError("ExactMatch compares strings; decode token ids to text before update()")
        self.correct += sum(normalize_whitespace(p) == normalize_whitespace(t) for p, t in zip(preds, target))
        self.total += len(target)

    def compute(self) -> torch.Tensor:
        """Matches / total (0 when nothing was counted)."""
        return self.correct.float() / self.total.clamp(min=1)


class RougeL(ROUGEScore):
    """ROUGE-L F1 (Lin, 2004) of generations against references, as one scalar.

    torchmetrics' ``ROUGEScore`` returns a dict, which ``LightningModule.log`` cannot take as a
    Metric object; this keeps its F-measure. No nltk: only the ``rougeL`` key is computed.

    Example:
        >>> m = RougeL()
        >>> m.update(["the cat sat on mat"], ["the cat sat on the mat"])
        >>> round(float(m.compute()), 4)
        0.9091
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(rouge_keys=("rougeL",), **kwargs)

    def __hash__(self) -> int:
        # ROUGEScore hashes its (empty) states without its id, so two fresh instances collide and
        # nn.Module.named_modules() skips the second one (torchmetrics 1.9): Lightning then cannot
        # find `metrics.test.rougeL` to log it. A module's hash must be unique (Metric.__hash__ says so).
        return id(self)

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        """Mean ROUGE-L F1 over the updates."""
        return super().compute()["rougeL_fmeasure"]
