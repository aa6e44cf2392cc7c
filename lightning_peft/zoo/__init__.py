"""Tiny versioned causal-LM families, built, cached and loaded entirely locally.

Three families in the styles of Llama, Qwen2 and GPT-2, each with its own locally trained
tokenizer, in two sizes (``tiny`` for the app, ``micro`` for tests) and two versions
(``v2`` = ``v1`` continually pre-trained on the updated world). Nothing is downloaded.

Example:
    >>> from lightning_peft import zoo
    >>> model, tokenizer = zoo.load("llama-micro-v1")  # builds on first use (seconds)
    >>> zoo.resolve("llama-micro-v1")  # doctest: +SKIP
    '/home/me/.cache/lightning_peft/zoo/llama-micro-v1-1a2b3c4d'
    >>> zoo.resolve("Qwen/Qwen2.5-0.5B")  # non-zoo names pass through
    'Qwen/Qwen2.5-0.5B'
"""

from .builder import build, cache_dir, info, is_built, load, model_dir, resolve
from .corpus import corpus, fact_prompts
from .spec import FAMILIES, SIZES, VERSIONS, ZooSpec, is_zoo_name, names, spec
from .world import World, make_world

__all__ = [
    "FAMILIES",
    "SIZES",
    "VERSIONS",
    "World",
    "ZooSpec",
    "build",
    "cache_dir",
    "corpus",
    "fact_prompts",
    "info",
    "is_built",
    "is_zoo_name",
    "load",
    "make_world",
    "model_dir",
    "names",
    "resolve",
    "spec",
]
