"""The data-free agreement check: does a candidate on the new base behave like the old adapter on the old base?

No task data is needed. The reference is the old base + old adapter; the candidate (the old
adapter loaded onto the new base, or a Trans-LoRA student) is run on the same inputs (the seed
inputs the adapter carries and held-out synthetic inputs) and compared:

* ``agreement``: mean over inputs of the similarity of the two greedy completions,
  ``difflib.SequenceMatcher(a, b).ratio()`` on whitespace-normalised text, in [0, 1] (1 = the
  same text). It needs no shared tokenizer, so it scores a transfer to another family too.
* ``exact``: share of inputs whose two greedy completions are identical.
* ``kl``: when both tokenizers are the same (same family, v1 -> v2), the mean per-token
  KL(reference || candidate) under teacher forcing on the reference's completion, in nats.

``agreement`` decides with ``score=agreement`` (it barely predicts real test accuracy on the zoo,
``benchmarks/upgrade_fleet.py``; the default decides on the fidelity, :mod:`.fidelity`, scored on the same
completions through the same teacher forcing: :func:`teacher_forced`, :func:`kl_sum`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.metrics import normalize_whitespace
from lightning_peft.transfer.models import greedy_completions

__all__ = ["Agreement", "TeacherForced", "agreement", "completion_kl", "evaluating", "kl_sum", "teacher_forced",
           "text_similarity"]


def text_similarity(a: str, b: str) -> float:
    """``SequenceMatcher`` ratio of two completions after whitespace normalisation (1 for equal texts)."""
    a, b = normalize_whitespace(a), normalize_whitespace(b)
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


@dataclass
class Agreement:
    """Scores of one candidate against the reference (see the module docstring)."""

    agreement: float
    exact: float
    kl: float | None
    inputs: int

    def to_dict(self) -> dict[str, Any]:
        return {"agreement": self.agreement, "exact": self.exact, "kl": self.kl, "inputs": self.inputs}


@dataclass
class TeacherForced:
    """One batch of ``prompt + completion`` rows, right-padded, for scoring completions under teacher forcing.

    Prompt and completion are tokenised apart (the completion without special tokens), as a student is
    trained on them. Position ``t`` of a row predicts its token ``t + 1``; ``keep`` marks the positions
    that predict a completion token (with an empty prompt the first completion token has none).

    Attributes:
        ids: ``(B, T)`` token ids, padded with the tokenizer's padding (else end) token.
        mask: ``(B, T)`` attention mask.
        keep: ``(B, T)`` bool, the positions predicting completion tokens; ``N = keep.sum()``.
        targets: ``(N,)`` the completion tokens they predict, in ``keep``'s row-major order.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    targets: torch.Tensor

    def logits(self, model: nn.Module) -> torch.Tensor:
        """``(N, V)`` float32 logits of ``model`` at the kept positions (on the model's device)."""
        device = next(model.parameters()).device
        out = model(input_ids=self.ids.to(device), attention_mask=self.mask.to(device)).logits  # (B, T, V)
        return out.float()[self.keep.to(device)]


def teacher_forced(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                   batch_size: int = 16) -> Iterator[TeacherForced]:
    """``prompts[i] + completions[i]`` in batches of ``batch_size`` rows (see :class:`TeacherForced`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        rows = []
        for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size], strict=True):
            p_ids = tokenizer(p)["input_ids"]
            rows.append((p_ids + tokenizer(c, add_special_tokens=False)["input_ids"], len(p_ids)))
        width = max(len(seq) for seq, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        keep = torch.zeros(len(rows), width, dtype=torch.bool)
        for j, (seq, n_prompt) in enumerate(rows):
            ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[j, : len(seq)] = 1
            keep[j, max(n_prompt - 1, 0) : len(seq) - 1] = True  # the positions predicting completion tokens
        yield TeacherForced(ids, mask, keep, ids.roll(-1, dims=1)[keep])  # (N,) the token after each kept position


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode under ``torch.no_grad``, their train/eval modes restored after."""
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in zip(models, was, strict=True):
            m.train(training)


def kl_sum(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Sum over positions of KL(reference || candidate) in nats, from ``(N, V)`` logits.

    Models of one vocabulary may pad their output layer to different widths; both are cut to the
    narrower one (the padded rows are never targets) before the softmax.
    """
    width = min(reference_logits.shape[-1], candidate_logits.shape[-1])
    ref = reference_logits[:, :width].log_softmax(-1)
    cand = candidate_logits[:, :width].to(ref.device).log_softmax(-1)
    return float(F.kl_div(cand, ref, log_target=True, reduction="sum"))


def completion_kl(reference: nn.Module, candidate: nn.Module, tokenizer: Any, prompts: Sequence[str],
                  completions: Sequence[str], batch_size: int = 16) -> float:
    """Mean per-token KL(reference || candidate) on ``prompt + completion`` tokens of the completions.

    Both models must share ``tokenizer`` (the same vocabulary). Positions are those predicting
    the completion's tokens (:func:`teacher_forced`); a completion of no tokens adds nothing.
    """
    total, count = 0.0, 0
    with evaluating(reference, candidate):
        for batch in teacher_forced(tokenizer, prompts, completions, batch_size):
            if batch.targets.numel():
                total += kl_sum(batch.logits(reference), batch.logits(candidate))
                count += batch.targets.numel()
    return total / count if count else 0.0


def agreement(
    reference: nn.Module, reference_tokenizer: Any, candidate: nn.Module, candidate_tokenizer: Any,
    inputs: Sequence[str], *, reference_outputs: Sequence[str] | None = None, max_new_tokens: int = 64,
    same_vocabulary: bool | None = None,
) -> Agreement:
    """Score ``candidate`` against ``reference`` on ``inputs`` (greedy outputs; KL when the vocabularies match).

    Args:
        reference, reference_tokenizer: The old base with the old adapter.
        candidate, candidate_tokenizer: The new base with the candidate adapter.
        inputs: Prompts (seed inputs and held-out synthetic inputs).
        reference_outputs: The reference's greedy completions when already known (the teacher's
            labels of a synthetic set); computed otherwise.
        max_new_tokens: Greedy decoding budget of both.
        same_vocabulary: Whether the tokenizers agree (default: compared here).

    Raises:
        ValueError: no inputs.
    """
    if not inputs:
        raise ValueError("the agreement check needs inputs; the adapter carries no seeds and no synthetic inputs were made")
    ref_out = list(reference_outputs) if reference_outputs is not None else greedy_completions(
        reference, reference_tokenizer, list(inputs), max_new_tokens=max_new_tokens, progress=False)
    cand_out = greedy_completions(candidate, candidate_tokenizer, list(inputs), max_new_tokens=max_new_tokens,
                                  progress=False)
    sims = [text_similarity(a, b) for a, b in zip(ref_out, cand_out, strict=True)]
    exact = sum(normalize_whitespace(a) == normalize_whitespace(b) for a, b in zip(ref_out, cand_out, strict=True))
    if same_vocabulary is None:
        same_vocabulary = reference_tokenizer.get_vocab() == candidate_tokenizer.get_vocab()
    kl = completion_kl(reference, candidate, reference_tokenizer, inputs, ref_out) if same_vocabulary else None
    return Agreement(sum(sims) / len(sims), exact / len(inputs), kl, len(inputs))
