"""RoSA as a Lightning callback: low-rank plus sparse adapters with a gradient-based mask.

Nikdan, Tabesh, Crncevic, Alistarh, "RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust
Adaptation", ICML 2024 (arXiv 2401.04679), section 3; schedule as in their code (schedule "wl64")::

    global_step:  0 ......... warmup_steps ......... + mask_steps ...................►
    LoRA:         trains      trains                  trains (re-initialised if restart_after_mask)
    S:            inactive    inactive, dO^T X        masks = per-layer top-k of the statistic,
                              collected per backward  then S trains jointly with LoRA

With ``tile=b`` the masks are whole 1 x b tiles along ``in`` instead: the statistic summed per tile, the
``nnz // b`` best tiles per layer (:func:`~lightning_peft.methods._sparse.tile_mask`, the one SHiRA uses), so an
``AdapterBank`` switches ``S`` by contiguous tile copies (SMT, ICLR 2025) and checkpoints hold one int32 per tile.

Every tensor exists at its final size from injection on (``rosa_values`` ``(nnz,)`` per layer),
so the user's ``configure_optimizers`` sees all of them once and nothing is rebuilt when the
masks appear: until then ``S`` is unused in the forward except for an exact zero term (so DDP
sees every trainable parameter used), and its optimizer state is reset when the mask is built.

Learning rates: ``lora_lr`` / ``sparse_lr`` (or ``sparse_lr_ratio``) give the LoRA factors and the
sparse values their own param groups inside the user's optimizer in ``on_fit_start``, every other
hyperparameter and the LR schedule kept (:func:`lightning_peft.optim.split_param_groups`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning as L
import torch
from typing_extensions import override

from lightning_peft._deprecated import deprecated_names
from lightning_peft.callback import AdapterCallback
from lightning_peft.deltas import LowRankTerm, lora_scale, sparse_term
from lightning_peft.methods._sparse import random_mask, tile_mask, topk_mask
from lightning_peft.methods.rosa.config import GRADIENT_CRITERIA, MaskCriterion, RoSAConfig, RosaPeftConfig
from lightning_peft.methods.rosa.layer import RosaLayer
from lightning_peft.methods.rosa.mask import (
    GradientCollector,
    layer_generator,
)
from lightning_peft.methods.rosa.model import RosaModel, register
from lightning_peft.optim import split_param_groups
from lightning_peft.registry import register_method

__all__ = ["RoSA", "RoSAConfig", "RosaLayer", "RosaModel", "RosaPeftConfig", "SparseRoSA"]

log = logging.getLogger(__name__)
register()  # peft learns the "ROSA" type: PeftModel.from_pretrained can load RoSA folders


def bank_deltas(layer: RosaLayer, adapter: str) -> list[Any]:
    """AdapterBank's view of a RoSA layer: the sparse ``S`` (once its mask exists) and the LoRA ``s B A``, both in
    the base weight's own layout (``(in, out)`` for ``Conv1D``)."""
    if adapter not in layer.rosa_values:
        return []
    terms: list[Any] = []
    if layer.mask_ready(adapter):
        idx = layer.sparse_index(adapter)
        terms.append(_sparse_in_weight_layout(idx.row, idx.col, layer.rosa_values[adapter].detach(),
                                              tuple(layer.get_base_layer().weight.shape), layer.fan_in_fan_out, ""))
    if layer.r[adapter] > 0:
        terms.append(LowRankTerm(layer.rosa_A[adapter].detach().clone(), layer.rosa_B[adapter].detach().clone(),
                                 float(layer.scaling[adapter]), layer.fan_in_fan_out))
    return terms


def _sparse_in_weight_layout(row: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                             transposed: bool, path: str) -> Any:
    """RoSA's ``(out, in)`` positions as a term on the stored weight (``shape``; ``(in, out)`` if ``transposed``)."""
    return sparse_term(torch.stack([col, row] if transposed else [row, col]), values, shape, path)


def bank_tensors(parts: dict[str, Any], config: Any, shape: tuple[int, int], path: str) -> list[Any]:
    """AdapterBank's view of one weight in a RoSA folder (``rosa_values/row/col``, ``rosa_A/B``)."""
    terms: list[Any] = []
    row, col = parts["rosa_row"], parts["rosa_col"]
    if row.numel() and int(row[0]) >= 0:  # -1: the mask was never built
        terms.append(_sparse_in_weight_layout(row, col, parts["rosa_values"], shape, config.fan_in_fan_out, path))
    if config.r > 0:
        terms.append(LowRankTerm(parts["rosa_A"], parts["rosa_B"], lora_scale(config, config.r), bool(config.fan_in_fan_out)))
    return terms


