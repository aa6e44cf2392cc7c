"""Which modules of a model an adapter adapts.

Target modules are matched by name over the **whole** LightningModule (or any ``nn.Module``):
there is no attribute convention such as ``self.model``. Matching follows peft's rules so a
config means the same here and in peft:

* ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except output heads (a module
  returned by some ``get_output_embeddings()``, one whose weight is tied to an embedding, or
  one named like a head: ``lm_head``, ``score``, ``classifier``, ...).
* another string: a regular expression that must match the full module name.
* a list of strings: a full module name or a suffix ending at a dot (``"q_proj"`` matches
  ``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "embed_out", "output_layer", "head", "qa_outputs"})
TargetSpec = str | Sequence[str]


class NoTargetModulesError(ValueError):
    """No module of the model matches ``target_modules``."""


def _inside_tuner_layers(model: nn.Module) -> set[str]:
    """Names of modules that belong to an injected adapter (``lora_A``, ``base_layer``, ...)."""
    inner: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            inner.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    return inner


def output_heads(model: nn.Module) -> set[str]:
    """Names of linear modules that produce the model's outputs (excluded by ``"all-linear"``)."""
    heads: set[str] = set()
    by_id = {id(m): n for n, m in model.named_modules()}
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        get_out = getattr(module, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out = get_out()
            except (NotImplementedError, AttributeError, TypeError):
                out = None
            if isinstance(out, nn.Module) and id(out) in by_id:
                heads.add(by_id[id(out)])
        if isinstance(module, LINEAR_TYPES) and (
            name.rsplit(".", 1)[-1] in HEAD_NAMES or id(module.weight) in embedding_weights
        ):
            heads.add(name)
    return heads


def exact_pattern(names: Sequence[str]) -> str:
    """A regex that (full-)matches exactly ``names``: peft's string form of ``target_modules``."""
    return "|".join(re.escape(n) for n in names)


def _is_linear(module: nn.Module) -> bool:
    """A linear layer, or one already wrapped by an adapter (stacked adapters share layers)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return isinstance(base, LINEAR_TYPES)


def _matches(name: str, spec: TargetSpec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def find_target_modules(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec | None = None,
    method: str = "adapter",
) -> list[str]:
    """Full names of the modules an adapter should wrap.

    Args:
        model: Any module; for a LightningModule the names include its attributes
            (``model.model.layers.0.self_attn.q_proj`` for ``self.model = LlamaForCausalLM``).
        target_modules: ``"all-linear"``, a regex, or a list of names/suffixes (see module doc).
        exclude_modules: Same syntax; matching modules are left alone.
        method: Method name used in error messages.

    Returns:
        Sorted-by-position list of module names, never empty.

    Raises:
        NoTargetModulesError: nothing matches; the message lists the closest module names.
        ValueError: ``target_modules`` is empty, or names a module that is not a supported
            layer type.
    """
    if not target_modules:
        raise ValueError(f"{method}: target_modules is empty; pass 'all-linear' or a list such as ['q_proj', 'v_proj']")
    skip = _inside_tuner_layers(model)
    candidates = [(n, m) for n, m in model.named_modules() if n and n not in skip]
    if target_modules == "all-linear":
        heads = output_heads(model)
        found = [n for n, m in candidates if _is_linear(m) and n not in heads]
    else:
        found = [n for n, m in candidates if _matches(n, target_modules)]
        wrong_type = [n for n in found if not (_is_linear(model.get_submodule(n)) or isinstance(model.get_submodule(n), nn.Embedding))]
        if wrong_type:
            kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in wrong_type[:5])
            raise ValueError(
                f"{method}: target_modules={target_modules!r} selects modules that are not linear or embedding "
                f"layers: {kinds}. Name the linear layers inside them instead (e.g. 'q_proj', 'down_proj')."
            )
    if exclude_modules:
        found = [n for n in found if not _matches(n, exclude_modules)]
    if not found:
        raise NoTargetModulesError(_no_match_message(model, target_modules, method, skip))
    return found


def _no_match_message(model: nn.Module, target_modules: TargetSpec, method: str, skip: Iterable[str]) -> str:
    skip = set(skip)
    linear = [n for n, m in model.named_modules() if _is_linear(m) and n not in skip]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    close = list(dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(str(w).split(".")[-1], leaves, n=3, cutoff=0.4)))  # closest first
    msg = f"{method}: no module matches target_modules={target_modules!r}."
    if isinstance(target_modules, str) and re.fullmatch(r"[\w.]+", target_modules):
        msg += f" A string is a regex over full module names; for a name or suffix pass a list: [{target_modules!r}]."
    if close:
        msg += f" Close names: {', '.join(close)}."
    if leaves:
        msg += f" Linear layers in this model end with: {', '.join(leaves[:20])}."
    else:
        msg += " The model has no linear layers yet: build it in __init__ or configure_model before fit."
    return msg + " Fix target_modules (a list of names/suffixes, a regex, or 'all-linear')."
