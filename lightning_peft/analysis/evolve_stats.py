"""Statistics of the Trans-PEFT evaluation protocol (``lightning-peft evolve``, :mod:`lightning_peft.cli.evolve`).

Gu et al., ACL 2025 (arXiv 2506.06844), section 4: four rows per seed (:data:`ROWS`), the recovery
ratio ``(TransPEFT_o->n - Direct_o->n) / (FineTune_n - Direct_o->n)`` (1 = Trans-PEFT closes the whole
transfer gap, 0 = no better than direct transfer), mean and population std over seeds, and exact match
with a 95% Wilson interval, its recovery only where the intervals of Direct transfer and Fine-tune_n do
not overlap (a few dozen answers near zero cannot resolve it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["HEADLINE", "METRICS", "ROWS", "aggregate", "exact_match_resolution", "newer_version", "recovery_ratio",
           "seed_list", "wilson_interval"]

ROWS = ("Fine-tune_o", "Direct transfer o->n", "Trans-PEFT o->n", "Fine-tune_n")
METRICS = ("test/loss", "test/token_acc", "test/exact_match")
HEADLINE = ("test/loss", "test/token_acc")  # metrics whose mean ± std the test split resolves


def newer_version(name: str, update: str = "v2") -> str:
    """``llama-v1`` -> ``llama-v2`` (or ``llama-v2-major`` with ``update="v2-major"``) for zoo names,
    ``smollm2-135m`` -> ``smollm2-135m-v2`` for a real checkpoint with an update (:mod:`lightning_peft.zoo.real_update`).

    Anything else must be given as ``evolve.new``.

    Raises:
        ValueError: ``name`` is not a ``*-v1`` zoo name, or the zoo has no such update of it.
    """
    from lightning_peft import zoo
    from lightning_peft.zoo.real_update import REAL_UPDATES

    real = [u.name for u in REAL_UPDATES.values() if u.base == name and u.name.endswith(f"-{update}")]
    if real:
        return real[0]
    if not (zoo.is_zoo_name(name) and name.endswith("-v1")):
        raise ValueError(f"evolve.new is not set and {name!r} is not a '-v1' zoo name; set evolve.new=<updated base>")
    new = name[: -len("v1")] + update
    if not zoo.is_zoo_name(new):
        raise ValueError(
            f"evolve.update={update!r} names no zoo model ({new!r}); the zoo's updates of a v1 are "
            f"{[v for v in zoo.VERSIONS if v != 'v1']}, or set evolve.new=<updated base>"
        )
    return new


def recovery_ratio(direct: float, trans_peft: float, fine_tune_n: float) -> float | None:
    """(TransPEFT_o->n - Direct_o->n) / (FineTune_n - Direct_o->n); ``None`` when the gap is ~0.

    The formula holds for lower-is-better metrics (loss) too: both differences change sign.
    """
    gap = fine_tune_n - direct
    return None if abs(gap) < 1e-9 else (trans_peft - direct) / gap


def seed_list(seeds: int | Sequence[int], first: int = 0) -> list[int]:
    """``evolve.seeds`` as a list: a count ``n`` means ``first, ..., first + n - 1``; a list is taken as is.

    Raises:
        ValueError: a count below 1, an empty list, repeated or negative seeds.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)) or isinstance(seeds, str):
        raise ValueError(f"evolve.seeds must be a count (e.g. 3) or a list of seeds (e.g. [0,1,2]), got {seeds!r}")
    out = list(range(first, first + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(
            f"evolve.seeds must give at least one distinct non-negative seed, got {seeds!r}; e.g. evolve.seeds=3"
        )
    return out


def aggregate(per_seed: Sequence[dict[str, dict[str, float]]]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Mean and population std over seeds of every ``row -> metric`` value present in all seeds.

    Args:
        per_seed: One ``{row: {metric: value}}`` per seed.

    Returns:
        ``(means, stds)`` with the same ``{row: {metric: value}}`` layout.
    """
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}
    for row in per_seed[0]:
        common = set.intersection(*(set(rows[row]) for rows in per_seed))
        values = {m: [rows[row][m] for rows in per_seed] for m in sorted(common)}
        means[row] = {m: statistics.fmean(v) for m, v in values.items()}
        stds[row] = {m: statistics.pstdev(v) for m, v in values.items()}
    return means, stds


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``rate`` observed on ``n`` trials (``(0, 1)`` for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def exact_match_resolution(means: dict[str, dict[str, float]], n_answers: int) -> dict[str, Any]:
    """Wilson intervals of every row's exact match and whether Direct vs Fine-tune_n is resolved."""
    metric = "test/exact_match"
    if not all(metric in r for r in means.values()):
        return {}
    ci = {row: wilson_interval(means[row][metric], n_answers) for row in ROWS}
    direct, upper = ci[ROWS[1]], ci[ROWS[3]]
    resolved = direct[1] < upper[0] or upper[1] < direct[0]
    return {"answers": n_answers, "ci95": ci, "resolved": resolved}
