"""Tiny versioned causal-LM families, built, cached and loaded entirely locally.

Three families in the styles of Llama, Qwen2 and GPT-2, each with its own locally trained
tokenizer, in two sizes (``tiny`` for the app, ``micro`` for tests) and three versions:
``v1``, and two updates of it, ``v2`` (moderate) and ``v2-major`` (strong), both ``v1``
continually pre-trained on the updated world's corpus. Nothing is downloaded.

Real checkpoints come from the package registry (:mod:`.packaged`: ``smollm2-135m``, the
Qwen2.5-Coder pair), and ``smollm2-135m-v2`` is a real update of one, continued on Python's own
documentation (:mod:`.real_update`), built here on first use like the zoo.

What the updates change
-----------------------
Real continual pre-training (a release update such as Qwen2 -> Qwen2.5, domain-adaptive
pre-training) restarts from the released weights at a peak learning rate below the original
one, on a corpus that keeps most of the old data and adds or revises facts. What it is known
to change: factual associations are stored mostly in mid-layer MLPs (Geva et al., EMNLP 2021;
Meng et al., ROME, NeurIPS 2022), and Trans-PEFT (Gu et al., ACL 2025, section 2) finds the
FFN activations of Qwen2 -> Qwen2.5 shift while attention patterns stay close. No public
per-module weight-drift figures of real version pairs exist.

What ours change (llama, build format 5, ``lightning-peft drift`` on arithmetic test inputs):

==========  ======================  ===========================  ============  =====
update      recipe (v1: 480 steps   relative weight change        attention JS  CKA
            at peak lr 3e-3)        attention / FFN (ratio)
==========  ======================  ===========================  ============  =====
v2          160 steps, lr 6e-4      0.135 / 0.157 (1.16)          0.044         0.91
v2-major    320 steps, lr 1.5e-3    0.334 / 0.343 (1.03)          0.098         0.84
==========  ======================  ===========================  ============  =====

So the weights of every module type move alike (AdamW moves every weight by about the
learning rate per step, whatever its role); FFN weights move slightly more. The causal
attribution (:func:`lightning_peft.analysis.attribute_drop`: put v1's blocks back into v2
and re-evaluate a v1 adapter) finds that the attention change costs a v1 LoRA as much as the
FFN change on both updates, unlike the FFN-dominated picture the paper describes for 7B
models: the tiny models' patterns are still being learned when v1 stops, so continued
pre-training rewrites them too. ``benchmarks/README.md`` has the figures.

Example:
    >>> from lightning_peft import zoo
    >>> model, tokenizer = zoo.load("llama-micro-v1")  # builds on first use (seconds)
    >>> zoo.resolve("llama-micro-v1")  # doctest: +SKIP
    '/home/me/.cache/lightning_peft/zoo/llama-micro-v1-1a2b3c4d'
    >>> zoo.resolve("Qwen/Qwen2.5-0.5B")  # non-zoo names pass through
    'Qwen/Qwen2.5-0.5B'
"""

from .builder import build, cache_dir, info, is_built, load, load_model, model_dir, resolve
from .corpus import corpus, fact_prompts
from .packaged import PACKAGED, PackagedModel, fetch, fetched_dir, is_packaged_name, packaged_dir
from .real_update import REAL_UPDATES, RealUpdate, build_real_update, is_real_update
from .spec import FAMILIES, SIZES, VERSIONS, ZooSpec, is_zoo_name, names, spec
from .world import World, make_world

__all__ = [
    "FAMILIES",
    "PACKAGED",
    "PackagedModel",
    "REAL_UPDATES",
    "RealUpdate",
    "SIZES",
    "VERSIONS",
    "World",
    "ZooSpec",
    "build",
    "build_real_update",
    "cache_dir",
    "corpus",
    "fact_prompts",
    "fetch",
    "fetched_dir",
    "info",
    "is_built",
    "is_packaged_name",
    "is_real_update",
    "is_zoo_name",
    "load",
    "load_model",
    "make_world",
    "model_dir",
    "names",
    "packaged_dir",
    "resolve",
    "spec",
]
