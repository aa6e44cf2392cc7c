"""Dispatch helpers shared by the kernels: when to launch Triton and when to run the reference.

The rule (one place, every op follows it):

* ``use_triton=None`` (default): the environment's ``LIGHTNING_PEFT_KERNELS`` (``auto``, the
  default; ``torch``: always the reference; ``triton``: as ``use_triton=True``). ``auto``: Triton
  when every tensor is on CUDA and the kernel passed its self-check on that device, the PyTorch
  reference otherwise (CPU tensors, Triton not importable, or a kernel that failed to compile or
  disagreed with its reference on a small input: warned once, naming kernel, device and Triton
  version, so a training run never crashes on a kernel problem).
* ``use_triton=True``: Triton, or a ``RuntimeError`` that says why not. On CPU tensors this
  only works in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
  **before** ``triton`` is first imported: ``@triton.jit`` reads the variable when the
  decorator runs and builds either a compiled ``JITFunction`` or an ``InterpretedFunction`` once
  and for all, and that includes Triton's own ``tl.zeros``/``tl.sum`` helpers, decorated when
  ``triton.language`` is imported (by lightning/transformers long before this package).
* ``use_triton=False``: the reference, always.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

try:  # triton is a declared dependency, but keep the CPU reference usable without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "KernelFallbackWarning",
    "cast_rtne",
    "interpreter_ready",
    "is_interpreted",
    "kernel_mode",
    "kernel_verified",
    "register_self_check",
    "should_use_triton",
    "tl",
    "triton",
]

KERNELS_ENV = "LIGHTNING_PEFT_KERNELS"
_MODES = {"auto": None, "torch": False, "triton": True}
_SELF_CHECKS: dict[int, tuple[str, Callable[[torch.device], bool]]] = {}  # id(kernel) -> (name, check)
_VERIFIED: dict[tuple[int, str], bool] = {}  # (id(kernel), device) -> passed


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed its self-check on a device; the PyTorch path runs instead."""


def kernel_mode() -> bool | None:
    """``LIGHTNING_PEFT_KERNELS`` as a ``use_triton`` value: ``auto`` -> ``None``, ``torch`` -> ``False``,
    ``triton`` -> ``True``.

    Raises:
        ValueError: another value (the message lists the three).
    """
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{KERNELS_ENV} must be auto, torch or triton, got {value!r}; unset it for auto")
    return _MODES[value]


def register_self_check(kernel: Any, name: str, check: Callable[[torch.device], bool]) -> None:
    """Register ``check(device) -> bool``: run the Triton launcher and the reference on a small input on
    ``device`` and say whether they agree (exceptions count as failure)."""
    if kernel is not None:
        _SELF_CHECKS[id(kernel)] = (name, check)


def kernel_verified(kernel: Any, device: torch.device) -> bool:
    """Whether ``kernel`` passed its self-check on ``device`` (run once per kernel and device, then cached).

    Warns:
        KernelFallbackWarning: once, when it failed (the error, the kernel, the device, Triton's version).
    """
    key = (id(kernel), str(device))
    if key not in _VERIFIED:
        name, check = _SELF_CHECKS.get(id(kernel), (getattr(kernel, "__name__", "kernel"), lambda d: True))
        try:
            ok, why = bool(check(device)), "its result differs from the PyTorch reference"
        except Exception as err:  # noqa: BLE001  (any compile/launch failure means: use the reference)
            ok, why = False, f"{type(err).__name__}: {err}"
        _VERIFIED[key] = ok
        if not ok:
            version = getattr(triton, "__version__", "not importable")
            warnings.warn(
                f"lightning-peft: the Triton kernel {name} failed its self-check on {device} (triton {version}): "
                f"{why}. Using the PyTorch path for it on this device; set {KERNELS_ENV}=torch to silence this, "
                f"or {KERNELS_ENV}=triton to force the kernel.",
                KernelFallbackWarning,
                stacklevel=3,
            )
    return _VERIFIED[key]


def _auto_eligible(tensors: tuple[torch.Tensor, ...]) -> bool:
    """``auto`` considers Triton for these tensors (all on CUDA)."""
    return all(t.is_cuda for t in tensors)


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was built by ``@triton.jit`` under ``TRITON_INTERPRET=1``."""
    return type(kernel).__name__ == "InterpretedFunction"


def interpreter_ready(kernel: Any) -> bool:
    """Whether ``kernel`` can run on CPU tensors in Triton's interpreter.

    Both the kernel and Triton's own ``triton.language`` helpers (``tl.zeros``, ``tl.sum``, ...,
    themselves ``@triton.jit`` functions decorated when ``triton`` is first imported) must have
    been built with ``TRITON_INTERPRET=1``; a kernel decorated under the variable but running on a
    ``triton`` imported before it fails with "Cannot call @triton.jit'd outside of the scope of a
    kernel". So the variable has to be set before ``triton`` is first imported anywhere.
    """
    return HAS_TRITON and is_interpreted(kernel) and is_interpreted(tl.zeros)


def should_use_triton(kernel: Any, *tensors: torch.Tensor, use_triton: bool | None) -> bool:
    """Decide between the Triton launcher and the PyTorch reference for one call.

    Args:
        kernel: The module-level ``@triton.jit`` kernel the launcher would run (``None``
            when Triton is not importable).
        *tensors: Every tensor the kernel would read or write.
        use_triton: ``None`` (``LIGHTNING_PEFT_KERNELS``, default auto: CUDA and a passed
            self-check -> Triton), ``True`` (force) or ``False`` (reference).

    Returns:
        ``True`` to launch the Triton kernel, ``False`` to run the reference.

    Raises:
        RuntimeError: ``use_triton=True`` but Triton cannot run on these tensors.
    """
    if use_triton is None:
        use_triton = kernel_mode()
    if use_triton is False:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if use_triton is None:
        if not (HAS_TRITON and kernel is not None and _auto_eligible(tensors)):
            return False
        return kernel_verified(kernel, tensors[0].device)
    if not HAS_TRITON or kernel is None:
        raise RuntimeError(
            "use_triton=True but triton is not importable; install triton>=3.0 or pass use_triton=None."
        )
    if on_cuda or interpreter_ready(kernel):
        return True
    devices = sorted({str(t.device) for t in tensors})
    raise RuntimeError(
        f"use_triton=True on tensors on {devices}, but Triton was set up for GPU: CPU tensors need "
        "Triton's interpreter. Set TRITON_INTERPRET=1 in the environment before `triton` is first "
        "imported (e.g. at the top of tests/conftest.py, before anything imports lightning, "
        "transformers or lightning_peft), or pass use_triton=None to use the PyTorch reference on CPU."
    )


if HAS_TRITON:

    @triton.jit
    def cast_rtne(x, dtype: tl.constexpr):
        """Cast fp32 ``x`` to ``dtype`` rounding to nearest-even, identically compiled and interpreted.

        Triton's interpreter (3.9) converts fp32 -> bf16 by truncation (and its "rtne" mode rounds
        ties up), while the GPU and ``torch.Tensor.to`` round to nearest-even; the bit trick below
        makes interpreted, compiled and PyTorch results bit-identical. NaN keeps the native cast
        (the trick could carry a NaN payload into infinity). Other dtypes use the native cast.
        """
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x != x, x.to(tl.bfloat16), rounded)
        else:
            return x.to(dtype)

else:  # pragma: no cover
    cast_rtne = None
