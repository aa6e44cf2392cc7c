"""Sparse-delta linear: ``y = x (W + S)^T + b`` with ``W`` frozen and only ``S``'s values trained.

RoSA (Nikdan et al. 2024, arXiv 2401.04679, section 3) materialises ``W + S`` by scattering ``S`` into a **copy** of ``W``
and runs one dense GEMM; that copy costs ~2x the weight bytes (read ``W``, write the copy) plus
an ``out * in`` temporary per layer. Here the merge is done **in place** and undone exactly::

    saved = W[idx]              # nnz reads
    W[idx] = W[idx] + S         # nnz writes   (fp32 sum, one rounding to W's dtype)
    y = x W^T + b               # the one dense GEMM, on W + S
    W[idx] = saved              # nnz writes: the original bits back, never a subtraction

which moves ~0.33x the weight bytes at 1% density (only the touched sectors; see
:mod:`lightning_peft.kernels.scatter`) and allocates only ``nnz`` saved values.

Backward (``dO`` ``(..., out)``):

* ``dX = dO (W + S)`` with the same in-place merge around the GEMM (W is not kept merged between
  forward and backward, so other users of ``W`` see it unchanged);
* ``dS = SDDMM(dO, X)`` (:mod:`lightning_peft.kernels.sddmm`): ``d`` times the FLOPs of the dense
  ``dW``, which is never formed;
* no ``dW`` (``W`` is frozen); ``db = sum_t dO`` when the bias needs a gradient.

Under autocast (Lightning's ``bf16-mixed`` / ``16-mixed``) both GEMMs run in the autocast dtype (as
``F.linear`` would); ``dX`` comes back in ``x``'s dtype and ``dS`` is computed from ``dO`` cast to
``x``'s dtype.

The op is three ``torch.library`` custom ops (forward, ``dX``, ``dS``) with a registered autograd
formula: ``torch.compile`` sees each as one opaque node, so a compiled model trains through the
sparse layers without a graph break (the in-place merge never reaches inductor).

The in-place merge writes through ``weight.data`` so autograd's version counter of ``W`` is not
bumped: every observer sees the same bits before and after the op. Not safe if another
thread/stream reads ``W`` while the op runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning_peft.kernels.scatter import scatter_add, scatter_restore
from lightning_peft.kernels.sddmm import sddmm
from lightning_peft.kernels.sparse_index import SparseIndex

__all__ = [
    "merged_weight",
    "sparse_delta_linear",
    "sparse_delta_linear_reference",
]


def sparse_delta_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    values: torch.Tensor,
    index: SparseIndex,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference: scatter ``S`` into a copy of ``W``, one GEMM; autograd does the rest.

    The test oracle and benchmark baseline (RoSA's/HF shira's approach): allocates an
    ``(out, in)`` copy and, in backward, lets autograd form the dense ``(out, in)`` weight
    gradient before gathering ``dS`` from it.

    Args:
        x: ``(..., in)`` in ``weight.dtype``.
        weight: ``(out, in)``.
        values: ``(nnz,)`` any float dtype; ``W[idx] + values`` is summed in fp32 (fp64 for fp64)
            and rounded once to ``weight.dtype``, exactly as the in-place path does.
        index: ``nnz`` positions.
        bias: ``(out,)`` or ``None``.

    Returns:
        ``(..., out)``.
    """
    rc = (index.row.long(), index.col.long())
    acc = torch.promote_types(torch.promote_types(weight.dtype, values.dtype), torch.float32)
    merged = weight.index_put(rc, (weight[rc].to(acc) + values.to(acc)).to(weight.dtype))  # (out, in) copy
    return F.linear(x, merged, bias)


@contextmanager
def merged_weight(
    weight: torch.Tensor, index: SparseIndex, values: torch.Tensor, *, use_triton: bool | None = None
) -> Iterator[torch.Tensor]:
    """Context manager: ``W + S`` in place inside the block, ``W`` bit-exactly restored after.

    Restores even if the block raises (e.g. an out-of-memory GEMM).

    Yields:
        ``weight.data`` holding ``W + S`` (a view sharing ``weight``'s storage).
    """
    w = weight.data  # in-place writes through .data leave W's autograd version unchanged
    saved = scatter_add(w, index, values.detach(), 1.0, use_triton=use_triton)  # (nnz,) W dtype
    try:
        yield w
    finally:
        scatter_restore(w, index, saved, use_triton=use_triton)


# ---------------------------------------------------------------------------- shared with tile_linear
def triton_flag(use_triton: bool | None) -> int:
    """``use_triton`` as the int the custom-op schemas take: -1 auto, 0 reference, 1 Triton."""
    return -1 if use_triton is None else int(use_triton)


def _tri(flag: int) -> bool | None:
    return None if flag < 0 else bool(flag)


