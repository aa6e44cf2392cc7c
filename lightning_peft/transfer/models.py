"""The three model roles of Trans-LoRA: generator, discriminator scorer and teacher.

Wang et al. 2024 (arXiv 2405.17258), section 3: the generator continues a numbered list of
seed inputs (sampling, one new input parsed per completion); the discriminator is the source
model plus a LoRA that answers "yes"/"no" to ``t(x) = "{x}\\nIs the above question from
{task} dataset?"``; the teacher (source model + its adapter) writes the completions that the
target adapter is trained on (sequence-level distillation, so tokenizers may differ).

All functions take a Hugging Face causal LM and its tokenizer, run batched under
``torch.no_grad`` and restore the model's train/eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lightning_peft.tasks.data import Example
from lightning_peft.transfer.synthesis import Deduplicator, SeedFormat, seed_list_prompt

__all__ = [
    "DISCRIMINATOR_TEMPLATE",
    "adapters_disabled",
    "completion_margins",
    "embed",
    "discriminator_examples",
    "greedy_completions",
    "sample_candidates",
]

DISCRIMINATOR_TEMPLATE = "{x}\nIs the above question from {task} dataset?"  # the paper's t(x)
YES, NO = " yes", " no"


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: every peft tuner layer (LoRA, RoSA, SHiRA) off, then restored.

    Only the layers' on/off flag changes (``requires_grad`` and weights are untouched), so it is
    safe inside a fit. Trans-LoRA's discriminator learns real inputs against inputs synthesised
    by the source *base* (Wang et al. 2024, section 3.1), the same kind of model that later
    generates on the target.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before):
            m._disable_adapters = flag


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _left_padded(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _generation_config(tokenizer: PreTrainedTokenizerBase, **settings: Any) -> GenerationConfig:
    """``settings`` plus the tokenizer's end and padding tokens (its end token where it has no padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **settings)


def discriminator_examples(real: Sequence[str], synthetic: Sequence[str], task_name: str) -> list[Example]:
    """Yes/no training examples: real inputs answer ``" yes"``, synthesised ones ``" no"``."""
    return [Example(DISCRIMINATOR_TEMPLATE.format(x=x, task=task_name), YES, "yes") for x in real] + [
        Example(DISCRIMINATOR_TEMPLATE.format(x=x, task=task_name), NO, "no") for x in synthetic
    ]


