"""Save and load adapters in peft's own format, with the base model they were trained on.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as
``PeftModel.save_pretrained`` does (keys ``base_model.model.<module path>.<tensor>``), so
plain ``peft.PeftModel.from_pretrained(base_model, path)`` loads it; the folder itself (and what
else it may hold: the upgrade record, the discriminator) is :class:`~lightning_peft.adapter_folder.AdapterFolder`'s.
The safetensors header also records the base model's fingerprint (:mod:`lightning_peft.fingerprint`).

``load_adapter`` compares that fingerprint with the model it loads onto. A different base
with the same shapes (an updated release: v1 -> v2) loads with a
:class:`BaseModelMismatchWarning` that names what differs; different shapes fail before the
model is touched. Only JSON and safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from lightning_peft.adapter_folder import AdapterFolder, AdapterFormatError, AdapterRecord
from lightning_peft.callback import activate_all_adapters, adapter_names
from lightning_peft.checkpointing import adapter_key_prefixes, install_adapter_only_state_dict
from lightning_peft.fingerprint import (
    BaseModelMismatchWarning,
    base_fingerprint,
    describe_base_difference,
    find_base_model,
)
from lightning_peft.registry import spec_for_peft_type

__all__ = ["AdapterFormatError", "BaseModelMismatchWarning", "base_fingerprint", "load_adapter", "read_adapter",
           "save_adapter"]


# --------------------------------------------------------------------------- locating the adapter
def _adapter_owner(module: nn.Module, adapter_name: str | None) -> tuple[str, nn.Module, str]:
    """Shallowest submodule carrying ``peft_config`` with the adapter; returns (prefix, owner, name)."""
    owners = [(n, m) for n, m in module.named_modules() if getattr(m, "peft_config", None)]
    names = sorted({a for _, m in owners for a in m.peft_config})
    if not owners:
        raise ValueError(
            f"{type(module).__name__} has no adapter to save; attach an adapter callback (e.g. LoRA()) and "
            "fit, or load one with load_adapter"
        )
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"the module holds several adapters {names}; pass adapter_name= one of them")
        adapter_name = names[0]
    for prefix, owner in owners:
        if adapter_name in owner.peft_config:
            return prefix, owner, adapter_name
    raise ValueError(f"no adapter named {adapter_name!r}; the module holds {names}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _relative(name: str, prefix: str) -> str:
    if not prefix:
        return name
    if not name.startswith(prefix + "."):  # also rejects `model_ema` for prefix `model`
        raise ValueError(f"adapter tensor {name!r} lies outside the base model {prefix!r}; it cannot be saved in peft format")
    return name[len(prefix) + 1 :]


# --------------------------------------------------------------------------- save
def save_adapter(module: nn.Module, path: str | os.PathLike[str], adapter_name: str | None = None, *,
                 metadata: dict[str, Any] | None = None, record: AdapterRecord | None = None) -> Path:
    """Write one adapter of ``module`` as a peft adapter folder, atomically.

    Args:
        module: A LightningModule or model holding an injected adapter.
        path: Target folder; replaced only once the new folder is complete.
        adapter_name: Which adapter; optional when the module holds one.
        metadata: JSON-serialisable facts stored with the weights (in the safetensors header,
            read back by :func:`read_adapter`), e.g. an upgrade's route.
        record: What a later base upgrade needs (:class:`~lightning_peft.adapter_folder.AdapterRecord`:
            task, seed inputs, training-set size, the discriminator), e.g. ``UpgradeRecord(...).record``
            after ``fit``; written as ``upgrade.json`` and ``discriminator/``, which plain peft ignores.

    Returns:
        The folder path.

    Raises:
        ValueError: no adapter, or several and ``adapter_name`` not given.
        FileNotFoundError: ``record`` names a discriminator folder that holds no adapter.
    """
    owner_prefix, owner, name = _adapter_owner(module, adapter_name)
    base_prefix, base = find_base_model(module)
    config = copy.deepcopy(owner.peft_config[name])
    tensors = {
        AdapterFolder.tensor_key(_relative(_join(owner_prefix, k), base_prefix)): v.detach().to("cpu").contiguous()
        for k, v in get_peft_model_state_dict(owner, adapter_name=name).items()
    }
    # the layers that really carry this adapter, relative to the base model (peft suffix-matches them)
    config.target_modules = sorted(
        _relative(n, base_prefix)
        for n, m in module.named_modules()
        if isinstance(m, BaseTunerLayer) and name in m._get_available_adapters()
    )
    config.base_model_name_or_path = str(getattr(base, "name_or_path", "") or config.base_model_name_or_path or "")
    config.inference_mode = True
    meta = {**(metadata or {}), "adapter_name": name, "base_module": base_prefix, "base": base_fingerprint(base)}
    AdapterFolder.write(path, config, tensors, meta, record)
    return Path(path)


# --------------------------------------------------------------------------- load
def read_adapter(path: str | os.PathLike[str]) -> tuple[PeftConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter folder: (peft config, tensors with peft keys, lightning_peft metadata or {}).

    Raises:
        AdapterFormatError: folder or files missing, JSON or safetensors corrupted.
    """
    return AdapterFolder(path).read()


