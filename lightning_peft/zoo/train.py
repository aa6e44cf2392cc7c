"""Packing the corpus into blocks, the (deliberately plain) pre-training loop and its thread count."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .spec import ZooSpec

IGNORE_INDEX = -100


def build_threads() -> int:
    """CPU threads a build trains with: ``$LIGHTNING_PEFT_ZOO_THREADS``, default 1.

    One thread by default, for two reasons: the result is then bit-identical whatever the
    caller's ``torch.get_num_threads()`` (GPT-2's Conv1D sums differ in the last bit between
    thread counts), and on a small shared machine a second process using the same cores
    makes multi-threaded OpenMP spin-wait and run ~20x slower, while one thread degrades
    gracefully. On an idle machine two threads are ~1.7x faster.

    Raises:
        ValueError: The variable is not a positive integer.
    """
    raw = os.environ.get("LIGHTNING_PEFT_ZOO_THREADS", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"LIGHTNING_PEFT_ZOO_THREADS must be a positive integer, got {raw!r}; unset it to use 1"
        )
    return int(raw)


def pack(
    tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize documents and pack them greedily into blocks that start at a document start.

    Every document is encoded with the tokenizer's own specials (Llama-style adds ``<s>``)
    and ends with ``eos``. Documents are appended to a block while they fit; the rest of
    the block is padding whose labels are ignored. Starting blocks at document starts
    means every kind of prompt is seen at position 0, where zoo users start generating.
    A document longer than ``seq_len`` is cut into ``seq_len`` pieces.

    Args:
        tokenizer: Tokenizer with ``eos_token_id`` and ``pad_token_id`` set.
        docs: Documents (strings).
        seq_len: Block length ``T``.

    Returns:
        ``(input_ids, labels)``, both ``(N, T)`` int64; labels are ``input_ids`` with
        padding set to ``-100`` (the model shifts them itself).
    """
    # verbose=False: documents are measured against seq_len here, not model_max_length.
    encoded = tokenizer(list(docs), add_special_tokens=True, verbose=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows: list[list[int]] = []
    cur: list[int] = []
    for ids in encoded:
        ids = [*ids, eos]
        pieces = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
        for piece in pieces:
            if len(cur) + len(piece) > seq_len:
                rows.append(cur)
                cur = []
            cur = cur + piece
    if cur:
        rows.append(cur)
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


@dataclass
class TrainResult:
    """Outcome of `pretrain`.

    Attributes:
        losses: Training loss of every step (nats per token).
        final_loss: Mean loss of the last 10% of steps (at least one), the smoothed end value.
    """

    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        k = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-k:]) / k)


def lr_at(step: int, spec: ZooSpec) -> float:
    """Learning-rate multiplier: linear warm-up over ``spec.warmup`` steps, cosine to 0.1."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    spec: ZooSpec,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place for ``spec.steps`` AdamW steps on packed blocks.

    Data order comes from a local `torch.Generator` seeded with ``spec.seed`` (epochs of
    random permutations), so the global RNG of the caller is untouched and a build is
    deterministic.

    Args:
        model: Causal LM (float32) in any mode; it is left in eval mode.
        input_ids: ``(N, T)`` packed blocks from `pack`.
        labels: ``(N, T)`` labels with ``-100`` on padding.
        spec: Supplies steps, batch, lr, warmup, weight_decay, seed.
        progress: Show a tqdm bar over the steps.

    Returns:
        The per-step losses.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(spec.seed)
    # Decay matrices only: biases and norm gains shrink to nothing otherwise.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, spec))
    if getattr(model, "loss_type", "") is None:
        # transformers infers the loss from the class name and warns for "GPT2LMHeadModel".
        model.loss_type = "ForCausalLM"
    model.train()
    result = TrainResult()
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(spec.steps), desc=f"zoo {spec.name}", disable=not progress, leave=False)
    for _ in bar:
        if len(order) < spec.batch:
            order = torch.cat([order, torch.randperm(len(input_ids), generator=gen)])
        idx, order = order[: spec.batch], order[spec.batch :]
        # The mask only hides the trailing padding (right padding under a causal mask changes
        # nothing for real tokens, but it keeps transformers' padding check quiet).
        mask = (labels[idx] != IGNORE_INDEX).long()
        loss = model(input_ids=input_ids[idx], attention_mask=mask, labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    model.eval()
    return result
