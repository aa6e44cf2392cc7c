"""Adapter-aware distributed strategies: ``Trainer(strategy="adapter_ddp")`` and friends.

Registered in Lightning's ``StrategyRegistry`` when ``lightning_peft`` is imported:

=====================  ===================================================================
``adapter_ddp``        :class:`AdapterDDPStrategy`, Lightning's subprocess launcher (re-runs
                       the command line for ranks 1..N-1; the ``lightning-peft`` CLI re-runs
                       itself with the same overrides and run directory)
``adapter_ddp_spawn``  the same with ``torch.multiprocessing`` spawn: Hydra multirun, scripts
``adapter_ddp_fork``   the same with fork: notebooks (Lightning allows only fork there)
``adapter_fsdp``       :class:`AdapterFSDPStrategy` (:mod:`lightning_peft.plugins.fsdp`)
=====================  ===================================================================

Where they act in ``Trainer.fit`` (Lightning 2.x ``Trainer._run``: strategy ``connect``, setup hooks, ``configure_model``, ``strategy.setup``)::

    Callback.setup / configure_model (adapters injected) ─► checkpoint weights restored
      ─► strategy.setup: [inject any adapter still missing] ─► precision convert_module
         ─► [adapters back to fp32] ─► DDP/FSDP wrap ─► optimizers

DDP settings (:class:`AdapterDDPStrategy`) and why. Every trainable tensor of the methods here is
used in every step: RoSA's sparse values before their mask exists and Trans-PEFT's dropped FFNs
contribute exact zero terms (``0 * sum(p)``), so the set of used parameters never changes between
steps and even a stock ``find_unused_parameters=False`` DDP trains them. What those terms cannot
cover is a user's adapter that ``training_step`` never reaches (``target_modules="all-linear"``
hitting an auxiliary head): stock DDP then fails in the second step ("Expected to have finished
reduction"). So, unless ``static_graph`` / ``find_unused_parameters`` are given:

* ``static_graph=True`` when gradients are not accumulated: DDP finds the unused adapters once, in
  the first step, instead of walking the autograd graph every step as
  ``find_unused_parameters=True`` does (DDP's docs), and it also allows reentrant activation
  checkpointing ("Expected to mark a variable ready only once", peft #313);
* ``find_unused_parameters=True`` with ``accumulate_grad_batches > 1``: torch 2.13's reducer does
  not combine ``static_graph`` with ``no_sync`` (measured: ``expect_autograd_hooks_ INTERNAL ASSERT
  FAILED`` in the first accumulated step).

Frozen adapters (``requires_grad=False`` when DDP wraps) are never registered. A used set that
changes from step to step (a user's data-dependent branch, an adapter frozen mid-run) needs
``find_unused_parameters=True``. The other settings:

* ``gradient_as_bucket_view=True``: the adapter gradients live in DDP's all-reduce buckets, no
  second copy.
* adapter index buffers (RoSA ``rosa_row``/``rosa_col``, SHiRA ``shira_indices``) are left out of
  DDP's per-step buffer broadcast: they are identical on every rank by construction (masks come
  from all-reduced statistics or seeds) and would otherwise cost ``2 * nnz`` int32 per layer
  every step. Other buffers are still broadcast from rank 0.
* adapters stay fp32 (as peft's ``autocast_adapter_dtype``): ``"bf16-true"``/``"16-true"``
  casts the whole module in ``convert_module``; the adapter tensors are cast back before DDP
  wraps and before the optimizer sees them (the frozen base stays in low precision).

The spawn/fork variants fix what stock ``ddp_spawn`` gets wrong with adapters: Lightning loads
rank 0's weights into the launching process's module with ``strict=False``, where the adapter
(injected only in the workers) does not exist, so every trained tensor is dropped. Here the
launcher injects the configured adapters into that module first and loads strictly.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_peft.callback import AdapterCallback, AdapterStrategyError, _inject_after_configure_model
from lightning_peft.checkpointing import kept_keys_filter

__all__ = [
    "ADAPTER_STRATEGIES",
    "AdapterDDPStrategy",
    "adapter_buffer_names",
    "adapter_callbacks",
    "in_hydra_multirun",
    "inject_configured_adapters",
    "keep_adapters_fp32",
]

log = logging.getLogger(__name__)

ADAPTER_STRATEGIES: dict[str, str] = {
    "adapter_ddp": "DDP for adapters (static graph, fp32 adapters), subprocess launcher",
    "adapter_ddp_spawn": "DDP for adapters, spawned workers; the trained adapter comes back to this process",
    "adapter_ddp_fork": "DDP for adapters, forked workers (notebooks); the trained adapter comes back",
    "adapter_fsdp": "FSDP with adapter leaves in their own units, fp32 adapters, adapter-only checkpoints",
}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------- helpers shared by DDP and FSDP
def adapter_callbacks(trainer: L.Trainer) -> list[AdapterCallback]:
    """The trainer's adapter callbacks (LoRA, RoSA, SHiRA, ...), in callback order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, AdapterCallback)]  # type: ignore[attr-defined]


