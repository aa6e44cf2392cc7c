"""`ZooSpec`: the single source of truth of every zoo model, and the name registry.

Names are ``"{family}-{version}"`` for the ``tiny`` size (``"llama-v1"``, ``"qwen2-v2"``)
and ``"{family}-micro-{version}"`` for the ``micro`` size used by tests
(``"gpt2-micro-v1"``). A ``v2`` spec names its ``v1`` parent in ``init``: it is built by
continuing the parent's pre-training on the ``v2`` corpus. Every family has two updates of the
same ``v1``: ``v2`` (moderate, the default v_n) and ``v2-major`` (the same updated corpus at a
5x larger learning rate), so results can show how transfer depends on the size of the update.

Example:
    >>> spec("llama-micro-v2").init
    'llama-micro-v1'
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["llama", "qwen2", "gpt2"]
Size = Literal["tiny", "micro"]

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gpt2")
SIZES: tuple[str, ...] = ("tiny", "micro")
VERSIONS: tuple[str, ...] = ("v1", "v2", "v2-major")

# Bump when the build code changes what a spec produces (corpus, tokenizer, training loop):
# it is part of every folder hash, so old caches are rebuilt rather than silently reused.
BUILD_FORMAT = 5

# Names that look like zoo names (so `resolve` must not pass them on to the Hub).
ZOO_NAME_RE = re.compile(r"^(llama|qwen2|gpt2)(-(tiny|micro|small|mini|nano))?-v\d+(-\w+)?$")


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines a zoo model; its hash names the cache folder.

    Attributes:
        family: Architecture and tokenizer style: ``"llama"``, ``"qwen2"`` or ``"gpt2"``.
        size: ``"tiny"`` (the app's default) or ``"micro"`` (tests).
        version: World/corpus version, ``"v1"`` or ``"v2"``.
        update: ``""`` or the name of a second update of the same ``v1`` on the same corpus
            (``"major"``: the name gets ``-major``).
        hidden: Model width ``d``.
        layers: Number of transformer blocks.
        heads: Attention heads (head dim = ``hidden // heads``).
        kv_heads: Key/value heads (grouped-query attention; ignored by ``gpt2``).
        intermediate: FFN inner width.
        vocab: Model vocabulary rows (>= the trained tokenizer's length; also the BPE target).
        seq_len: Training block length and ``max_position_embeddings``.
        steps: Optimiser steps of this build (for ``v2``: steps on top of ``v1``).
        lr: Peak AdamW learning rate (linear warm-up, cosine decay to ``lr / 10``).
        warmup: Warm-up steps.
        batch: Blocks per step.
        weight_decay: AdamW weight decay (matrices only).
        seed: Seed of the world, the corpus, the init and the data order.
        n_docs: Documents of this version's corpus.
        tokenizer_docs: Documents per version used to train the (shared v1+v2) tokenizer.
        world_scale: `make_world` scale.
        init: Name of the model whose weights this build starts from (``None``: random init).
    """

    family: Family
    size: Size
    version: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq_len: int
    steps: int
    lr: float
    warmup: int
    batch: int
    weight_decay: float = 0.1
    seed: int = 0
    n_docs: int = 2000
    tokenizer_docs: int = 2000
    world_scale: int = 1
    init: str | None = None
    update: str = ""

    @property
    def name(self) -> str:
        """The zoo name, e.g. ``"llama-v1"`` or ``"gpt2-micro-v2"``."""
        mid = "" if self.size == "tiny" else f"-{self.size}"
        return f"{self.family}{mid}-{self.version}" + (f"-{self.update}" if self.update else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (what ``zoo.json`` stores under ``"spec"``)."""
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short hash of this spec, its ``init`` chain and `BUILD_FORMAT` (8 hex chars)."""
        payload: dict[str, Any] = {"format": BUILD_FORMAT, "spec": self.to_dict()}
        if self.init is not None:
            payload["init_digest"] = spec(self.init).digest()
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    @property
    def folder_name(self) -> str:
        """Cache folder name: ``"{name}-{digest}"``."""
        return f"{self.name}-{self.digest()}"


# Architecture of each (family, size); the three families differ in width ratios and vocab
# like the originals (llama: GQA + gated SiLU FFN; qwen2: GQA + qkv bias, tied embeddings;
# gpt2: MHA, Conv1D, 4x GELU FFN, learned positions).
_ARCH: dict[tuple[str, str], dict[str, Any]] = {
    ("llama", "tiny"): dict(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=352, vocab=1024),
    ("qwen2", "tiny"): dict(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=320, vocab=1152),
    ("gpt2", "tiny"): dict(hidden=128, layers=3, heads=4, kv_heads=4, intermediate=512, vocab=1024),
    ("llama", "micro"): dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=512),
    ("qwen2", "micro"): dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=576),
    ("gpt2", "micro"): dict(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=128, vocab=512),
}
# Training recipe of each (size, version). Tiny blocks are 384 tokens (4 per step, the same
# tokens per step as 12 x 128) so a Trans-LoRA seed-list prompt of 5 task inputs plus the new
# one fits the context of every family. Both updates continue v1 on the v2 corpus with a fresh
# warm-up/decay, as continual pre-training does (CPT restarts at a peak below the original one):
# v2 at 1/5 of v1's peak for 1/3 of its steps (moderate: 13-16% relative weight change, attention
# JS 0.04, CKA 0.91 on llama, see `lightning_peft.zoo` "What the updates change"), v2-major at 1/2
# of the peak for 2/3 of the steps (33-36%, JS 0.10, CKA 0.84: the zoo's v2 up to build format 4).
_RECIPE: dict[tuple[str, str], dict[str, Any]] = {
    ("tiny", "v1"): dict(
        seq_len=384, steps=480, lr=3e-3, warmup=20, batch=4, n_docs=3000, tokenizer_docs=3000
    ),
    ("tiny", "v2"): dict(
        seq_len=384, steps=160, lr=6e-4, warmup=10, batch=4, n_docs=4000, tokenizer_docs=3000
    ),
    ("tiny", "v2-major"): dict(
        seq_len=384, steps=320, lr=1.5e-3, warmup=10, batch=4, n_docs=4000, tokenizer_docs=3000
    ),
    ("micro", "v1"): dict(seq_len=64, steps=30, lr=3e-3, warmup=3, batch=8, n_docs=400, tokenizer_docs=400),
    ("micro", "v2"): dict(seq_len=64, steps=10, lr=6e-4, warmup=2, batch=8, n_docs=500, tokenizer_docs=400),
    ("micro", "v2-major"): dict(seq_len=64, steps=20, lr=1.5e-3, warmup=2, batch=8, n_docs=500, tokenizer_docs=400),
}


