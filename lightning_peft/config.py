"""Typed configs shared by all adapter methods (mirrored by ``conf/method/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass


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
