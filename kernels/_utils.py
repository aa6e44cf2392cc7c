"""Dispatch helpers shared by the kernels: when to launch Triton and when to run the reference.

The rule (one place, every op follows it):

* ``use_triton=None`` (default): Triton when every tensor is on CUDA, the PyTorch reference
  otherwise (CPU tensors, or Triton not importable).
* ``use_triton=True``: Triton, or a ``RuntimeError`` that says why not. On CPU tensors this
  only works in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
  **before** ``triton`` is first imported: ``@triton.jit`` reads the variable when the
  decorator runs and builds either a compiled ``JITFunction`` or an ``InterpretedFunction`` once
  and for all, and that includes Triton's own ``tl.zeros``/``tl.sum`` helpers, decorated when
  ``triton.language`` is imported (by lightning/transformers long before this package).
* ``use_triton=False``: the reference, always.
"""

from __future__ import annotations

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
    "cast_rtne",
    "interpreter_ready",
    "is_interpreted",
    "should_use_triton",
    "tl",
    "triton",
]


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
        use_triton: ``None`` (auto: CUDA -> Triton), ``True`` (force) or ``False`` (reference).

    Returns:
        ``True`` to launch the Triton kernel, ``False`` to run the reference.

    Raises:
        RuntimeError: ``use_triton=True`` but Triton cannot run on these tensors.
    """
    if use_triton is False:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if use_triton is None:
        return HAS_TRITON and kernel is not None and on_cuda
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
