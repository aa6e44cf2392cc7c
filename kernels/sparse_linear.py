"""Sparse-delta linear: ``y = x (W + S)^T + b`` with ``W`` frozen and only ``S``'s values trained.

RoSA (methods.md section 3) materialises ``W + S`` by scattering ``S`` into a **copy** of ``W``
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
    "SparseDeltaLinearFunction",
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


class SparseDeltaLinearFunction(torch.autograd.Function):
    """Autograd function of :func:`sparse_delta_linear` (in-place merge, SDDMM backward)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        index: SparseIndex,
        use_triton: bool | None,
    ) -> torch.Tensor:
        with merged_weight(weight, index, values, use_triton=use_triton) as w:
            y = F.linear(x, w, bias)  # (..., out)
        ctx.save_for_backward(x, weight, values)
        ctx.index = index
        ctx.use_triton = use_triton
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, values = ctx.saved_tensors
        index: SparseIndex = ctx.index
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            with merged_weight(weight, index, values, use_triton=ctx.use_triton) as w:
                grad_x = grad_out.matmul(w)  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[2]:
            grad_values = sddmm(
                grad_out, x, index, out_dtype=values.dtype, use_triton=ctx.use_triton
            )  # (nnz,)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, None, grad_values, grad_bias, None, None


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
    if x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(
            f"sparse_delta_linear needs x (..., {weight.shape[1]}) in the weight's dtype {weight.dtype}, "
            f"got shape {tuple(x.shape)} dtype {x.dtype}; cast x to the base layer's dtype."
        )
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "sparse_delta_linear trains only the sparse values and computes no gradient for the base "
            "weight, but weight.requires_grad is True; freeze it (weight.requires_grad_(False)) or use "
            "sparse_delta_linear_reference for a dense weight gradient."
        )
    return SparseDeltaLinearFunction.apply(x, weight, values, bias, index, use_triton)
