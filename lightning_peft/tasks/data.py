"""Tokenisation, datasets and collation shared by every prompt/completion task.

An example becomes ``prefix + prompt + completion + eos`` token ids (``prefix`` is what the
tokenizer adds in front of a text, e.g. Llama's ``<s>``); the loss is taken on the
completion and the eos only. Prompt and completion are tokenised separately, so the prompt
a model is given at generation time is exactly the prompt it was trained behind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Truncation = Literal["left", "error", "drop"]


@dataclass(frozen=True)
class Example:
    """One task example before tokenisation.

    Attributes:
        prompt: What the model is given (ends right before the completion).
        completion: What the model must write (usually starts with a space).
        answer: The reference answer that `extract_answer` of the generation must equal
            (the final number for arithmetic, the sentence or SQL string otherwise).
    """

    prompt: str
    completion: str
    answer: str


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example.

    Attributes:
        input_ids: ``prefix + prompt + completion + [eos]``.
        prompt_length: Number of leading ids that are prefix or prompt (label -100).
        answer: The example's reference answer.
    """

    input_ids: tuple[int, ...]
    prompt_length: int
    answer: str


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts in front of every text (``[bos]`` for Llama, ``[]`` for GPT-2)."""
    with_special = tokenizer("a b")["input_ids"]
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: Truncation = "left",
    split: str = "train",
) -> list[TokenizedExample]:
    """Tokenise examples into ``prefix + prompt + completion + eos`` within ``max_length``.

    Args:
        examples: The examples of one split.
        tokenizer: Any Hugging Face tokenizer with an eos token.
        max_length: Most tokens of one full sequence (prefix, prompt, completion and eos).
        truncation: ``"left"`` drops the prompt's first tokens (after the prefix) until the
            sequence fits; ``"error"`` raises instead; ``"drop"`` is ``"left"`` that also leaves out (logged) an
            example whose completion alone does not fit (a teacher's run-away synthetic label) instead of raising.
            The completion is never truncated.
        split: Split name, for error messages.

    Returns:
        One `TokenizedExample` per example, in order (those left out by ``"drop"`` aside).

    Raises:
        ValueError: The tokenizer has no eos token, a completion alone does not fit (with ``"drop"``: none
            fits), or an example is too long and ``truncation="error"``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"the tokenizer {type(tokenizer).__name__} has no eos token (eos_token_id=None); completions end with "
            "eos so the model learns to stop: set `tokenizer.eos_token` before building the task"
        )
    if not examples:
        return []
    prefix = special_prefix(tokenizer)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
    out: list[TokenizedExample] = []
    dropped = 0
    for i, (ex, p, c) in enumerate(zip(examples, prompts, completions)):
        budget = max_length - len(prefix) - len(c) - 1  # room left for the prompt
        if budget < 1 and truncation == "drop" and dropped + 1 < len(examples):
            dropped += 1
            continue
        if budget < 1:
            need = len(prefix) + len(c) + 2
            raise ValueError(
                f"max_length must leave room for the whole completion plus one prompt token, got max_length={max_length} "
                f"but {split} example {i} has a {len(c)}-token completion ({ex.completion[:60]!r}); "
                f"raise max_length to at least {need}"
            )
        if len(p) > budget:
            if truncation == "error":
                need = len(prefix) + len(p) + len(c) + 1
                raise ValueError(
                    f"examples must fit in max_length={max_length} tokens when truncation='error', but {split} example {i} "
                    f"has {need} tokens ({ex.prompt[:60]!r}...); raise max_length to {need} or use truncation='left'"
                )
            p = p[len(p) - budget :]
        out.append(TokenizedExample(tuple(prefix + p + c + [eos]), len(prefix) + len(p), ex.answer))
    if dropped:
        log.warning("%s: left out %d of %d examples whose completion alone exceeds max_length=%d tokens",
                    split, dropped, len(examples), max_length)
    return out


class TokenizedDataset(Dataset):
    """A map-style dataset over tokenised examples (picklable, so workers can use it)."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


class PromptCompletionCollator:
    """Pads a list of `TokenizedExample` into a batch dict.

    Training batches hold right-padded ``input_ids``, ``attention_mask`` and ``labels``
    (-100 on prefix, prompt and padding). With ``with_prompts=True`` (validation/test) they
    also hold the left-padded prompts ``prompt_input_ids``/``prompt_attention_mask`` for
    generation and the reference ``answers``.

    Args:
        pad_token_id: Id used for padding (masked out by the attention mask).
        with_prompts: Add the generation inputs and the answers.
    """

    def __init__(self, pad_token_id: int, with_prompts: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.with_prompts = with_prompts

    def __call__(self, items: Sequence[TokenizedExample]) -> dict[str, Any]:
        n, width = len(items), max(len(it.input_ids) for it in items)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((n, width), dtype=torch.long)  # (B, T)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, it in enumerate(items):
            ids = torch.tensor(it.input_ids, dtype=torch.long)  # (L,)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, it.prompt_length : len(ids)] = ids[it.prompt_length :]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.with_prompts:
            p_width = max(it.prompt_length for it in items)
            prompt_ids = torch.full((n, p_width), self.pad_token_id, dtype=torch.long)  # (B, P)
            prompt_mask = torch.zeros((n, p_width), dtype=torch.long)  # (B, P)
            for row, it in enumerate(items):
                prompt_ids[row, p_width - it.prompt_length :] = torch.tensor(it.input_ids[: it.prompt_length])
                prompt_mask[row, p_width - it.prompt_length :] = 1
            batch["prompt_input_ids"] = prompt_ids
            batch["prompt_attention_mask"] = prompt_mask
            batch["answers"] = [it.answer for it in items]
        return batch
