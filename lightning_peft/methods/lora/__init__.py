"""LoRA as a Lightning callback, backed by peft's LoRA layers."""

from __future__ import annotations

from peft import LoraConfig

from lightning_peft.callback import AdapterCallback
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.registry import register_method

__all__ = ["LoRA", "LoRAConfig"]


@register_method("lora")
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
