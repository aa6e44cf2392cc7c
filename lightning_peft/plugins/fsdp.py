"""``adapter_fsdp``: FSDP that gives adapter leaves their own units and writes adapter-only checkpoints.

Why units matter (pytorch #91167, litgpt #1392): FSDP flattens each unit's
tensors into one ``FlatParameter``; with ``use_orig_params=True`` frozen and trainable tensors
may share a unit, but the gradient is then allocated for the whole flat parameter, i.e. as if
nothing were frozen. Here every adapter leaf (a module whose own parameters all train and
whose ``forward`` runs: peft LoRA's ``lora_A[name]``/``lora_B[name]``, ``lora_embedding_*``
...) is a unit of its own (peft's ``fsdp_auto_wrap_policy`` rule), so::

    root / block units:  frozen base weights only      -> FlatParameter.requires_grad=False, no .grad
    adapter units:       lora_A.default, lora_B.default -> fp32, sharded, gradients

Pass ``auto_wrap_policy={LlamaDecoderLayer, ...}`` to shard the frozen base per block too
(otherwise it is one root unit).

Precision: ``"bf16-true"``/``"16-true"`` casts the module down in ``convert_module``; adapter
tensors are cast back to fp32 before wrapping (peft's ``autocast_adapter_dtype``) and their units
get ``mixed_precision=None``, so the adapter computes, reduces and steps in fp32 while the frozen
base runs in bf16 (an FSDP unit holds one dtype, which is why adapters need their own units).

Checkpoints: the model part holds exactly the keys of the LightningModule's adapter-only state
dict (:mod:`lightning_peft.checkpointing`) as full tensors: only the units that own adapter (or
other trainable) tensors are gathered, one at a time (``summon_full_params(unit, recurse=False)``),
so a save moves adapter-sized data and never the frozen base (FSDP's own full state dict would
gather every unit and then have the base dropped). The optimizer part is FSDP's full optimizer
state re-keyed to parameter ids, as Lightning's ``FSDPStrategy`` writes it, so a single-process
or DDP run resumes from an ``adapter_fsdp`` checkpoint and ``adapter_fsdp`` resumes from theirs.

CPU (gloo): Lightning refuses ``FSDPStrategy`` on CPU (an exact-type check in its accelerator
connector; a subclass passes) and torch's FSDP needs ``device_id=torch.device("cpu")`` to accept
CPU modules (Lightning passes the device index, ``None`` on CPU). With both, FSDP trains on CPU
under torch 2.13; its full state dict with ``offload_to_cpu=True`` (Lightning's choice for
``world_size > 1``) segfaults rank 0 on CPU, so offloading (and ``rank0_only``) is used on
accelerators only.

Not supported (both fail before the first step and name ``adapter_ddp``):

* adapters that keep their trainable tensors in the tuner layer itself (RoSA's and SHiRA's
  ``ParameterDict`` values) read the frozen base weight outside the forward (mask statistics,
  weight magnitude, calibration), where FSDP holds only a 1-D shard of it;
* Trans-PEFT dropping (``drop_p > 0``): each rank skips other FFNs, so the ranks would run
  different FSDP units and their all-gathers would not pair up (measured on CPU: gloo's "Received
  data size doesn't match expected size"). Masking (``mask_p``) is fine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.optim import Optimizer
from typing_extensions import override

from lightning_peft.callback import AdapterStrategyError
from lightning_peft.checkpointing import clean_name, kept_keys_filter
from lightning_peft.plugins.strategies import (
    ADAPTER_STRATEGIES,
    inject_configured_adapters,
    keep_adapters_fp32,
)

__all__ = ["AdapterFSDPStrategy", "adapter_wrap_policy", "is_adapter_leaf"]

_NOT_CALLED = (nn.ParameterDict, nn.ParameterList)  # hold tensors that their owner reads; forward never runs


def is_adapter_leaf(module: nn.Module) -> bool:
    """A module with no children whose own parameters (at least one) all train and whose forward runs."""
    own = list(module.parameters(recurse=False))
    has_children = next(module.children(), None) is not None
    return bool(own) and not has_children and not isinstance(module, _NOT_CALLED) and all(p.requires_grad for p in own)


def _unsupported_tuner_layers(model: nn.Module) -> list[str]:
    """Tuner layers whose method's spec says ``fsdp=False`` (RoSA, SHiRA: trainable tensors in the tuner layer
    itself); layers of unregistered methods are judged by where their trainable tensors live."""
    from lightning_peft.registry import spec_for_layer

    bad = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        spec = spec_for_layer(layer)
        if spec is not None:
            if not spec.fsdp:
                bad.append(f"{name} ({spec.name})")
            continue
        for child_name, child in layer.named_modules():
            if child_name.startswith("base_layer") or is_adapter_leaf(child):
                continue
            if any(p.requires_grad for p in child.parameters(recurse=False)):
                bad.append(f"{name} ({type(layer).__name__})")
                break
    return bad


def adapter_wrap_policy(block_classes: tuple[type[nn.Module], ...] = (), adapter_kwargs: dict[str, Any] | None = None):
    """FSDP ``CustomPolicy``: each adapter leaf is a unit (with ``adapter_kwargs`` overrides), and each block.

    Args:
        block_classes: Module classes (e.g. decoder layers) that get units of their own.
        adapter_kwargs: FSDP keyword overrides for adapter units (``{"mixed_precision": None}``).
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    def unit(module: nn.Module) -> bool | dict[str, Any]:
        if is_adapter_leaf(module):
            return dict(adapter_kwargs) if adapter_kwargs else True
        return bool(block_classes) and isinstance(module, block_classes)

    return CustomPolicy(unit)