def inject_configured_adapters(trainer: L.Trainer, module: L.LightningModule, build: bool = False) -> None:
    """Inject every adapter callback of ``trainer`` into ``module`` (idempotent).

    Args:
        trainer: Its adapter callbacks are the configured adapters.
        module: The LightningModule.
        build: Also build a model made in ``configure_model`` (the launching process of a spawn
            run never ran it); the callbacks then inject through the ``configure_model`` wrapper.
    """
    callbacks = adapter_callbacks(trainer)
    if build and is_overridden("configure_model", module):
        for cb in callbacks:
            _inject_after_configure_model(module, cb)
        module.configure_model()
        return
    for cb in callbacks:
        cb.inject(module)


def keep_adapters_fp32(module: nn.Module) -> list[str]:
    """Cast bf16/fp16 adapter tensors (and other trainable parameters) of ``module`` to fp32 in place.

    The same ``Parameter`` objects are kept (``.data`` is replaced), so hooks and any reference
    still point at them. Frozen base weights keep their dtype.

    Returns:
        The names of the tensors that were cast.
    """
    keep = kept_keys_filter(module)
    cast = []
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.dtype in _LOW_PRECISION and keep(name):
                tensor.data = tensor.data.float()
                cast.append(name)
    if cast:
        log.info("kept %d adapter tensors in fp32 (the precision plugin had cast them down)", len(cast))
    return cast


def adapter_buffer_names(module: nn.Module) -> list[str]:
    """Names of the adapter buffers of ``module`` (mask indices): identical on every rank by construction."""
    keep = kept_keys_filter(module)
    return [name for name, _ in module.named_buffers() if keep(name)]


