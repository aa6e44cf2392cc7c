"""SDDMM: the gradient of a sparse delta, ``dS = (dO^T X)`` sampled at the mask only.

For ``y = x (W + S)^T`` with ``S`` nonzero at ``(row[k], col[k])``::

    dS[k] = sum_t dO[t, row[k]] * X[t, col[k]]          k = 0 .. nnz-1

with ``dO`` ``(..., out)`` and ``X`` ``(..., in)``, leading dims flattened to ``T``.

Cost (RoSA, Nikdan et al. 2024, arXiv 2401.04679: dS by SDDMM; kernels IST-DASLab/spops). The dense ``dW = dO^T X`` is ``2 T out in`` FLOPs and writes
``out * in`` values; HF PEFT's shira computes it and then gathers. SDDMM needs ``2 T nnz`` FLOPs
(``d`` times the dense GEMM) and writes ``nnz`` values. The kernel below is element-parallel on
CUDA cores (tensor cores do not help an unstructured mask: at d = 1% 92% of 16x16 blocks are
non-empty). Each program owns ``BLOCK_K`` consecutive nonzeros and walks ``T`` in tiles of
``BLOCK_T``, loading a ``(BLOCK_T, BLOCK_K)`` gather of ``dO`` columns and one of ``X`` columns:
``2 T nnz`` element loads in total, of which the ``dO`` ones are mostly cache hits because
row-major order makes consecutive ``k`` share ``row[k]``. Loads in the input dtype (bf16 halves
the bytes), accumulation always in fp32.

Off CUDA the op runs :func:`sddmm_sampled_addmm` (``torch.sparse.sampled_addmm``: 0.11-0.68x (two runs) the
dense GEMM's time on CPU at 0.5-5%, ``benchmarks/sparse_ops.py``); :func:`sddmm_reference` stays
the test oracle. The switch
to "dense GEMM + gather" above a measured density lives in
:meth:`lightning_peft.methods._sparse.core.SparseDeltaCore.sparse_linear` (``DENSE_FALLBACK_DENSITY``).

Not done yet (documented so it is not mistaken for a tuned kernel): grouping a row's nonzeros
so ``dO[:, row]`` is loaded once into registers. ``BLOCK_*`` are defaults, not the result of a
sweep: no GPU has been available to sweep them.
"""

from __future__ import annotations

import warnings

import torch
from lightning_peft.kernels._utils import (
    HAS_TRITON,
    cast_rtne,
    register_self_check,
    should_use_triton,
    tl,
    triton,
)
from lightning_peft.kernels.sparse_index import SparseIndex

__all__ = ["sddmm", "sddmm_reference", "sddmm_sampled_addmm"]

# Reference: gather at most this many (T x chunk) elements per operand at a time (~16 MB fp32),
# so the CPU path never holds more than a chunk of the (T, nnz) products.
_REF_CHUNK_ELEMS = 1 << 22


def _flatten(
    grad_out: torch.Tensor, x: torch.Tensor, index: SparseIndex
) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = index.shape
    if grad_out.shape[-1] != out_f or x.shape[-1] != in_f or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"sddmm needs grad_out (..., {out_f}) and x (..., {in_f}) with equal leading dims for an index "
            f"of shape {index.shape}, got {tuple(grad_out.shape)} and {tuple(x.shape)}."
        )
    return grad_out.reshape(-1, out_f), x.reshape(-1, in_f)  # (T, out), (T, in)


