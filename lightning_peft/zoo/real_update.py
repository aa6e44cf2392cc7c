"""A v2 of a real checkpoint: continued pre-training of a packaged model on a real text corpus.

No published pair of versions of one small model with the same shapes installs from the package
registry, so ``smollm2-135m-v2`` is made here the way a release update is made (Trans-PEFT,
Gu et al., ACL 2025, section 2: Qwen2 -> Qwen2.5 is continued pre-training of the released
weights): ``smollm2-135m`` (v1) continued on a corpus that ships with Python, its English
documentation (``pydoc_data.topics``: the language reference) and the docstrings of its standard
library, parsed with :mod:`ast` and never imported. That is a domain update (towards Python
documentation), as the code and math stages of SmolLM2's own multi-stage training shifted its data mix.

The recipe is continual pre-training's: restart from the released weights at a peak learning rate
well below pre-training's (2e-4), a linear warm-up,
cosine decay to 10%, AdamW (0.9, 0.95), weight decay 0.1 on matrices, gradient clipping at 1.0
(:func:`lightning_peft.zoo.train.pretrain`, the loop that builds the zoo's v2). One in twenty
documents is held out: its loss under v1 and v2 (``zoo.json``) shows the update learned the domain.

What it changes (``benchmarks/drift_profile.py``, sarcasm test inputs; the zoo's Llama ``v2`` beside it):

=====================  ===========================  ============  =====  ==================  =============
update                 relative weight change        attention JS  CKA    FFN top-10% overlap held-out loss
                       attention / FFN (ratio)
=====================  ===========================  ============  =====  ==================  =============
smollm2-135m-v2        0.0091 / 0.0087 (0.96)        0.014         0.98   0.82                2.94 -> 2.53
zoo llama-v2           0.136 / 0.157 (1.15)          0.052         0.92   0.59
=====================  ===========================  ============  =====  ==================  =============

Every module type moves alike (0.008-0.010, flat over depth except layer 0's attention, 0.017), as
in the zoo: AdamW moves each weight by about the learning rate per step whatever its role. The
update is 15x smaller than the zoo's in the weights yet moves the held-out loss on the new domain
by 0.41 nats per token (v1 -> v2).

Sized for 2 CPU cores: 160 steps of 4 x 256 tokens (164k tokens, 0.4 epochs of the corpus's
400k) took 38 minutes in float32 with two threads. The folder name hashes the recipe and the
Python version (whose standard library is the corpus), so another recipe builds another folder.

Example:
    >>> from lightning_peft import zoo
    >>> zoo.resolve("smollm2-135m-v2")  # doctest: +SKIP  (builds on first use, ~40 min on 2 cores)
    '/home/me/.cache/lightning_peft/zoo/smollm2-135m-v2-1a2b3c4d'
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import WEIGHTS, ZOO_JSON, cache_dir, file_sha256, locked_build

log = logging.getLogger(__name__)

# Mean relative weight change of the attention and the FFN matrices of the built update (measured 0.0091 and
# 0.0087): the range ``tests/test_real_update.py`` checks a build against.
DOCUMENTED_DRIFT = (0.006, 0.013)
# Library folders left out of the corpus: tests, GUI toolkits and vendored code are not documentation.
SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "tkinter", "turtledemo", "site-packages", "lib2to3", "ensurepip"})

__all__ = ["DOCUMENTED_DRIFT", "REAL_UPDATES", "RealUpdate", "build_real_update", "held_out_loss", "is_real_update", "python_docs"]


@dataclass(frozen=True)
class RealUpdate:
    """The recipe of a real model's update (the fields `lightning_peft.zoo.train.pretrain` reads, and more).

    Attributes:
        name: The zoo name of the update (``"smollm2-135m-v2"``).
        base: The packaged checkpoint it continues (``"smollm2-135m"``).
        steps: AdamW steps.
        batch: Blocks per step.
        seq_len: Tokens per block.
        lr: Peak learning rate.
        warmup: Linear warm-up steps.
        weight_decay: On matrices only.
        seed: Data order.
        min_doc_chars: Docstrings shorter than this are left out (one-liners teach little).
        held_out_every: Every n-th document is held out for the before/after loss.
    """

    name: str
    base: str
    steps: int = 160
    batch: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    min_doc_chars: int = 200
    held_out_every: int = 20

    def digest(self) -> str:
        """Hash of the recipe and the Python version whose library is the corpus."""
        payload = json.dumps({**asdict(self), "python": list(sys.version_info[:2])}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:8]

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.digest()}"


REAL_UPDATES: dict[str, RealUpdate] = {u.name: u for u in (RealUpdate("smollm2-135m-v2", base="smollm2-135m"),)}


def is_real_update(name: object) -> bool:
    """Whether ``name`` is one of :data:`REAL_UPDATES`."""
    return isinstance(name, str) and name in REAL_UPDATES


def python_docs(min_chars: int = 200, stdlib: str | Path | None = None) -> list[str]:
    """Python's own documentation as documents, in a fixed order.

    The topics of the language reference (``pydoc_data.topics``, one document each) and every
    module, class and function docstring of at least ``min_chars`` characters in the standard
    library's ``.py`` files (sorted by path; parsed, not imported), prefixed with its qualified name.

    Args:
        min_chars: Shorter docstrings are left out.
        stdlib: The library folder; default this Python's (``sysconfig``).
    """
    from pydoc_data.topics import topics

    docs = [f"{name}\n\n{text.strip()}" for name, text in sorted(topics.items())]
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few library files are templates or other encodings
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            text = ast.get_docstring(node)
            if text and len(text) >= min_chars:
                title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                docs.append(f"{title}\n\n{text}")
    return list(dict.fromkeys(docs))  # a name defined twice with one docstring (if/else variants) once


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token loss (nats per token) of ``model`` on packed blocks ``(N, T)``."""
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch):
        ids, lab = input_ids[i : i + batch], labels[i : i + batch]
        logits = model(input_ids=ids, attention_mask=(lab != -100).long()).logits[:, :-1].float()
        target = lab[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + int((target != -100).sum())
    return total / max(count, 1)


def _train_into(u: RealUpdate, base: Path, tmp: Path, target: Path, progress: bool) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import build_threads, pack, pretrain

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    saved_dtype = json.loads((base / "config.json").read_text()).get("dtype") or "bfloat16"
    docs = python_docs(u.min_doc_chars)
    train_docs = [d for i, d in enumerate(docs) if i % u.held_out_every]
    held_docs = [d for i, d in enumerate(docs) if i % u.held_out_every == 0]
    input_ids, labels = pack(tokenizer, train_docs, u.seq_len)
    held_ids, held_labels = pack(tokenizer, held_docs, u.seq_len)
    held_ids, held_labels = held_ids[:32], held_labels[:32]  # 8k tokens: the loss to 2-3 digits in ~30 s
    threads, before = build_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(u.seed)
            model.eval()
            loss_v1 = held_out_loss(model, held_ids, held_labels)
            result = pretrain(model, input_ids, labels, u, progress=progress)  # type: ignore[arg-type]
            loss_v2 = held_out_loss(model, held_ids, held_labels)
    finally:
        torch.set_num_threads(before)
    model.config._name_or_path = str(target)
    model.to(getattr(torch, saved_dtype)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    corpus_sha = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    meta = {
        "name": u.name, "digest": u.digest(), "spec": asdict(u), "base": u.base, "base_folder": base.name,
        "base_weights_sha256": file_sha256(base / WEIGHTS), "dtype": saved_dtype,
        "corpus": "python-docs", "corpus_sha256": corpus_sha, "python": sys.version.split()[0],
        "corpus_docs": len(train_docs), "corpus_tokens": int((labels != -100).sum()), "blocks": len(input_ids),
        "held_out_docs": len(held_docs), "held_out_tokens": int((held_labels != -100).sum()),
        "held_out_loss_v1": round(loss_v1, 4), "held_out_loss_v2": round(loss_v2, 4),
        "tokens_seen": u.steps * u.batch * u.seq_len, "final_loss": round(result.final_loss, 4),
        "losses": [round(x, 4) for x in result.losses], "threads": threads,
        "build_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
    }
    (tmp / ZOO_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_real_update(name: str, *, force: bool = False, progress: bool = True, base: Path | None = None) -> Path:
    """Build the real update ``name`` into the zoo cache once (fetching its base first); returns the folder.

    Threads: ``$LIGHTNING_PEFT_ZOO_THREADS`` (default 1; 2 is ~1.7x faster on an idle 2-core machine).

    Args:
        name: A key of :data:`REAL_UPDATES`.
        force: Build again even if the folder exists.
        progress: A tqdm bar over the steps.
        base: The base's folder (default: the fetched packaged checkpoint); tests pass a tiny one.

    Raises:
        ValueError: ``name`` is not a real update.
    """
    if not is_real_update(name):
        raise ValueError(
            f"unknown real update {name!r}; the real updates are: {', '.join(REAL_UPDATES)}. "
            "Fix: use one of these names, or pass a local save_pretrained folder"
        )
    u = REAL_UPDATES[name]
    target = cache_dir() / u.folder_name
    if not force and (target / ZOO_JSON).is_file():
        return target
    if base is None:
        from .packaged import resolve_packaged

        base = resolve_packaged(u.base)
    with locked_build(target, ZOO_JSON, force) as tmp:
        if tmp is not None:
            log.warning("building %s: %s continued on Python's documentation (%d steps)", name, u.base, u.steps)
            _train_into(u, Path(base), tmp, target, progress)
    return target
