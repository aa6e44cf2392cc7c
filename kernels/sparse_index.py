"""The sparse index format shared by every sparse op: sorted row-major COO with int32 indices.

A sparse delta ``S`` of a weight ``W`` of shape ``(out, in)`` is stored as

* ``values``: ``(nnz,)`` any float dtype (owned by the adapter, trainable), and
* a :class:`SparseIndex` ``(row, col, shape)`` with ``row``/``col`` ``(nnz,)`` ``int32``,
  sorted row-major (strictly increasing ``row * in + col``, so no duplicates).

Why COO and not CSR: every kernel here is element-parallel over ``nnz`` (SDDMM, scatter),
so each program wants ``(row[k], col[k])`` directly; CSR would need a search over ``crow``
per element. Row-major order keeps the CSR information recoverable (:meth:`SparseIndex.crow`)
and makes consecutive entries hit the same row of ``W`` / the same column of ``dO``, which
is what cache lines reward. Why ``int32``: 8 bytes per nonzero instead of 16 for two int64
(RoSA stores int32 row offsets + int16 columns for the same reason); any dimension below
``2**31`` fits, and kernels widen to int64 before multiplying by strides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseIndex"]

_INDEX_DTYPE = torch.int32


@dataclass(frozen=True)
class SparseIndex:
    """Positions of the nonzeros of a sparse ``(out, in)`` delta, sorted row-major.

    Attributes:
        row: ``(nnz,)`` int32 row of each nonzero.
        col: ``(nnz,)`` int32 column of each nonzero.
        shape: ``(out, in)`` of the dense weight the index addresses.
    """

    row: torch.Tensor
    col: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.row.ndim != 1 or self.col.ndim != 1 or self.row.numel() != self.col.numel():
            raise ValueError(
                f"SparseIndex needs 1-D row and col of equal length, got shapes {tuple(self.row.shape)} "
                f"and {tuple(self.col.shape)}; build it with SparseIndex.from_mask or SparseIndex.from_flat."
            )
        if self.row.dtype != _INDEX_DTYPE or self.col.dtype != _INDEX_DTYPE:
            raise ValueError(
                f"SparseIndex row/col must be int32, got {self.row.dtype}/{self.col.dtype}; "
                "build it with SparseIndex.from_mask or SparseIndex.from_flat, which convert."
            )
        if len(self.shape) != 2 or min(self.shape) < 0 or max(self.shape) >= 2**31:
            raise ValueError(f"SparseIndex shape must be (out, in) with each dim < 2**31, got {self.shape}.")

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> SparseIndex:
        """Index of the ``True`` entries of a boolean ``(out, in)`` mask (row-major order).

        Args:
            mask: ``(out, in)`` bool tensor; ``mask.sum()`` is ``nnz`` (0 allowed).

        Raises:
            ValueError: ``mask`` is not a 2-D bool tensor.
        """
        if mask.dtype != torch.bool or mask.ndim != 2:
            raise ValueError(
                f"from_mask needs a 2-D bool mask, got dtype {mask.dtype} with {mask.ndim} dims; "
                "pass e.g. `scores.abs() >= threshold`."
            )
        # nonzero() already returns row-major order.
        rc = mask.nonzero()  # (nnz, 2) int64
        return cls(rc[:, 0].to(_INDEX_DTYPE), rc[:, 1].to(_INDEX_DTYPE), (mask.shape[0], mask.shape[1]))

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: tuple[int, int]) -> SparseIndex:
        """Index from flat positions ``row * in + col`` into a contiguous ``(out, in)`` weight.

        The positions may come in any order; they are sorted here.

        Args:
            flat: ``(nnz,)`` integer positions in ``[0, out * in)``, no duplicates.
            shape: ``(out, in)``.

        Raises:
            ValueError: positions out of range or duplicated.
        """
        out_f, in_f = int(shape[0]), int(shape[1])
        flat = flat.reshape(-1).to(torch.int64)
        if flat.numel():
            flat = flat.sort().values
            if int(flat[0]) < 0 or int(flat[-1]) >= out_f * in_f:
                raise ValueError(
                    f"flat indices must lie in [0, {out_f * in_f}) for shape {(out_f, in_f)}, "
                    f"got range [{int(flat[0])}, {int(flat[-1])}]."
                )
            if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
                raise ValueError("flat indices contain duplicates; a sparse delta needs each position once.")
        return cls((flat // in_f).to(_INDEX_DTYPE), (flat % in_f).to(_INDEX_DTYPE), (out_f, in_f))

    # ------------------------------------------------------------------ views
    @property
    def nnz(self) -> int:
        """Number of nonzeros."""
        return self.row.numel()

    @property
    def device(self) -> torch.device:
        """Device the index tensors live on."""
        return self.row.device

    def flat(self) -> torch.Tensor:
        """``(nnz,)`` int64 positions ``row * in + col`` (sorted ascending)."""
        return self.row.to(torch.int64) * self.shape[1] + self.col.to(torch.int64)

    def offsets(self, stride_out: int, stride_in: int) -> torch.Tensor:
        """``(nnz,)`` int64 storage offsets ``row * stride_out + col * stride_in`` of the entries in a weight
        with these strides; computed once per stride pair and kept (8 B/nnz), since switching reads them
        on every call."""
        cache = self.__dict__.setdefault("_offsets", {})  # frozen dataclass: a plain attribute cache
        key = (int(stride_out), int(stride_in))
        if key not in cache:
            cache[key] = self.row.to(torch.int64).mul_(key[0]).add_(self.col, alpha=key[1])
        return cache[key]

    @property
    def nbytes(self) -> int:
        """Bytes this index holds: ``row``, ``col`` and the offsets cached by :meth:`offsets`."""
        held = [self.row, self.col, *self.__dict__.get("_offsets", {}).values()]
        return sum(t.numel() * t.element_size() for t in held)

    def crow(self) -> torch.Tensor:
        """``(out + 1,)`` int64 CSR row offsets (``col`` is already the CSR column array)."""
        counts = torch.bincount(self.row.to(torch.int64), minlength=self.shape[0])
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def to_mask(self) -> torch.Tensor:
        """Dense ``(out, in)`` bool mask (allocates ``out * in`` bytes: tests and debugging only)."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        mask[self.row.long(), self.col.long()] = True
        return mask

    def to(self, device: torch.device | str) -> SparseIndex:
        """The same index on ``device``."""
        return SparseIndex(self.row.to(device), self.col.to(device), self.shape)

    def check_weight(self, weight: torch.Tensor) -> None:
        """Raise a ``ValueError`` unless ``weight`` is the ``(out, in)`` tensor this index addresses."""
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(
                f"sparse index built for a {self.shape} weight applied to a weight of shape "
                f"{tuple(weight.shape)}; rebuild the index for this layer."
            )

    def check_values(self, values: torch.Tensor) -> None:
        """Raise a ``ValueError`` unless ``values`` is ``(nnz,)``."""
        if values.ndim != 1 or values.numel() != self.nnz:
            raise ValueError(
                f"sparse values must have shape ({self.nnz},) to match the index, got {tuple(values.shape)}."
            )