def completion_margins(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: Sequence[str],
    task_name: str,
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """``log p(" yes" | t(x)) - log p(" no" | t(x))`` for each input (the filter keeps ``> 0``).

    Both answers are scored as full continuations (sum of their tokens' log-probabilities), so
    tokenizers that split ``" yes"`` into several tokens work too.

    Returns:
        ``(len(inputs),)`` float32 on CPU.
    """
    dev = _device(model)
    out: list[torch.Tensor] = []
    with _eval_mode(model):
        for i in range(0, len(inputs), batch_size):
            prompts = [DISCRIMINATOR_TEMPLATE.format(x=x, task=task_name) for x in inputs[i : i + batch_size]]
            scores = [_continuation_logprob(model, tokenizer, prompts, ans, dev) for ans in (YES, NO)]
            out.append((scores[0] - scores[1]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _continuation_logprob(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], answer: str, dev: torch.device
) -> torch.Tensor:
    """Sum of log p(answer tokens | prompt) per prompt, ``(B,)``; prompt and answer tokenised apart."""
    ans = tokenizer(answer, add_special_tokens=False)["input_ids"]  # (A,)
    ids, mask = _left_padded(tokenizer, prompts, dev)  # (B, P)
    a = torch.tensor(ans, device=dev).expand(len(prompts), -1)  # (B, A)
    full = torch.cat([ids, a], 1)  # (B, P + A)
    full_mask = torch.cat([mask, torch.ones_like(a)], 1)
    logits = model(input_ids=full, attention_mask=full_mask).logits.float()  # (B, P + A, V)
    logp = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1)  # (B, A, V): positions predicting the answer
    return logp.gather(-1, a.unsqueeze(-1)).squeeze(-1).sum(-1)  # (B,)


def sample_candidates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    seeds: Sequence[str],
    task_name: str,
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 64,
    seed: int = 0,
    max_batches: int = 1000,
    dedup: Deduplicator | None = None,
    anchor_format: bool = True,
) -> Iterator[list[str]]:
    """Yield batches of new, parsed, de-duplicated inputs sampled from the seed-list prompt.

    Each batch samples ``batch_size`` completions of :func:`seed_list_prompt` with the seeds in
    a fresh random order (more diverse continuations), parses one item per completion with
    :func:`parse_generation` and drops duplicates of the seeds and of earlier items. With
    ``anchor_format`` the open item starts with the seeds' common opening and must end with
    their common ending (:class:`~lightning_peft.transfer.synthesis.SeedFormat`).

    Args:
        model, tokenizer: The generator (the paper uses the target model).
        seeds: The real inputs shown to the generator (5 in the paper).
        task_name: Named in the prompt's header.
        batch_size: Completions sampled per batch.
        temperature, top_p: Sampling settings.
        max_new_tokens: Most tokens per completion.
        seed: Seeds torch's RNG for sampling and the seed order (same seed, same stream).
        max_batches: Stop after this many batches.
        dedup: Shared de-duplicator (default: a new one holding the seeds).
        anchor_format: Anchor items to the seeds' shared opening and ending (``False``: the
            paper's free continuation, parsed up to the next list number).

    Raises:
        ValueError: ``temperature <= 0`` or ``top_p`` outside ``(0, 1]``.
    """
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"sample_candidates needs temperature > 0 and top_p in (0, 1], got {temperature!r} and {top_p!r}; "
            "the paper samples with e.g. temperature 1.0, top_p 0.95."
        )
    dedup = dedup if dedup is not None else Deduplicator(seeds)
    order_rng = torch.Generator().manual_seed(seed)
    dev = _device(model)
    config = _generation_config(tokenizer, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                max_new_tokens=max_new_tokens)
    fmt = SeedFormat(seeds if anchor_format else [])
    for b in range(max_batches):
        prompts = [seed_list_prompt([seeds[i] for i in torch.randperm(len(seeds), generator=order_rng).tolist()],
                                    task_name, opening=fmt.prefix) for _ in range(batch_size)]
        ids, mask = _left_padded(tokenizer, prompts, dev)
        with _eval_mode(model):
            torch.manual_seed(seed * 100_003 + b)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        parsed = [p for p in map(fmt.parse, _completions(tokenizer, ids, out)) if p is not None]
        yield [p for p in parsed if dedup.add(p)]


def _completions(tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor, out: torch.Tensor) -> list[str]:
    """The generated text after each prompt, with its leading space (the completion decoded alone loses it)."""
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.batch_decode(out, skip_special_tokens=True)
    alone = tokenizer.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=True)
    return [f[len(p) :] if f.startswith(p) else a for f, p, a in zip(full, prompts, alone)]


def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """The teacher's completions: greedy decoding of each prompt, special tokens dropped."""
    dev = _device(model)
    config = _generation_config(tokenizer, do_sample=False, max_new_tokens=max_new_tokens)
    texts: list[str] = []
    with _eval_mode(model):
        for i in tqdm(range(0, len(prompts), batch_size), desc="teacher labels", disable=not progress):
            ids, mask = _left_padded(tokenizer, prompts[i : i + batch_size], dev)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            texts += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return texts


def embed(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled last hidden states ``(len(texts), hidden)`` (padding excluded), for MMD."""
    dev = _device(model)
    out: list[torch.Tensor] = []
    with _eval_mode(model):
        for i in range(0, len(texts), batch_size):
            ids, mask = _left_padded(tokenizer, texts[i : i + batch_size], dev)
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
            m = mask.unsqueeze(-1).float()  # (B, T, 1)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).cpu())  # (B, hidden)
    return torch.cat(out) if out else torch.zeros(0, 0)
