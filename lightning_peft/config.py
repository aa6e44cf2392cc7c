"""Typed configs shared by all adapter methods (mirrored by ``conf/method/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AdapterConfig:
    """Fields every adapter method has.

    Attributes:
        target_modules: ``"all-linear"`` (every linear layer except output heads), a regex that
            must match full module names, or a list of names/suffixes such as
            ``["q_proj", "v_proj"]``. Matched over the whole LightningModule.
        exclude_modules: Same syntax; matching modules are not adapted.
        adapter_name: Name of the adapter inside the model; stacked adapters need distinct names.
    """

    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        if not self.adapter_name or not self.adapter_name.isidentifier():
            raise ValueError(
                f"adapter_name must be a Python identifier (it becomes a module attribute), got "
                f"{self.adapter_name!r}; use e.g. 'default' or 'task_a'"
            )
        if not isinstance(self.target_modules, str):  # OmegaConf ListConfig -> list
            self.target_modules = list(self.target_modules)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = list(self.exclude_modules)


def check_resumed_config(who: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise if a checkpoint's config differs from this run's, naming every differing key.

    Args:
        who: Named in the message, e.g. ``"lora[default]"``.
        saved: The config stored in the checkpoint (a dict of its fields).
        now: This run's config.

    Raises:
        ValueError: a key of ``saved`` has another value now.
    """
    diff = {k: (saved[k], now.get(k)) for k in saved if saved[k] != now.get(k)}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{who}: the checkpoint was trained with another config ({pretty}). Resume with the checkpoint's "
            "settings, or start a new run."
        )
