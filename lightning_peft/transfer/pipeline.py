"""Trans-LoRA's synthetic data: generate, filter, label, with every intermediate result on disk.

Wang et al. 2024 (arXiv 2405.17258), Algorithm 1::

    seeds (5 real inputs) ─► generator (target by default) ─► parse + de-duplicate
        ─► discriminator filter (source + yes/no LoRA) ─► teacher labels (source + adapter)
        ─► synthetic.jsonl (provenance)

:func:`synthesize` reuses a cached ``synthetic.jsonl`` whose header matches the request (and
continues one that is short); :func:`~lightning_peft.transfer.student.train_student` then distils it
into the target's adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lightning_peft._deprecated import deprecated_names
from lightning_peft.adapter_folder import AdapterFolder
from lightning_peft.budget import TimeBudget
from lightning_peft.model_loader import ModelLoader
from lightning_peft.tasks import get_task
from lightning_peft.transfer import config as _config
from lightning_peft.transfer import student as _student
from lightning_peft.transfer.config import TransferConfig, discriminator_folder, resolve_num_synthetic
from lightning_peft.transfer.filtering import FilterResult, mmd_rbf, rejection_sample
from lightning_peft.transfer.models import completion_margins, embed, greedy_completions, sample_candidates
from lightning_peft.transfer.provenance import SyntheticSet
from lightning_peft.transfer.synthesis import Deduplicator, SeedFormat, seed_list_prompt

__all__ = ["ANCHOR_PROBE_BATCHES", "SynthesisShortError", "fitting_seeds", "synthesize"]

log = logging.getLogger(__name__)
# generate calls of anchored items after which, none accepted, synthesis falls back to the free continuation
ANCHOR_PROBE_BATCHES = 4


class SynthesisShortError(RuntimeError):
    """The synthesis gave up before it kept the examples asked for (what it kept is saved in its cache)."""


def fitting_seeds(tokenizer: Any, seeds: list[str], task_name: str, max_new_tokens: int, context: int,
                  anchor_format: bool = False) -> list[str]:
    """The longest prefix of ``seeds`` whose seed-list prompt leaves ``max_new_tokens`` in ``context``."""
    for k in range(len(seeds), 0, -1):
        opening = SeedFormat(seeds[:k]).prefix if anchor_format else ""
        n = len(tokenizer(seed_list_prompt(seeds[:k], task_name, opening=opening))["input_ids"])
        if n + max_new_tokens <= context:
            return seeds[:k]
    raise ValueError(
        f"not even one seed fits the generator's context of {context} tokens with max_new_tokens={max_new_tokens}; "
        "lower max_new_tokens or use a generator with a longer context."
    )


def synthesize(cfg: TransferConfig, console: Console | None = None, models: ModelLoader | None = None,
               budget: TimeBudget | None = None) -> SyntheticSet:
    """Generate, filter and label ``num_synthetic`` examples (or reuse/continue ``cfg.cache``).

    Args:
        cfg: What to synthesise.
        console: Where the summary line goes (default: stderr).
        models: Loads the generator, the discriminator and the teacher (default: a fresh
            :class:`~lightning_peft.model_loader.ModelLoader`; the fleet upgrade shares its own).
        budget: Counts the seconds of proposing and filtering (``synthesis``) and of the teacher's labels
            (``labelling``); proposing stops once it has run out (then short: :class:`SynthesisShortError`).

    Returns:
        The synthetic set; its accepted records carry ``input`` and the teacher's ``output``.

    Raises:
        ProvenanceMismatchError: ``cfg.cache`` exists but was made with other settings.
        SynthesisShortError: fewer than ``num_synthetic`` accepted within ``max_proposed`` proposals or the
            ``budget`` (what was found is saved to ``cfg.cache`` first).
        ValueError: ``num_synthetic`` unset and not recorded with the source adapter.
        FileNotFoundError: ``filter=True`` and the source adapter has no discriminator.
    """
    console = console or Console(stderr=True)
    models = models or ModelLoader()
    wanted = resolve_num_synthetic(cfg)  # fails fast when unknown
    seeds_all = _real_seeds(cfg)
    generator, gen_tok = models.load(cfg.generator or cfg.target_model)
    context = cfg.generator_context or getattr(generator.config, "max_position_embeddings", 2048)
    seeds = fitting_seeds(gen_tok, seeds_all, cfg.task, cfg.max_new_tokens, context, cfg.anchor_format)
    if len(seeds) < len(seeds_all):
        log.warning("Trans-LoRA: only %d of %d seeds fit the generator's %d-token context", len(seeds), len(seeds_all),
                    context)
    header = _header(cfg, seeds)
    syn = SyntheticSet(header)
    if cfg.cache and Path(cfg.cache).exists():
        syn = SyntheticSet.load(cfg.cache)
        syn.check_header(header)
    missing = wanted - len(syn.accepted)
    if missing > 0:
        result = _extend(cfg, syn, seeds, missing, (generator, gen_tok), models, budget or TimeBudget())
        console.print(f"Trans-LoRA: kept {len(result.kept)} of {result.proposed} proposals "
                      f"(acceptance {result.acceptance_rate:.2f}); {len(syn.accepted)} synthetic examples")
        if cfg.cache:
            syn.save(cfg.cache)  # also when short: a rerun continues from here
        if len(syn.accepted) < wanted:
            raise SynthesisShortError(
                f"Trans-LoRA kept only {len(syn.accepted)} of the {wanted} requested synthetic examples "
                f"(acceptance {result.acceptance_rate:.3f} over {result.proposed} proposals). Raise max_proposed, lower "
                "num_synthetic, sample more diversely (temperature), or check the discriminator; "
                + ("rerunning continues from the cache." if cfg.cache else "set cache= to keep what was found.")
            )
    return syn


def _real_seeds(cfg: TransferConfig) -> list[str]:
    """``cfg.seeds``, else the first ``num_seeds`` training inputs of the task (at most ``num_seeds``).

    Raises:
        ValueError: none.
    """
    if cfg.seeds is not None:
        seeds = list(cfg.seeds)[: cfg.num_seeds]
    else:
        task = get_task(cfg.task, tokenizer=cfg.target_model, **{"num_train": max(cfg.num_seeds, 8), **cfg.task_kwargs})
        seeds = [e.prompt for e in task.get_examples()["train"][: cfg.num_seeds]]
    if not seeds:
        raise ValueError("Trans-LoRA needs at least one real seed input; pass seeds=[...] or num_seeds >= 1")
    return seeds


def _discriminator(cfg: TransferConfig) -> AdapterFolder:
    """The discriminator the filter runs (``cfg.discriminator`` or the source adapter's own).

    Raises:
        FileNotFoundError: there is none.
    """
    disc = discriminator_folder(cfg)
    if disc is None or not disc.exists:
        raise FileNotFoundError(
            f"filter=true needs a discriminator, but {disc or cfg.source_adapter} holds none: train one with the source "
            "adapter (TransLoRADiscriminator; `lightning-peft train experiment=translora_source`), pass "
            "discriminator=DIR, or set filter=false (the unfiltered ablation)"
        )
    return disc


def _header(cfg: TransferConfig, seeds: list[str]) -> dict[str, Any]:
    return {
        "task": cfg.task, "source_model": cfg.source_model, "target_model": cfg.target_model,
        "generator": cfg.generator or cfg.target_model, "teacher": cfg.source_model,
        "source_adapter_fingerprint": AdapterFolder(cfg.source_adapter).fingerprint(),
        "discriminator_fingerprint": _discriminator(cfg).fingerprint() if cfg.filter else None,
        "seeds": seeds, "filter": cfg.filter, "anchor_format": cfg.anchor_format,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                     "batch_size": cfg.generate_batch_size, "seed": cfg.seed},
        "label_max_new_tokens": cfg.label_max_new_tokens,
    }


def _extend(cfg: TransferConfig, syn: SyntheticSet, seeds: list[str], missing: int, generator: tuple[Any, Any],
            models: ModelLoader, budget: TimeBudget) -> FilterResult:
    """Propose, filter and label until ``missing`` more are kept (or ``max_proposed`` or the time ``budget`` is
    spent); adds them to ``syn``."""
    max_proposed = cfg.proposal_limit(missing)
    if cfg.filter:
        judge = models.load(cfg.source_model, _discriminator(cfg))
        margins: Callable[[list[str]], torch.Tensor] = lambda batch: completion_margins(*judge, batch, cfg.task)  # noqa: E731
    else:
        margins = lambda batch: torch.ones(len(batch))  # noqa: E731  (unfiltered ablation: accept all)
    proposals = _Proposals(cfg, generator, seeds, Deduplicator(seeds + [r["input"] for r in syn.records]),
                           cfg.seed + len(syn.records), max_proposed, margins, budget)
    with budget.phase("synthesis"):
        result = rejection_sample(iter(proposals), proposals.score, missing, max_proposed=max_proposed)
    teacher, teacher_tok = models.load(cfg.source_model, cfg.source_adapter)
    with budget.phase("labelling"):
        outputs = greedy_completions(teacher, teacher_tok, result.kept, max_new_tokens=cfg.label_max_new_tokens)
    syn.records += [{"input": x, "output": y, "accepted": True, "score": s}
                    for x, y, s in zip(result.kept, outputs, result.kept_scores)]
    syn.records += [{"input": x, "output": None, "accepted": False, "score": s}
                    for x, s in zip(result.rejected, result.rejected_scores)]
    syn.header["stats"] = _stats(result, seeds, *(judge if cfg.filter else models.load(cfg.source_model)))
    syn.header["stats"]["anchor_fallback"] = proposals.fallback
    return result


class _Proposals:
    """The generator's new inputs in batches, and their scores (what :func:`rejection_sample` draws from).

    With ``anchor_format`` the items are anchored to the seeds' opening and ending; when the first
    ``ANCHOR_PROBE_BATCHES`` generate calls of anchored items have none accepted, it goes on with the
    paper's free continuation (``fallback``). Sampling is bounded too (``4 * max_proposed / batch``
    generate calls): a generator whose completions rarely parse must not loop for ever; and it stops when the time
    budget has run out.
    """

    def __init__(self, cfg: TransferConfig, generator: tuple[Any, Any], seeds: list[str], dedup: Deduplicator,
                 seed: int, max_proposed: int, margins: Callable[[list[str]], torch.Tensor], budget: TimeBudget) -> None:
        self.cfg, self.generator, self.seeds, self.dedup, self.seed = cfg, generator, seeds, dedup, seed
        self.budget = budget
        self.max_batches = max(4, 4 * max_proposed // cfg.generate_batch_size)
        self.margins = margins
        self.accepted, self.fallback = 0, False

    def score(self, batch: list[str]) -> torch.Tensor:
        """The discriminator's margins of ``batch`` (counting the accepted ones for the fallback)."""
        margins = self.margins(batch)
        self.accepted += int((margins > 0).sum())
        return margins

    def __iter__(self) -> Iterator[list[str]]:
        batches = self._batches()
        while not self.budget.expired():  # checked before the next batch is generated
            batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _batches(self) -> Iterator[list[str]]:
        if not self.cfg.anchor_format:
            yield from self._stream(False, self.max_batches)
            return
        for b, batch in enumerate(self._stream(True, self.max_batches)):
            yield batch  # scored by rejection_sample before the next one is asked for
            if b + 1 >= ANCHOR_PROBE_BATCHES and not self.accepted:
                log.warning("Trans-LoRA: none of %d generate calls of anchored items was accepted; going on with "
                            "the free continuation of the seed list (anchor_format=false)", b + 1)
                self.fallback = True
                yield from self._stream(False, self.max_batches - b - 1)
                return

    def _stream(self, anchor: bool, batches: int) -> Iterator[list[str]]:
        c = self.cfg
        return sample_candidates(*self.generator, self.seeds, c.task, batch_size=c.generate_batch_size,
                                 temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                 seed=self.seed, dedup=self.dedup, max_batches=batches, anchor_format=anchor)


def _stats(result: FilterResult, seeds: list[str], model: torch.nn.Module, tok: Any) -> dict[str, Any]:
    """Acceptance and MMD (mean-pooled hidden states of the source base) of kept/rejected vs seeds."""
    def mmd(texts: list[str]) -> float | None:
        if len(texts) < 2 or len(seeds) < 2:
            return None  # the unbiased estimator needs two samples on each side
        return mmd_rbf(embed(model, tok, texts[:256]), embed(model, tok, seeds))

    return {"proposed": result.proposed, "acceptance_rate": result.acceptance_rate,
            "mmd_kept_vs_seeds": mmd(result.kept), "mmd_rejected_vs_seeds": mmd(result.rejected)}


__getattr__ = deprecated_names(__name__, {  # moved out of this module (kept for one release)
    "adapter_fingerprint": (_config.adapter_fingerprint, "lightning_peft.transfer.adapter_fingerprint"),
    "synthetic_examples": (_student.synthetic_examples, "lightning_peft.transfer.student.synthetic_examples"),
    "train_student": (_student.train_student, "lightning_peft.transfer.train_student"),
    "warm_start_from": (_student.warm_start_from, "lightning_peft.transfer.student.warm_start_from"),
})
