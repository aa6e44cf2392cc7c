"""Three real, locally trained tokenizers in the styles of GPT-2, Llama and Qwen2.

All are BPE models trained with the ``tokenizers`` library on the zoo's corpus and wrapped
in `transformers.PreTrainedTokenizerFast`, so ``save_pretrained`` / ``AutoTokenizer`` work
as for any Hub tokenizer. They differ the way the originals do:

* ``gpt2``: byte-level BPE (256-byte alphabet, ``Ġ`` marks a leading space), one special
  token ``<|endoftext|>`` used as bos/eos/unk/pad, no bos added on encode.
* ``llama``: sentencepiece-like BPE over ``▁``-marked text (Metaspace, prefix space on the
  first word) with byte fallback (``<0x00>``..``<0xFF>``, so no input is ever ``<unk>``),
  specials ``<unk>``/``<s>``/``</s>``, ``<s>`` added on encode, pad = ``<unk>``.
* ``qwen2``: byte-level BPE whose pre-tokenizer splits every digit on its own (Qwen2's
  regex), specials ``<|endoftext|>`` (bos/eos/unk/pad), ``<|im_start|>``, ``<|im_end|>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TokenizerStyle = Literal["gpt2", "llama", "qwen2"]

# Qwen2's pre-tokenizer regex: \p{N} matches ONE digit, so numbers are split digit by digit.
_QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
_BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


def _byte_level(
    texts: Sequence[str], vocab_size: int, specials: Sequence[str], split_digits: bool
) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.normalizer = normalizers.NFC()
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _llama(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    # Train on Metaspace-marked text, then rebuild the model with the 256 byte tokens right
    # after the specials (ids 3..258, as in Llama) and byte_fallback on. Adding them as
    # trainer special tokens instead would make them "added tokens" that decode() drops.
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre
    n_merge_vocab = vocab_size - len(_BYTE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=n_merge_vocab,
        special_tokens=list(_LLAMA_SPECIALS),
        show_progress=False,
        max_token_length=16,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {s: i for i, s in enumerate(_LLAMA_SPECIALS)}
    for b in _BYTE_TOKENS:
        vocab[b] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    out = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    out.pre_tokenizer = pre
    out.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out.add_special_tokens(list(_LLAMA_SPECIALS))
    out.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return out


def train_tokenizer(style: TokenizerStyle, texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a tokenizer of one style on ``texts``.

    Deterministic: the same texts and size give the same vocabulary and merges.

    Args:
        style: ``"gpt2"``, ``"llama"`` or ``"qwen2"`` (see the module docstring).
        texts: Training documents.
        vocab_size: Target vocabulary size including specials (and, for ``llama``, the 256
            byte tokens); the trainer may stop short when the corpus has no more merges.

    Returns:
        A fast tokenizer with bos/eos/unk/pad set and ``model_max_length`` left to the caller.

    Raises:
        ValueError: Unknown ``style`` or a ``vocab_size`` too small for the style.
    """
    minimum = {"gpt2": 300, "llama": 300, "qwen2": 300}
    if style not in minimum:
        raise ValueError(f"tokenizer style must be one of {sorted(minimum)}, got {style!r}")
    if vocab_size < minimum[style]:
        raise ValueError(
            f"vocab_size for the {style} tokenizer must be >= {minimum[style]} (bytes + specials + merges), "
            f"got {vocab_size}; raise ZooSpec.vocab"
        )
    if style == "gpt2":
        eot = "<|endoftext|>"
        tok = _byte_level(texts, vocab_size, [eot], split_digits=False)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot
        )
    if style == "qwen2":
        eot, extra = "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]
        tok = _byte_level(texts, vocab_size, [eot, *extra], split_digits=True)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=eot,
            eos_token=eot,
            unk_token=eot,
            pad_token=eot,
            additional_special_tokens=extra,
        )
    tok = _llama(texts, vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
