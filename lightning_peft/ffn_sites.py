"""Find the FFN sub-blocks of a transformer: where Trans-PEFT masks and what it skips, what the drift analysis compares.

An :class:`FFNSite` is one decoder layer's FFN:

* ``skip``: the modules whose forward is replaced by zeros when the layer's FFN is dropped.
  Gated (Llama, Mistral, Qwen2, Gemma: ``mlp.{gate,up,down}_proj``) and GPT-2
  (``mlp.{c_fc,c_proj}``) FFNs are submodules, so ``skip = [mlp]``; an OPT decoder layer holds
  ``fc1``/``fc2`` directly (``residual + fc2(act(fc1(LN(x))))``, no FFN submodule), so
  ``skip = [fc1, fc2]``: both GEMMs are skipped and ``act(0) = 0`` for ReLU/GELU/SiLU.
* ``project``: the output projection whose *input* (the intermediate activation h, shape
  (B, T, d_ff)) is masked: ``down_proj``, ``c_proj`` or ``fc2``.

Sites are looked up when the hooks are attached, i.e. after adapter callbacks injected their
layers, so ``project`` is the outermost (peft-wrapped) module and the mask reaches the base
weight and every adapter branch alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["FFNSite", "NoFFNFoundError", "find_ffn_sites", "out_features"]

_LINEAR = (nn.Linear, Conv1D)


class NoFFNFoundError(ValueError):
    """Trans-PEFT found no FFN sub-block to mask or drop."""


@dataclass
class FFNSite:
    """One FFN sub-block.

    Attributes:
        name: Module name of the FFN (the MLP, or the decoder layer for OPT-style layers).
        kind: ``"gated"``, ``"gpt2"``, ``"opt"`` or ``"explicit"``.
        skip: Modules replaced by zeros when the FFN is dropped.
        project: Output projection whose input is masked (``None``: masking impossible).
    """

    name: str
    kind: str
    skip: list[nn.Module] = field(default_factory=list)
    project: nn.Module | None = None


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _auto_site(name: str, module: nn.Module) -> FFNSite | None:
    if isinstance(module, BaseTunerLayer):
        return None
    if _has(module, "gate_proj", "up_proj", "down_proj") or _has(module, "gate_up_proj", "down_proj"):  # Phi-3 fuses
        return FFNSite(name, "gated", [module], module.down_proj)
    if _has(module, "c_fc", "c_proj") and not hasattr(module, "c_attn"):
        return FFNSite(name, "gpt2", [module], module.c_proj)
    if _has(module, "fc1", "fc2"):
        return FFNSite(name, "opt", [module.fc1, module.fc2], module.fc2)
    return None


def _last_projection(module: nn.Module) -> nn.Module | None:
    """Last linear-like child of ``module`` in registration order (a peft layer counts as one)."""
    last, inside = None, []
    for name, child in module.named_modules():
        if child is module or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(child, BaseTunerLayer):
            inside.append(name)
            last = child
        elif isinstance(child, _LINEAR):
            last = child
    return last


def _matches(name: str, spec: str | list[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def find_ffn_sites(model: nn.Module, ffn_modules: str | list[str] = "auto") -> list[FFNSite]:
    """The FFN sub-blocks of ``model``, in module order (= depth order for decoder stacks).

    Args:
        model: Any module (a LightningModule, an HF model, a plain ``nn.Module``).
        ffn_modules: ``"auto"``; a regex matching full module names; or a list of full names
            or dotted suffixes. Explicit modules must return a tensor shaped like their first
            input (they are skipped by returning zeros); their last linear child is masked.

    Returns:
        One :class:`FFNSite` per FFN; nested matches are dropped (the outer one wins).

    Raises:
        NoFFNFoundError: Nothing matched; the message lists likely candidates.
    """
    sites: list[FFNSite] = []
    for name, module in model.named_modules():
        if any(name.startswith(s.name + ".") for s in sites if s.name):
            continue  # inside an FFN already found
        if ffn_modules == "auto":
            site = _auto_site(name, module)
        elif _matches(name, ffn_modules) and not isinstance(module, BaseTunerLayer):
            site = FFNSite(name, "explicit", [module], _last_projection(module))
        else:
            site = None
        if site is not None:
            sites.append(site)
    if not sites:
        hints = [n for n, _ in model.named_modules() if re.search(r"(mlp|ffn|feed_?forward|fc\d)$", n, re.I)][:5]
        how = (
            "auto-discovery knows gated MLPs (gate_proj/up_proj/down_proj: Llama, Mistral, Qwen, Gemma; gate_up_proj/"
            "down_proj: Phi-3), "
            "GPT-2 MLPs (c_fc/c_proj) and OPT-style layers (fc1/fc2)"
            if ffn_modules == "auto"
            else "no module name matched"
        )
        raise NoFFNFoundError(
            f"TransPEFT found no FFN sub-block in {type(model).__name__} with ffn_modules={ffn_modules!r}: {how}. "
            f"Pass ffn_modules=[...] with the names (or dotted suffixes) of the FFN modules"
            + (f", e.g. {hints}" if hints else "")
        )
    return sites


def out_features(module: nn.Module) -> int | None:
    """Output width of a linear-like module (``nn.Linear``, GPT-2 ``Conv1D``, a peft layer)."""
    for attr in ("out_features", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    base = getattr(module, "base_layer", None)
    return out_features(base) if isinstance(base, nn.Module) else None
