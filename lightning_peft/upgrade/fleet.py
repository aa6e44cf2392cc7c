"""Upgrade a fleet of adapters to a new base: each carried by the cheapest route a data-free check accepts.

The problem both Trans-* papers start from (Trans-PEFT, Gu et al. ACL 2025; Trans-LoRA, Wang et
al. NeurIPS 2024): a provider with many adapters on one base and a new base release. Whether an
old adapter can simply be reused depends on the update (PortLLM, ICLR 2025, finds direct reuse
works across close versions; Trans-PEFT finds it degrades), so it is decided per adapter::

    for every adapter folder under DIR (LoRA, RoSA, SHiRA, mixed), in order of cost:
      direct     the old adapter loaded onto the new base (same shapes only)
      translora  synthetic inputs from the adapter's seeds (filtered by its discriminator when it
                 has one), labelled by old base + adapter, a fresh adapter trained on the new base
      needs data neither passes: retrain with real data (the reason is reported)

Every candidate is scored against the old base + old adapter on the seeds and on held-out synthetic
inputs, on the same reference completions, by the data-free agreement check (:mod:`.agreement`:
greedy outputs, and the token KL where the vocabularies match) and by the fidelity (:mod:`.fidelity`:
the share of the adapter's effect kept, 0 at the bare new base, 1 at the reference); the first route
whose deciding score (``score``: ``fidelity`` >= ``min_fidelity``, the default, on the seeds within one
vocabulary and on all the check's inputs across tokenizers, ``fidelity_on``; or ``agreement`` >= ``threshold``)
passes, or whose KL is at most ``max_kl``, is taken. Per adapter the output folder
holds the new adapter (peft format, the new base's fingerprint, route and scores in its metadata,
the record carried on); the fleet gets ``upgrade_report.{json,csv,md,png}``. A rerun skips adapters
finished with the same settings and refuses changed settings naming the keys (``redo_changed=true``
redoes them, :mod:`lightning_peft.resume`); a failing adapter is reported and the others go on.
``shard``/``num_shards`` split the fleet across jobs (Hydra multirun). The routes are objects in one
registry (:mod:`.routes`). Each adapter has ``time_budget`` seconds (:class:`~lightning_peft.budget.TimeBudget`):
the routes are tried cheapest first and the Trans-LoRA route spends only where its held-out inputs and its
student's checks (:mod:`.student_check`) say it can finish and pass; the row reports the seconds per phase.
"""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter_folder import AdapterFolder, AdapterRecord
from lightning_peft.adapter_io import save_adapter
from lightning_peft.budget import TimeBudget
from lightning_peft.model_loader import ModelLoader
from lightning_peft.registry import spec_for_peft_type
from lightning_peft.resume import FinishedFile
from lightning_peft.transfer.models import greedy_completions
from lightning_peft.upgrade.agreement import agreement
from lightning_peft.upgrade.calibration import test_accuracy
from lightning_peft.upgrade.config import SETTING_OF, UpgradeConfig
from lightning_peft.upgrade.fidelity import fidelity
from lightning_peft.upgrade.routes import ROUTES, Candidate, RouteContext, RouteSkipped
from lightning_peft.upgrade.student_check import PassLine, passes

__all__ = ["NoSeedsError", "check_fidelity", "check_inputs", "find_adapters", "upgrade_adapter", "upgrade_fleet"]

log = logging.getLogger(__name__)

DONE_FILE = "upgrade_done.json"


class NoSeedsError(ValueError):
    """An adapter carries no seed inputs: no candidate can be checked without real data."""


