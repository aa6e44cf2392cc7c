"""SHiRA as a Lightning callback (Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175).

Sparse high-rank adaptation: train ``nnz`` chosen entries of each frozen weight (1-2%) and
nothing else. The model holds peft's own ``shira`` layer (subclassed, see :mod:`.layer`), so
``save_adapter`` writes peft's native ``shira`` folder that ``PeftModel.from_pretrained``
loads, while training goes through the sparse core (in-place ``W + S`` around one GEMM, ``dS``
by SDDMM): no dense weight gradient, optimizer state for the ``nnz`` values only.

Lifecycle with ``mask="grad"``/``"snip"``::

    setup / configure_model ─► inject: peft ShiraConfig, our layer, placeholder random mask
    (checkpoint restored: mask and values come from it) ─► on_train_start: unless resuming,
    ``calibration_batches`` train batches ─► dense grad of the frozen W (only now) ─► top-k
    mask per layer, values reset to 0 ─► training (values only)
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from peft import ShiraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from typing_extensions import override

from lightning_peft.callback import AdapterCallback
from lightning_peft.config import check_resumed_config
from lightning_peft.deltas import sparse_term
from lightning_peft.kernels import SparseIndex
from lightning_peft.methods.shira.config import CALIBRATED_MASKS, MaskKind, SHiRAConfig
from lightning_peft.methods.shira.layer import ShiraLinear, shira_layer_class
from lightning_peft.methods.shira.mask import build_mask, layer_nnz
from lightning_peft.optim import split_param_groups
from lightning_peft.peft_compat import check_shira_layers
from lightning_peft.registry import register_method

__all__ = ["SHiRA", "SHiRAConfig", "ShiraLinear"]

log = logging.getLogger(__name__)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


class _MaskLookup:
    """peft ``mask_fn``: ``(base_layer, r, **kw) -> SparseIndex`` looked up by the layer object."""

    def __init__(self, masks: dict[int, SparseIndex]) -> None:
        self.masks = masks

    def __call__(self, base_layer: nn.Module, r: int, **kwargs: Any) -> SparseIndex:
        return self.masks[id(base_layer)]


def bank_deltas(layer: ShiraLinear, adapter: str) -> list[Any]:
    """AdapterBank's view of a SHiRA layer: one sparse term (scaling applied), a tile term for a tile mask."""
    if adapter not in layer.shira_weight:
        return []
    index = layer.sparse_index(adapter)
    values = layer.sparse_values(adapter).detach().clone()
    return [sparse_term(torch.stack([index.row, index.col]), values, tuple(index.shape), "")]


def bank_tensors(parts: dict[str, Any], config: Any, shape: tuple[int, int], path: str) -> list[Any]:
    """AdapterBank's view of one weight in a SHiRA folder (peft's padded ``shira_weight``/``shira_indices``)."""
    return [sparse_term(parts["shira_indices"], parts["shira_weight"], shape, path)]


@register_method("shira", layer_classes=(ShiraLinear,), prefix="shira_", injection_context=shira_layer_class,
                 bank_deltas=bank_deltas, bank_tensors=bank_tensors, encode_checkpoint=ShiraLinear.encode_index_state,
                 decode_checkpoint=ShiraLinear.decode_index_state)
