"""peft tuner of RoSA, registered with peft when ``lightning_peft`` is imported.

Once registered (its ``PeftType`` member ``ROSA`` is added in :mod:`.config`), ``inject_adapter_in_model``,
``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work with
:class:`~lightning_peft.methods.rosa.config.RosaPeftConfig`; the index buffers are persistent, so a
saved folder holds the masks.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import register_peft_method
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.methods._sparse import tile_nnz
from lightning_peft.methods.rosa.config import ROSA_PEFT_TYPE, RosaPeftConfig
from lightning_peft.methods.rosa.layer import Linear, RosaLayer

__all__ = ["ROSA_PEFT_TYPE", "RosaModel"]


class RosaModel(BaseTuner):
    """Replaces targeted ``nn.Linear`` / ``Conv1D`` layers by RoSA :class:`Linear` layers."""

    prefix: str = "rosa_"
    tuner_layer_cls = RosaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # same defaults as LoRA

    def _create_and_replace(
        self, rosa_config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
        current_key: str, **optional_kwargs: Any,
    ) -> None:
        kwargs = {
            "r": rosa_config.r, "lora_alpha": rosa_config.lora_alpha, "lora_dropout": rosa_config.lora_dropout,
            "density": rosa_config.density, "use_rslora": rosa_config.use_rslora, "tile": rosa_config.tile,
        }
        if rosa_config.tile is not None:  # here the layer's name is known: the error can name it
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if isinstance(base, Conv1D):
                raise ValueError(
                    f"RoSA tile={rosa_config.tile} runs tiles along a weight's contiguous dimension, but {current_key!r} is "
                    "a transformers Conv1D (GPT-2) whose weight is stored (in, out); use tile=None for these layers or "
                    "exclude them with exclude_modules="
                )
            in_f, out_f = _get_in_out_features(base)
            tile_nnz(1, (out_f, in_f), rosa_config.tile, "RoSA", current_key)
        if isinstance(target, Linear):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(rosa_config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(rosa_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> Linear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            rosa_config.fan_in_fan_out = True  # GPT-2 stores W as (in, out)
        elif isinstance(base, nn.Linear):
            rosa_config.fan_in_fan_out = False
        else:
            raise TypeError(
                f"RoSA adapts nn.Linear and transformers Conv1D layers, not {type(base).__name__}; "
                "narrow target_modules to linear layers"
            )
        return Linear(target, adapter_name, fan_in_fan_out=rosa_config.fan_in_fan_out, **kwargs)


def register() -> None:
    """Register RoSA with peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if ROSA_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="rosa", config_cls=RosaPeftConfig, model_cls=RosaModel, prefix="rosa_")
