"""LoRA as a Lightning callback, backed by peft's LoRA layers."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from lightning_peft.callback import AdapterCallback
from lightning_peft.deltas import LowRankTerm, lora_scale
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.registry import register_method

__all__ = ["LoRA", "LoRAConfig"]


def bank_deltas(layer: nn.Module, adapter: str) -> list[Any]:
    """AdapterBank's view of a peft LoRA layer: one low-rank term."""
    if adapter not in layer.lora_A:
        return []
    return [LowRankTerm(layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone(),
                        float(layer.scaling[adapter]), bool(getattr(layer, "fan_in_fan_out", False)))]


def bank_tensors(parts: dict[str, Any], config: Any, shape: tuple[int, int], path: str) -> list[Any]:
    """AdapterBank's view of one weight in a LoRA folder (``lora_A.weight``, ``lora_B.weight``)."""
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    return [LowRankTerm(a, b, lora_scale(config, a.shape[0]), bool(config.fan_in_fan_out))]


@register_method("lora", layer_classes=(LoraLayer,), prefix="lora_", bank_deltas=bank_deltas, bank_tensors=bank_tensors,
                 fsdp=True)
class LoRA(AdapterCallback):
    """Add LoRA adapters to any LightningModule: ``Trainer(callbacks=[LoRA(r=8)])``.

    Args:
        r: Rank (>= 1).
        alpha: The update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: ``"all-linear"`` (output heads excluded), a regex, or names/suffixes.
        exclude_modules: Modules to leave alone (same syntax).
        use_rslora: Scale by ``alpha / sqrt(r)``.
        adapter_name: Name of the adapter; stacked adapters need distinct names.

    Raises:
        ValueError: ``r <= 0``, ``alpha <= 0`` or ``dropout`` outside [0, 1).
    """

    config_cls = LoRAConfig

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        super().__init__(
            LoRAConfig(
                target_modules=target_modules, exclude_modules=exclude_modules, adapter_name=adapter_name,
                r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            )
        )

    def to_peft_config(self, target_names: list[str]) -> LoraConfig:
        c = self.config
        return LoraConfig(
            r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, use_rslora=c.use_rslora, target_modules=target_names
        )