class SHiRA(AdapterCallback):
    """Add SHiRA adapters to any LightningModule: ``Trainer(callbacks=[SHiRA(density=0.01)])``.

    Args:
        density: Fraction of each weight trained, in (0, 1]; ``nnz = round(density * numel)``.
        mask: ``"random"``, ``"struct"``, ``"wm"``, ``"grad"``, ``"snip"`` or a callable
            ``(weight, grad_stats) -> SparseIndex | bool mask`` (see :mod:`.mask`).
        target_modules: ``"all-linear"`` (output heads excluded), a regex, or names/suffixes.
            Only ``nn.Linear`` layers (peft's shira has no GPT-2 ``Conv1D`` layer).
        calibration_batches: Train batches scoring ``grad``/``snip`` masks at ``on_train_start``.
        seed: Random-mask seed.
        r: Optional: ``nnz = r * (in + out)`` per layer (peft's budget) instead of ``density``.
        exclude_modules: Modules to leave alone (same syntax as ``target_modules``).
        adapter_name: Name of the adapter; stacked adapters need distinct names.
        use_triton: Sparse-kernel dispatch (``None``: Triton on CUDA, reference on CPU).
        lr_ratio: The values' lr as a multiple of the optimizer's (default 2.5, the paper's
            5e-4 : 2e-4 against LoRA; ``1.0`` keeps the optimizer's), see :class:`SHiRAConfig`.
        tile: ``None`` (unstructured) or ``16``/``32``/``64``: entries in 1 x b tiles along ``in``,
            switched by whole-tile copies in an ``AdapterBank`` (see :class:`SHiRAConfig`).

    Raises:
        ValueError: invalid config values (see :class:`SHiRAConfig`), or targets that are not
            ``nn.Linear``.
    """

    config_cls = SHiRAConfig

    def __init__(
        self,
        density: float = 0.01,
        mask: MaskKind | Callable[..., Any] = "grad",
        target_modules: str | list[str] = "all-linear",
        calibration_batches: int = 8,
        seed: int = 0,
        r: int | None = None,
        exclude_modules: str | list[str] | None = None,
        adapter_name: str = "default",
        use_triton: bool | None = None,
        lr_ratio: float = 2.5,
        tile: int | None = None,
    ) -> None:
        super().__init__(
            SHiRAConfig(
                target_modules=target_modules, exclude_modules=exclude_modules, adapter_name=adapter_name,
                density=density, mask=mask, r=r, calibration_batches=calibration_batches, seed=seed,
                use_triton=use_triton, lr_ratio=lr_ratio, tile=tile,
            )
        )
        self._module: nn.Module | None = None
        self._calibrated = False

    # ------------------------------------------------------------------ injection
    @override
    def inject(self, module: nn.Module) -> nn.Module:
        self._module = module
        try:
            super().inject(module)  # inside the registry's injection context: peft builds ShiraLinear
        finally:
            self._module = None
        check_shira_layers(module.modules())
        for layer in self.layers(module).values():
            layer.use_triton = self.config.use_triton
        return module

    def layers(self, module: nn.Module) -> dict[str, ShiraLinear]:
        """This adapter's SHiRA layers in ``module`` by module name."""
        name = self.config.adapter_name
        return {n: m for n, m in module.named_modules() if isinstance(m, ShiraLinear) and name in m.shira_weight}

    def _needs_calibration(self) -> bool:
        c = self.config
        return c.mask in CALIBRATED_MASKS or (callable(c.mask) and c.calibration_batches > 0)

    def to_peft_config(self, target_names: list[str]) -> ShiraConfig:
        """peft ``ShiraConfig`` with one ``r`` for all layers and our masks as ``mask_fn``.

        ``r = max_l ceil(nnz_l / (in_l + out_l))`` so every layer's mask fits peft's
        ``r * (in + out)`` slots (the rest is zero padding, see :func:`.mask.pad_index`).

        Raises:
            ValueError: a target is not an ``nn.Linear``, or the padded budget exceeds a layer.
        """
        if self._module is None:
            raise RuntimeError("SHiRA.to_peft_config is called from SHiRA.inject; call inject(module)")
        c = self.config
        bases = {n: _base(self._module.get_submodule(n)) for n in target_names}
        wrong = [f"{n} ({type(m).__name__})" for n, m in bases.items() if not isinstance(m, nn.Linear)]
        if wrong:
            raise ValueError(
                f"SHiRA adapts nn.Linear layers only (peft's shira tuner, which must load the saved folder, has no "
                f"other layer type), but target_modules={c.target_modules!r} selects {', '.join(wrong[:3])}"
                f"{' ...' if len(wrong) > 3 else ''}; target only nn.Linear modules (GPT-2's attention/MLP are "
                "transformers Conv1D: use LoRA there) or exclude them with exclude_modules="
            )
        budgets = {n: layer_nnz(m.out_features, m.in_features, c.density, c.r, c.tile, n) for n, m in bases.items()}
        r = c.r or max(math.ceil(budgets[n] / (m.in_features + m.out_features)) for n, m in bases.items())
        too_big = [n for n, m in bases.items() if r * (m.in_features + m.out_features) > m.in_features * m.out_features]
        if too_big:
            raise ValueError(
                f"SHiRA density={c.density} needs r={r} slots per (in + out) in peft's shira format, more than layer "
                f"{too_big[0]} holds; lower the density or target layers of similar aspect ratio"
            )
        calibrate_later = self._needs_calibration()
        masks = {}
        for n, m in bases.items():
            kind = "random" if calibrate_later else c.mask  # placeholder until on_train_start
            masks[id(m)] = build_mask(kind, m.weight, budgets[n], seed=c.seed, name=n, tile=c.tile)
        cfg = ShiraConfig(r=r, mask_type="random", random_seed=c.seed, target_modules=target_names)
        cfg.mask_type = c.mask_name  # saved, so readers see which mask built the adapter
        cfg.mask_fn = _MaskLookup(masks)
        return cfg

    # ------------------------------------------------------------------ learning rate
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning restores a resumed optimizer's state: it finds the same groups
        ratio = self.config.lr_ratio
        if ratio != 1.0:
            values = {id(layer.shira_weight[self.config.adapter_name]): "shira" for layer in self.layers(pl_module).values()}
            split_param_groups(trainer, values, lambda part, base: base * ratio)

    # ------------------------------------------------------------------ calibration
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._needs_calibration() or self._calibrated or trainer.ckpt_path:
            return  # resumed runs restore the mask with the checkpoint
        self.calibrate(pl_module, _calibration_batches(trainer, self.config.calibration_batches), trainer)

    @torch.no_grad()
    def calibrate(self, pl_module: L.LightningModule, batches: list[Any], trainer: L.Trainer | None = None) -> None:
        """Score and install the masks from ``batches`` (mean squared dense gradient of each frozen W).

        Runs ``pl_module.training_step`` on each batch (its logging disabled), with the base
        weights of the adapted layers temporarily requiring grad and the adapter path off, so
        only here a dense ``(out, in)`` gradient exists. Values are reset to 0.

        Raises:
            ValueError: no batches, or a ``training_step`` that returns no loss.
        """
        c = self.config
        layers = self.layers(pl_module)
        if not batches:
            raise ValueError(
                f"SHiRA mask={c.mask_name!r} needs calibration batches but the train dataloader gave none; "
                "give fit() a non-empty train dataloader or use mask='wm'"
            )
        weights = [layer.get_base_layer().weight for layer in layers.values()]
        stats = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        was_training = pl_module.training
        pl_module.train()
        pl_module.log = pl_module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
        try:
            for layer, w in zip(layers.values(), weights):
                layer.calibrating = True
                w.requires_grad_(True)
            for i, batch in enumerate(batches):
                if trainer is not None:
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                with torch.enable_grad():
                    out = pl_module.training_step(batch, i)
                    loss = out["loss"] if isinstance(out, dict) else out
                    if not isinstance(loss, torch.Tensor):
                        raise ValueError(
                            "SHiRA calibration needs training_step to return the loss (or {'loss': ...}), got "
                            f"{type(out).__name__}; return the loss or pick mask='wm'"
                        )
                    grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for s, g in zip(stats, grads):
                    if g is not None:
                        s.add_(g.float().square())
        finally:
            del pl_module.log, pl_module.log_dict
            for layer, w in zip(layers.values(), weights):
                layer.calibrating = False
                w.requires_grad_(False)
            pl_module.train(was_training)
        if trainer is not None and trainer.world_size > 1:  # every rank must pick the same mask
            stats = [trainer.strategy.reduce(s, reduce_op="mean") for s in stats]
        for (name, layer), w, s in zip(layers.items(), weights, stats):
            nnz = layer.shira_nnz[c.adapter_name]
            index = build_mask(c.mask, w, nnz, stats=s / len(batches), seed=c.seed, name=name, tile=c.tile)
            layer.set_mask(c.adapter_name, index.to(w.device))
        self._calibrated = True
        log.info("SHiRA[%s]: %s masks from %d calibration batches", c.adapter_name, c.mask_name, len(batches))

    # ------------------------------------------------------------------ state
    def _config_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.config)
        d["mask"] = self.config.mask_name  # a callable is not checkpointable; its name is enough to compare
        return d

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method_name, "config": self._config_dict(), "targets": self.target_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_config(f"shira[{self.config.adapter_name}]", state_dict.get("config", {}), self._config_dict())
        self._calibrated = True  # the mask comes with the checkpoint


def _calibration_batches(trainer: L.Trainer, n: int) -> list[Any]:
    """The first ``n`` train batches, leaving the loader's state and the global RNG as they were."""
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    # stateful pieces (StatefulDataLoader, resumable samplers) are put back as they were, so training
    # still starts at the first batch and a resumed run sees the same order
    batch_sampler = getattr(loader, "batch_sampler", None)
    parts = [loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)]
    stateful = {id(p): p for p in parts if hasattr(p, "state_dict") and hasattr(p, "load_state_dict")}
    states = {k: copy.deepcopy(p.state_dict()) for k, p in stateful.items()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return list(itertools.islice(iter(loader), n))
    finally:
        for k, p in stateful.items():
            p.load_state_dict(states[k])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