def sddmm_reference(
    grad_out: torch.Tensor, x: torch.Tensor, index: SparseIndex, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """PyTorch reference of :func:`sddmm` that never forms the dense ``(out, in)`` gradient.

    Gathers the needed columns of ``dO`` and ``X`` for a chunk of nonzeros, ``(T, chunk)``
    each, and reduces over ``T`` in fp32 (fp64 for fp64 inputs, so ``gradcheck`` works).

    Args:
        grad_out: ``(..., out)``.
        x: ``(..., in)``, same leading dims.
        index: ``nnz`` positions into the ``(out, in)`` weight.
        out_dtype: dtype of the result.

    Returns:
        ``(nnz,)`` in ``out_dtype``.
    """
    g2, x2 = _flatten(grad_out, x, index)  # (T, out), (T, in)
    acc = torch.promote_types(torch.promote_types(g2.dtype, x2.dtype), torch.float32)
    nnz, t = index.nnz, g2.shape[0]
    out = torch.empty(nnz, dtype=out_dtype, device=g2.device)
    chunk = max(1, _REF_CHUNK_ELEMS // max(t, 1))
    row, col = index.row.long(), index.col.long()
    for s in range(0, nnz, chunk):
        gs = g2[:, row[s : s + chunk]].to(acc)  # (T, chunk)
        xs = x2[:, col[s : s + chunk]].to(acc)  # (T, chunk)
        out[s : s + chunk] = (gs * xs).sum(0).to(out_dtype)
    return out


def sddmm_sampled_addmm(
    grad_out: torch.Tensor, x: torch.Tensor, index: SparseIndex, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The non-Triton path of :func:`sddmm`: ``torch.sparse.sampled_addmm`` on a CSR view of the mask.

    ``sampled_addmm(C, dO^T, X)`` evaluates ``(dO^T X)`` only at ``C``'s nonzeros (MKL/OpenMP on
    CPU, cuSPARSE on CUDA). On CPU it takes 0.11-0.68x (two runs) the dense ``dO^T X`` GEMM's time at
    0.5-5% density and is 3.5-68x faster than :func:`sddmm_reference` (``benchmarks/sparse_ops.py``,
    rows ``sddmm_ms_vs_*`` in ``benchmarks/results.csv``). The CSR row offsets come from the sorted COO
    index (:meth:`SparseIndex.crow`, cast to int32 like ``col``): the ``(nnz,)`` columns are used as they are.

    Args:
        grad_out: ``(..., out)``; bf16/fp16 are upcast to fp32 (accumulation in fp32), fp64 stays fp64.
        x: ``(..., in)``, same leading dims.
        index: ``nnz`` positions into the ``(out, in)`` weight.
        out_dtype: dtype of the result.

    Returns:
        ``(nnz,)`` in ``out_dtype``.
    """
    g2, x2 = _flatten(grad_out, x, index)  # (T, out), (T, in)
    acc = torch.promote_types(torch.promote_types(g2.dtype, x2.dtype), torch.float32)
    if index.nnz == 0 or g2.shape[0] == 0:
        return torch.zeros(index.nnz, dtype=out_dtype, device=g2.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": we rely on sampled_addmm only
        warnings.simplefilter("ignore", UserWarning)
        zeros = torch.zeros(index.nnz, dtype=acc, device=g2.device)  # not empty: beta=0 still reads them (0 * NaN)
        crow = index.crow().to(index.col.dtype)  # (out + 1,) int32, like col
        # check_invariants=False: SparseIndex already guarantees sorted, in-range, unique indices
        mask = torch.sparse_csr_tensor(crow, index.col, zeros, index.shape, check_invariants=False)
        sampled = torch.sparse.sampled_addmm(mask, g2.t().to(acc), x2.to(acc), beta=0.0)  # CSR (out, in)
    return sampled.values().to(out_dtype)


if HAS_TRITON:

    @triton.jit
    def _sddmm_kernel(
        g_ptr,  # (T, out) grad_out
        x_ptr,  # (T, in) input
        row_ptr,  # (nnz,) int32
        col_ptr,  # (nnz,) int32
        out_ptr,  # (nnz,) result
        T,
        nnz,
        stride_gt,
        stride_go,
        stride_xt,
        stride_xi,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        k = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        kmask = k < nnz
        r = tl.load(row_ptr + k, mask=kmask, other=0).to(tl.int64)
        c = tl.load(col_ptr + k, mask=kmask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,)
            m = (t < T)[:, None] & kmask[None, :]  # (BLOCK_T, BLOCK_K)
            g = tl.load(g_ptr + t[:, None] * stride_gt + r[None, :] * stride_go, mask=m, other=0.0)
            xv = tl.load(x_ptr + t[:, None] * stride_xt + c[None, :] * stride_xi, mask=m, other=0.0)
            acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=0)  # fp32 accumulation
        tl.store(out_ptr + k, cast_rtne(acc, out_ptr.dtype.element_ty), mask=kmask)

else:  # pragma: no cover
    _sddmm_kernel = None

_BLOCK_T = 32
_BLOCK_K = 64


def _sddmm_launch(
    g2: torch.Tensor, x2: torch.Tensor, index: SparseIndex, out_dtype: torch.dtype
) -> torch.Tensor:
    """Host launcher: 1-D grid over ``cdiv(nnz, BLOCK_K)``; strides passed, no copies."""
    nnz = index.nnz
    out = torch.empty(nnz, dtype=out_dtype, device=g2.device)
    if nnz == 0:
        return out
    if g2.shape[0] == 0:
        return out.zero_()
    grid = (triton.cdiv(nnz, _BLOCK_K),)
    _sddmm_kernel[grid](
        g2,
        x2,
        index.row,
        index.col,
        out,
        g2.shape[0],
        nnz,
        g2.stride(0),
        g2.stride(1),
        x2.stride(0),
        x2.stride(1),
        BLOCK_T=_BLOCK_T,
        BLOCK_K=_BLOCK_K,
    )
    return out


def _self_check(device: torch.device) -> bool:
    """The launcher against the reference on a (9, 7) x (9, 5) fp32 problem with 6 positions: close?"""
    g = torch.Generator().manual_seed(0)
    grad_out, x = torch.randn(9, 7, generator=g).to(device), torch.randn(9, 5, generator=g).to(device)
    index = SparseIndex.from_flat(torch.tensor([0, 4, 11, 17, 23, 34]), (7, 5)).to(device)
    return torch.allclose(_sddmm_launch(grad_out, x, index, torch.float32),
                          sddmm_reference(grad_out, x, index, torch.float32), rtol=1e-4, atol=1e-5)


register_self_check(_sddmm_kernel, "sddmm (lightning_peft.kernels.sddmm)", _self_check)


def sddmm(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    index: SparseIndex,
    out_dtype: torch.dtype = torch.float32,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Sampled dense-dense matmul: ``(dO^T X)[row, col]`` without the dense ``(out, in)`` product.

    Args:
        grad_out: ``(..., out)`` fp32, bf16 or fp16; fp64 never runs Triton (fp64
            accumulation, for ``gradcheck``), whatever ``use_triton`` says.
        x: ``(..., in)`` with the same leading dims (flattened to ``T``).
        index: ``nnz`` positions into the ``(out, in)`` weight (``nnz = 0`` gives ``(0,)``).
        out_dtype: dtype of the result; fp32 by default (accumulation is fp32 regardless).
            :func:`~lightning_peft.kernels.sparse_linear.sparse_delta_linear` passes the
            values' dtype.
        use_triton: ``None`` auto (CUDA -> Triton), ``True`` force Triton, ``False``
            :func:`sddmm_sampled_addmm` (also the path for CPU tensors and fp64).

    Returns:
        ``(nnz,)`` ``dS[k] = sum_t dO[t, row[k]] * X[t, col[k]]`` in ``out_dtype``.

    Raises:
        ValueError: shapes that do not match the index.
    """
    g2, x2 = _flatten(grad_out, x, index)
    fp64 = torch.float64 in (
        g2.dtype,
        x2.dtype,
    )  # the kernel accumulates in fp32: fp64 stays off Triton
    if not fp64 and should_use_triton(_sddmm_kernel, g2, x2, index.row, use_triton=use_triton):
        return _sddmm_launch(g2, x2, index, out_dtype)
    return sddmm_sampled_addmm(grad_out, x, index, out_dtype)
