"""Typed configs shared by all adapter methods (mirrored by ``conf/method/*.yaml``)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


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


def check_number(who: str, key: str, value: object, *, low: float, high: float | None = None,
                 low_open: bool = True, high_open: bool = False, hint: str = "") -> None:
    """Raise unless ``value`` is a real number (not a bool or a string) in the given interval.

    Args:
        who: Named in the message, e.g. ``"LoRA"``.
        key: The argument's name.
        value: What the user passed.
        low, high: Interval bounds (``high=None``: no upper bound).
        low_open, high_open: Whether each bound is excluded.
        hint: Appended to the message: what to pass instead.

    Raises:
        ValueError: naming the rule, the value and ``hint``.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
        rule = f"{left}{low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{who} {key} must be a number in {rule}, got {key}={value!r}" + (f"; {hint}" if hint else ""))


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


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as oneDNN detects them). Without it, PyTorch's
    bf16 GEMMs on CPU take a scalar fallback path (measured ~50x slower than fp32 on an AVX2-only AMD EPYC)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_precision(measured: str) -> str:
    """``trainer=cpu``'s precision: the model group's measured ``cpu_precision`` (``conf/model/*.yaml``), except
    that a bf16 choice becomes ``32-true`` on a CPU without native bf16 (:func:`native_cpu_bf16`), where the
    measurement's reason (bf16 is faster at fp32's quality) does not hold. A user's ``trainer.precision=...`` is
    taken as given (it replaces this interpolation)."""
    if "bf16" in str(measured) and not native_cpu_bf16():
        log.warning("trainer=cpu: %s was measured fastest on CPUs with native bf16 (AVX512-BF16/AMX); this CPU has "
                    "none, so training runs in 32-true (set trainer.precision=%s to force it)", measured, measured)
        return "32-true"
    return str(measured)