def in_hydra_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# ---------------------------------------------------------------------- DDP
class AdapterDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with adapter-aware defaults (see the module docstring for why).

    ``Trainer(strategy="adapter_ddp", devices=4)`` or ``Trainer(strategy=AdapterDDPStrategy(...))``.

    Args:
        start_method: ``"popen"`` (``adapter_ddp``), ``"spawn"`` (``adapter_ddp_spawn``) or
            ``"fork"`` (``adapter_ddp_fork``).
        static_graph: DDP's ``static_graph``; ``None``: chosen at setup (module docstring).
        find_unused_parameters: DDP's flag; ``None``: chosen at setup (module docstring).
        gradient_as_bucket_view: DDP's flag (``True``: no second copy of the adapter gradients).
        **kwargs: Everything else ``DDPStrategy`` / ``DistributedDataParallel`` accept.

    Raises:
        AdapterStrategyError: ``start_method="popen"`` inside a Hydra multirun (each re-run
            rank would run the whole sweep again).
    """

    adapter_aware: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        static_graph: bool | None = None,
        find_unused_parameters: bool | None = None,
        gradient_as_bucket_view: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, start_method=start_method, gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)
        self._graph_settings = {"static_graph": static_graph, "find_unused_parameters": find_unused_parameters}

    def ddp_graph_settings(self, accumulate_grad_batches: int = 1) -> dict[str, bool]:
        """``static_graph`` and ``find_unused_parameters`` for a run (given values win; see the module docstring)."""
        static, find = self._graph_settings["static_graph"], self._graph_settings["find_unused_parameters"]
        if static is None and find is None:
            static = accumulate_grad_batches == 1
            find = not static
        return {"static_graph": bool(static) if static is not None else not find, "find_unused_parameters": bool(find)}

    @override
    def _configure_launcher(self) -> None:
        if self._start_method == "popen":
            if in_hydra_multirun():
                raise AdapterStrategyError(
                    "adapter_ddp re-runs the command line for ranks 1..N-1, and inside a Hydra multirun (-m) each of "
                    "them would run the whole sweep again. Use trainer.strategy=adapter_ddp_spawn for multirun."
                )
            super()._configure_launcher()
        else:
            self._launcher = _AdapterMultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup(self, trainer: L.Trainer) -> None:
        # normally a no-op: the callbacks injected in `setup`/`configure_model`, before the checkpoint
        # weights were restored; this makes sure nothing reaches precision, DDP and the optimizer without them
        assert self.lightning_module is not None
        inject_configured_adapters(trainer, self.lightning_module)
        self._ddp_kwargs.update(self.ddp_graph_settings(trainer.accumulate_grad_batches))
        super().setup(trainer)

    @override
    def model_to_device(self) -> None:
        # DDPStrategy.setup: convert_module (precision) -> model_to_device -> DDP wrap -> optimizers
        assert self.model is not None
        keep_adapters_fp32(self.model)
        super().model_to_device()

    @override
    def _setup_model(self, model: nn.Module) -> torch.nn.parallel.DistributedDataParallel:
        ignore = adapter_buffer_names(model)
        if ignore:  # DDP's documented hook for tensors it should neither broadcast nor reduce
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return super()._setup_model(model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (("adapter_ddp", "popen"), ("adapter_ddp_spawn", "spawn"), ("adapter_ddp_fork", "fork")):
            strategy_registry.register(
                name, cls, description=ADAPTER_STRATEGIES[name], override=True, start_method=start_method
            )


class _AdapterMultiProcessingLauncher(_MultiProcessingLauncher):
    """Spawn/fork launcher that gives the launching process the trained adapter.

    Lightning's launcher loads rank 0's weights into this process's module with ``strict=False``;
    the adapter was injected only in the workers, so its tensors would be dropped without a word.
    Here the configured adapters are injected first (building a ``configure_model`` model if need
    be) and the weights are loaded so that an unexpected key is an error.
    """

    @override
    def _recover_results_in_main_process(self, worker_output: Any, trainer: L.Trainer) -> None:
        if worker_output.weights_path is not None:
            module = trainer.lightning_module
            inject_configured_adapters(trainer, module, build=True)
            state = self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path)
            result = module.load_state_dict(state, strict=False)  # frozen keys are absent by design
            self._strategy.checkpoint_io.remove_checkpoint(worker_output.weights_path)
            if result.unexpected_keys or result.missing_keys:
                raise RuntimeError(
                    f"the trained weights of rank 0 do not fit the module in this process (unexpected "
                    f"{result.unexpected_keys[:3]}, missing {result.missing_keys[:3]}): the adapter callbacks here "
                    "must be the ones the workers trained with"
                )
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)

    @override
    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        # Lightning sends back the metrics but not the loop progress (`trainer.global_step` would read 0 here)
        extra = super().get_extra_results(trainer)
        extra["lightning_peft_progress"] = (trainer.global_step, trainer.fit_loop.epoch_progress.current.completed)
        return extra

    @override
    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if "lightning_peft_progress" not in extra or trainer.lightning_module is None:
            return
        step, epochs = extra["lightning_peft_progress"]
        loop = trainer.fit_loop.epoch_loop
        if trainer.lightning_module.automatic_optimization:
            loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
        else:
            loop.manual_optimization.optim_step_progress.total.completed = step
        trainer.fit_loop.epoch_progress.current.completed = epochs
