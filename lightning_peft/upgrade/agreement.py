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

``agreement`` is what a route is accepted on (its threshold is calibrated against real test
accuracy on the zoo, ``benchmarks/upgrade_fleet.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.metrics import normalize_whitespace
from lightning_peft.transfer.models import greedy_completions

__all__ = ["Agreement", "agreement", "completion_kl", "text_similarity"]


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


@torch.no_grad()
def completion_kl(reference: nn.Module, candidate: nn.Module, tokenizer: Any, prompts: Sequence[str],
                  completions: Sequence[str], batch_size: int = 16) -> float:
    """Mean per-token KL(reference || candidate) on ``prompt + completion`` tokens of the completions.

    Both models must share ``tokenizer`` (the same vocabulary). Positions are those predicting
    the completion's tokens; a completion of no tokens adds nothing.
    """
    total, count = 0.0, 0
    was = reference.training, candidate.training
    reference.eval(), candidate.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            rows = []
            for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size], strict=True):
                p_ids = tokenizer(p)["input_ids"]
                c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
                rows.append((p_ids + c_ids, len(p_ids), len(c_ids)))
            width = max(len(r[0]) for r in rows)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            keep = torch.zeros(len(rows), width, dtype=torch.bool)  # position t predicts token t + 1
            for j, (seq, n_prompt, n_completion) in enumerate(rows):
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, : len(seq)] = 1
                keep[j, n_prompt - 1 : n_prompt - 1 + n_completion] = True
            device = next(reference.parameters()).device
            ref = reference(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()[keep.to(device)]
            cand = candidate(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()[keep.to(device)]
            if ref.numel():
                total += float(F.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"))
                count += ref.shape[0]
    finally:
        reference.train(was[0]), candidate.train(was[1])
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