def _by_position(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A name-keyed (FSDP) optimizer state dict re-keyed by position in the param groups (torch's format)."""
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A torch optimizer state dict (ids by position in the param groups) re-keyed by parameter name (FSDP's).

    Raises:
        RuntimeError: the groups hold another number of parameters than ``names``.
    """
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(names) or any(isinstance(i, str) for i in saved):
        if all(isinstance(i, str) for i in saved):
            return state  # already by name
        raise RuntimeError(
            f"the checkpoint's optimizer holds {len(saved)} parameters, this run's {len(names)}: resume with the "
            "same adapter settings and configure_optimizers"
        )
    name = dict(zip(saved, names))
    return {
        "state": {name[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [name[k] for k in g["params"]]} for g in state["param_groups"]],
    }


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` for adapters (see the module docstring).

    ``Trainer(strategy="adapter_fsdp", devices=8)`` or
    ``Trainer(strategy=AdapterFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, sharding_strategy=...))``.

    Args:
        auto_wrap_policy: ``None`` or a set of module classes (transformer blocks) that get their
            own units besides the adapter leaves. A policy callable cannot be merged with the
            adapter units and is refused.
        state_dict_type: ``"full"`` only: adapter-only checkpoints are small, full tensors.
        **kwargs: Everything else ``FSDPStrategy`` / ``FullyShardedDataParallel`` accept.

    Raises:
        AdapterStrategyError: a policy callable, ``state_dict_type="sharded"``, or (at setup) RoSA /
            SHiRA layers, or ``use_orig_params=False`` with frozen tensors.
    """

    adapter_aware: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        auto_wrap_policy: set[type[nn.Module]] | list[type[nn.Module]] | None = None,
        state_dict_type: str = "full",
        **kwargs: Any,
    ) -> None:
        if auto_wrap_policy is not None and not (
            isinstance(auto_wrap_policy, (set, list, tuple)) and all(isinstance(c, type) for c in auto_wrap_policy)
        ):
            raise AdapterStrategyError(
                f"adapter_fsdp: auto_wrap_policy must be None or a set of block classes, got {auto_wrap_policy!r}; "
                "adapter leaves always get their own units, pass e.g. auto_wrap_policy={LlamaDecoderLayer}"
            )
        if state_dict_type != "full":
            raise AdapterStrategyError(
                f"adapter_fsdp writes adapter-only checkpoints as full tensors, got state_dict_type={state_dict_type!r}; "
                "drop the argument (sharding a few MB of adapter buys nothing)"
            )
        super().__init__(*args, state_dict_type="full", **kwargs)
        self._block_classes = tuple(auto_wrap_policy or ())

    # ------------------------------------------------------------------ wrapping
    @override
    def setup(self, trainer: L.Trainer) -> None:
        for callback in trainer.callbacks:  # a callback that cannot run under FSDP says so (TransPEFT dropping FFNs)
            if callable(getattr(callback, "check_strategy_name", None)):
                callback.check_strategy_name("adapter_fsdp")
        assert self.lightning_module is not None
        inject_configured_adapters(trainer, self.lightning_module)  # a no-op unless a callback did not inject
        super().setup(trainer)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if any(isinstance(m, FSDP) for m in model.modules()):
            return super()._setup_model(model)  # wrapped by the user (configure_model): keep theirs
        unsupported = _unsupported_tuner_layers(model)
        if unsupported:
            raise AdapterStrategyError(
                f"adapter_fsdp: {', '.join(unsupported[:3])} keep their trainable tensors in the tuner layer and "
                "read the frozen base weight outside the forward (mask statistics, calibration), where FSDP holds "
                "only a shard of it. Train RoSA/SHiRA with Trainer(strategy='adapter_ddp'); adapter_fsdp takes "
                "adapters held in leaf modules (LoRA)."
            )
        if not self.kwargs.get("use_orig_params", True):
            raise AdapterStrategyError(
                "adapter_fsdp needs use_orig_params=True: units mix frozen and trainable parameters (the root keeps "
                "what is not an adapter); drop use_orig_params=False"
            )
        keep_adapters_fp32(model)  # convert_module (precision) has just run
        true_precision = "true" in str(self.precision_plugin.precision) and "32" not in str(self.precision_plugin.precision)
        self.kwargs["auto_wrap_policy"] = adapter_wrap_policy(
            self._block_classes, {"mixed_precision": None} if true_precision else None
        )
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # torch's FSDP accepts CPU modules only with device_id=torch.device("cpu"); Lightning passes the index
        from lightning.pytorch.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )

        wrapped = FSDP(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    # ------------------------------------------------------------------ checkpoints
    @contextlib.contextmanager
    def _full_state(self, rank0_only: bool = True) -> Iterator[None]:
        """FSDP full state dicts; offloading (and rank 0 only) on accelerators, never on CPU (segfault)."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

        offload = self.root_device.type != "cpu" and self.world_size > 1
        rank0 = rank0_only and offload
        assert self.model is not None
        with FSDP.state_dict_type(
            self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0),
        ):
            yield

    def _adapter_units(self) -> list[tuple[FSDP, list[tuple[str, nn.Parameter]]]]:
        """The FSDP units that own kept tensors, each with ``(state-dict key, parameter)`` of those tensors."""
        assert self.model is not None and self.lightning_module is not None
        from torch.distributed.fsdp._runtime_utils import _lazy_init

        # torch marks the first unit it initialises as the root: before the first forward (a resume loads
        # here), gathering a nested unit on its own would make it one and break the real root
        _lazy_init(self.model, self.model)
        keep = kept_keys_filter(self.lightning_module)
        names = {id(p): clean_name(n) for n, p in self.lightning_module.named_parameters(remove_duplicate=False)}
        units = []
        for unit in FSDP.fsdp_modules(self.model):  # the same order on every rank: the gathers pair up
            nested = {id(p) for sub in FSDP.fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
            own = [(names[id(p)], p) for p in unit.parameters() if id(p) not in nested and id(p) in names]
            kept = [(n, p) for n, p in own if keep(n)]
            if kept:
                units.append((unit, kept))
        return units

    def _adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Kept buffers (mask indices): FSDP does not shard buffers."""
        assert self.lightning_module is not None
        keep = kept_keys_filter(self.lightning_module)
        return {clean_name(n): b for n, b in self.lightning_module.named_buffers() if keep(n)}

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for unit, kept in self._adapter_units():
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                state.update((n, p.detach().cpu().clone()) for n, p in kept)
        state.update((n, b.detach().cpu().clone()) for n, b in self._adapter_buffers().items())
        return state

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        with self._full_state():
            state = FSDP.optim_state_dict(self.model, optimizer)  # keyed by parameter name
        # keyed by position in the param groups, as a plain optimizer writes it (FSDP's own PARAM_ID re-keying
        # counts the frozen parameters too): single-process and DDP runs load it as theirs
        return _by_position(state, self._optimizer_names(optimizer)) if state.get("state") is not None else state

    def _optimizer_names(self, optimizer: Optimizer) -> list[str]:
        """The state-dict name of every parameter of ``optimizer``, in param-group order."""
        assert self.lightning_module is not None
        names = {id(p): clean_name(n) for n, p in self.lightning_module.named_parameters(remove_duplicate=False)}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    @override
    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise AdapterStrategyError(
                f"adapter_fsdp resumes from a single checkpoint file (adapter-only), got the folder {path}; a sharded "
                "checkpoint of Lightning's FSDPStrategy holds the full model: resume it with that strategy"
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=bool(weights_only))
        assert self.model is not None and self.lightning_module is not None
        self._load_adapter_state(checkpoint.pop("state_dict"))
        optimizer_states = checkpoint.get("optimizer_states")
        if optimizer_states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(optimizer_states):
            raise RuntimeError(
                f"the checkpoint holds {len(optimizer_states)} optimizer states for {len(self.optimizers)} "
                "optimizers; resume with the same configure_optimizers"
            )
        with self._full_state(rank0_only=False):
            for optimizer, state in zip(self.optimizers, optimizer_states):
                named = _by_name(state, self._optimizer_names(optimizer))
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, named))
        return checkpoint

    @torch.no_grad()
    def _load_adapter_state(self, state: Mapping[str, Any]) -> None:
        """Write an adapter-only state dict into the sharded model, unit by unit (frozen keys may be absent).

        Raises:
            RuntimeError: an adapter tensor is missing, or a key is not an adapter tensor of this model.
        """
        assert self.lightning_module is not None
        state = {clean_name(k): v for k, v in state.items()}
        seen: set[str] = set()
        units = self._adapter_units()
        for unit, kept in units:
            with FSDP.summon_full_params(unit, recurse=False, writeback=True):
                for name, param in kept:
                    if name in state:
                        param.copy_(state[name])
                        seen.add(name)
        for name, buffer in self._adapter_buffers().items():
            if name in state:
                buffer.copy_(state[name])
                seen.add(name)
        expected = {n for _, kept in units for n, _ in kept} | set(self._adapter_buffers())
        missing, unexpected = sorted(expected - seen), sorted(set(state) - expected)
        if unexpected or (missing and self.lightning_module.strict_loading):
            raise RuntimeError(
                f"the checkpoint's adapter does not fit this model (missing adapter tensors {missing[:3]}, unexpected "
                f"{unexpected[:3]}): resume with the adapter settings it was trained with"
            )

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded in load_checkpoint (FSDP restores after setup)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register("adapter_fsdp", cls, description=ADAPTER_STRATEGIES["adapter_fsdp"], override=True)