# --------------------------------------------------------------------------- the fleet
def find_adapters(root: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Adapter folders under ``root``, sorted; discriminators (inside adapters or beside them) skipped, and
    everything under ``exclude`` (the upgrade's own output, when it lies inside ``root``).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no adapter folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"adapters={str(root)!r} is not a folder; pass the folder that holds your adapter folders")
    found = AdapterFolder.find(root, exclude)
    if not found:
        raise ValueError(f"adapters={str(root)!r} holds no adapter folder (none has a peft config); point it at the "
                         "folder your adapters were saved into (lightning-peft train writes <run dir>/adapter)")
    return found


def _name(folder: Path, root: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return re.sub(r"[^\w.-]+", "__", rel) if rel != "." else folder.name


def _done_file(target: Path) -> FinishedFile:
    return FinishedFile(target / DONE_FILE, override="redo_changed=true", elsewhere="out= folder")


def upgrade_fleet(cfg: UpgradeConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Upgrade every adapter under ``cfg.adapters`` (this job's shard); returns the report rows.

    Raises:
        FileNotFoundError / ValueError: no such folder, no adapters in it (before anything is done).
        SettingsChangedError: an adapter was upgraded into ``cfg.out`` with other settings (and not ``redo_changed``).
    """
    from tqdm.auto import tqdm

    from lightning_peft import zoo

    root, out = Path(cfg.adapters), Path(cfg.out)
    folders = find_adapters(root, exclude=out)
    if cfg.shard is not None:
        folders = folders[cfg.shard :: cfg.num_shards]
    zoo.resolve(cfg.new)  # an unknown zoo-like name fails here, before any work
    settings = cfg.settings()
    done = {f: _done_file(out / _name(f, root)).read(settings, cfg.redo_changed) for f in folders}  # refused first
    rows = []
    models = ModelLoader(keep=2)  # an old and a new base, shared by the fleet
    for folder in tqdm(folders, desc=f"upgrade -> {cfg.new}", disable=not progress):
        name = _name(folder, root)
        if done[folder] is not None:
            log.info("upgrade: %s already done with these settings (%s)", name, done[folder]["row"]["route"])
            rows.append(done[folder]["row"])
            continue
        start = time.perf_counter()
        try:
            row = upgrade_adapter(folder, cfg, out / name, models)
        except NoSeedsError as exc:
            row = {"route": "needs_data", "reason": str(exc), "agreement": None, "fidelity": None, "output": None}
        except Exception as exc:  # one adapter's failure is reported, the fleet goes on
            log.error("upgrade: %s failed: %s", name, exc)
            row = {"route": "failed", "reason": f"{type(exc).__name__}: {exc}", "agreement": None, "fidelity": None,
                   "output": None, "traceback": traceback.format_exc(limit=5)}
        row = {"adapter": name, "source": str(folder), **row, "seconds": round(time.perf_counter() - start, 1)}
        if row["route"] != "failed":
            _done_file(out / name).write(settings, {"row": row})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- one adapter
def old_base(folder: Path, record: AdapterRecord, config: Any, cfg: UpgradeConfig) -> str:
    """``cfg.old``, or the base the adapter names (its record, else its peft config), as a loadable name.

    Raises:
        ValueError: neither names a base that exists here.
    """
    from lightning_peft import zoo

    for candidate in (cfg.old, record.base, getattr(config, "base_model_name_or_path", None)):
        if not candidate:
            continue
        if zoo.is_zoo_name(candidate) or os.path.exists(candidate):
            return candidate
        stem = re.sub(r"-[0-9a-f]{8}$", "", Path(candidate).name)  # a zoo cache folder of another machine
        if zoo.is_zoo_name(stem):
            return stem
    raise ValueError(f"{folder} names no base that exists here ({record.base or getattr(config, 'base_model_name_or_path', None)!r}); "
                     "pass old=MODEL (the base the adapters were trained on)")


def upgrade_adapter(folder: Path, cfg: UpgradeConfig, target: Path, models: ModelLoader | None = None) -> dict[str, Any]:
    """Try ``cfg.routes`` on one adapter; write the accepted candidate to ``target``; returns its report row."""
    models = models or ModelLoader(keep=2)
    adapter = AdapterFolder(folder)
    config, record = adapter.read()[0], adapter.record
    old = old_base(folder, record, config, cfg)
    spec = spec_for_peft_type(config.peft_type)
    method = spec.name if spec else str(getattr(config.peft_type, "value", config.peft_type)).lower()
    budget = TimeBudget(cfg.time_budget)
    context = RouteContext(folder, record, old, method, cfg, target, models, budget=budget)
    reference, ref_tok = models.load(old, folder, other_base=True)
    inputs, ref_outputs, context.synthetic = _check_inputs(context, reference, ref_tok)

    def check(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
        with budget.phase("scoring"):
            return _score(reference, ref_tok, model, tokenizer, inputs, ref_outputs, cfg, len(record.seeds))

    context.check = check
    scores: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    spent = {"method": method, "old": old, "new": cfg.new, "retrain_seconds": record.train_seconds}
    source_acc = _test_accuracy(reference, ref_tok, context)  # a calibration run only
    if source_acc is not None:
        spent["source_test_acc"] = source_acc
    for route in cfg.routes:
        if budget.expired():
            reasons.append(f"{route}: not tried, the time budget of {budget.limit:g} s ran out during {budget.ran_out}")
            continue
        try:
            candidate = ROUTES[route].propose(context)
        except RouteSkipped as exc:
            reasons.append(f"{route}: {exc}")
            continue
        scores[route] = score = check(candidate.model, candidate.tokenizer)
        if source_acc is not None:
            acc = _test_accuracy(candidate.model, candidate.tokenizer, context)
            score.update(test_acc=acc, relative_acc=acc / source_acc if source_acc else None)
        if cfg.keep_candidates:
            _save(candidate, target / "candidates" / route, route, score, context)
        failed = _fails(score, cfg.pass_lines())
        if failed is None:
            output = _save(candidate, target / "adapter", route, score, context)
            real = {k: score[k] for k in ("test_acc", "relative_acc") if k in score}  # a calibration run's
            return {"route": route, "agreement": score["agreement"], "fidelity": score["fidelity"], "scores": scores,
                    **spent, **real, "output": str(output), "reason": None, **_timings(budget)}
        reasons.append(f"{route}: {failed}")
    best = {key: max((s[key] for s in scores.values() if s[key] is not None), default=None)
            for key in ("agreement", "fidelity")}
    return {"route": "needs_data", **best, "scores": scores, **spent, "output": None,
            "reason": "retrain with real data: " + "; ".join(reasons), **_timings(budget)}


def _timings(budget: TimeBudget) -> dict[str, Any]:
    """What a report row says of the time spent: seconds per phase, and the phase the budget ran out in (if it did)."""
    return {"timings": budget.summary(), "budget_ran_out": budget.ran_out}


def _test_accuracy(model: nn.Module, tokenizer: Any, context: RouteContext) -> float | None:
    """A calibration run's real test token accuracy of ``model`` on the adapter's recorded task (``None``: not one).

    Raises:
        ValueError: the adapter recorded no task.
    """
    cfg, record = context.cfg, context.record
    if not cfg.num_test:
        return None
    if not record.task:
        raise ValueError(f"num_test={cfg.num_test} measures each adapter on its recorded task's test split, but "
                         f"{context.folder} records no task; save it with UpgradeRecord (lightning-peft train does) or "
                         "run the upgrade with num_test=0")
    with context.budget.phase("calibration"):
        return test_accuracy(model, tokenizer, record.task, cfg.num_test, record.task_kwargs)["token_acc"]


def _score(reference: nn.Module, ref_tok: Any, model: nn.Module, tokenizer: Any, inputs: list[str],
           ref_outputs: list[str], cfg: UpgradeConfig, num_seeds: int) -> dict[str, Any]:
    """Every score of one candidate: the agreement check's (:mod:`.agreement`) on all the check's inputs, and the
    fidelity (:func:`check_fidelity`), on the same reference completions."""
    scored = agreement(reference, ref_tok, model, tokenizer, inputs, reference_outputs=ref_outputs,
                       max_new_tokens=cfg.max_new_tokens)
    return {**scored.to_dict(), **check_fidelity(reference, ref_tok, model, tokenizer, inputs, ref_outputs, num_seeds,
                                                  cfg.fidelity_on)}


def check_fidelity(reference: nn.Module, ref_tok: Any, model: nn.Module, tokenizer: Any, inputs: list[str],
                   ref_outputs: list[str], num_seeds: int, on: str) -> dict[str, Any]:
    """The fidelity (:mod:`.fidelity`) of a candidate on the adapter's seeds (its first ``num_seeds`` inputs: real task
    inputs) and on all the check's inputs (the seeds and the held-out synthetic ones); ``on`` (``"seeds"``, ``"all"``,
    or ``"auto"``: the seeds for the KL form, all for the per-byte form, :class:`~.config.UpgradeConfig`) picks the one
    reported as ``fidelity`` with its details, both values are kept (``fidelity_seeds``, ``fidelity_all``)."""
    seeds = fidelity(reference, ref_tok, model, tokenizer, inputs[:num_seeds], ref_outputs[:num_seeds])
    every = seeds if num_seeds >= len(inputs) else fidelity(reference, ref_tok, model, tokenizer, inputs, ref_outputs)
    chosen = seeds if on == "seeds" or (on == "auto" and seeds.basis == "kl") else every
    return {**chosen.to_dict(), "fidelity_on": on, "fidelity_seeds": seeds.fidelity, "fidelity_all": every.fidelity}


def _fails(score: dict[str, Any], lines: list[PassLine]) -> str | None:
    """Why a scored candidate is not taken (``None``: it reaches one of the pass ``lines``)."""
    if any(passes(score, line) for line in lines):
        return None
    why = []
    for key, target, sign in lines:
        if score.get(key) is not None:
            why.append(f"{key} {score[key]:.3f} {'<' if sign > 0 else '>'} {SETTING_OF[key]} {target}")
        elif key != "kl":  # no KL across vocabularies: nothing to say
            why.append(f"{key} undefined ({score.get(key + '_note')})")
    return ", ".join(why)


def _check_inputs(context: RouteContext, reference: nn.Module, ref_tok: Any) -> tuple[list[str], list[str], Any]:
    """The agreement check's inputs (seeds + held-out synthetic), the reference's outputs on them, the synthetic set."""
    record, cfg = context.record, context.cfg
    if not record.seeds:
        raise NoSeedsError(
            f"{context.folder} carries no seed inputs, so nothing can check a candidate without real data; save adapters "
            "with UpgradeRecord(num_seeds=5) (lightning-peft train does), or retrain this one with its data"
        )
    synthetic = context.synthesize(cfg.num_holdout)  # short of budget: the check runs on the seeds and what was kept
    with context.budget.phase("scoring"):
        inputs, outputs = check_inputs(reference, ref_tok, record.seeds, synthetic, cfg)
    return inputs, outputs, synthetic


def check_inputs(reference: nn.Module, ref_tok: Any, seeds: list[str], synthetic: Any,
                 cfg: UpgradeConfig) -> tuple[list[str], list[str]]:
    """What every candidate of an adapter is scored on: its ``seeds``, then the first ``cfg.num_holdout`` accepted
    inputs of its synthetic set (a :class:`~lightning_peft.transfer.SyntheticSet`, ``None``: none), with the
    reference's completions (its greedy outputs on the seeds, the set's teacher labels on the rest)."""
    holdout = synthetic.accepted[: cfg.num_holdout] if synthetic is not None else []
    seed_out = greedy_completions(reference, ref_tok, seeds, max_new_tokens=cfg.max_new_tokens, progress=False)
    return list(seeds) + [r["input"] for r in holdout], seed_out + [r["output"] for r in holdout]


def _save(candidate: Candidate, path: Path, route: str, score: dict[str, Any], context: RouteContext) -> Path:
    """Write a candidate: peft format, the new base's fingerprint, route and scores, the record carried on."""
    cfg, record = context.cfg, context.record
    # the discriminator judges the *old* base's inputs: not carried
    carried = AdapterRecord(task=record.task, seeds=record.seeds, train_size=record.train_size,
                            task_kwargs=record.task_kwargs, base=cfg.new)
    meta = {"upgrade": {"route": route, "from": context.old, "to": cfg.new,
                        "source_adapter": str(candidate.source) if candidate.source else None,
                        **score, "score": cfg.score, "threshold": cfg.threshold, "min_fidelity": cfg.min_fidelity}}
    with torch.no_grad():
        return save_adapter(candidate.owner, path, metadata=meta, record=carried)
