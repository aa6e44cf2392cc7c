"""Causal drift attribution: which sub-blocks of an update v_o -> v_n cost the old adapter what.

The drift metrics of :mod:`~lightning_peft.analysis.compare` say *what* changed between two
versions of a base; they cannot say which change hurts an adapter trained on v_o. Trans-PEFT's
mechanism claim (Gu et al., ACL 2025, arXiv 2506.06844, section 2) is causal: continual
pre-training rewrites the FFN knowledge, the attention patterns stay, so an adapter breaks on
v_n mostly through its FFNs. This module tests that claim on any pair of bases by building
**hybrid bases** and evaluating the old adapter on each:

* ``put back``: v_n with one sub-block group of v_o restored (all FFN sub-blocks, all attention
  sub-blocks, the parameters outside the layers, or one layer's FFN / attention);
* ``only``: v_o with just that group taken from v_n (the update applied to one group).

A sub-block is what Trans-PEFT's dropping skips or keeps: a layer's FFN sub-block is its MLP
plus the norm in front of it (and after it, Gemma-style); its attention sub-block is every
other parameter of the layer (q/k/v/o, their biases and norms, the input norm); ``outside``
is the embeddings, final norm and head. For a metric m of the old adapter (loss, token
accuracy), with drop D = m(v_n) - m(v_o):

    explained(put back g) = (m(v_n with g from v_o) - m(v_n)) / (m(v_o) - m(v_n))
    explained(only g)     = (m(v_o with g from v_n) - m(v_o)) / (m(v_n) - m(v_o))

1 means "this group alone accounts for the whole drop"; the two directions agree when the
groups act independently and differ by their interaction. Bases are swapped in place inside
one adapted model (the parameters of one base are kept on CPU), so a hybrid costs one
evaluation, not one model copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.analysis.evaluation import evaluate_lm
from lightning_peft.analysis.metrics import layer_index, module_type

Row = dict[str, Any]

# In-layer norms in front of (or behind) the FFN: Llama/Qwen/Mistral `post_attention_layernorm`,
# GPT-2 `ln_2`, OPT `final_layer_norm`, Gemma 2/3 `pre_/post_feedforward_layernorm`. In Gemma,
# `post_attention_layernorm` normalises the attention output instead (it has a
# `pre_feedforward_layernorm`), so it belongs to the attention sub-block there.
_FFN_NORMS = re.compile(r"(post_attention_layernorm|ln_2|final_layer_norm|pre_feedforward_layernorm|post_feedforward_layernorm)$")
_GEMMA_STYLE = "pre_feedforward_layernorm"


def sub_block(param_name: str, layer_modules: set[str] | None = None) -> tuple[str, int | None]:
    """``("ffn" | "attention" | "outside", layer)`` of a base-model parameter name.

    Args:
        param_name: e.g. ``model.layers.2.mlp.up_proj.weight``.
        layer_modules: Module names of the same layer (to tell Gemma-style norms apart); optional.

    Example:
        >>> sub_block("model.layers.2.mlp.up_proj.weight"), sub_block("model.layers.0.input_layernorm.weight")
        (('ffn', 2), ('attention', 0))
    """
    layer = layer_index(param_name)
    if layer is None:
        return "outside", None
    stem = param_name.rsplit(".", 1)[0]
    group = module_type(param_name)[1]
    if group == "ffn":
        return "ffn", layer
    if group == "norm" and _FFN_NORMS.search(stem):
        gemma = layer_modules is not None and any(m.endswith(_GEMMA_STYLE) for m in layer_modules)
        if not (gemma and stem.endswith("post_attention_layernorm")):
            return "ffn", layer
    return "attention", layer


def sub_blocks(names: Sequence[str], per_layer: bool = True) -> dict[str, list[str]]:
    """Parameter names of every group: ``ffn``, ``attention``, ``outside``, then ``attention@l`` / ``ffn@l``.

    Args:
        names: Base-model parameter names (one model's ``named_parameters`` keys).
        per_layer: Add one attention and one FFN group per layer.
    """
    modules: dict[int, set[str]] = {}
    for name in names:
        if (layer := layer_index(name)) is not None:
            modules.setdefault(layer, set()).add(name.rsplit(".", 1)[0])
    groups: dict[str, list[str]] = {"ffn": [], "attention": [], "outside": []}
    layered: dict[tuple[int, str], list[str]] = {}
    for name in names:
        kind, layer = sub_block(name, modules.get(layer_index(name)))  # type: ignore[arg-type]
        groups[kind].append(name)
        if per_layer and layer is not None:
            layered.setdefault((layer, kind), []).append(name)
    groups.update({f"{kind}@{layer}": layered[layer, kind] for layer, kind in sorted(layered)})
    return {group: members for group, members in groups.items() if members}


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The frozen base parameters of a (possibly adapted) model under the base model's own names.

    peft inserts ``.base_layer`` into wrapped modules and :class:`peft.PeftModel` prefixes
    ``base_model.model.``; both are removed, adapter tensors are left out.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    tuners = [name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)]
    out: dict[str, nn.Parameter] = {}
    for name, param in inner.named_parameters():
        owner = next((t for t in tuners if name.startswith(t + ".")), None)
        if owner is None or name.startswith(owner + ".base_layer."):  # not an adapter tensor
            out[name.replace(".base_layer.", ".")] = param
    return out


@contextmanager
def hybrid(params: Mapping[str, nn.Parameter], donor: Mapping[str, torch.Tensor], names: Sequence[str]) -> Iterator[None]:
    """Copy ``donor[name]`` into ``params[name]`` for ``names`` in place; undo it on exit (bit for bit).

    Raises:
        ValueError: a name is missing from either side, or the shapes differ (not two versions of one base).
    """
    missing = [n for n in names if n not in params or n not in donor]
    bad = [n for n in names if n not in missing and params[n].shape != donor[n].shape]
    if missing or bad:
        raise ValueError(
            f"hybrid bases need two versions of one architecture; {'missing ' + str(missing[:3]) if missing else ''}"
            f"{' shapes differ at ' + str(bad[:3]) if bad else ''}. Compare e.g. llama-v1 with llama-v2, not two families"
        )
    saved = {n: params[n].detach().clone() for n in names}
    try:
        with torch.no_grad():
            for n in names:
                params[n].copy_(donor[n].to(params[n].device, params[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])


def _explained(value: float, start: float, end: float) -> float | None:
    gap = end - start
    return None if abs(gap) < 1e-9 else (value - start) / gap


def attribute_drop(
    old: nn.Module, new: nn.Module, adapter_dir: str | Path, batches: list[dict[str, torch.Tensor]],
    per_layer: bool = True, old_name: str = "v_o", new_name: str = "v_n",
) -> list[Row]:
    """The attribution table of the old adapter's drop from ``old`` to ``new`` (see the module docstring).

    Args:
        old: v_o (the base the adapter was trained on), an HF causal LM.
        new: v_n, same architecture. The adapter is loaded into it (peft wraps its layers in place) and its
            base weights are swapped while this runs, then restored.
        adapter_dir: The adapter trained on v_o (any peft folder: LoRA, RoSA, SHiRA).
        batches: Task batches with ``input_ids``, ``attention_mask``, ``labels``.
        per_layer: Also one row per layer and sub-block.
        old_name: Label of v_o.
        new_name: Label of v_n.

    Returns:
        Rows ``{direction, group, params, loss, token_acc, explained_loss, explained_token_acc}``:
        first the two plain bases (``direction`` ``"base"``, ``group`` the base label), then one
        ``"put back"`` and one ``"only"`` row per group.

    Raises:
        ValueError: the two bases are not two versions of one architecture.
    """
    from peft import PeftModel

    old_state = {n: p.detach().cpu() for n, p in base_parameters(old).items()}
    model = PeftModel.from_pretrained(new, str(adapter_dir)).eval()
    params = base_parameters(model)
    if params.keys() != old_state.keys():
        diff = sorted(set(params) ^ set(old_state))[:3]
        raise ValueError(f"hybrid bases need two versions of one architecture; the parameter names differ at {diff}")
    new_state = {n: p.detach().clone().cpu() for n, p in params.items()}
    groups = sub_blocks(list(params), per_layer)
    metrics = ("loss", "token_acc")
    m_new = evaluate_lm(model, batches)
    with hybrid(params, old_state, list(params)):
        m_old = evaluate_lm(model, batches)
    rows: list[Row] = [
        {"direction": "base", "group": old_name, "params": sum(p.numel() for p in params.values()), **m_old},
        {"direction": "base", "group": new_name, "params": sum(p.numel() for p in params.values()), **m_new},
    ]
    for row in rows:
        row.update({f"explained_{m}": None for m in metrics})
    for group, names in groups.items():
        count = sum(params[n].numel() for n in names)
        with hybrid(params, old_state, names):
            put_back = evaluate_lm(model, batches)
        with hybrid(params, old_state, list(params)), hybrid(params, new_state, names):
            only = evaluate_lm(model, batches)
        rows.append({"direction": "put back", "group": group, "params": count, **put_back,
                     **{f"explained_{m}": _explained(put_back[m], m_new[m], m_old[m]) for m in metrics}})
        rows.append({"direction": "only", "group": group, "params": count, **only,
                     **{f"explained_{m}": _explained(only[m], m_old[m], m_new[m]) for m in metrics}})
    return rows
