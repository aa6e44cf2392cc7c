"""Rejection sampling through the discriminator, and the MMD that says how real the kept data looks.

Trans-LoRA (Wang et al. 2024, section 3.3): keep a synthetic input ``x`` iff the discriminator
says ``p(yes | t(x)) > p(no | t(x))``; draw until ``|D_syn|`` reaches the requested count and
log the acceptance rate. The paper checks that filtered data is closer to the real data with
the MMD of sentence embeddings (0.21-0.72 filtered vs 0.77-1.31 unfiltered); here the
embeddings are mean-pooled hidden states of a model of the user's choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = ["FilterResult", "mmd_rbf", "rejection_sample"]


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD between samples ``x`` ``(n, d)`` and ``y`` ``(m, d)``, Gaussian kernel.

    ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``; ``h`` defaults to the median pairwise distance of
    the pooled sample (the median heuristic). Unbiased (Gretton et al. 2012, eq. 3): the
    diagonal terms are left out, so two samples of one distribution give values around 0
    (slightly negative is possible).

    Args:
        x: ``(n, d)`` with ``n >= 2``.
        y: ``(m, d)`` with ``m >= 2``.
        bandwidth: ``h``; ``None`` for the median heuristic.

    Returns:
        ``MMD^2`` as a float.

    Raises:
        ValueError: fewer than 2 rows in a sample, or different feature sizes.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(
            f"mmd_rbf needs two (n, d) samples with n >= 2 and the same d, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    x, y = x.double(), y.double()
    pooled = torch.cat([x, y])  # (n + m, d)
    d2 = torch.cdist(pooled, pooled).pow(2)  # (n + m, n + m)
    if bandwidth is None:
        off = d2[~torch.eye(len(pooled), dtype=torch.bool)]
        bandwidth = math.sqrt(max(float(off.median()), 1e-12))
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


@dataclass
class FilterResult:
    """What :func:`rejection_sample` kept and how it got there.

    Attributes:
        kept: Accepted inputs, in the order they were accepted (``len == target`` unless the
            proposals ran out).
        kept_scores: ``log p(yes) - log p(no)`` of each kept input (``> 0``).
        rejected: Inputs the discriminator refused.
        rejected_scores: Their scores (``<= 0``).
        proposed: Inputs scored (kept + rejected).
    """

    kept: list[str] = field(default_factory=list)
    kept_scores: list[float] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)

    @property
    def proposed(self) -> int:
        return len(self.kept) + len(self.rejected)

    @property
    def acceptance_rate(self) -> float:
        """Kept / scored (``nan`` before anything was scored)."""
        return len(self.kept) / self.proposed if self.proposed else float("nan")


def rejection_sample(
    proposals: Iterator[list[str]],
    score: Callable[[Sequence[str]], torch.Tensor],
    target: int,
    *,
    max_proposed: int | None = None,
    progress: bool = True,
) -> FilterResult:
    """Score batches of proposals and keep those with ``score > 0`` until ``target`` are kept.

    Args:
        proposals: Yields batches of candidate inputs (already parsed and de-duplicated).
        score: ``(B,)`` discriminator margins ``log p(yes) - log p(no)`` for a batch.
        target: How many to keep; the last batch is cut so exactly ``target`` are kept.
        max_proposed: Stop after scoring this many (default ``50 * target``) even if short.
        progress: Show a tqdm bar of kept inputs.

    Returns:
        A :class:`FilterResult`; ``len(result.kept) < target`` only when the proposals ran out
        or ``max_proposed`` was reached (the caller decides whether that is an error).

    Raises:
        ValueError: ``target < 1``, or ``score`` returned the wrong shape.
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"rejection_sample: target must be an int >= 1 (examples to keep), got {target!r}.")
    max_proposed = 50 * target if max_proposed is None else max_proposed
    result = FilterResult()
    bar = tqdm(total=target, desc="filter (kept)", disable=not progress)
    for batch in proposals:
        if not batch:
            continue
        margins = score(batch)
        if margins.shape != (len(batch),):
            raise ValueError(f"score returned shape {tuple(margins.shape)} for a batch of {len(batch)}; return (B,) margins.")
        for text, m in zip(batch, margins.tolist()):
            if len(result.kept) == target or result.proposed >= max_proposed:
                break
            if m > 0:
                result.kept.append(text)
                result.kept_scores.append(m)
                bar.update(1)
            else:
                result.rejected.append(text)
                result.rejected_scores.append(m)
        bar.set_postfix(proposed=result.proposed, acceptance=f"{result.acceptance_rate:.2f}")
        if len(result.kept) == target or result.proposed >= max_proposed:
            break
    bar.close()
    return result
