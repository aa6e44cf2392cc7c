"""Adapter-only state dicts: what a checkpoint of an adapted LightningModule holds.

Once an adapter is injected, ``module.state_dict()`` keeps only adapter tensors (everything
on a peft tuner layer except its wrapped ``base_layer``) and parameters that are still
trainable; frozen base weights are dropped, so a ``ModelCheckpoint`` file is a small
fraction of the model (also with ``save_weights_only=True``, where callback hooks do not
run). Loading such a state dict reports no missing frozen keys, so Lightning's strict
loading still catches a missing or misnamed *adapter* tensor.

Lightning loads checkpoint weights after ``Callback.setup`` and ``configure_model`` (Lightning 2.x
``Trainer._run``: setup hooks, ``configure_model``, then ``_restore_modules_and_callbacks``), i.e. after injection, so the hooks are in place when
it does. To get the full weights, call ``state_dict()`` on the wrapped model itself (e.g.
``pl_module.model.state_dict()``) or merge with ``peft``.

Names are compared without the wrapper segments of FSDP and activation checkpointing
(:func:`clean_name`): under ``adapter_fsdp`` the module's parameter names contain
``_fsdp_wrapped_module.`` while the checkpoint keys (one process's names) do not.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lightning_peft.registry import spec_for_layer

_HOOKED = "_lightning_peft_adapter_only_state_dict"
# segments that FSDP and torch's activation-checkpoint wrappers insert into module paths
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """``name`` without wrapper segments: ``a._fsdp_wrapped_module.lora_A.default.weight`` -> ``a.lora_A.default.weight``."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def adapter_key_prefixes(module: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes (with trailing dot) of every injected adapter's tensors.

    Structural, as in peft 0.21: every child of a tuner layer except ``base_layer``; so a base
    module whose name happens to contain ``lora_`` is never mistaken for an adapter.
    """
    prefixes: list[str] = []
    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer):
            base = clean_name(f"{name}.") if name else ""
            prefixes += [f"{base}{child}." for child, _ in layer.named_children() if child != "base_layer"]
            # parameters/buffers stored directly on the tuner layer (e.g. ParameterDict entries)
            prefixes += [f"{base}{p}" for p, _ in layer.named_parameters(recurse=False)]
            prefixes += [f"{base}{b}" for b, _ in layer.named_buffers(recurse=False)]
    return tuple(prefixes)


def kept_keys_filter(module: nn.Module):
    """Predicate on state-dict keys (relative to ``module``): adapter tensor or trainable parameter."""
    prefixes = adapter_key_prefixes(module)
    trainable = {clean_name(n) for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}

    def keep(key: str) -> bool:
        key = clean_name(key)
        return key in trainable or key.startswith(prefixes)

    return keep


def _drop_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    keep = kept_keys_filter(module)
    for key in [k for k in state_dict if k.startswith(prefix) and not keep(k[len(prefix) :])]:
        del state_dict[key]


def _ignore_missing_frozen(module: nn.Module, incompatible_keys: Any) -> None:
    # Keys carry the prefix of any outer module this one is nested in (the hook is not told
    # it), so drop a missing key only when it *is* one of this module's frozen tensors.
    keep = kept_keys_filter(module)
    frozen = {k for k in _all_keys(module) if not keep(k)}

    def is_frozen(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[i:]) in frozen for i in range(len(parts)))

    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not is_frozen(k)]


def _check_adapter_shapes(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Before torch's own size check: name a checkpoint whose adapter has other shapes (another r or targets).

    Tensors a method stores in a compact code (``MethodSpec.decode_checkpoint``: sparse positions) are
    decoded first, so the check sees the layers' own layout.
    """
    for name, layer in module.named_modules():
        spec = spec_for_layer(layer)
        if spec is not None and spec.decode_checkpoint is not None:
            spec.decode_checkpoint(layer, state_dict, f"{prefix}{name}." if name else prefix)
    own = dict(module.state_dict(keep_vars=True))  # adapter-only: what a checkpoint of this run holds
    clashes = [
        f"{k}: checkpoint {tuple(v.shape)} vs this run {tuple(own[k[len(prefix):]].shape)}"
        for k, v in state_dict.items()
        if k.startswith(prefix) and k[len(prefix) :] in own and hasattr(v, "shape") and v.shape != own[k[len(prefix) :]].shape
    ]
    if clashes:
        raise ValueError(
            f"the checkpoint's adapter has other shapes than this run's ({'; '.join(clashes[:3])}"
            f"{' ...' if len(clashes) > 3 else ''}): it was trained with another rank or other target modules. "
            "Resume with the adapter settings the checkpoint was trained with, or start a new run."
        )


def _all_keys(module: nn.Module) -> set[str]:
    """Every state-dict key of ``module`` before the adapter-only filter."""
    keys = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return keys | {n for n, _ in module.named_buffers(remove_duplicate=False)}


def install_adapter_only_state_dict(module: nn.Module) -> None:
    """Make a LightningModule's ``state_dict()`` adapter-only and its loading tolerant of absent frozen keys.

    Only LightningModules (what Lightning checkpoints); other modules are left alone.
    Idempotent: hooks are registered once per module.
    """
    if getattr(module, _HOOKED, False) or not isinstance(module, L.LightningModule):
        return  # a bare model keeps its full state_dict (save_pretrained must still work)
    module.register_state_dict_post_hook(_drop_frozen)
    module.register_load_state_dict_pre_hook(_check_adapter_shapes)
    module.register_load_state_dict_post_hook(_ignore_missing_frozen)
    object.__setattr__(module, _HOOKED, True)
