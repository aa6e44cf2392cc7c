"""``AdapterCallback``: inject a peft-backed adapter into **any** LightningModule.

Where injection happens (Lightning 2.x ``Trainer._run`` order, ``lightning/pytorch/trainer/trainer.py``):

    Callback.setup ──► LightningModule.configure_model ──► ckpt weights loaded
        ──► strategy.setup (precision, DDP/FSDP wrap, optimizers) ──► on_fit_start (summary)

* model built in ``__init__``: injected in ``Callback.setup``;
* model built in ``configure_model``: the callback replaces ``pl_module.configure_model`` by
  a wrapper that calls the user's hook and then injects. The wrapper deliberately does **not**
  use ``functools.wraps``: Lightning's ``is_overridden`` follows ``__wrapped__`` to the
  original function and would then skip the hook. It is a ``functools.partial`` of a
  module-level function (``is_overridden`` reads ``partial.func``), not a closure, so the module
  still pickles for the spawn launchers (``adapter_ddp_spawn``, ``trainer.test`` after ``fit``).

Both are before checkpoint weights are restored and before optimizers and DDP/FSDP wrapping,
so resumed runs find the adapter tensors, ``configure_optimizers`` sees only adapter
parameters, and Lightning's model summary counts them as the trainable parameters.
Injection is idempotent (``configure_model`` runs again on every fit/validate/test), and
several callbacks stack: each injects its own named adapter.

``setup`` also refuses, before any step, the stock strategies that would lose or mis-wrap the
adapters (:func:`check_strategy`) and names the plugin to use instead; under stock DDP the first
optimizer step checks for adapter tensors that got no gradient (:func:`check_unused_under_ddp`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden
from peft import PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from typing_extensions import override

from lightning_peft.checkpointing import install_adapter_only_state_dict
from lightning_peft.config import AdapterConfig, check_resumed_config
from lightning_peft.fingerprint import (
    BaseModelMismatchWarning,
    base_fingerprint,
    describe_base_difference,
    find_base_model,
)
from lightning_peft.registry import spec_for_layer, spec_for_method
from lightning_peft.targeting import exact_pattern, find_target_modules

log = logging.getLogger(__name__)
_INJECTORS = "_lightning_peft_injectors"


class AdapterCallback(L.Callback):
    """Base class of every adapter method; subclasses say how their config becomes a peft config.

    Subclasses set ``config_cls`` and implement :meth:`to_peft_config`, then register with
    :func:`lightning_peft.register_method`. Everything else (targeting, freezing, adapter-only
    checkpoints, state, the ``configure_model`` hook-up) is written once here.

    Args:
        config: The method's typed config.
    """

    method_name: ClassVar[str] = "adapter"
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    _names_checked: bool = False  # set by `setup` (see `state_key`)

    def __init__(self, config: AdapterConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} expects a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.target_names: list[str] = []

    def to_peft_config(self, target_names: list[str]) -> PeftConfig:
        """The peft config that adapts exactly ``target_names`` (full module names)."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_peft_config")

    @property
    @override
    def state_key(self) -> str:
        # distinct per adapter so stacked callbacks of one class keep separate state. Until `setup` has checked
        # that no other adapter callback on the trainer uses the same adapter_name, the key is also unique per
        # instance: Lightning's own duplicate-key check (in Trainer.__init__) would pre-empt our error, which
        # names the fix. Checkpoints are saved and restored after `setup`, so they always see the stable key.
        key = f"{type(self).__qualname__}[{self.config.adapter_name}]"
        return key if self._names_checked else f"{key}#{id(self):x}"

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_strategy(trainer, self.method_name)
        check_unique_adapter_names(trainer.callbacks)
        self._names_checked = True
        if is_overridden("configure_model", pl_module):
            _inject_after_configure_model(pl_module, self)
        else:
            self.inject(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not getattr(self, "_checked_unused", False):
            self._checked_unused = True
            check_unused_under_ddp(trainer, pl_module, self.method_name)

    def inject(self, module: nn.Module) -> nn.Module:
        """Inject this callback's adapter into ``module`` in place (no-op if already there).

        Freezes every parameter that is not an adapter tensor and makes ``module.state_dict()``
        adapter-only.

        Raises:
            NoTargetModulesError: no module matches ``target_modules`` (close names listed).
        """
        name = self.config.adapter_name
        if name in getattr(module, "peft_config", {}):
            return module  # injected by this callback on an earlier configure_model/setup
        if name in adapter_names(module):
            raise ValueError(
                f"{self.method_name}: the model already holds an adapter named {name!r} (e.g. from load_adapter); "
                f"pass another adapter_name to add a second adapter, or train the loaded one with "
                f"load_adapter(..., is_trainable=True) and no {type(self).__name__} callback"
            )
        self.target_names = find_target_modules(
            module, self.config.target_modules, self.config.exclude_modules, method=self.method_name
        )
        peft_config = self.to_peft_config(self.target_names)
        # peft matches list entries by suffix (`model.q_proj` would also hit `ema.model.q_proj`):
        # hand it a regex that matches exactly the modules chosen here.
        peft_config.target_modules = exact_pattern(self.target_names)
        spec = spec_for_method(self.method_name)  # e.g. SHiRA: peft must build the method's own layer class
        with spec.injecting() if spec else contextlib.nullcontext():
            inject_adapter_in_model(peft_config, module, adapter_name=name)
        activate_all_adapters(module)
        install_adapter_only_state_dict(module)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        log.info(
            "%s[%s]: adapted %d modules; trainable %d / %d parameters (%.3f%%)",
            self.method_name, name, len(self.target_names), trainable, total, 100 * trainable / max(total, 1),
        )
        return module

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # once per checkpoint (stacked callbacks share it): which base these adapter tensors belong to, and
        # each layer's tensors in its method's compact code (MethodSpec.encode_checkpoint: sparse positions)
        if "base_fingerprint" not in checkpoint.setdefault("lightning_peft", {}):
            checkpoint["lightning_peft"]["base_fingerprint"] = base_fingerprint(find_base_model(pl_module)[1])
            state = checkpoint.get("state_dict", {})
            for name, layer in pl_module.named_modules():
                spec = spec_for_layer(layer)
                if spec is not None and spec.encode_checkpoint is not None:
                    spec.encode_checkpoint(layer, state, f"{name}." if name else "")

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lightning_peft", {}).get("base_fingerprint")
        if saved is None or checkpoint.get("lightning_peft", {}).get("_checked"):
            return
        checkpoint["lightning_peft"]["_checked"] = True  # stacked callbacks: warn once
        diff = describe_base_difference(saved, base_fingerprint(find_base_model(pl_module)[1]))
        if diff:
            warnings.warn(
                f"resuming a checkpoint whose adapters were trained on another base ({diff}); they are restored as "
                "they are. Resume on the original base, or start a new run on this one.",
                BaseModelMismatchWarning,
                stacklevel=2,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method_name, "config": dataclasses.asdict(self.config), "targets": self.target_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_config(f"{self.method_name}[{self.config.adapter_name}]", state_dict.get("config", {}),
                             dataclasses.asdict(self.config))


def adapter_names(module: nn.Module) -> set[str]:
    """Names of all adapters injected anywhere in ``module``."""
    return {name for m in module.modules() for name in (getattr(m, "peft_config", None) or {})}


def activate_all_adapters(module: nn.Module) -> None:
    """Make every adapter of every tuner layer active, keeping each parameter's ``requires_grad``.

    peft's injection calls ``set_adapter(new_name)`` on all tuner layers, which would switch
    earlier adapters off: stacked adapters must all contribute (their outputs add up).
    """
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            grads = [(p, p.requires_grad) for p in layer.parameters()]
            layer.set_adapter(sorted(layer._get_available_adapters()))
            for p, g in grads:
                p.requires_grad_(g)


def _inject_after_configure_model(pl_module: L.LightningModule, callback: AdapterCallback) -> None:
    """Have ``pl_module.configure_model`` inject ``callback``'s adapter after building the model."""
    injectors: list[AdapterCallback] = pl_module.__dict__.setdefault(_INJECTORS, [])
    if callback not in injectors:
        injectors.append(callback)
    hook = pl_module.configure_model
    if isinstance(hook, functools.partial) and hook.func is _configure_then_inject:
        return  # wrapped once already; the wrapper runs every registered injector
    # the class's own hook is looked up again at call time (a bound method would pickle as
    # `getattr(module, "configure_model")`, i.e. as this wrapper); any other callable is kept
    user_hook = None if getattr(hook, "__func__", None) is type(pl_module).configure_model else hook
    pl_module.configure_model = functools.partial(_configure_then_inject, pl_module, user_hook)  # type: ignore[method-assign]


def _configure_then_inject(pl_module: L.LightningModule, user_hook: Callable[[], None] | None) -> None:
    """The ``configure_model`` wrapper: the user's hook, then every registered injector (picklable)."""
    if user_hook is None:
        type(pl_module).configure_model(pl_module)
    else:
        user_hook()
    for injector in pl_module.__dict__.get(_INJECTORS, []):
        injector.inject(pl_module)


class AdapterStrategyError(RuntimeError):
    """A stock Lightning strategy that would lose or mis-wrap the adapters; the message names the plugin."""


def check_unique_adapter_names(callbacks: list[L.Callback]) -> None:
    """Refuse two adapter callbacks that inject the same ``adapter_name`` (the second would inject nothing)."""
    seen: dict[str, AdapterCallback] = {}
    for cb in callbacks:
        if not isinstance(cb, AdapterCallback):
            continue
        name = cb.config.adapter_name
        if name in seen:
            first = type(seen[name]).__name__
            raise ValueError(
                f"two adapter callbacks ({first} and {type(cb).__name__}) use adapter_name={name!r}; each stacked "
                f"adapter needs its own name, e.g. {first}(adapter_name={name!r}) and "
                f"{type(cb).__name__}(adapter_name={name + '_2'!r})"
            )
        seen[name] = cb


def check_strategy(trainer: L.Trainer, method: str = "adapter") -> None:
    """Fail before the first step where a stock strategy would lose or mis-wrap the adapters.

    * ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook`` (Lightning's ``_MultiProcessingLauncher``):
      fit runs in worker processes, which inject the adapters; Lightning then loads rank 0's
      weights into the launching process's module with ``strict=False``, where no adapter
      exists, so every trained adapter tensor is silently dropped. Use ``adapter_ddp_spawn``
      (``adapter_ddp_fork`` in notebooks), which injects there first and loads strictly.
    * ``fsdp``: one FSDP unit (or the user's policy) mixes frozen and trainable tensors, so the
      frozen base gets gradient memory, and ``*-true`` precision casts the adapters down. Use
      ``adapter_fsdp`` (adapter leaves in their own units, fp32 adapters, adapter-only checkpoints).

    Plain ``ddp`` (popen) works with every method here: no trainable adapter tensor is unused in
    a step (RoSA's inactive ``S`` and Trans-PEFT's dropped FFNs add exact zero terms). Adapters
    that a user's ``training_step`` never reaches cannot be seen before the first backward; they
    need ``adapter_ddp`` (``static_graph``) or ``ddp_find_unused_parameters_true``.

    Raises:
        AdapterStrategyError: one of the cases above; the message names the plugin to use.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    strategy = trainer.strategy
    if getattr(strategy, "adapter_aware", False):
        return
    name = type(strategy).__name__
    if isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher):
        start = getattr(strategy, "_start_method", "spawn")
        plugin = "adapter_ddp_fork" if start in ("fork", "forkserver") else "adapter_ddp_spawn"
        raise AdapterStrategyError(
            f"{method}: {name}(start_method={start!r}) trains in worker processes and loads their weights back "
            "into this process's module with strict=False, where the adapter (injected only in the workers) "
            f"does not exist: every trained adapter tensor would be silently dropped. Use "
            f"Trainer(strategy={plugin!r}) from lightning_peft, which injects the adapters here first and loads "
            "them strictly."
        )
    if isinstance(strategy, FSDPStrategy):
        raise AdapterStrategyError(
            f"{method}: Lightning's FSDPStrategy wraps frozen base weights and trainable adapters into the same "
            "FSDP units, so the frozen weights get gradient memory and '*-true' precision casts the adapters "
            "down. Use Trainer(strategy='adapter_fsdp') (or lightning_peft.AdapterFSDPStrategy(...) with your "
            "FSDP arguments): adapter leaves get their own units, adapters stay fp32, checkpoints are adapter-only."
        )


def check_unused_under_ddp(trainer: L.Trainer, pl_module: L.LightningModule, method: str = "adapter") -> None:
    """Under stock DDP (no ``find_unused_parameters``, no ``static_graph``), fail at the first optimizer step
    if a trainable tensor got no gradient.

    Such a tensor (an adapter on a module ``training_step`` never calls) makes DDP fail at the next
    step with "Expected to have finished reduction in the prior iteration"; here the message names
    the tensors and the plugin instead. Called after the first backward, before the optimizer step.

    Raises:
        AdapterStrategyError: trainable tensors without a gradient under stock DDP.
    """
    from torch.nn.parallel import DistributedDataParallel

    model = trainer.strategy.model
    if (getattr(trainer.strategy, "adapter_aware", False) or not isinstance(model, DistributedDataParallel)
            or model.find_unused_parameters or model.static_graph):
        return
    unused = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        raise AdapterStrategyError(
            f"{method}: {len(unused)} trainable tensors got no gradient in the first step ({', '.join(unused[:3])}"
            f"{' ...' if len(unused) > 3 else ''}): training_step did not reach their modules, and stock DDP with "
            "find_unused_parameters=False fails on them in the next step. Use Trainer(strategy='adapter_ddp') "
            "(static_graph), or leave those modules out with exclude_modules=[...]."
        )
