"""Multi-adapter fusion analysis: how much two adapters' weight deltas interfere.

SHiRA (Bhardwaj et al. 2024, arXiv 2406.13175, section 4.2) explains why sparse adapters
fuse with less concept loss than LoRA by the orthogonality of the adapter weights. For two
dense deltas ``A1, A2`` of one layer (each ``(out, in)``) it measures

* **AWOM** (Adapter Weight Orthogonality Magnitude) = ``|| A1^T A2 ||``, the l2 (Frobenius)
  norm of the ``(in, in)`` product: 0 when every column of ``A1`` is orthogonal to every column
  of ``A2``; lower means less interference;
* **AWOR** (Adapter Weight Orthogonality Ratio) = the sparsity ratio of ``A1^T A2``, i.e. the
  fraction of its ``in * in`` entries that are exactly 0; higher means more orthogonal.

Two sparse adapters whose masks share no row give ``A1^T A2 = 0`` (AWOM 0, AWOR 1), whatever the
values; two LoRA deltas are dense and almost never have a zero entry (AWOR ~ 0).

Note: the definitions above are this project's reading of the paper's section 4.2 (recalled,
not checked against the text while writing this module); the norm is the Frobenius norm.
:func:`mask_overlap` adds the plain fraction of shared positions of two sparse masks.
"""

from __future__ import annotations

import torch

from lightning_peft.kernels import SparseIndex

__all__ = ["awom", "awor", "mask_overlap", "orthogonality"]


def _product(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    if a1.ndim != 2 or a1.shape != a2.shape:
        raise ValueError(
            f"AWOM/AWOR compare two deltas of one layer: two (out, in) tensors of equal shape, got "
            f"{tuple(a1.shape)} and {tuple(a2.shape)}"
        )
    return a1.double().T @ a2.double()  # (in, in); fp64 so exact zeros stay zeros only when structural


def awom(a1: torch.Tensor, a2: torch.Tensor) -> float:
    """Adapter Weight Orthogonality Magnitude ``|| A1^T A2 ||_F`` of two ``(out, in)`` deltas."""
    return float(torch.linalg.matrix_norm(_product(a1, a2)))


def awor(a1: torch.Tensor, a2: torch.Tensor) -> float:
    """Adapter Weight Orthogonality Ratio: fraction of exact zeros in ``A1^T A2`` (``in * in`` entries)."""
    p = _product(a1, a2)
    return float((p == 0).sum()) / p.numel()


def mask_overlap(i1: SparseIndex, i2: SparseIndex) -> float:
    """``|M1 & M2| / min(|M1|, |M2|)``: share of the smaller mask's positions that the other also trains."""
    if tuple(i1.shape) != tuple(i2.shape):
        raise ValueError(f"mask_overlap needs masks of one layer, got shapes {i1.shape} and {i2.shape}")
    if min(i1.nnz, i2.nnz) == 0:
        return 0.0
    shared = torch.isin(i1.flat(), i2.flat().to(i1.row.device)).sum()
    return float(shared) / min(i1.nnz, i2.nnz)


def orthogonality(deltas1: dict[str, torch.Tensor], deltas2: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean AWOM and AWOR over the layers two adapters share (dense ``(out, in)`` deltas by layer name).

    Returns:
        ``{"awom": mean AWOM, "awor": mean AWOR, "layers": number of shared layers}``.

    Raises:
        ValueError: the adapters share no layer.
    """
    shared = sorted(set(deltas1) & set(deltas2))
    if not shared:
        raise ValueError("the two adapters adapt no common layer; AWOM/AWOR compare deltas of the same layer")
    m = [awom(deltas1[k], deltas2[k]) for k in shared]
    r = [awor(deltas1[k], deltas2[k]) for k in shared]
    return {"awom": sum(m) / len(m), "awor": sum(r) / len(r), "layers": float(len(shared))}