def _remove_adapter(model: nn.Module, name: str) -> None:
    """Undo ``inject_adapter_in_model`` for one adapter (restores the original layers)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer) and name in child.active_adapters:
                if len(getattr(child, "peft_config", {}) or {}) > 1 or len(child._get_available_adapters()) > 1:
                    child.delete_adapter(name)
                else:
                    setattr(parent, child_name, child.get_base_layer())
    configs = getattr(model, "peft_config", None)
    if configs is not None:
        configs.pop(name, None)
        if not configs:
            del model.peft_config


def load_adapter(
    module: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Inject a saved adapter (ours or any peft adapter folder) into a model or LightningModule.

    Args:
        module: The target; its base model is found as in :func:`find_base_model`.
        path: Adapter folder.
        adapter_name: Name given to the adapter inside the model.
        is_trainable: Keep the adapter's parameters trainable (default: frozen, for inference).

    Returns:
        ``module``, adapted in place.

    Raises:
        AdapterFormatError: folder missing/corrupted, or its tensors do not fit this model's
            shapes (the model is left exactly as it was).

    Warns:
        BaseModelMismatchWarning: shapes fit but the base differs from the one the adapter was
            trained on (config or weights); the message names the differences.
    """
    config, tensors, meta = read_adapter(path)
    _, base = find_base_model(module)
    saved_base = meta.get("base_module")
    if not isinstance(base, PreTrainedModel) and saved_base and saved_base in dict(module.named_modules()):
        base = module.get_submodule(saved_base)  # a plain nn.Module (e.g. at `net`) before it holds adapters
    if adapter_name in adapter_names(module):
        raise ValueError(f"the model already holds an adapter named {adapter_name!r}; pass another adapter_name=")
    grad_before = {n: p.requires_grad for n, p in base.named_parameters()}  # injection freezes the base
    try:
        spec = spec_for_peft_type(config.peft_type)  # SHiRA: peft builds our layer class for this injection only
        with spec.injecting() if spec else contextlib.nullcontext():
            inject_adapter_in_model(config, base, adapter_name=adapter_name, low_cpu_mem_usage=True)
    except ValueError as exc:
        raise AdapterFormatError(f"adapter at {str(path)!r} does not fit this model: {exc}") from exc
    expected = {AdapterFolder.tensor_key(k): v for k, v in get_peft_model_state_dict(base, adapter_name=adapter_name).items()}
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{k}: not in this model" for k in tensors if k not in expected]
    problems += [f"{k}: in this model but not in the file" for k in expected if k not in tensors]
    if problems:
        _remove_adapter(base, adapter_name)
        for n, p in base.named_parameters():
            p.requires_grad_(grad_before.get(n, p.requires_grad))
        raise AdapterFormatError(
            f"adapter at {str(path)!r} was made for other shapes or modules: {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}. Load it onto the base model it was trained on "
            f"({meta.get('base', {}).get('name_or_path') or config.base_model_name_or_path or 'unknown'}) "
            "or one of the same architecture and size."
        )
    state = {AdapterFolder.module_key(k): v for k, v in tensors.items()}
    set_peft_model_state_dict(base, state, adapter_name, low_cpu_mem_usage=True)
    activate_all_adapters(base)
    for n, p in base.named_parameters():
        named = f".{adapter_name}." in n or n.endswith(f".{adapter_name}")  # lora_A.default.weight, shira_weight.default
        if named and n.startswith(adapter_key_prefixes(base)):
            p.requires_grad_(is_trainable)
    install_adapter_only_state_dict(module)
    if "base" in meta:
        diff = describe_base_difference(meta["base"], base_fingerprint(base))
        if diff:
            warnings.warn(
                f"adapter at {str(path)!r} was trained on base {meta['base'].get('name_or_path')!r} but is loaded onto "
                f"{getattr(base, 'name_or_path', '') or type(base).__name__!r}: {diff}. Shapes match, so it is applied; "
                "expect changed quality (an updated base): evaluate it there, or re-tune it on the new base.",
                BaseModelMismatchWarning,
                stacklevel=2,
            )
    return module
