"""A time budget with a stopwatch per phase: where a long job's seconds go, and when it has to stop.

The fleet upgrade gives each adapter one (``UpgradeConfig.time_budget``) and reports its phases
(synthesis, labelling, student, scoring); the Trans-LoRA synthesis stops proposing when it runs out::

    budget = TimeBudget(600.0)
    with budget.phase("synthesis"):
        ...                       # budget.expired() turns True once 600 s have passed since it was made
    budget.seconds                # {"synthesis": 12.3}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["TimeBudget"]


class TimeBudget:
    """``limit`` seconds from now (``None``: no limit), and the seconds spent in each named phase.

    Attributes:
        limit: The budget in seconds, or ``None``.
        seconds: Seconds spent per phase (a phase entered twice adds up; nested phases each count their own).
        ran_out: The phase during which the budget was first found spent (``None`` while it lasts).

    Raises:
        ValueError: ``limit`` is not a positive number.
    """

    def __init__(self, limit: float | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise ValueError(f"a time budget is a number of seconds > 0 or None (no limit), got {limit!r}")
        self.limit, self._clock = limit, clock
        self._start = clock()
        self._current: list[str] = []
        self.seconds: dict[str, float] = {}
        self.ran_out: str | None = None

    @property
    def elapsed(self) -> float:
        """Seconds since the budget was made."""
        return self._clock() - self._start

    def left(self) -> float | None:
        """Seconds left (never below 0), ``None`` without a limit."""
        return None if self.limit is None else max(0.0, self.limit - self.elapsed)

    def expired(self) -> bool:
        """Whether the limit has passed; the first time it is found so, the current phase is kept in ``ran_out``."""
        if self.limit is None or self.elapsed < self.limit:
            return False
        if self.ran_out is None:
            self.ran_out = self._current[-1] if self._current else "between phases"
        return True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the seconds of the ``with`` block to ``name``."""
        start = self._clock()
        self._current.append(name)
        try:
            yield
        finally:
            self._current.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + self._clock() - start

    def summary(self) -> dict[str, float]:
        """The seconds per phase, rounded to 0.1 s (what a report shows)."""
        return {k: round(v, 1) for k, v in self.seconds.items()}
