"""The sparse-delta layer core: what a RoSA layer and a SHiRA layer do with their sparse parts, once.

Both methods give each adapter ``a`` of a frozen weight ``W`` ``(out, in)`` a sparse delta
``S_a`` = ``nnz_a`` (position, value) pairs (RoSA: Nikdan et al., ICML 2024, arXiv 2401.04679,
section 3, next to a LoRA branch; SHiRA: Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175, alone)::

    forward (active adapters A):  y = x (W + sum_{a in A} S_a)^T + b
        one (index, values) on the union of the active masks (cached per adapter set), then
        sparse_delta_linear: W[idx] += S in place, one GEMM, exact restore, dS by SDDMM;
        positions that are whole 1 x b tiles (SHiRA tile=b; found once per adapter set): tile_delta_linear,
        the same in whole-tile copies with dS one GEMM per column block;
        training above DENSE_FALLBACK_DENSITY: dense GEMM on a merged copy, dS gathered from dW
    merge:    saved = W[idx_a]; W[idx_a] += S_a       (or a full copy when the caller adds a dense part)
    unmerge:  the saved bits written back in reverse order: W bit-identical, never a subtraction

:class:`SparseDeltaCore` is a mixin of the peft tuner layers
(:class:`~lightning_peft.methods.rosa.layer.Linear`,
:class:`~lightning_peft.methods.shira.layer.ShiraLinear`); a layer provides three facts about
its adapters (:meth:`~SparseDeltaCore.sparse_index`, :meth:`~SparseDeltaCore.sparse_values`,
:meth:`~SparseDeltaCore.base_weight_out_in`) and calls :meth:`~SparseDeltaCore.forget_masks`
whenever an index changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_peft.deltas import MergeStack, SparseTerm, WeightCopy
from lightning_peft.kernels import SparseIndex, find_tiles, sparse_delta_linear, tile_delta_linear
from lightning_peft.methods._sparse.mask import dense_fallback_density

__all__ = ["SparseDeltaCore"]


class SparseDeltaCore:
    """Mixin: the union of active masks, the sparse forward with its dense fallback, the exact merge stack."""

    # ------------------------------------------------------------------ provided by the layer
    def sparse_index(self, adapter: str) -> SparseIndex:
        """``adapter``'s ``nnz`` positions in ``(out, in)`` coordinates."""
        raise NotImplementedError

    def sparse_values(self, adapter: str) -> torch.Tensor:
        """``adapter``'s ``(nnz,)`` values with its scaling applied (differentiable)."""
        raise NotImplementedError

    def base_weight_out_in(self) -> torch.Tensor:
        """The frozen base weight as ``(out, in)`` (a transposed view for ``Conv1D``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def init_sparse_core(self) -> None:
        """Call once in the layer's ``__init__``."""
        self._union: dict[tuple, tuple[SparseIndex, list[torch.Tensor]]] = {}
        self._tiles: dict[tuple[str, ...], tuple[torch.Tensor, int] | None] = {}  # adapters -> (tiles, b) or None
        self._merges = MergeStack()  # the same exact undo stack AdapterBank switches adapters with

    def forget_masks(self) -> None:
        """Drop cached unions and tiles (an index was replaced: ``set_mask``, a state-dict load, a new adapter)."""
        self._union.clear()
        self._tiles.clear()

    # ------------------------------------------------------------------ forward
    def sparse_operands(self, adapters: list[str]) -> tuple[SparseIndex, torch.Tensor]:
        """One ``(index, values)`` for ``sum_a S_a``: the union of the masks (computed once per adapter set
        and device), values summed by ``index_add`` so each adapter's gradient is gathered from the union's."""
        if len(adapters) == 1:
            return self.sparse_index(adapters[0]), self.sparse_values(adapters[0])
        indices = [self.sparse_index(a) for a in adapters]
        key = (*adapters, indices[0].row.device)
        if key not in self._union:
            flats = [i.flat() for i in indices]  # (nnz_a,) int64 each
            union = torch.unique(torch.cat(flats))  # (n_union,) sorted
            self._union[key] = (SparseIndex.from_flat(union, indices[0].shape), [torch.searchsorted(union, f) for f in flats])
        index, positions = self._union[key]
        parts = [self.sparse_values(a) for a in adapters]
        dtype = torch.promote_types(parts[0].dtype, torch.float32)
        values = torch.zeros(index.nnz, dtype=dtype, device=index.device)
        for v, pos in zip(parts, positions, strict=True):
            values = values.index_add(0, pos, v.to(dtype))
        return index, values.to(parts[0].dtype)

    def sparse_tiles(self, adapters: list[str], index: SparseIndex) -> tuple[torch.Tensor, int] | None:
        """``(tiles (T,) int64 sorted, b)`` when ``index`` (``adapters``' positions) is whole 1 x b tiles, else ``None``.

        Found once per adapter set by :func:`~lightning_peft.kernels.find_tiles` (widest ``b`` first) and kept
        until :meth:`forget_masks`. Sorted positions are then tile by tile, so the ``(nnz,)`` values viewed as
        ``(T, b)`` are the tiles' values. Finding reads the positions, so it runs in eager code only: while
        ``torch.compile`` traces, a set not yet seen takes the unstructured path (a layer that knows its masks
        calls this eagerly when they change, e.g. :class:`~lightning_peft.methods.shira.layer.ShiraLinear`).
        """
        key = tuple(adapters)
        if key not in self._tiles:
            if torch.compiler.is_compiling():
                return None
            flat = index.flat()  # (nnz,) sorted
            self._tiles[key] = find_tiles(flat, torch.ones_like(flat, dtype=torch.bool), index.shape[1])
        found = self._tiles[key]
        if found is None or found[0].device == index.device:
            return found
        moved = (found[0].to(index.device), found[1])  # the layer moved since the tiles were found
        if not torch.compiler.is_compiling():
            self._tiles[key] = moved
        return moved

    def uses_dense_fallback(self, index: SparseIndex, values: torch.Tensor) -> bool:
        """Whether a step takes "dense GEMM + gather": training above the device's measured crossover
        density (:data:`~lightning_peft.methods._sparse.mask.DENSE_FALLBACK_DENSITY`), or a base weight
        that requires grad (a user unfroze ``W``: autograd's dense path gives it its gradient)."""
        w = self.base_weight_out_in()
        if not torch.is_grad_enabled():
            return False
        if w.requires_grad:
            return True
        return values.requires_grad and index.nnz > dense_fallback_density(w.device) * w.numel()

    def sparse_linear(
        self, x: torch.Tensor, adapters: list[str], bias: torch.Tensor | None, use_triton: bool | None = None
    ) -> torch.Tensor:
        """``x (W + sum_a S_a)^T + bias`` over ``adapters``: ``(..., in) -> (..., out)`` in ``W``'s dtype.

        Whole tiles on a contiguous ``W`` (:meth:`sparse_tiles`) take :func:`~lightning_peft.kernels.tile_delta_linear`,
        other masks :func:`~lightning_peft.kernels.sparse_delta_linear`; a step above the fallback density either way
        the dense GEMM (:meth:`uses_dense_fallback`)."""
        index, values = self.sparse_operands(adapters)
        w = self.base_weight_out_in()
        x = x.to(w.dtype)
        if self.uses_dense_fallback(index, values):
            merged = w.index_put((index.row.long(), index.col.long()), values.to(w.dtype), accumulate=True)  # (out, in)
            return F.linear(x, merged, bias)
        found = self.sparse_tiles(adapters, index) if w.is_contiguous() else None  # Conv1D's W^T view: no tile rows
        if found is not None:
            tiles, b = found
            return tile_delta_linear(x, w, values.view(-1, b), tiles, bias, use_triton=use_triton)  # values (T, b)
        return sparse_delta_linear(x, w, values, index, bias, use_triton=use_triton)

    # ------------------------------------------------------------------ compact checkpoints
    def encode_index_state(self, state_dict: dict, prefix: str) -> None:
        """Replace this layer's int32 positions in a checkpoint's ``state_dict`` (keys under ``prefix``) by
        their compact code (:func:`~lightning_peft.methods._sparse.storage.encode_index`)."""
        raise NotImplementedError

    def decode_index_state(self, state_dict: dict, prefix: str) -> None:
        """Undo :meth:`encode_index_state` in place (run as a load pre-hook, before torch copies the buffers)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ merge stack
    @torch.no_grad()
    def push_sparse_merge(self, index: SparseIndex, values: torch.Tensor, use_triton: bool | None = None) -> None:
        """``W[index] += values`` in place, saving the ``nnz`` overwritten originals for :meth:`pop_merges`."""
        self._merges.push(SparseTerm(index, values.detach()), self.base_weight_out_in().data, use_triton=use_triton)

    @torch.no_grad()
    def push_weight_copy(self) -> torch.Tensor:
        """Save a full copy of ``W`` for :meth:`pop_merges` (before a dense change); returns ``W.data`` ``(out, in)``."""
        w = self.base_weight_out_in().data
        self._merges.push(WeightCopy(), w)
        return w

    @torch.no_grad()
    def pop_merges(self, use_triton: bool | None = None) -> None:
        """Undo every pushed merge in reverse order: ``W`` gets its original bits back."""
        self._merges.pop_all(use_triton=use_triton, weight=self.base_weight_out_in().data)
