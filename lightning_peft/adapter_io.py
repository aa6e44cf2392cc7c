"""Adapter folders in peft's own format, with the base model they were trained on.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as
``PeftModel.save_pretrained`` does (keys ``base_model.model.<module path>.<tensor>``), so
plain ``peft.PeftModel.from_pretrained(base_model, path)`` loads it. The safetensors header
also records the base model's fingerprint: name or path, a hash of its config and a hash of
its weights (per tensor, from a fixed sample of each tensor rounded to bf16, so the same base
loaded in fp32 or bf16, on CPU or GPU, has the same fingerprint).

``load_adapter`` compares that fingerprint with the model it loads onto. A different base
with the same shapes (an updated release: v1 -> v2) loads with a
:class:`BaseModelMismatchWarning` that names what differs; different shapes fail before the
model is touched. Only JSON and safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from lightning_peft.atomic import atomic_directory
from lightning_peft.callback import activate_all_adapters, adapter_names
from lightning_peft.checkpointing import adapter_key_prefixes, install_adapter_only_state_dict
from lightning_peft.fingerprint import (  # noqa: F401  (BaseModelMismatchWarning: part of this module's API)
    BaseModelMismatchWarning,
    base_fingerprint,
    describe_base_difference,
    find_base_model,
)
from lightning_peft.registry import spec_for_peft_type

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_KEY = "lightning_peft"
PEFT_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter folder is missing, incomplete, corrupted or made for other shapes."""


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
def save_adapter(module: nn.Module, path: str | Path, adapter_name: str | None = None, *,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write one adapter of ``module`` as a peft adapter folder, atomically.

    Args:
        module: A LightningModule or model holding an injected adapter.
        path: Target folder; replaced only once the new folder is complete.
        adapter_name: Which adapter; optional when the module holds one.
        metadata: JSON-serialisable facts stored with the weights (in the safetensors header,
            read back by :func:`read_adapter`), e.g. the training set size.

    When ``module`` carries an upgrade record (:class:`~lightning_peft.UpgradeRecord`,
    ``TransLoRADiscriminator``), the folder also gets ``upgrade.json`` (task, seed inputs,
    training-set size) and a copy of the discriminator in ``discriminator/``
    (:mod:`lightning_peft.upgrade.record`); plain peft ignores both.

    Returns:
        The folder path.

    Raises:
        ValueError: no adapter, or several and ``adapter_name`` not given.
    """
    from lightning_peft.upgrade.record import DISCRIMINATOR_DIR, RECORD_ATTR, RECORD_FILE, write_record

    owner_prefix, owner, name = _adapter_owner(module, adapter_name)
    base_prefix, base = find_base_model(module)
    config = copy.deepcopy(owner.peft_config[name])
    tensors = {
        PEFT_PREFIX + _relative(_join(owner_prefix, k), base_prefix): v.detach().to("cpu").contiguous()
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
    record = getattr(module, RECORD_ATTR, None)
    ours = {CONFIG_FILE, WEIGHTS_FILE, "README.md", RECORD_FILE, DISCRIMINATOR_DIR}
    with atomic_directory(path, replaceable=ours) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
        if record:
            write_record(tmp, record)
    return Path(path)


# --------------------------------------------------------------------------- load
def read_adapter(path: str | Path) -> tuple[PeftConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter folder: (peft config, tensors with peft keys, lightning_peft metadata or {}).

    Raises:
        AdapterFormatError: folder or files missing, JSON or safetensors corrupted.
    """
    path = Path(path)
    fix = "point to a folder written by lightning_peft.save_adapter or PeftModel.save_pretrained"
    if not path.is_dir():
        raise AdapterFormatError(f"adapter folder {str(path)!r} does not exist; {fix}")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            pickled = f == WEIGHTS_FILE and (path / "adapter_model.bin").is_file()
            extra = " (its pickled adapter_model.bin is not read: re-save it as safetensors)" if pickled else ""
            raise AdapterFormatError(f"adapter folder {str(path)!r} has no {f}{extra}; {fix}")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        config = PeftConfig.from_peft_type(**raw)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
        raise AdapterFormatError(f"{path / CONFIG_FILE} is corrupted or not a peft config ({exc}); re-save the adapter") from exc
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{path / WEIGHTS_FILE} is corrupted ({exc}); re-save the adapter") from exc
    meta = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    return config, tensors, meta


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
    module: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False
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
    expected = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(base, adapter_name=adapter_name).items()}
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
    set_peft_model_state_dict(base, {k[len(PEFT_PREFIX) :]: v for k, v in tensors.items()}, adapter_name, low_cpu_mem_usage=True)
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
