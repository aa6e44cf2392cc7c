"""Which base model an adapter belongs to: finding it inside a module, and its fingerprint.

The fingerprint of a base is its name or path, a hash of its config and a hash of its weights
(per tensor, from a fixed sample of each tensor rounded to bf16, so the same base loaded in fp32
or bf16, on CPU or GPU, has the same fingerprint). ``save_adapter`` stores it with the adapter,
checkpoints carry it too, and loading compares it with the model at hand
(:func:`describe_base_difference`): a different base of the same shapes loads with a
:class:`BaseModelMismatchWarning` that names what differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import lightning as L
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from lightning_peft.checkpointing import adapter_key_prefixes

__all__ = ["BaseModelMismatchWarning", "base_fingerprint", "describe_base_difference", "find_base_model"]

_SAMPLE = 4096  # elements hashed per tensor: cheap for 7B models, yet any real update shows
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


class BaseModelMismatchWarning(UserWarning):
    """An adapter is loaded onto a base model other than the one it was trained on."""


# --------------------------------------------------------------------------- locating modules
def find_base_model(module: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(prefix, model)``: the model a user would hand to ``PeftModel.from_pretrained``.

    The shallowest ``transformers.PreTrainedModel`` inside ``module``; for a plain
    ``nn.Module`` inside a LightningModule, the single child that holds every adapter;
    otherwise ``module`` itself (prefix ``""``).
    """
    for name, sub in module.named_modules():  # pre-order: shallowest first
        if isinstance(sub, PreTrainedModel):
            return name, sub
    if isinstance(module, L.LightningModule):
        tops = {n.split(".")[0] for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
        if len(tops) == 1:
            top = tops.pop()
            return top, module.get_submodule(top)
    return "", module


# --------------------------------------------------------------------------- fingerprints
def _tensor_hash(t: torch.Tensor) -> str:
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
    data = sample.to(device="cpu", dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    return hashlib.sha256(repr(tuple(t.shape)).encode() + data).hexdigest()[:16]


def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    kept = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))  # as stored: int dict keys become str


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Fingerprint of a base model's identity: name, config hash and weight hashes.

    Adapter tensors are left out and peft's ``.base_layer`` is removed from names, so the
    fingerprint of a model is the same before and after an adapter is injected.
    """
    skip = adapter_key_prefixes(model)
    tensors = {
        n.replace(".base_layer.", "."): _tensor_hash(p)
        for n, p in model.named_parameters(remove_duplicate=False)
        if not n.startswith(skip)
    }
    config = _config_dict(model)
    return {
        "name_or_path": str(getattr(model, "name_or_path", "") or ""),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "config": config,
        "weights_sha256": hashlib.sha256("".join(f"{k}:{v}" for k, v in sorted(tensors.items())).encode()).hexdigest(),
        "tensors": tensors,
    }


def describe_base_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Human-readable difference between two fingerprints; ``None`` when they are the same base."""
    if saved.get("weights_sha256") == current["weights_sha256"] and saved.get("config_sha256") == current["config_sha256"]:
        return None
    parts = []
    if saved.get("config_sha256") != current["config_sha256"]:
        old, new = saved.get("config", {}), current["config"]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        parts.append("config differs in " + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys[:8]))
    old_t, new_t = saved.get("tensors", {}), current["tensors"]
    changed = [k for k in new_t if k in old_t and old_t[k] != new_t[k]]
    if changed:
        parts.append(f"{len(changed)} of {len(new_t)} weight tensors differ (e.g. {', '.join(changed[:3])})")
    missing = sorted(set(old_t) ^ set(new_t))
    if missing:
        parts.append(f"{len(missing)} tensors exist in only one of them (e.g. {', '.join(missing[:3])})")
    return "; ".join(parts) or "weights differ"
