"""What a fleet upgrade is asked to do: :class:`UpgradeConfig`, mirrored by ``conf/upgrade.yaml``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from lightning_peft.budget import TimeBudget
from lightning_peft.transfer import StudentConfig
from lightning_peft.upgrade.routes import ROUTES
from lightning_peft.upgrade.student_check import PassLine

__all__ = ["SCORES", "SETTING_OF", "UpgradeConfig"]

Score = Literal["agreement", "fidelity"]
SCORES: tuple[str, ...] = get_args(Score)  # what `score` may name: the deciding score of a route
FidelityInputs = Literal["auto", "seeds", "all"]  # what `fidelity_on` may name: the inputs the fidelity is scored on
SETTING_OF = {"agreement": "threshold", "fidelity": "min_fidelity", "kl": "max_kl"}  # the setting of each score's line


@dataclass
class UpgradeConfig:
    """What to upgrade to what, and how; mirrored by ``conf/upgrade.yaml``.

    Attributes:
        adapters: Folder holding the adapter folders (searched recursively; discriminator folders
            inside adapters are not adapters of their own).
        new: The new base (zoo name, folder or Hub name).
        old: The old base; default: what each adapter's record (or peft config) names.
        out: Where the upgraded adapters go (one folder per adapter, named like its source path).
        routes: Routes tried, in this order (names in :data:`~lightning_peft.upgrade.routes.ROUTES`:
            ``direct``, ``translora``).
        score: The score that decides whether a route is taken: ``"agreement"`` (similarity of greedy outputs, at
            least ``threshold``) or ``"fidelity"`` (the share of the old adapter's effect the candidate keeps, between
            the bare new base, 0, and the old base + old adapter, 1, at least ``min_fidelity``;
            :mod:`lightning_peft.upgrade.fidelity`). Both, and the KL, are reported for every candidate either way.
        threshold: Agreement a route needs to be taken with ``score="agreement"`` (the agreement barely predicts
            real accuracy on the zoo: rank correlation 0.32, ``benchmarks/upgrade_fleet.py``).
        min_fidelity: Fidelity a route needs to be taken with ``score="fidelity"`` (the default). Calibrated on the
            zoo (``benchmarks/upgrade_fleet.py``, 62 candidates of 42 adapter-target pairs): the smallest value at which
            every route taken keeps >= 0.85x of the source's real accuracy (0.876-0.916x; no value keeps 0.9x
            everywhere, the routes between 0.94 and 0.96 keep 0.72-0.94x). Not yet checked on real checkpoints.
        fidelity_on: The inputs the fidelity is scored on: ``"seeds"`` (the adapter's recorded real inputs), ``"all"``
            (the seeds and the ``num_holdout`` held-out synthetic inputs) or ``"auto"``: the seeds where the vocabularies
            match (the KL form), all inputs across tokenizers (the per-byte form, a difference of two differences, needs
            more text). On the zoo ``auto`` ranks candidates by their real accuracy best (``benchmarks/README.md``,
            "Fleet upgrade"). Both values are reported either way.
        max_kl: Also take a route whose token-level KL to the reference is at most this (nats per token;
            same vocabulary only, so same-family updates; ``None``: ``score`` alone decides; either score passes with it). On the zoo the
            KL predicts real accuracy far better than the agreement does (``benchmarks/README.md``).
        num_holdout: Held-out synthetic inputs the check scores on (besides the seeds).
        num_synthetic: Synthetic examples a Trans-LoRA student trains on (default: the adapter's
            recorded training-set size, capped at ``max_synthetic``).
        max_synthetic: Cap of that default.
        synthesis: Other :class:`~lightning_peft.transfer.TransferConfig` settings (``temperature``,
            ``generator``, ``max_new_tokens``, ...).
        student: Trans-LoRA student (:class:`~lightning_peft.transfer.StudentConfig` fields): ``method``
            (default: the adapter's own), ``method_kwargs``, ``module_kwargs``, ``trainer_kwargs``, ``data_kwargs``.
        max_new_tokens: Greedy budget of the agreement check.
        time_budget: Seconds one adapter's upgrade may take (``None``: no limit). The synthesis stops proposing and
            the student's trainer stops (``max_time``) when it runs out; a route that would need more than is left
            (projected from the held-out inputs' seconds each) is not started. Reported when it runs out.
        student_checks: Times a Trans-LoRA student is scored while it trains (:class:`~.student_check.StudentCheck`):
            it is stopped once its projected final score misses every pass line (0: never checked, trained to the end).
        keep_candidates: Also save every scored candidate, taken or not, to ``<out>/<name>/candidates/<route>``
            (to inspect a rejected one, or to calibrate ``threshold`` against real test data).
        num_test: A calibration run (``> 0``; needs the task data): also measure the real token accuracy of the old
            adapter on the old base and of every candidate on the new base, on the first ``num_test`` test examples
            of the task each adapter recorded (:mod:`.calibration`); the report shows it beside the scores. 0: none
            (an upgrade needs no task data).
        redo_changed: Redo adapters upgraded into ``out`` before with other settings (default: refuse,
            naming the settings that differ).
        shard: This job's shard of the fleet, in ``[0, num_shards)`` (``None``: the whole fleet).
        num_shards: How many shards the fleet is split into.
        seed: Sampling seed.
    """

    adapters: str
    new: str
    old: str | None = None
    out: str = "upgraded"
    routes: list[str] = field(default_factory=lambda: list(ROUTES))
    score: Score = "fidelity"
    threshold: float = 0.8
    min_fidelity: float = 0.96
    fidelity_on: FidelityInputs = "auto"
    max_kl: float | None = None
    num_holdout: int = 16
    num_synthetic: int | None = None
    max_synthetic: int = 256
    synthesis: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    time_budget: float | None = 3600.0
    student_checks: int = 3
    keep_candidates: bool = False
    num_test: int = 0
    redo_changed: bool = False
    shard: int | None = None
    num_shards: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [r for r in self.routes if r not in ROUTES]
        if unknown or not self.routes:
            raise ValueError(f"upgrade routes must be a non-empty list of {list(ROUTES)}, got {self.routes!r}; "
                             "e.g. routes=[direct,translora]")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"upgrade threshold is an agreement in [0, 1], got {self.threshold!r}; e.g. threshold=0.8")
        if self.score not in SCORES:
            raise ValueError(f"upgrade score must be one of {list(SCORES)}, got {self.score!r}; e.g. score=fidelity")
        if self.fidelity_on not in get_args(FidelityInputs):
            raise ValueError(f"upgrade fidelity_on must be one of {list(get_args(FidelityInputs))}, got "
                             f"{self.fidelity_on!r}; e.g. fidelity_on=seeds")
        if isinstance(self.min_fidelity, bool) or not isinstance(self.min_fidelity, (int, float)) or not (
                0.0 <= self.min_fidelity <= 1.0):
            raise ValueError(f"upgrade min_fidelity is a fidelity in [0, 1] (0: the bare new base, 1: the old adapter on "
                             f"the old base), got {self.min_fidelity!r}; e.g. min_fidelity=0.8")
        if self.max_kl is not None and not (isinstance(self.max_kl, (int, float)) and self.max_kl >= 0):
            raise ValueError(f"upgrade max_kl is a KL in nats per token, >= 0 or null, got {self.max_kl!r}; e.g. max_kl=0.3")
        if self.shard is not None and not (isinstance(self.num_shards, int) and 0 <= self.shard < self.num_shards):
            raise ValueError(f"upgrade shard must be in [0, num_shards), got shard={self.shard!r} num_shards="
                             f"{self.num_shards!r}; e.g. `-m shard=0,1,2,3 num_shards=4`")
        try:
            TimeBudget(self.time_budget)
        except ValueError as exc:
            raise ValueError(f"upgrade time_budget (per adapter): {exc}; set time_budget=3600 or time_budget=null") from None
        if isinstance(self.student_checks, bool) or not isinstance(self.student_checks, int) or self.student_checks < 0:
            raise ValueError(f"upgrade student_checks must be an integer >= 0 (0: no checks), got "
                             f"{self.student_checks!r}; e.g. student_checks=3")
        if isinstance(self.num_test, bool) or not isinstance(self.num_test, int) or self.num_test < 0:
            raise ValueError(f"upgrade num_test (test examples of a calibration run) must be an integer >= 0, got "
                             f"{self.num_test!r}; e.g. num_test=128 (0: no test data)")
        for name in ("num_holdout", "max_synthetic"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"upgrade {name} must be an integer >= 1, got {getattr(self, name)!r}")
        StudentConfig.from_dict(self.student)  # unknown student settings fail here, naming the known ones

    def pass_lines(self) -> list[PassLine]:
        """What a candidate must reach to be taken (any one of them): ``score`` at its threshold (``threshold`` or
        ``min_fidelity``), or a KL of at most ``max_kl`` when set."""
        lines: list[PassLine] = [(self.score, getattr(self, SETTING_OF[self.score]), 1)]
        return lines + ([("kl", self.max_kl, -1)] if self.max_kl is not None else [])

    def settings(self) -> dict[str, Any]:
        """What determines an adapter's upgrade (a finished one is reused only when these agree)."""
        keep = asdict(self)
        for volatile in ("adapters", "out", "shard", "num_shards", "redo_changed"):
            keep.pop(volatile)
        if not keep["num_test"]:  # not a calibration run: the settings (and resumes) of before num_test existed
            keep.pop("num_test")
        return json.loads(json.dumps(keep, sort_keys=True, default=str))
