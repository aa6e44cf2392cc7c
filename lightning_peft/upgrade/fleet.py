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

Every candidate is scored by the data-free agreement check (:mod:`.agreement`) against the old
base + old adapter on the seeds and on held-out synthetic inputs; the first route whose
``agreement`` reaches ``threshold`` is taken. Per adapter the output folder holds the new adapter
(peft format, the new base's fingerprint, route and scores in its metadata, the record carried
on); the fleet gets ``upgrade_report.{json,csv,md,png}``. A rerun skips adapters finished with the
same settings and refuses changed settings naming the keys; a failing adapter is reported and the
others go on. ``shard``/``num_shards`` split the fleet across jobs (Hydra multirun).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter_io import (
    CONFIG_FILE,
    AdapterFormatError,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lightning_peft.atomic import atomic_write_text
from lightning_peft.registry import spec_for_peft_type
from lightning_peft.transfer.pipeline import SynthesisShortError
from lightning_peft.upgrade.agreement import Agreement, agreement
from lightning_peft.upgrade.record import DISCRIMINATOR_DIR, RECORD_ATTR, AdapterRecord, read_record

__all__ = ["ROUTES", "NoSeedsError", "UpgradeConfig", "UpgradeSettingsError", "find_adapters", "upgrade_adapter", "upgrade_fleet"]

log = logging.getLogger(__name__)

ROUTES = ("direct", "translora")
DONE_FILE = "upgrade_done.json"
SYNTHETIC_FILE = "synthetic.jsonl"  # an adapter's synthetic set, shared by the check and the Trans-LoRA route


class UpgradeSettingsError(ValueError):
    """An adapter was upgraded before into the same folder with other settings."""


class NoSeedsError(ValueError):
    """An adapter carries no seed inputs: no candidate can be checked without real data."""


@dataclass
class UpgradeConfig:
    """What to upgrade to what, and how; mirrored by ``conf/upgrade.yaml``.

    Attributes:
        adapters: Folder holding the adapter folders (searched recursively; discriminator folders
            inside adapters are not adapters of their own).
        new: The new base (zoo name, folder or Hub name).
        old: The old base; default: what each adapter's record (or peft config) names.
        out: Where the upgraded adapters go (one folder per adapter, named like its source path).
        routes: Routes tried, in this order (``direct``, ``translora``).
        threshold: Agreement a route needs to be taken (calibrated on the zoo, see ``benchmarks/upgrade_fleet.py``).
        max_kl: Also take a route whose token-level KL to the reference is at most this (nats per token;
            same vocabulary only, so same-family updates; ``None``: agreement alone decides). On the zoo the
            KL predicts real accuracy far better than the agreement does (``benchmarks/README.md``).
        num_holdout: Held-out synthetic inputs the check scores on (besides the seeds).
        num_synthetic: Synthetic examples a Trans-LoRA student trains on (default: the adapter's
            recorded training-set size, capped at ``max_synthetic``).
        max_synthetic: Cap of that default.
        synthesis: Other :class:`~lightning_peft.transfer.TransferConfig` settings (``temperature``,
            ``generator``, ``max_new_tokens``, ...).
        student: Trans-LoRA student: ``method`` (default: the adapter's own), ``method_kwargs``,
            ``module_kwargs``, ``trainer_kwargs``, ``data_kwargs``.
        max_new_tokens: Greedy budget of the agreement check.
        keep_candidates: Also save every scored candidate, taken or not, to ``<out>/<name>/candidates/<route>``
            (to inspect a rejected one, or to calibrate ``threshold`` against real test data).
        shard: This job's shard of the fleet, in ``[0, num_shards)`` (``None``: the whole fleet).
        num_shards: How many shards the fleet is split into.
        seed: Sampling seed.
    """

    adapters: str
    new: str
    old: str | None = None
    out: str = "upgraded"
    routes: list[str] = field(default_factory=lambda: list(ROUTES))
    threshold: float = 0.8
    max_kl: float | None = None
    num_holdout: int = 16
    num_synthetic: int | None = None
    max_synthetic: int = 256
    synthesis: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    keep_candidates: bool = False
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
        if self.max_kl is not None and not (isinstance(self.max_kl, (int, float)) and self.max_kl >= 0):
            raise ValueError(f"upgrade max_kl is a KL in nats per token, >= 0 or null, got {self.max_kl!r}; e.g. max_kl=0.3")
        if self.shard is not None and not (isinstance(self.num_shards, int) and 0 <= self.shard < self.num_shards):
            raise ValueError(f"upgrade shard must be in [0, num_shards), got shard={self.shard!r} num_shards="
                             f"{self.num_shards!r}; e.g. `-m shard=0,1,2,3 num_shards=4`")
        for name in ("num_holdout", "max_synthetic"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"upgrade {name} must be an integer >= 1, got {getattr(self, name)!r}")

    def settings(self) -> dict[str, Any]:
        """What determines an adapter's upgrade (a finished one is reused only when these agree)."""
        keep = asdict(self)
        for volatile in ("adapters", "out", "shard", "num_shards"):
            keep.pop(volatile)
        return json.loads(json.dumps(keep, sort_keys=True, default=str))


# --------------------------------------------------------------------------- the fleet
def find_adapters(root: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Adapter folders under ``root`` (``adapter_config.json``), sorted; discriminators inside adapters skipped,
    and everything under ``exclude`` (the upgrade's own output, when it lies inside ``root``).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no adapter folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"adapters={str(root)!r} is not a folder; pass the folder that holds your adapter folders")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = sorted(p.parent for p in root.rglob(CONFIG_FILE)
                   if p.parent.name != DISCRIMINATOR_DIR and not p.parent.name.endswith("-discriminator")
                   and not (skip is not None and p.resolve().is_relative_to(skip)))
    if not found:
        raise ValueError(f"adapters={str(root)!r} holds no adapter folder (none has an {CONFIG_FILE}); point it at the "
                         "folder your adapters were saved into (lightning-peft train writes <run dir>/adapter)")
    return found


def _name(folder: Path, root: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return re.sub(r"[^\w.-]+", "__", rel) if rel != "." else folder.name


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def upgrade_fleet(cfg: UpgradeConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Upgrade every adapter under ``cfg.adapters`` (this job's shard); returns the report rows.

    Raises:
        FileNotFoundError / ValueError: no such folder, no adapters in it (before anything is done).
        UpgradeSettingsError: an adapter was upgraded into ``cfg.out`` with other settings.
    """
    from tqdm.auto import tqdm

    from lightning_peft import zoo

    root, out = Path(cfg.adapters), Path(cfg.out)
    folders = find_adapters(root, exclude=out)
    if cfg.shard is not None:
        folders = folders[cfg.shard :: cfg.num_shards]
    zoo.resolve(cfg.new)  # an unknown zoo-like name fails here, before any work
    settings = cfg.settings()
    # changed settings are refused before anything runs, naming the keys
    for folder in folders:
        _check_done(out / _name(folder, root), settings)
    rows = []
    bases = _Bases()
    for folder in tqdm(folders, desc=f"upgrade -> {cfg.new}", disable=not progress):
        name = _name(folder, root)
        target = out / name
        done = _check_done(target, settings)
        if done is not None:
            log.info("upgrade: %s already done with these settings (%s)", name, done["route"])
            rows.append(done)
            continue
        start = time.perf_counter()
        try:
            row = upgrade_adapter(folder, cfg, target, bases)
        except NoSeedsError as exc:
            row = {"route": "needs_data", "reason": str(exc), "agreement": None, "output": None}
        except Exception as exc:  # one adapter's failure is reported, the fleet goes on
            log.error("upgrade: %s failed: %s", name, exc)
            row = {"route": "failed", "reason": f"{type(exc).__name__}: {exc}", "agreement": None, "output": None,
                   "traceback": traceback.format_exc(limit=5)}
        row = {"adapter": name, "source": str(folder), **row, "seconds": round(time.perf_counter() - start, 1)}
        if row["route"] != "failed":
            atomic_write_text(target / DONE_FILE, json.dumps({"settings": settings, "digest": _digest(settings),
                                                              "row": row}, indent=2))
        rows.append(row)
    return rows


def _check_done(target: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    path = target / DONE_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("digest") == _digest(settings):
        return saved["row"]
    before = saved.get("settings", {})
    diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    pretty = "; ".join(f"{k}: before {before.get(k)!r} vs now {settings.get(k)!r}" for k in diff)
    raise UpgradeSettingsError(
        f"{target} was upgraded with other settings ({pretty}). Write into another out= folder, or delete "
        f"{path} to redo that adapter with the current settings."
    )


# --------------------------------------------------------------------------- one adapter
class _Bases:
    """Loaded base models by name (each use gets a deep copy: loading an adapter changes the model)."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[nn.Module, Any]] = {}

    def get(self, name: str) -> tuple[nn.Module, Any]:
        from lightning_peft import zoo

        if name not in self._models:
            model, tok = zoo.load(name)
            # keep the two last used (an old and a new base): the fleet shares them, memory stays bounded
            self._models = {**dict(list(self._models.items())[-1:]), name: (model.eval(), tok)}
        model, tok = self._models[name]
        return copy.deepcopy(model), tok

    def adapted(self, name: str, adapter: str | Path) -> tuple[nn.Module, Any]:
        import warnings

        from lightning_peft.adapter_io import BaseModelMismatchWarning

        model, tok = self.get(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseModelMismatchWarning)  # onto another base is the point here
            load_adapter(model, adapter)
        return model.eval(), tok


def old_base(folder: Path, record: AdapterRecord, config: Any, cfg: UpgradeConfig) -> str:
    """``cfg.old``, or the base the adapter names (its record, else its peft config), as a loadable name.

    Raises:
        ValueError: neither names a base that exists here.
    """
    import os

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


def upgrade_adapter(folder: Path, cfg: UpgradeConfig, target: Path, bases: _Bases | None = None) -> dict[str, Any]:
    """Try ``cfg.routes`` on one adapter; write the accepted candidate to ``target``; returns its report row."""
    bases = bases or _Bases()
    config, _, _ = read_adapter(folder)
    record = read_record(folder)
    old = old_base(folder, record, config, cfg)
    spec = spec_for_peft_type(config.peft_type)
    method = spec.name if spec else str(getattr(config.peft_type, "value", config.peft_type)).lower()
    reference, ref_tok = bases.adapted(old, folder)
    inputs, ref_outputs, synthetic = _check_inputs(folder, record, old, cfg, target, reference, ref_tok)
    scores: dict[str, Any] = {}
    reasons: list[str] = []
    for route in cfg.routes:
        made = _ROUTES[route](folder, record, old, method, cfg, target, bases, synthetic)
        if isinstance(made, str):  # not applicable
            reasons.append(f"{route}: {made}")
            continue
        candidate, cand_tok, owner, adapter_source = made
        score = agreement(reference, ref_tok, candidate, cand_tok, inputs, reference_outputs=ref_outputs,
                          max_new_tokens=cfg.max_new_tokens)
        scores[route] = score.to_dict()
        if cfg.keep_candidates:
            _save(owner, adapter_source, target / "candidates" / route, route, score, record, cfg, old)
        close = cfg.max_kl is not None and score.kl is not None and score.kl <= cfg.max_kl
        if score.agreement >= cfg.threshold or close:
            output = _save(owner, adapter_source, target / "adapter", route, score, record, cfg, old)
            return {"route": route, "agreement": score.agreement, "scores": scores, "method": method, "old": old,
                    "new": cfg.new, "output": str(output), "reason": None}
        kl = f", kl {score.kl:.3f} > max_kl {cfg.max_kl}" if cfg.max_kl is not None and score.kl is not None else ""
        reasons.append(f"{route}: agreement {score.agreement:.3f} < threshold {cfg.threshold}{kl}")
    best = max(scores.items(), key=lambda kv: kv[1]["agreement"], default=(None, None))
    return {"route": "needs_data", "agreement": best[1]["agreement"] if best[1] else None, "scores": scores,
            "method": method, "old": old, "new": cfg.new, "output": None,
            "reason": "retrain with real data: " + "; ".join(reasons)}


def _check_inputs(folder: Path, record: AdapterRecord, old: str, cfg: UpgradeConfig, target: Path,
                  reference: nn.Module, ref_tok: Any) -> tuple[list[str], list[str], Any]:
    """The agreement check's inputs (seeds + held-out synthetic) and the reference's outputs on them."""
    from lightning_peft.transfer.models import greedy_completions

    if not record.seeds:
        raise NoSeedsError(
            f"{folder} carries no seed inputs, so nothing can check a candidate without real data; save adapters "
            "with UpgradeRecord(num_seeds=5) (lightning-peft train does), or retrain this one with its data"
        )
    try:
        synthetic = _synthesize(folder, record, old, cfg, target, cfg.num_holdout)
    except SynthesisShortError as exc:  # the generator ran out of budget first: check on the seeds and what it kept
        synthetic = _short_set(target, exc)
    holdout = synthetic.accepted[: cfg.num_holdout]
    seed_out = greedy_completions(reference, ref_tok, record.seeds, max_new_tokens=cfg.max_new_tokens, progress=False)
    inputs = list(record.seeds) + [r["input"] for r in holdout]
    return inputs, seed_out + [r["output"] for r in holdout], synthetic


def _transfer_config(folder: Path, record: AdapterRecord, old: str, cfg: UpgradeConfig, target: Path,
                     count: int) -> Any:
    from lightning_peft.transfer import TransferConfig

    kwargs = {"label_max_new_tokens": cfg.max_new_tokens, **cfg.synthesis}
    return TransferConfig(
        source_model=old, source_adapter=str(folder), target_model=cfg.new, task=record.task or "task",
        seeds=list(record.seeds), discriminator=record.discriminator, filter=record.discriminator is not None,
        num_synthetic=count, cache=str(target / SYNTHETIC_FILE), seed=cfg.seed,
        task_kwargs=dict(record.task_kwargs), **kwargs,
    )


def _synthesize(folder: Path, record: AdapterRecord, old: str, cfg: UpgradeConfig, target: Path, count: int) -> Any:
    """The first ``count`` synthetic examples of this adapter (cached in ``target``; a larger count continues it)."""
    from lightning_peft.transfer import synthesize

    return synthesize(_transfer_config(folder, record, old, cfg, target, count))


def _short_set(target: Path, exc: SynthesisShortError) -> Any:
    """The synthetic set a synthesis saved before it gave up short of its count (``exc`` says why)."""
    from lightning_peft.transfer import SyntheticSet

    synthetic = SyntheticSet.load(target / SYNTHETIC_FILE)
    log.warning("upgrade: %s: %s; going on with the %d kept", target.name, exc, len(synthetic.accepted))
    return synthetic


def _direct(folder: Path, record: AdapterRecord, old: str, method: str, cfg: UpgradeConfig, target: Path,
            bases: _Bases, synthetic: Any) -> tuple[nn.Module, Any, nn.Module, Path] | str:
    """The old adapter loaded onto the new base (or why it cannot be)."""
    try:
        model, tok = bases.adapted(cfg.new, folder)
    except AdapterFormatError as exc:
        return f"the adapter does not fit the new base ({exc})"
    return model, tok, model, folder


def _translora(folder: Path, record: AdapterRecord, old: str, method: str, cfg: UpgradeConfig, target: Path,
               bases: _Bases, synthetic: Any) -> tuple[nn.Module, Any, nn.Module, None] | str:
    """A Trans-LoRA student on the new base, trained on synthetic inputs labelled by the old base + adapter."""
    from lightning_peft.transfer import train_student

    if len(synthetic.accepted) < cfg.num_holdout:
        stats = synthetic.header.get("stats") or {}
        return (f"the generator wrote only {len(synthetic.accepted)} usable inputs for the {cfg.num_holdout} held-out "
                f"ones ({stats.get('proposed', 0)} proposals), too few to train a student on; raise "
                "synthesis.max_proposed or set synthesis.generator to a model that follows the seeds")
    wanted = cfg.num_synthetic or min(record.train_size or cfg.max_synthetic, cfg.max_synthetic)
    tcfg = _transfer_config(folder, record, old, cfg, target, cfg.num_holdout + wanted)
    try:
        syn = _synthesize(folder, record, old, cfg, target, cfg.num_holdout + wanted)
    except SynthesisShortError as exc:  # short of the count: the student learns from what was kept, the check judges it
        syn = _short_set(target, exc)
    train = copy.copy(syn)
    train.records = syn.accepted[cfg.num_holdout :]  # the held-out inputs stay unseen
    if not train.records:
        return "the generator wrote no usable input beyond the held-out ones; raise synthesis.max_proposed"
    student = {**cfg.student, "method": cfg.student.get("method") or method}
    module, _ = train_student(tcfg, train, student["method"], student.get("method_kwargs"), student.get("module_kwargs"),
                              student.get("trainer_kwargs"), student.get("data_kwargs"), test=False)
    return module.model.eval(), module.tokenizer, module, None  # the adapter lives on the LightningModule


_ROUTES = {"direct": _direct, "translora": _translora}


def _save(owner: nn.Module, source: Path | None, path: Path, route: str, score: Agreement, record: AdapterRecord,
          cfg: UpgradeConfig, old: str) -> Path:
    """Write the accepted candidate: peft format, the new base's fingerprint, route and scores, the record carried on."""
    carried = {"task": record.task, "seeds": record.seeds, "train_size": record.train_size,
               "task_kwargs": record.task_kwargs, "base": cfg.new}
    object.__setattr__(owner, RECORD_ATTR, carried)  # the discriminator judges the *old* base's inputs: not carried
    meta = {"upgrade": {"route": route, "from": old, "to": cfg.new, "source_adapter": str(source) if source else None,
                        **score.to_dict(), "threshold": cfg.threshold}}
    with torch.no_grad():
        return save_adapter(owner, path, metadata=meta)
