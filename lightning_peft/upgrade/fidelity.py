"""The fidelity score: how much of the old adapter's own effect a candidate on the new base keeps.

The agreement (:mod:`.agreement`) compares greedy outputs and barely predicts real accuracy; the
token-level KL does, but its scale (nats per token) depends on the model and it needs one
vocabulary. The fidelity places the candidate on a scale anchored by two models that need no task
data: **0 is the bare new base** (the adapter's effect entirely lost), **1 is the reference** (old
base + old adapter, the effect entirely kept). It is scored under teacher forcing on the reference's
own completions ``c_i`` of the check's inputs ``x_i`` (the adapter's seed inputs and held-out
synthetic inputs, Trans-LoRA's data-free setting: Wang et al., NeurIPS 2024, arXiv 2405.17258,
section 3), so it is a ratio of two differences of the same kind: scale-free.

Within one vocabulary (same family, v1 -> v2) the KL form decides (``basis="kl"``)::

    fidelity_kl = 1 - KL(ref || cand) / KL(ref || new)          # mean nats per completion token each

Across vocabularies (another family) no distribution can be compared token by token, so the
log-likelihood form decides (``basis="ll"``). ``LL_m = sum_i log p_m(c_i | x_i) / sum_i bytes(c_i)``
is a model's teacher-forced log-likelihood of the completions per UTF-8 byte, each model under its
own tokenizer (so bytes, not tokens, are the unit)::

    fidelity_ll = (LL_cand - LL_new) / (LL_ref - LL_old)         # the share of the adapter's own gain kept

A text's log-likelihood depends on how it is tokenised (the same completion split into another
tokenizer's pieces gets another, often lower, likelihood that says nothing about the adapter), so
each difference is taken under one tokenizer only: the numerator under the new one (candidate and
new base), the denominator, the per-byte gain the old adapter opens over its own base, under the
old one. The reference cannot be run under the new tokenizer, so its 1 anchor there is estimated as
``LL_new + (LL_ref - LL_old)``: the adapter's gain, not the base's level, is what is assumed to
carry. It is exact where the candidate reproduces the reference behind another tokenization of the
same text (a renumbered vocabulary scores 1). Within one vocabulary it is reported next to the KL
form; the four per-byte log-likelihoods are kept too, so other anchors can be computed from the report.

The KL form is at most 1 and 1 only for the reference's own distribution; the log-likelihood form is
not bounded so. The reference's greedy completions, decoded and tokenised again, are not the text it
finds most likely, and a student trained on such completions grows more confident in them than its
teacher: on micro models a Trans-LoRA-like student passes 1 within a few steps, and the reference's
adapter scaled down can score above 1 on greedy completions. Completions *sampled* from the
reference, where ``LL_ref`` is the largest in expectation, are the principled alternative (not yet
measured against real accuracy).

The scores are reported raw, not clamped: below 0 the candidate fits the reference's completions
worse than the bare new base does, above 1 (``fidelity_ll`` only) the candidate gains more on them
over its base than the old adapter does over its own. A score whose denominator is not positive (the
reference is no more likely than its 0 anchor on its own completions: the adapter has no measurable
effect there) is ``None``, with the reason in ``note``; a route is never taken on a ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lightning_peft.transfer.models import adapters_disabled
from lightning_peft.upgrade.agreement import evaluating, kl_sum, teacher_forced

__all__ = ["Fidelity", "fidelity"]

EPS = 1e-9  # smallest denominator (nats per token or per byte) a score is divided by; below it the score is None


@dataclass
class Fidelity:
    """The fidelity of one candidate (see the module docstring).

    Attributes:
        fidelity: The deciding score: ``fidelity_kl`` within one vocabulary, else ``fidelity_ll``.
        basis: Which form ``fidelity`` is: ``"kl"`` or ``"ll"``.
        fidelity_kl: ``1 - KL(ref || cand) / KL(ref || new)`` (one vocabulary only, else ``None``).
        fidelity_ll: The per-byte log-likelihood form.
        kl_new: ``KL(ref || new)``, the bare new base's mean KL per completion token (nats; one vocabulary only).
        ll: Per-byte log-likelihoods (nats) of the completions: ``candidate``, ``new_base`` (under the new
            tokenizer), ``reference``, ``old_base`` (under the old one).
        bytes: UTF-8 bytes of the completions (the per-byte denominator).
        note: Why a score is ``None`` (``None`` when both that apply are defined).
        token_acc: Teacher-forced token accuracy on the completions (the share of completion tokens each model's
            argmax predicts), each model under its own tokenizer: ``candidate``, ``new_base``, ``reference``,
            ``old_base``.
        fidelity_acc: The accuracy form, ``(acc_cand - acc_new) / (acc_ref - acc_old)``: the share of the old
            adapter's token-accuracy gain on its own completions that the candidate keeps.
        relative_token_acc: ``acc_cand / acc_ref``: the candidate's token accuracy on the reference's completions
            relative to the reference's own (no bare-base anchor).
    """

    fidelity: float | None
    basis: Literal["kl", "ll"]
    fidelity_kl: float | None
    fidelity_ll: float | None
    kl_new: float | None
    ll: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    note: str | None = None
    token_acc: dict[str, float] = field(default_factory=dict)
    fidelity_acc: float | None = None
    relative_token_acc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"fidelity": self.fidelity, "fidelity_basis": self.basis, "fidelity_kl": self.fidelity_kl,
                "fidelity_ll": self.fidelity_ll, "kl_new": self.kl_new, "ll_per_byte": dict(self.ll),
                "bytes": self.bytes, "fidelity_note": self.note, "token_acc": dict(self.token_acc),
                "fidelity_acc": self.fidelity_acc, "relative_token_acc": self.relative_token_acc}


def _view(model: nn.Module, base: nn.Module | None, role: str) -> tuple[nn.Module, nn.Module | None]:
    """``(model, adapter-off switch)`` of a bare base: ``base`` as it is, or ``model`` with its adapter layers
    switched off for its forward passes when no base is given.

    Raises:
        ValueError: no ``base`` and ``model`` has no adapter layers.
    """
    if base is not None:
        return base, None
    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(f"the {role} model has no adapter layers to switch off, so its bare base cannot be derived "
                         f"from it; pass {role}_base=<the bare model> to fidelity()")
    return model, model


def _teacher_forced_sums(models: dict[str, tuple[nn.Module, nn.Module | None]], tokenizer: Any, prompts: Sequence[str],
                         completions: Sequence[str], kl_to: Sequence[str], batch_size: int) -> dict[str, float]:
    """Summed log-likelihoods of the completions under each model (key ``ll:<name>``), summed
    ``KL(reference || <name>)`` for each name in ``kl_to`` (``kl:<name>``), the completion tokens each model's argmax
    predicts (``hit:<name>``), and the token count (``tokens``).

    ``models`` maps a name to ``(model, adapter-off switch)``: the switch is the model whose adapters are
    turned off for this name's forward (``None``: run the model as it is). ``kl_to`` needs a ``reference``.
    """
    sums = dict.fromkeys([f"ll:{n}" for n in models] + [f"hit:{n}" for n in models] + [f"kl:{n}" for n in kl_to]
                         + ["tokens"], 0.0)
    with evaluating(*{id(m): m for m, _ in models.values()}.values()):
        for batch in teacher_forced(tokenizer, prompts, completions, batch_size):
            if not batch.targets.numel():
                continue
            logits = {}
            for name, (model, switch) in models.items():
                with adapters_disabled(switch) if switch is not None else nullcontext():
                    logits[name] = batch.logits(model)  # (N, V)
                lp = logits[name].log_softmax(-1)
                targets = batch.targets.to(lp.device)
                sums[f"ll:{name}"] += float(lp.gather(-1, targets[:, None]).sum())
                sums[f"hit:{name}"] += float((lp.argmax(-1) == targets).sum())  # teacher-forced token accuracy
            for name in kl_to:
                sums[f"kl:{name}"] += kl_sum(logits["reference"], logits[name])
            sums["tokens"] += batch.targets.numel()
    return sums


def _ratio(gain: float, span: float, what: str) -> tuple[float | None, str | None]:
    return (gain / span, None) if span > EPS else (None, f"{what} is {span:.3g}, not positive: the adapter has no "
                                                          "measurable effect on its own completions")


def fidelity(
    reference: nn.Module, reference_tokenizer: Any, candidate: nn.Module, candidate_tokenizer: Any,
    prompts: Sequence[str], completions: Sequence[str], *, old_base: nn.Module | None = None,
    new_base: nn.Module | None = None, same_vocabulary: bool | None = None, batch_size: int = 16,
) -> Fidelity:
    """Score ``candidate`` between the bare new base (0) and ``reference`` (1) on the reference's completions.

    Args:
        reference, reference_tokenizer: The old base with the old adapter.
        candidate, candidate_tokenizer: The new base with the candidate adapter.
        prompts: The inputs ``x_i`` (seed inputs and held-out synthetic inputs).
        completions: The reference's completions ``c_i`` of them (its greedy outputs, as the agreement
            check computes them; also the Trans-LoRA teacher's labels).
        old_base: The bare old base (default: ``reference`` with its adapter layers switched off).
        new_base: The bare new base (default: ``candidate`` with its adapter layers switched off); it shares
            ``candidate_tokenizer``.
        same_vocabulary: Whether the two tokenizers agree (default: compared here).
        batch_size: Rows per forward pass.

    Shapes: ``prompts`` and ``completions`` are ``n`` strings each; every model runs on padded batches of
    ``batch_size`` rows, ``(B, T)`` token ids under its own tokenizer, and is read at the ``N`` positions that
    predict completion tokens, ``(N, V)`` logits (:class:`~lightning_peft.upgrade.agreement.TeacherForced`).

    Returns:
        :class:`Fidelity`; every model's train/eval mode and adapters are as they were.

    Raises:
        ValueError: no prompts, or their number differs from the completions'; a model without adapter layers
            and no bare base given for it.
    """
    if not prompts or len(prompts) != len(completions):
        raise ValueError(f"fidelity needs one reference completion per prompt, got {len(prompts)} prompts and "
                         f"{len(completions)} completions")
    if same_vocabulary is None:
        same_vocabulary = reference_tokenizer.get_vocab() == candidate_tokenizer.get_vocab()
    n_bytes = sum(len(c.encode("utf-8")) for c in completions)
    views_ref = {"reference": (reference, None), "old_base": _view(reference, old_base, "old")}
    views_cand = {"candidate": (candidate, None), "new_base": _view(candidate, new_base, "new")}
    if same_vocabulary:
        ref_sums = cand_sums = _teacher_forced_sums({**views_ref, **views_cand}, reference_tokenizer, prompts,
                                                    completions, ["candidate", "new_base"], batch_size)
    else:
        ref_sums = _teacher_forced_sums(views_ref, reference_tokenizer, prompts, completions, [], batch_size)
        cand_sums = _teacher_forced_sums(views_cand, candidate_tokenizer, prompts, completions, [], batch_size)
    return _scores(ref_sums, cand_sums, n_bytes, same_vocabulary)


def _scores(ref_sums: dict[str, float], cand_sums: dict[str, float], n_bytes: int, same_vocabulary: bool) -> Fidelity:
    """The :class:`Fidelity` of the summed log-likelihoods and KLs (see the module docstring for the forms)."""
    if not n_bytes:
        return Fidelity(None, "kl" if same_vocabulary else "ll", None, None, None,
                        note="the reference's completions are all empty: nothing to score")
    ll = {"candidate": cand_sums["ll:candidate"] / n_bytes, "new_base": cand_sums["ll:new_base"] / n_bytes,
          "reference": ref_sums["ll:reference"] / n_bytes, "old_base": ref_sums["ll:old_base"] / n_bytes}
    f_ll, note_ll = _ratio(ll["candidate"] - ll["new_base"], ll["reference"] - ll["old_base"],
                           "the reference's per-byte log-likelihood gain over the old base")
    acc = {name: sums[f"hit:{name}"] / max(sums["tokens"], 1.0)
           for sums, names in ((cand_sums, ("candidate", "new_base")), (ref_sums, ("reference", "old_base")))
           for name in names}
    f_acc = _ratio(acc["candidate"] - acc["new_base"], acc["reference"] - acc["old_base"], "")[0]
    by_acc = {"token_acc": acc, "fidelity_acc": f_acc,
              "relative_token_acc": acc["candidate"] / acc["reference"] if acc["reference"] > EPS else None}
    if not same_vocabulary:
        return Fidelity(f_ll, "ll", None, f_ll, None, ll, n_bytes, note_ll, **by_acc)
    tokens = cand_sums["tokens"]
    kl_new = cand_sums["kl:new_base"] / tokens if tokens else 0.0
    kl_cand = cand_sums["kl:candidate"] / tokens if tokens else 0.0
    f_kl, note_kl = _ratio(kl_new - kl_cand, kl_new, "KL(reference || new base)")
    return Fidelity(f_kl, "kl", f_kl, f_ll, kl_new, ll, n_bytes, note_kl or note_ll, **by_acc)
