"""Trans-LoRA end to end: synthesise, filter, label, then distil into the target's adapter.

Wang et al. 2024 (arXiv 2405.17258), Algorithm 1, with every intermediate result on disk::

    seeds (5 real inputs) ─► generator (target by default) ─► parse + de-duplicate
        ─► discriminator filter (source + yes/no LoRA) ─► teacher labels (source + adapter)
        ─► synthetic.jsonl (provenance) ─► student: target + fresh adapter, trained with
           Lightning on the synthetic pairs (sequence-level distillation: tokenizers may differ)

:func:`synthesize` reuses a cached ``synthetic.jsonl`` whose header matches the request (and
continues one that is short); :func:`train_student` trains and tests through the user's
choice of adapter method, evaluating on the task's real test split.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console

from lightning_peft.adapter_io import CONFIG_FILE, load_adapter, read_adapter
from lightning_peft.registry import create_method
from lightning_peft.tasks import get_task
from lightning_peft.tasks.data import Example
from lightning_peft.tasks.examples import ExamplesDataModule
from lightning_peft.transfer.filtering import FilterResult, mmd_rbf, rejection_sample
from lightning_peft.transfer.models import completion_margins, embed, greedy_completions, sample_candidates
from lightning_peft.transfer.provenance import SyntheticSet
from lightning_peft.transfer.synthesis import Deduplicator, SeedFormat, seed_list_prompt

__all__ = ["SynthesisShortError", "TransferConfig", "adapter_fingerprint", "fitting_seeds", "synthesize", "train_student"]


class SynthesisShortError(RuntimeError):
    """The synthesis gave up before it kept the examples asked for (what it kept is saved in its cache)."""

log = logging.getLogger(__name__)
# generate calls of anchored items after which, none accepted, synthesis falls back to the free continuation
ANCHOR_PROBE_BATCHES = 4


@dataclass
class TransferConfig:
    """What to transfer where; mirrored by ``conf/transfer.yaml``.

    Attributes:
        source_model: Base the adapter was trained on (zoo name, folder or Hub name).
        source_adapter: The trained adapter folder (peft format).
        target_model: The new base.
        task: Task name (``lightning_peft.tasks.TASKS``): seeds come from its training split,
            the evaluation from its test split; the training data is otherwise never read. With
            ``seeds`` given it is only the name the prompts use (any string).
        seeds: The real inputs shown to the generator (default: the first ``num_seeds`` training
            inputs of ``task``); an adapter's recorded seeds (:mod:`lightning_peft.upgrade`).
        discriminator: Discriminator adapter folder (default ``{source_adapter}-discriminator``);
            ``None`` together with ``filter=False`` skips filtering (the "unfiltered" ablation).
        generator: Model that writes new inputs (default: ``target_model``, as in the paper).
        num_seeds: Real inputs shown to the generator (paper: 5); fewer are used when they do
            not fit the generator's context, with a warning.
        num_synthetic: Synthetic examples to keep; default: the size of the original training set,
            as recorded in the discriminator folder by ``TransLoRADiscriminator`` (as in the paper).
        filter: Keep only what the discriminator accepts.
        anchor_format: Start every synthesised input with the seeds' common opening and end it
            with their common ending (:class:`~lightning_peft.transfer.synthesis.SeedFormat`;
            ours, not in the paper: see ``benchmarks/README.md`` for what it changes). When the
            first ``ANCHOR_PROBE_BATCHES`` generate calls of anchored items yield no accepted input,
            synthesis goes on with the paper's free continuation (logged, and recorded in the
            synthetic set's ``stats.anchor_fallback``).
        max_proposed: Give up after scoring this many proposals (default ``50 * num_synthetic``);
            sampling stops after ``4 * max_proposed / generate_batch_size`` generate calls too.
        temperature, top_p, generate_batch_size, max_new_tokens: Generator sampling.
        label_max_new_tokens: Teacher's greedy completion length.
        seed: Sampling seed (the same seed regenerates the same set).
        generator_context: Token budget of the generator's prompt + completion (default: its
            ``max_position_embeddings``). Raise it only for RoPE models, which run past it.
        cache: JSONL path of the synthetic set (default: none, nothing cached).
        kl_weight: Weight of the token-level KL to the teacher in the student's loss (0: off,
            sequence-level distillation only). Needs source and target to share a vocabulary.
        kl_temperature: Softening of that KL.
        warm_start: Start the student from the source adapter itself when it fits the target's
            shapes (a same-family update), instead of a fresh adapter; a target it does not fit
            gets a fresh one. Ours, not in the paper (which transfers across families): the
            synthetic data then only has to correct the drift, not teach the task from scratch.
        warm_lr, warm_steps: Peak learning rate and steps of a warm-started student (``None``: the
            student's own ``lr`` and ``max_steps``). Lower and fewer than a fresh student's: at a fresh
            student's 5e-3 / 300 steps it drifts away from what the source adapter knew
            (``benchmarks/README.md``, Trans-LoRA ablations).
    """

    source_model: str
    source_adapter: str
    target_model: str
    task: str
    discriminator: str | None = None
    generator: str | None = None
    seeds: list[str] | None = None
    num_seeds: int = 5
    num_synthetic: int | None = None
    filter: bool = True
    anchor_format: bool = True
    max_proposed: int | None = None
    temperature: float = 1.0
    top_p: float = 0.95
    generate_batch_size: int = 16
    max_new_tokens: int = 64
    label_max_new_tokens: int = 64
    seed: int = 0
    generator_context: int | None = None
    cache: str | None = None
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    warm_start: bool = True
    warm_lr: float | None = 5e-4
    warm_steps: int | None = 100
    task_kwargs: dict[str, Any] = field(default_factory=dict)


def adapter_fingerprint(folder: str | os.PathLike[str]) -> str:
    """sha256 of the adapter folder's weight file (first 16 hex digits)."""
    files = sorted(Path(folder).glob("adapter_model.*"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no adapter_model.* file; pass a folder written by save_adapter.")
    return hashlib.sha256(files[0].read_bytes()).hexdigest()[:16]


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


def _load(name: str, adapter: str | None = None) -> tuple[torch.nn.Module, Any]:
    from lightning_peft import zoo

    model, tok = zoo.load(name)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval(), tok


def _header(cfg: TransferConfig, seeds: list[str]) -> dict[str, Any]:
    disc = discriminator_folder(cfg)
    return {
        "task": cfg.task, "source_model": cfg.source_model, "target_model": cfg.target_model,
        "generator": cfg.generator or cfg.target_model, "teacher": cfg.source_model,
        "source_adapter_fingerprint": adapter_fingerprint(cfg.source_adapter),
        "discriminator_fingerprint": adapter_fingerprint(disc) if cfg.filter else None,
        "seeds": seeds, "filter": cfg.filter, "anchor_format": cfg.anchor_format,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                     "batch_size": cfg.generate_batch_size, "seed": cfg.seed},
        "label_max_new_tokens": cfg.label_max_new_tokens,
    }


def discriminator_folder(cfg: TransferConfig) -> str:
    """``cfg.discriminator`` or the convention ``{source_adapter}-discriminator``."""
    return cfg.discriminator or f"{cfg.source_adapter.rstrip('/')}-discriminator"


def resolve_num_synthetic(cfg: TransferConfig) -> int:
    """``cfg.num_synthetic``, or the source's training set size recorded with its discriminator.

    Raises:
        ValueError: neither is known (no discriminator folder, or one saved without the size).
    """
    if cfg.num_synthetic is not None:
        return cfg.num_synthetic
    folder = discriminator_folder(cfg)
    size = read_adapter(folder)[2].get("train_size") if Path(folder, CONFIG_FILE).exists() else None
    if not size:
        raise ValueError(
            f"num_synthetic is not set and {folder} records no training set size (TransLoRADiscriminator writes "
            "it); pass num_synthetic=N, e.g. the number of examples the source adapter was trained on."
        )
    return int(size)


def synthesize(cfg: TransferConfig, console: Console | None = None) -> SyntheticSet:
    """Generate, filter and label ``num_synthetic`` examples (or reuse/continue ``cfg.cache``).

    Returns:
        The synthetic set; its accepted records carry ``input`` and the teacher's ``output``.

    Raises:
        ProvenanceMismatchError: ``cfg.cache`` exists but was made with other settings.
        SynthesisShortError: fewer than ``num_synthetic`` accepted within ``max_proposed`` proposals
            (what was found is saved to ``cfg.cache`` first).
        ValueError: ``num_synthetic`` unset and not recorded with the discriminator.
    """
    console = console or Console(stderr=True)
    wanted = resolve_num_synthetic(cfg)  # fails fast when unknown
    if cfg.seeds is not None:
        seeds_all = list(cfg.seeds)[: cfg.num_seeds]
    else:
        task = get_task(cfg.task, tokenizer=cfg.target_model, **{"num_train": max(cfg.num_seeds, 8), **cfg.task_kwargs})
        seeds_all = [e.prompt for e in task.get_examples()["train"][: cfg.num_seeds]]
    if not seeds_all:
        raise ValueError("Trans-LoRA needs at least one real seed input; pass seeds=[...] or num_seeds >= 1")
    generator, gen_tok = _load(cfg.generator or cfg.target_model)
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
        dedup = Deduplicator(seeds + [r["input"] for r in syn.records])
        max_proposed = cfg.max_proposed or 50 * missing
        # bound the sampling too: a generator whose completions rarely parse must not loop for ever
        max_batches = max(4, 4 * max_proposed // cfg.generate_batch_size)
        def stream(anchor: bool, batches: int) -> Any:
            return sample_candidates(generator, gen_tok, seeds, cfg.task, batch_size=cfg.generate_batch_size,
                                     temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed + len(syn.records), dedup=dedup, max_batches=batches,
                                     anchor_format=anchor)

        if cfg.filter:
            disc, disc_tok = _load(cfg.source_model, discriminator_folder(cfg))
            margins = lambda batch: completion_margins(disc, disc_tok, batch, cfg.task)  # noqa: E731
        else:
            margins = lambda batch: torch.ones(len(batch))  # noqa: E731  (unfiltered ablation: accept all)
        accepted, fallback = 0, False

        def score(batch: list[str]) -> torch.Tensor:
            nonlocal accepted
            m = margins(batch)
            accepted += int((m > 0).sum())
            return m

        def anchored_then_free() -> Any:  # the free continuation once the anchored probe found nothing
            nonlocal fallback
            for b, batch in enumerate(stream(True, max_batches)):
                yield batch  # scored by rejection_sample before the next one is asked for
                if b + 1 >= ANCHOR_PROBE_BATCHES and not accepted:
                    log.warning("Trans-LoRA: none of %d generate calls of anchored items was accepted; going on with "
                                "the free continuation of the seed list (anchor_format=false)", b + 1)
                    fallback = True
                    yield from stream(False, max_batches - b - 1)
                    return

        proposals = anchored_then_free() if cfg.anchor_format else stream(False, max_batches)
        result = rejection_sample(proposals, score, missing, max_proposed=max_proposed)
        teacher, teacher_tok = _load(cfg.source_model, cfg.source_adapter)
        outputs = greedy_completions(teacher, teacher_tok, result.kept, max_new_tokens=cfg.label_max_new_tokens)
        syn.records += [{"input": x, "output": y, "accepted": True, "score": s}
                        for x, y, s in zip(result.kept, outputs, result.kept_scores)]
        syn.records += [{"input": x, "output": None, "accepted": False, "score": s}
                        for x, s in zip(result.rejected, result.rejected_scores)]
        syn.header["stats"] = _stats(result, seeds, *(_load(cfg.source_model) if not cfg.filter else (disc, disc_tok)))
        syn.header["stats"]["anchor_fallback"] = fallback
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


def _stats(result: FilterResult, seeds: list[str], model: torch.nn.Module, tok: Any) -> dict[str, Any]:
    """Acceptance and MMD (mean-pooled hidden states of the source base) of kept/rejected vs seeds."""
    def mmd(texts: list[str]) -> float | None:
        if len(texts) < 2 or len(seeds) < 2:
            return None  # the unbiased estimator needs two samples on each side
        return mmd_rbf(embed(model, tok, texts[:256]), embed(model, tok, seeds))

    return {"proposed": result.proposed, "acceptance_rate": result.acceptance_rate,
            "mmd_kept_vs_seeds": mmd(result.kept), "mmd_rejected_vs_seeds": mmd(result.rejected)}


def synthetic_examples(records: list[dict[str, Any]]) -> list[Example]:
    """Training examples of accepted synthetic records: the input, then the teacher's completion."""
    return [Example(r["input"], " " + (r["output"] or "").strip(), (r["output"] or "").strip()) for r in records]


def warm_start_from(module: L.LightningModule, adapter: str) -> bool:
    """Load ``adapter`` trainable into ``module`` (built first) when it fits its shapes; ``False`` if not.

    The base mismatch warning is expected here (the adapter comes from the old base) and is
    not shown; the model is left unchanged when the shapes differ.
    """
    from lightning_peft.adapter_io import AdapterFormatError, BaseModelMismatchWarning

    module.configure_model()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseModelMismatchWarning)
            load_adapter(module, adapter, is_trainable=True)
    except AdapterFormatError as exc:
        log.info("Trans-LoRA: the source adapter does not fit the target (%s); the student starts fresh", exc)
        return False
    return True


def train_student(
    cfg: TransferConfig,
    syn: SyntheticSet,
    method: str = "lora",
    method_kwargs: dict[str, Any] | None = None,
    module_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    data_kwargs: dict[str, Any] | None = None,
    test: bool = True,
) -> tuple[L.LightningModule, dict[str, float]]:
    """Train a fresh adapter on ``cfg.target_model`` with the synthetic pairs; test on real data.

    With ``test=False`` no real data is read at all (the upgrade's data-free route): the metrics
    are empty and the examples' length comes from ``data_kwargs``/``cfg.task_kwargs``
    (``max_length``, default 128).

    The loss is the LM loss on the teacher's completions, plus the teacher's token-level KL when
    ``cfg.kl_weight > 0`` (:class:`~lightning_peft.transfer.distill.DistillationModule`).

    Returns:
        The trained module and the test metrics (``test/exact_match``, ``test/loss``, ...).

    Raises:
        ValueError: the synthetic set has no accepted examples.
    """
    from lightning_peft.module import CausalLMModule

    train = synthetic_examples(syn.accepted)
    if not train:
        raise ValueError("the synthetic set has no accepted examples; raise num_synthetic or check the filter.")
    if test:
        task = get_task(cfg.task, tokenizer=cfg.target_model, **cfg.task_kwargs)
        data = ExamplesDataModule(cfg.target_model, train, test=task.get_examples()["test"],
                                  **{"max_length": task.max_length, **(data_kwargs or {})})
        data.extract_answer = task.extract_answer  # type: ignore[method-assign]  (the task's own scoring)
    else:
        length = cfg.task_kwargs.get("max_length", 128)
        data = ExamplesDataModule(cfg.target_model, train, **{"max_length": length, **(data_kwargs or {})})
    if cfg.kl_weight > 0:  # token-level KL on top (same vocabulary only; checked in configure_model)
        from lightning_peft.transfer.distill import DistillationModule

        module: CausalLMModule = DistillationModule(_load(cfg.source_model, cfg.source_adapter), cfg.kl_weight,
                                                    cfg.kl_temperature, model=cfg.target_model, **(module_kwargs or {}))
    else:
        module = CausalLMModule(model=cfg.target_model, **(module_kwargs or {}))
    kw: dict[str, Any] = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False}
    kw.update(trainer_kwargs or {})
    warm = cfg.warm_start and warm_start_from(module, cfg.source_adapter)
    if warm:  # it continues a trained adapter: a gentler schedule than a fresh one's
        module.hparams.lr = cfg.warm_lr or module.hparams.lr
        kw["max_steps"] = cfg.warm_steps or kw.get("max_steps", -1)
    trainer = L.Trainer(callbacks=[] if warm else [create_method(method, **(method_kwargs or {}))], **kw)
    trainer.fit(module, data)
    if not test:
        return module, {}
    metrics = trainer.test(module, data, verbose=False)[0]
    return module, {k: float(v) for k, v in metrics.items()}


