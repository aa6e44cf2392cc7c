"""The routes an adapter can take to a new base, as a protocol and one registry.

A route is an object with a ``name`` and ``propose(context) -> Candidate``: it builds a candidate
adapter on the new base for the adapter the :class:`RouteContext` describes, or raises
:class:`RouteSkipped` saying why it does not apply. The fleet (:mod:`.fleet`) tries the routes of
``UpgradeConfig.routes`` in order, scores each candidate with the data-free checks (agreement, fidelity) and takes
the first that passes. Routes here, cheapest first (:data:`ROUTES`):

* ``direct`` (:class:`DirectRoute`): the old adapter loaded onto the new base (same shapes only);
* ``translora`` (:class:`TransLoRARoute`): synthetic inputs from the adapter's seeds (filtered by
  its discriminator when it has one), labelled by the old base + adapter, a student trained on the
  new base (Trans-LoRA, Wang et al., NeurIPS 2024).

A new route is a class with those two members and one :func:`register_route` call.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from lightning_peft.adapter_folder import AdapterRecord
from lightning_peft.adapter_io import AdapterFormatError
from lightning_peft.budget import TimeBudget
from lightning_peft.model_loader import ModelLoader
from lightning_peft.transfer import (
    ProvenanceMismatchError,
    StudentConfig,
    SynthesisShortError,
    SyntheticSet,
    TransferConfig,
    synthesize,
    train_student,
)
from lightning_peft.upgrade.student_check import StudentCheck

if TYPE_CHECKING:
    from lightning_peft.upgrade.config import UpgradeConfig

__all__ = ["ROUTES", "Candidate", "DirectRoute", "Route", "RouteContext", "RouteSkipped", "TransLoRARoute",
           "register_route"]

log = logging.getLogger(__name__)

SYNTHETIC_FILE = "synthetic.jsonl"  # an adapter's synthetic set, shared by the check and the Trans-LoRA route


class RouteSkipped(Exception):
    """A route does not apply to this adapter; the message says why (it goes into the report)."""


@dataclass
class Candidate:
    """A candidate adapter on the new base.

    Attributes:
        model: The new base with the candidate adapter, in eval mode (what the check runs).
        tokenizer: Its tokenizer.
        owner: What ``save_adapter`` writes (the model, or the student's LightningModule).
        source: The adapter folder it reuses (``direct``), ``None`` for a newly trained one.
    """

    model: nn.Module
    tokenizer: Any
    owner: nn.Module
    source: Path | None = None


@dataclass
class RouteContext:
    """Everything a route may use about one adapter.

    Attributes:
        folder: The old adapter.
        record: What it carries (task, seeds, training-set size, discriminator).
        old: The old base (a loadable name).
        method: The adapter's method (``lora``, ``shira``, ...).
        cfg: The upgrade's settings.
        target: This adapter's output folder (the synthetic set is cached there).
        models: The fleet's model loader (keeps the old and the new base).
        synthetic: The check's synthetic set (its first ``num_holdout`` accepted inputs are held out);
            ``None`` when the check made none.
        budget: This adapter's time budget and seconds per phase (``cfg.time_budget``).
        check: Scores a model on the check's inputs (``check(model, tokenizer) -> scores``), set by the fleet.
    """

    folder: Path
    record: AdapterRecord
    old: str
    method: str
    cfg: UpgradeConfig
    target: Path
    models: ModelLoader
    synthetic: SyntheticSet | None = None
    budget: TimeBudget = field(default_factory=TimeBudget)
    check: Callable[[nn.Module, Any], dict[str, Any]] | None = None

    def transfer_config(self, count: int) -> TransferConfig:
        """The Trans-LoRA settings of this adapter's first ``count`` synthetic examples."""
        cfg, record = self.cfg, self.record
        return TransferConfig(
            source_model=self.old, source_adapter=str(self.folder), target_model=cfg.new, task=record.task or "task",
            seeds=list(record.seeds), discriminator=record.discriminator, filter=record.discriminator is not None,
            num_synthetic=count, cache=str(self.target / SYNTHETIC_FILE), seed=cfg.seed,
            task_kwargs=dict(record.task_kwargs), **{"label_max_new_tokens": cfg.max_new_tokens, **cfg.synthesis},
        )

    def synthesize(self, count: int) -> SyntheticSet:
        """The first ``count`` synthetic examples (cached in ``target``: a larger count continues the set; a set made
        with other settings is made again with ``redo_changed``, else refused); when the generator runs out of budget
        first, what it kept (logged)."""
        cache = self.target / SYNTHETIC_FILE
        try:
            try:
                return synthesize(self.transfer_config(count), models=self.models, budget=self.budget)
            except ProvenanceMismatchError:
                if not self.cfg.redo_changed:
                    raise
                log.info("upgrade: %s: synthetic set made again with the current settings (redo_changed)", self.target.name)
                cache.unlink()
                return synthesize(self.transfer_config(count), models=self.models, budget=self.budget)
        except SynthesisShortError as exc:  # the check judges what was kept, on the seeds at least
            synthetic = SyntheticSet.load(cache)
            log.warning("upgrade: %s: %s; going on with the %d kept", self.target.name, exc, len(synthetic.accepted))
            return synthetic


class Route(Protocol):
    """A way to carry an adapter to the new base (see the module docstring)."""

    name: str

    def propose(self, context: RouteContext) -> Candidate:
        """A candidate on the new base.

        Raises:
            RouteSkipped: the route does not apply to this adapter (the message says why).
        """
        ...


class DirectRoute:
    """The old adapter loaded onto the new base, nothing trained (PortLLM's direct reuse)."""

    name = "direct"

    def propose(self, context: RouteContext) -> Candidate:
        try:
            model, tok = context.models.load(context.cfg.new, context.folder, other_base=True)
        except AdapterFormatError as exc:
            raise RouteSkipped(f"the adapter does not fit the new base ({exc})") from exc
        return Candidate(model, tok, model, context.folder)


class TransLoRARoute:
    """A Trans-LoRA student on the new base, trained on synthetic inputs labelled by the old base + adapter.

    The first ``num_holdout`` synthetic inputs are the check's held-out ones and stay unseen; the student
    trains on the next ``num_synthetic`` (default: the adapter's training-set size, capped). It decides before
    spending: no synthesis that the held-out inputs' rate (seconds and acceptance per input) says cannot finish
    within the time budget or ``max_proposed``; the student is checked while it trains (:class:`StudentCheck`) and
    its trainer stops when the budget runs out.
    """

    name = "translora"

    def propose(self, context: RouteContext) -> Candidate:
        cfg, record = context.cfg, context.record
        held_out = context.synthetic if context.synthetic is not None else context.synthesize(cfg.num_holdout)
        if len(held_out.accepted) < cfg.num_holdout:
            stats = held_out.header.get("stats") or {}
            raise RouteSkipped(
                f"the generator wrote only {len(held_out.accepted)} usable inputs for the {cfg.num_holdout} held-out "
                f"ones ({stats.get('proposed', 0)} proposals), too few to train a student on; raise "
                "synthesis.max_proposed or set synthesis.generator to a model that follows the seeds")
        count = cfg.num_holdout + (cfg.num_synthetic or min(record.train_size or cfg.max_synthetic, cfg.max_synthetic))
        _decide_synthesis(context, held_out, count - len(held_out.accepted))
        syn = context.synthesize(count)
        budget = context.budget
        if budget.expired():
            raise RouteSkipped(f"the time budget of {budget.limit:g} s ran out during {budget.ran_out} with "
                               f"{len(syn.accepted) - cfg.num_holdout} of the student's {count - cfg.num_holdout} inputs "
                               "written; raise time_budget or lower num_synthetic")
        train = copy.copy(syn)
        train.records = syn.accepted[cfg.num_holdout :]  # the held-out inputs stay unseen
        if not train.records:
            raise RouteSkipped("the generator wrote no usable input beyond the held-out ones; raise synthesis.max_proposed")
        student = StudentConfig.from_dict(cfg.student)
        student.method = student.method or context.method
        if budget.limit is not None:
            student = student.with_trainer_kwargs(max_time={"seconds": budget.left()})
        checks = [StudentCheck(context.check, cfg.pass_lines(), cfg.student_checks)] if (
            context.check is not None and cfg.student_checks) else []
        with budget.phase("student"):
            module, _ = train_student(context.transfer_config(count), train, student, test=False, callbacks=checks)
            budget.expired()  # a student stopped by the budget is still scored; the report names the phase
        if checks and checks[0].stopped:
            raise RouteSkipped(f"the student cannot pass the check: {checks[0].stopped}; more student steps or "
                               "synthetic inputs may help (student.trainer_kwargs.max_steps, num_synthetic), or "
                               "student_checks=0 trains it to the end")
        return Candidate(module.model.eval(), module.tokenizer, module)  # the adapter lives on the LightningModule


def _decide_synthesis(context: RouteContext, held_out: SyntheticSet, missing: int) -> None:
    """Raise :class:`RouteSkipped` when writing ``missing`` more inputs cannot finish, judged by the held-out ones:
    their seconds each (generation, filter and labels, when they were written in this run) against the time
    left, their acceptance against ``max_proposed``."""
    if missing <= 0:
        return
    budget = context.budget
    spent = budget.seconds.get("synthesis", 0.0) + budget.seconds.get("labelling", 0.0)
    each, left = spent / max(1, len(held_out.accepted)), budget.left()
    if left is not None and each * missing > left:
        raise RouteSkipped(f"writing the student's {missing} synthetic inputs would take about {each * missing:.0f} s "
                           f"({each:.2f} s each, as the held-out ones took), more than the {left:.0f} s left of "
                           f"time_budget={budget.limit:g}; raise time_budget or lower num_synthetic")
    acceptance = (held_out.header.get("stats") or {}).get("acceptance_rate")
    max_proposed = context.transfer_config(missing).proposal_limit(missing)
    if acceptance and missing / acceptance > max_proposed:
        raise RouteSkipped(f"the filter accepted {acceptance:.3f} of the held-out proposals, so {missing} more inputs "
                           f"need about {missing / acceptance:.0f} proposals, more than max_proposed={max_proposed}; "
                           "raise synthesis.max_proposed or set synthesis.generator to a model that follows the seeds")


ROUTES: dict[str, Route] = {}


def register_route(route: Route) -> Route:
    """Add ``route`` to :data:`ROUTES` under its name (after the others: the order is the default cost order).

    Raises:
        ValueError: the name is taken by another route.
    """
    if route.name in ROUTES and type(ROUTES[route.name]) is not type(route):
        raise ValueError(f"an upgrade route named {route.name!r} is already registered ({type(ROUTES[route.name]).__name__}); "
                         "pick another name")
    ROUTES[route.name] = route
    return route


register_route(DirectRoute())
register_route(TransLoRARoute())