def check_linear_inputs(op: str, x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Refuse an ``x`` that does not fit ``weight`` or a trainable ``weight``; return the GEMMs' dtype: autocast's
    (``bf16-mixed``, ``16-mixed``: as ``F.linear``'s would run) or ``weight``'s.

    Raises:
        ValueError: ``x`` not ``(..., in)`` in ``weight``'s dtype, or ``weight.requires_grad`` with grad enabled.
    """
    if x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(
            f"{op} needs x (..., {weight.shape[1]}) in the weight's dtype {weight.dtype}, "
            f"got shape {tuple(x.shape)} dtype {x.dtype}; cast x to the base layer's dtype."
        )
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op} trains only the sparse values and computes no gradient for the base "
            "weight, but weight.requires_grad is True; freeze it (weight.requires_grad_(False)) or use "
            f"{op}_reference for a dense weight gradient."
        )
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def linear_on(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """``x w^T + bias`` ``(..., out)`` with the GEMM in ``compute_dtype`` (autocast off: the dtype is chosen)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(compute_dtype), w.to(compute_dtype), None if bias is None else bias.to(compute_dtype))


def grad_x_on(w: torch.Tensor, grad_out: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """``dX = dO w`` in ``dO``'s dtype, returned in ``x_dtype``: ``(..., out) @ (out, in) -> (..., in)``."""
    with torch.autocast(grad_out.device.type, enabled=False):
        return grad_out.matmul(w.to(grad_out.dtype)).to(x_dtype)


def grad_bias_of(grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``db = sum over tokens of dO`` ``(out,)`` in ``dtype``."""
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(dtype)


# ---------------------------------------------------------------------------- the op


@torch.library.custom_op("lightning_peft::sparse_delta_linear", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
    bias: torch.Tensor | None, compute_dtype: torch.dtype, use_triton: int,
) -> torch.Tensor:
    """``x (W + S)^T + b`` with the GEMM in ``compute_dtype``; ``W`` is merged in place and restored, so the op
    is functional from the outside (``torch.compile`` treats it as one opaque node: no graph break, no
    view-mutation for inductor to trace)."""
    index = SparseIndex(row, col, (weight.shape[0], weight.shape[1]))
    with merged_weight(weight, index, values, use_triton=_tri(use_triton)) as w:
        return linear_on(w, x, bias, compute_dtype)


@_forward_op.register_fake
def _(x, weight, values, row, col, bias, compute_dtype, use_triton):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=compute_dtype)


@torch.library.custom_op("lightning_peft::sparse_delta_linear_dx", mutates_args=())
def _grad_x_op(
    grad_out: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
    x_dtype: torch.dtype, use_triton: int,
) -> torch.Tensor:
    """``dX = dO (W + S)`` with the same in-place merge, in ``dO``'s dtype, returned in ``x_dtype``."""
    index = SparseIndex(row, col, (weight.shape[0], weight.shape[1]))
    with merged_weight(weight, index, values, use_triton=_tri(use_triton)) as w:
        return grad_x_on(w, grad_out, x_dtype)


@_grad_x_op.register_fake
def _(grad_out, weight, values, row, col, x_dtype, use_triton):  # noqa: ANN001, ANN202
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]), dtype=x_dtype)


@torch.library.custom_op("lightning_peft::sddmm", mutates_args=())
def _grad_values_op(
    grad_out: torch.Tensor, x: torch.Tensor, row: torch.Tensor, col: torch.Tensor, out: int, inp: int,
    values_dtype: torch.dtype, use_triton: int,
) -> torch.Tensor:
    """``dS = (dO^T X)[row, col]`` by SDDMM, ``dO`` cast to ``x``'s dtype, returned in ``values_dtype``."""
    return sddmm(grad_out.to(x.dtype), x, SparseIndex(row, col, (out, inp)), out_dtype=values_dtype,
                 use_triton=_tri(use_triton))


@_grad_values_op.register_fake
def _(grad_out, x, row, col, out, inp, values_dtype, use_triton):  # noqa: ANN001, ANN202
    return row.new_empty(row.shape, dtype=values_dtype)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, values, row, col, bias, compute_dtype, use_triton = inputs
    ctx.save_for_backward(x, weight, values, row, col)
    ctx.has_bias, ctx.bias_dtype, ctx.use_triton = bias is not None, None if bias is None else bias.dtype, use_triton


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, values, row, col = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    # dS before dX: the SDDMM's temporaries (on CPU a contiguous copy of dO^T, (out, T)) are freed before the
    # (T, in) dX is allocated, so the two never coexist: the step's peak stays at LoRA's (benchmarks/switching.py)
    if ctx.needs_input_grad[2]:
        grad_values = _grad_values_op(grad_out, x, row, col, weight.shape[0], weight.shape[1], values.dtype,
                                      ctx.use_triton)
    if ctx.needs_input_grad[0]:
        grad_x = _grad_x_op(grad_out, weight, values, row, col, x.dtype, ctx.use_triton)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad_bias_of(grad_out, ctx.bias_dtype)
    return grad_x, None, grad_values, None, None, grad_bias, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    values: torch.Tensor,
    index: SparseIndex,
    bias: torch.Tensor | None = None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``y = x (W + S)^T + b`` with ``S`` given as ``(values, index)``; trains ``values`` only.

    Args:
        x: ``(..., in)`` in ``weight.dtype``.
        weight: ``(out, in)`` frozen base weight; temporarily modified in place and restored
            bit-exactly (forward and backward).
        values: ``(nnz,)`` trainable sparse values (any float dtype; their gradient comes back in
            the same dtype, accumulated in fp32).
        index: ``nnz`` positions, from :class:`~lightning_peft.kernels.sparse_index.SparseIndex`.
        bias: ``(out,)`` or ``None``.
        use_triton: For the scatter and SDDMM kernels: ``None`` auto (CUDA -> Triton), ``True``
            force, ``False`` reference. The GEMMs are always ``torch``'s.

    Returns:
        ``(..., out)`` in ``weight.dtype``.

    Raises:
        ValueError: shapes or dtypes that do not fit, or a ``weight`` that requires grad.
    """
    index.check_weight(weight)
    index.check_values(values)
    compute_dtype = check_linear_inputs("sparse_delta_linear", x, weight)
    return _forward_op(x, weight, values, index.row, index.col, bias, compute_dtype, triton_flag(use_triton))