def _make(family: str, size: str, version: str) -> ZooSpec:
    init = None if version == "v1" else f"{family}{'' if size == 'tiny' else '-' + size}-v1"
    world, _, update = version.partition("-")
    arch, recipe = _ARCH[family, size], _RECIPE[size, version]
    return ZooSpec(family, size, world, **arch, **recipe, init=init, update=update)  # type: ignore[arg-type]


SPECS: dict[str, ZooSpec] = {
    s.name: s for s in (_make(f, z, v) for f in FAMILIES for z in SIZES for v in VERSIONS)
}


def names() -> list[str]:
    """All zoo names, sorted (``"gpt2-micro-v1"``, ..., ``"qwen2-v2"``)."""
    return sorted(SPECS)


def is_zoo_name(name: object) -> bool:
    """Whether ``name`` is a zoo name (not a path, not a Hub name)."""
    return isinstance(name, str) and name in SPECS


def unknown_name_error(name: object) -> ValueError:
    """The error for a name that is not in the zoo: available names, closest first, and the fix."""
    close = difflib.get_close_matches(str(name), names(), n=len(SPECS), cutoff=0.0)
    return ValueError(
        f"unknown zoo model {name!r}: zoo names are '{{family}}-{{version}}' (tiny) or "
        f"'{{family}}-micro-{{version}}' with family in {list(FAMILIES)} and version in {list(VERSIONS)}; "
        f"available (closest first): {', '.join(close)}. Fix: use one of these names, or pass a local "
        f"folder / Hugging Face model name instead."
    )


def spec(name: str) -> ZooSpec:
    """The `ZooSpec` of a zoo name.

    Raises:
        ValueError: ``name`` is not a zoo name (the message lists the closest names first).
    """
    if not is_zoo_name(name):
        raise unknown_name_error(name)
    return SPECS[name]