_CHECKPOINT_CODEC = {"encode_checkpoint": RosaLayer.encode_index_state, "decode_checkpoint": RosaLayer.decode_index_state}


@register_method("rosa", layer_classes=(RosaLayer,), prefix="rosa_", bank_deltas=bank_deltas, bank_tensors=bank_tensors,
                 **_CHECKPOINT_CODEC)
class RoSA(AdapterCallback):
    """Add RoSA adapters (``Delta W = s B A + S``) to any LightningModule.

    ``Trainer(callbacks=[RoSA(r=16, density=0.006)])``; see :class:`RoSAConfig` for the schedule.

    Args:
        r: LoRA rank (0 = sparse-only).
        density: Fraction of each adapted weight in the sparse part ``S``, in (0, 1].
        alpha: LoRA scaling numerator (``s = alpha / r``).
        dropout: Dropout on the LoRA input.
        target_modules: ``"all-linear"`` (output heads excluded), a regex, or names/suffixes.
        exclude_modules: Modules to leave alone (same syntax).
        mask_criterion: ``fisher`` | ``mean`` | ``weight_magnitude`` | ``random``.
        warmup_steps: LoRA-only optimizer steps before collecting gradients (ignored for ``r=0``).
        mask_steps: Optimizer steps of gradient collection.
        lora_lr: Learning rate of the LoRA factors (``None``: the optimizer's).
        sparse_lr: Learning rate of the sparse values (``None``: ``sparse_lr_ratio`` x the optimizer's).
        sparse_lr_ratio: Fraction of the optimizer's lr the sparse values train at when ``sparse_lr`` is
            ``None`` (default 2/7, the paper's 2e-4 : 7e-4; ``1.0`` keeps the optimizer's).
        restart_after_mask: Re-initialise the adapter once the masks exist (paper's recipe).
        grad_accumulator_device: ``cpu`` or ``same`` (the weight's device).
        use_rslora: Scale by ``alpha / sqrt(r)``.
        seed: Seed of the random mask and of the re-initialisation.
        adapter_name: Name of the adapter; stacked adapters need distinct names.
        tile: ``None`` (unstructured ``S``) or ``16``/``32``/``64``: ``S`` in 1 x b tiles along ``in``, chosen by the
            statistic pooled per tile, switched by whole-tile copies in an ``AdapterBank`` (see :class:`RoSAConfig`).

    Raises:
        ValueError: any invalid argument (see :class:`RoSAConfig`).
    """

    config_cls = RoSAConfig
    config: RoSAConfig

    def __init__(
        self,
        r: int = 16,
        density: float = 0.006,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        mask_criterion: MaskCriterion = "fisher",
        warmup_steps: int = 64,
        mask_steps: int = 1,
        lora_lr: float | None = None,
        sparse_lr: float | None = None,
        sparse_lr_ratio: float = 2 / 7,
        restart_after_mask: bool = False,
        grad_accumulator_device: Literal["cpu", "same"] = "cpu",
        use_rslora: bool = False,
        seed: int = 0,
        adapter_name: str = "default",
        tile: int | None = None,
    ) -> None:
        super().__init__(
            RoSAConfig(
                target_modules=target_modules, exclude_modules=exclude_modules, adapter_name=adapter_name,
                r=r, density=density, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                mask_criterion=mask_criterion, warmup_steps=warmup_steps, mask_steps=mask_steps,
                lora_lr=lora_lr, sparse_lr=sparse_lr, sparse_lr_ratio=sparse_lr_ratio, restart_after_mask=restart_after_mask,
                grad_accumulator_device=grad_accumulator_device, seed=seed, tile=tile,
            )
        )
        self._collectors: dict[str, GradientCollector] = {}
        self._pending_collectors: dict[str, dict[str, Any]] = {}
        self._module: L.LightningModule | None = None
        self._layers: dict[str, RosaLayer] | None = None
        if r == 0 and warmup_steps:
            log.info("RoSA r=0 (sparse-only): warmup_steps=%d ignored, the mask comes from step 0", warmup_steps)

    def to_peft_config(self, target_names: list[str]) -> RosaPeftConfig:
        c = self.config
        return RosaPeftConfig(
            r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, use_rslora=c.use_rslora, density=c.density,
            tile=c.tile, target_modules=target_names,
        )

    # ------------------------------------------------------------------ layers and phase
    def layers(self, module: torch.nn.Module | None = None) -> dict[str, RosaLayer]:
        """This adapter's RoSA layers by module name (cached during fit: looked up every batch)."""
        if module is None and self._layers is not None:
            return self._layers
        module = module if module is not None else self._module
        name = self.config.adapter_name
        if module is None:
            return {}
        return {n: m for n, m in module.named_modules() if isinstance(m, RosaLayer) and name in m.rosa_values}

    def masks_ready(self) -> bool:
        """Whether every layer's mask is built (the joint phase)."""
        layers = self.layers()
        return bool(layers) and all(m.mask_ready(self.config.adapter_name) for m in layers.values())

    def phase(self, global_step: int) -> str:
        """``warmup``, ``collect`` or ``joint`` at optimizer step ``global_step``."""
        if self.masks_ready():
            return "joint"
        return "warmup" if global_step < self.config.collect_start else "collect"

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module, self._layers = pl_module, None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning restores the optimizer state (trainer.py: on_fit_start, then
        # restore_training_state), so a resumed optimizer finds the same groups
        self._module = pl_module
        self._layers = self.layers(pl_module)  # the model is final now (injected, wrapped)
        c = self.config
        if c.lora_lr is not None or c.sparse_lr is not None or c.sparse_lr_ratio != 1.0:
            self._split_param_groups(trainer)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.masks_ready():
            return
        step, c = trainer.global_step, self.config
        if step >= c.mask_step:
            self._build_masks(trainer)  # e.g. weight_magnitude/random at the end of warm-up
        elif step >= c.collect_start and c.mask_criterion in GRADIENT_CRITERIA:
            self._attach_collectors(trainer)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # after the optimizer step of the last collection step; ModelCheckpoint runs after us (Lightning
        # orders checkpoint callbacks last), so a checkpoint of this step already holds the masks
        if not self.masks_ready() and trainer.global_step >= self.config.mask_step:
            self._build_masks(trainer)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for layer in self.layers().values():
            layer.grad_collectors.pop(self.config.adapter_name, None)
        self._layers = None

    # ------------------------------------------------------------------ collection and masks
    def _attach_collectors(self, trainer: L.Trainer) -> None:
        c, name = self.config, self.config.adapter_name
        for layer_name, layer in self.layers().items():
            if layer_name not in self._collectors:
                w = layer.base_weight_out_in()
                device = "cpu" if c.grad_accumulator_device == "cpu" else w.device
                collector = GradientCollector((w.shape[0], w.shape[1]), c.mask_criterion, device)
                pending = self._pending_collectors.pop(layer_name, None)
                if pending is not None and trainer.global_rank == 0:
                    collector.load(pending)  # rank 0 saved the all-reduced sum; other ranks go on from zero
                self._collectors[layer_name] = collector
            layer.grad_collectors[name] = self._collectors[layer_name]

    def _all_reduce(self, trainer: L.Trainer | None):
        if trainer is None or trainer.world_size <= 1:
            return None
        strategy = trainer.strategy

        def reduce(t: torch.Tensor) -> torch.Tensor:
            # a copy: DDP's all_reduce works in place and the caller's sum must stay rank-local
            return strategy.reduce(t.detach().clone().to(strategy.root_device), reduce_op="sum").to(t.device)

        return reduce

    @torch.no_grad()
    def _build_masks(self, trainer: L.Trainer | None) -> None:
        """Build every layer's mask, activate ``S``, free the accumulators, reset optimizer state."""
        c, name = self.config, self.config.adapter_name
        reduce = self._all_reduce(trainer)
        reset: list[torch.nn.Parameter] = []
        for layer_name, layer in self.layers().items():
            w = layer.base_weight_out_in()  # (out, in)
            shape = (w.shape[0], w.shape[1])
            if c.mask_criterion in GRADIENT_CRITERIA:
                collector = self._collectors.pop(layer_name, None)
                if collector is None:
                    raise RuntimeError(
                        f"RoSA[{name}]: no gradients were collected for {layer_name} before the mask step "
                        f"{c.mask_step}; the layer was not used in training_step"
                    )
                scores = collector.statistic(reduce).to(w.device)  # (out, in) mean G**2 or |mean G|
            elif c.mask_criterion == "weight_magnitude":
                scores = w.detach().abs().float()  # (out, in)
            else:  # random
                scores = None
            if c.tile is not None:  # whole tiles by the score summed per tile; random: i.i.d. uniform scores
                if scores is None:
                    scores = torch.rand(shape, generator=layer_generator(c.seed, layer_name))
                index = tile_mask(scores, layer.rosa_values[name].numel(), c.tile).to(w.device)
            elif scores is not None:
                index = topk_mask(scores, c.density)
            else:
                index = random_mask(shape, c.density, layer_generator(c.seed, layer_name)).to(w.device)
            layer.grad_collectors.pop(name, None)
            layer.set_mask(name, index)
            reset.append(layer.rosa_values[name])
            if c.restart_after_mask and c.r > 0:
                self._reinit_lora(layer, layer_name)
                reset += [layer.rosa_A[name], layer.rosa_B[name]]
        self._collectors.clear()
        for optimizer in trainer.optimizers if trainer is not None else []:
            for p in reset:
                optimizer.state.pop(p, None)  # fresh Adam moments and step count for the new S
        log.info("RoSA[%s]: built %d masks at step %s (%s)", name, len(reset), getattr(trainer, "global_step", "?"),
                 c.mask_criterion)

    def _reinit_lora(self, layer: RosaLayer, layer_name: str) -> None:
        """LoRA back to its init (A Kaiming-uniform = U(-1/sqrt(in), 1/sqrt(in)), B = 0), seeded."""
        name = self.config.adapter_name
        A, B = layer.rosa_A[name], layer.rosa_B[name]
        bound = 1.0 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound, as at injection
        g = layer_generator(self.config.seed + 1, layer_name)
        A.copy_((torch.rand(A.shape, generator=g, dtype=torch.float32) * 2 - 1).mul_(bound).to(A))
        B.zero_()

    # ------------------------------------------------------------------ param groups
    def _split_param_groups(self, trainer: L.Trainer) -> None:
        c, name = self.config, self.config.adapter_name
        parts: dict[int, str] = {}
        for layer in self.layers().values():
            parts[id(layer.rosa_values[name])] = "sparse"
            if c.r > 0:
                parts[id(layer.rosa_A[name])] = parts[id(layer.rosa_B[name])] = "lora"

        def lr_for(part: str, base: float) -> float | None:
            if part == "lora":
                return c.lora_lr
            if c.sparse_lr is not None:
                return c.sparse_lr
            return base * c.sparse_lr_ratio if c.sparse_lr_ratio != 1.0 else None

        split_param_groups(trainer, parts, lr_for)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        trainer = getattr(self._module, "_trainer", None)
        reduce = self._all_reduce(trainer)
        collectors = {}
        for layer_name, col in self._collectors.items():
            total, count = col.total, torch.tensor([float(col.count)])
            if reduce is not None:  # rank 0 writes the file: store the sum over all ranks
                total, count = reduce(total), reduce(count)
            collectors[layer_name] = {"total": total.detach().cpu().clone(), "count": int(count.item())}
        # the masks themselves are in the model's state dict (rosa_row/rosa_col, compact in checkpoints)
        state.update(phase=self.phase(getattr(trainer, "global_step", 0)), collectors=collectors)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._collectors.clear()
        self._pending_collectors = dict(state_dict.get("collectors", {}))


@register_method("rosa_sparse", peft_type="ROSA", layer_classes=(RosaLayer,), prefix="rosa_", bank_deltas=bank_deltas,
                 bank_tensors=bank_tensors, **_CHECKPOINT_CODEC)
class SparseRoSA(RoSA):
    """Sparse-only RoSA (``r = 0``), the paper's "SpA" baseline; registered as ``rosa_sparse``.

    Same arguments as :class:`RoSA` with ``r=0``, ``density=0.012`` (the paper compares RoSA at 0.6%
    with sparse-only at 1.2%, about the same parameter count for ``r = 16``) and
    ``sparse_lr_ratio=1.0``: without a LoRA part there is no warm-up for the first sparse step to
    undo, and ``S`` is the whole adapter, so it trains at the optimizer's rate.
    """

    def __init__(self, r: int = 0, density: float = 0.012, sparse_lr_ratio: float = 1.0, **kwargs: Any) -> None:
        super().__init__(r=r, density=density, sparse_lr_ratio=sparse_lr_ratio, **kwargs)


__getattr__ = deprecated_names(__name__, {"RosaConfig": (RosaPeftConfig, "RosaPeftConfig")})
