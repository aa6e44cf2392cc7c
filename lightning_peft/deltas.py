"""Weight deltas as terms, and the one stack that undoes them exactly.

An adapter's change of one frozen weight ``W`` is a sum of *terms*; :class:`AdapterBank
<lightning_peft.bank.AdapterBank>` switches adapters by applying and restoring them, and the
sparse-delta layer core (:class:`~lightning_peft.methods._sparse.SparseDeltaCore`) merges its
adapters the same way. A term is a small protocol (:class:`DeltaTerm`):

=============  ==========================================================================
``apply``      ``W += alpha * delta`` in place; returns what ``restore`` needs
``restore``    undo one ``apply`` (bit-exact, except :class:`LowRankTerm` undone by subtraction)
``dense``      the ``(rows, cols)`` delta as a dense tensor (analysis, fusion statistics)
``to``         the same term on another device
``shape``      the ``(rows, cols)`` of the weight it is made for
``nbytes``     the bytes the term holds (values and positions)
``linear_add`` ``y[rows] += alpha * x[rows] delta^T``: the delta's share of a linear layer's output, ``W`` unfused
               (a batch whose rows name different adapters, :meth:`AdapterBank.mixed <lightning_peft.AdapterBank.mixed>`)
=============  ==========================================================================

Terms here: :class:`SparseTerm` (``W[index] += values``: SHiRA, RoSA's ``S``; its undo writes the
``nnz`` saved originals back), :class:`TileTerm` (the same for a tile-structured mask, 1 x b runs along
``in``: whole tiles gathered, added and copied back, :mod:`lightning_peft.kernels.tiles`; picked by
:func:`sparse_term` whenever a delta's positions form whole tiles), :class:`LowRankTerm` (``W += scale * B @ A``: LoRA, RoSA's low-rank
part; undone from a saved copy of ``W``, or by subtracting as peft's ``unmerge`` does) and
:class:`WeightCopy` (no change: saves ``W`` before a caller changes it densely). :class:`MergeStack`
keeps what each ``apply`` saved and restores in reverse order, so ``W`` comes back bit-exactly
whatever was applied on top of what; its ``replace`` (a switch: undo all, apply the next) does the same per
weight in turn and hands restored tile buffers back to the next tile apply (``out=``, no allocation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lightning_peft.kernels import (
    SparseIndex,
    expand_tiles,
    find_tiles,
    scatter_add,
    scatter_restore,
    tile_add,
    tile_linear_add,
    tile_restore,
    tile_span,
)

__all__ = [
    "DeltaTerm",
    "LowRankTerm",
    "MergeStack",
    "SparseTerm",
    "TileTerm",
    "WeightCopy",
    "lora_scale",
    "sparse_term",
]


class DeltaTerm(Protocol):
    """One additive change of one weight (see the module docstring)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def apply(self, weight: torch.Tensor, alpha: float = 1.0, *, use_triton: bool | None = None,
              copy_undo: bool = True) -> Any: ...

    def restore(self, weight: torch.Tensor, saved: Any, *, use_triton: bool | None = None) -> None: ...

    def dense(self, dtype: torch.dtype) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> DeltaTerm: ...

    @property
    def nbytes(self) -> int: ...

    def linear_add(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0) -> None: ...


@dataclass(frozen=True)
class SparseTerm:
    """A sparse delta of one weight: ``W[index] += alpha * values`` (the method's scaling already applied)."""

    index: SparseIndex
    values: torch.Tensor  # (nnz,)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index.shape)

    def apply(self, weight: torch.Tensor, alpha: float = 1.0, *, use_triton: bool | None = None,
              copy_undo: bool = True) -> torch.Tensor:
        """``scatter_add`` (fp32 sum, one rounding to ``W``'s dtype); returns the ``nnz`` overwritten originals."""
        return scatter_add(weight, self.index, self.values, float(alpha), use_triton=use_triton)

    def restore(self, weight: torch.Tensor, saved: torch.Tensor, *, use_triton: bool | None = None) -> None:
        scatter_restore(weight, self.index, saved, use_triton=use_triton)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(self.index.shape, dtype=dtype, device=self.values.device)
        out[self.index.row.long(), self.index.col.long()] = self.values.to(dtype)
        return out

    def to(self, device: torch.device | str) -> SparseTerm:
        return SparseTerm(self.index.to(device), self.values.to(device))

    def linear_add(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0) -> None:
        """``y[rows] += alpha * x[rows] S^T``: the entries as tiles of width 1 (:func:`~lightning_peft.kernels.tile_linear_add`)."""
        flat, values = self.index.offsets(self.index.shape[1], 1), self.values.view(-1, 1)  # (nnz,), (nnz, 1)
        tile_linear_add(y, x, flat, values if alpha == 1.0 else values * alpha, rows)

    @property
    def nbytes(self) -> int:
        """Values plus int32 row and column (plus int64 offsets once a switch has cached them)."""
        return self.values.numel() * self.values.element_size() + self.index.nbytes


@dataclass(frozen=True)
class TileTerm:
    """A tile-structured sparse delta: ``W.view(-1, b)[tiles] += alpha * values`` (as SMT, ICLR 2025, switches blocks).

    The positions are whole 1 x b runs along ``in`` (:mod:`lightning_peft.kernels.tiles`), so apply and
    restore move whole rows of a ``(-1, b)`` view: contiguous 64-256 byte runs instead of one cache line per
    entry. Held: ``8 / b`` bytes of index per value (int64 tile numbers, what the CPU row ops take fastest)
    against a :class:`SparseTerm`'s 8-16.
    """

    tiles: torch.Tensor  # (T,) int64 tile numbers, sorted
    values: torch.Tensor  # (T, b), the method's scaling applied
    shape: tuple[int, int]
    span: tuple[int, int] | None = field(init=False, repr=False, compare=False)  # tile_span(tiles), once

    def __post_init__(self) -> None:
        object.__setattr__(self, "span", tile_span(self.tiles))

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    def apply(self, weight: torch.Tensor, alpha: float = 1.0, *, use_triton: bool | None = None,
              copy_undo: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather the ``T`` tiles (returned, for ``restore``; into ``out`` if given, see :meth:`saved_key`), then
        add ``alpha * values`` into them."""
        return tile_add(weight, self.tiles, self.values, float(alpha), out=out, span=self.span)

    def restore(self, weight: torch.Tensor, saved: torch.Tensor, *, use_triton: bool | None = None) -> None:
        tile_restore(weight, self.tiles, saved, span=self.span)

    def saved_key(self, weight: torch.Tensor) -> tuple:
        """What ``apply`` on ``weight`` saves, as ``(shape, dtype, device)``: a restored ``saved`` of the same key
        may be passed back as ``apply``'s ``out`` (:meth:`MergeStack.replace` recycles them so)."""
        return tuple(self.values.shape), weight.dtype, weight.device

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype, device=self.values.device)
        out.view(-1, self.width)[self.tiles] = self.values.to(dtype)
        return out

    def to(self, device: torch.device | str) -> TileTerm:
        return TileTerm(self.tiles.to(device), self.values.to(device), self.shape)

    def linear_add(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0) -> None:
        """``y[rows] += alpha * x[rows] S^T`` by :func:`~lightning_peft.kernels.tile_linear_add`."""
        tile_linear_add(y, x, self.tiles, self.values if alpha == 1.0 else self.values * alpha, rows)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.tiles.numel() * self.tiles.element_size()


@dataclass(frozen=True)
class LowRankTerm:
    """A low-rank delta of one weight: ``W += scale * B @ A`` (transposed for fan_in_fan_out layers)."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    def apply(self, weight: torch.Tensor, alpha: float = 1.0, *, use_triton: bool | None = None,
              copy_undo: bool = True) -> tuple[torch.Tensor, bool]:
        """A dense ``(out, in)`` GEMM and add over every element, rounded once to ``W``'s dtype.

        With ``copy_undo`` the undo is a saved copy of ``W`` (bit-exact, one weight of memory), else
        the delta itself is kept and subtracted (peft's ``unmerge``: ~1 ulp errors that accumulate).
        """
        delta = self.dense(torch.float32) * float(alpha)
        saved = weight.clone() if copy_undo else delta
        weight.copy_((weight.float() + delta).to(weight.dtype))
        return saved, copy_undo

    def restore(self, weight: torch.Tensor, saved: tuple[torch.Tensor, bool], *, use_triton: bool | None = None) -> None:
        tensor, copied = saved
        weight.copy_(tensor if copied else (weight.float() - tensor).to(weight.dtype))

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        d = (self.B.float() @ self.A.float()) * self.scale  # (out, in), the dense GEMM of a LoRA merge
        return (d.T if self.transpose else d).to(dtype)

    def to(self, device: torch.device | str) -> LowRankTerm:
        return LowRankTerm(self.A.to(device), self.B.to(device), self.scale, self.transpose)

    def linear_add(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0) -> None:
        """``y[rows] += alpha * scale * (x[rows] A^T) B^T``: LoRA's unmerged branch (an ``nn.Linear`` layout only)."""
        if self.transpose:
            raise ValueError("LowRankTerm.linear_add computes x (B A)^T for an nn.Linear weight (out, in); this term is "
                             "for a fan_in_fan_out (Conv1D) weight: apply it with AdapterBank.activate instead")
        y.index_add_(0, rows, (x.index_select(0, rows) @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T,
                     alpha=alpha * self.scale)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B))


@dataclass(frozen=True)
class WeightCopy:
    """No change: saves all of ``W`` so that a caller may then change it densely (restored from the copy)."""

    def apply(self, weight: torch.Tensor, alpha: float = 1.0, *, use_triton: bool | None = None,
              copy_undo: bool = True) -> torch.Tensor:
        return weight.clone()

    def restore(self, weight: torch.Tensor, saved: torch.Tensor, *, use_triton: bool | None = None) -> None:
        weight.copy_(saved)


def _storage(weight: torch.Tensor) -> tuple:
    """Which memory ``weight`` lives in: changes of different storages commute, of one storage they do not."""
    return weight.device, weight.untyped_storage().data_ptr()


def _saved_key(saved: Any) -> tuple | None:
    return (tuple(saved.shape), saved.dtype, saved.device) if isinstance(saved, torch.Tensor) else None


@dataclass
class MergeStack:
    """What each in-place change of a weight saved, undone in reverse order (:meth:`pop_all`)."""

    entries: list[tuple[Any, torch.Tensor, Any]] = field(default_factory=list)  # (term, weight, saved)

    def push(self, term: Any, weight: torch.Tensor, alpha: float = 1.0, *, use_triton: bool | None = None,
             copy_undo: bool = True) -> None:
        """``term.apply`` on ``weight`` (in place), remembering what undoes it."""
        self.entries.append((term, weight, term.apply(weight, alpha, use_triton=use_triton, copy_undo=copy_undo)))

    def pop_all(self, *, use_triton: bool | None = None, weight: torch.Tensor | None = None) -> None:
        """Undo every pushed change, last first: the weights get their original bits back.

        Args:
            use_triton: Scatter dispatch (``None``: Triton on CUDA, PyTorch on CPU).
            weight: Restore onto this tensor instead of the one each change was applied to (a layer's one
                weight, which may have moved since, e.g. by ``.to(device)``).
        """
        while self.entries:
            term, applied_to, saved = self.entries.pop()
            term.restore(applied_to if weight is None else weight, saved, use_triton=use_triton)

    def replace(self, changes: list[tuple[Any, torch.Tensor, float]], *, use_triton: bool | None = None,
                copy_undo: bool = True) -> None:
        """:meth:`pop_all`, then :meth:`push` each ``(term, weight, alpha)`` of ``changes``: the same bits, done
        weight by weight and without allocating where it can (a switch from one adapter to the next).

        Changes of different storages commute, so each storage is finished in turn: its entries undone last first,
        then the new changes of it applied in order (what ``pop_all`` and the pushes do to that storage), while its
        tiles are still in the cache and TLB. A restored tile term's ``saved`` goes to a pool keyed by
        ``(shape, dtype, device)`` that the next apply of a term with a matching ``saved_key`` writes into (``out=``);
        the pool lives for this call only, so the memory held never exceeds what the stack held before.
        If a change raises, the stack still undoes exactly what has been applied (unrestored old entries kept).
        """
        old, self.entries = self.entries, []
        undo: dict[tuple, list[int]] = {}  # storage -> indices into old, in push order
        for i, (_, applied_to, _) in enumerate(old):
            undo.setdefault(_storage(applied_to), []).append(i)
        todo: dict[tuple, list[tuple[Any, torch.Tensor, float]]] = {}
        for change in changes:
            todo.setdefault(_storage(change[1]), []).append(change)
        pool: dict[tuple, list[torch.Tensor]] = {}
        restored = [False] * len(old)
        try:
            for key in list(todo) + [k for k in undo if k not in todo]:
                for i in reversed(undo.get(key, ())):
                    term, applied_to, saved = old[i]
                    term.restore(applied_to, saved, use_triton=use_triton)
                    restored[i] = True
                    if hasattr(term, "saved_key") and (k := _saved_key(saved)) is not None:
                        pool.setdefault(k, []).append(saved)
                for term, weight, alpha in todo.get(key, ()):
                    spare = pool.get(term.saved_key(weight)) if hasattr(term, "saved_key") else None
                    kw = {"out": spare.pop()} if spare else {}
                    self.entries.append((term, weight, term.apply(weight, alpha, use_triton=use_triton,
                                                                   copy_undo=copy_undo, **kw)))
        except BaseException:
            self.entries = [e for e, done in zip(old, restored) if not done] + self.entries
            raise

    def __len__(self) -> int:
        return len(self.entries)


def sparse_term(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], path: str) -> SparseTerm | TileTerm:
    """The term of ``(2, n)`` positions and ``(n,)`` values: a :class:`TileTerm` when the nonzero entries lie in
    whole tiles (:func:`~lightning_peft.kernels.find_tiles`), else a :class:`SparseTerm` with exact zeros dropped
    (e.g. peft-format padding), sorted row-major.

    Raises:
        ValueError: an index lies outside ``shape`` (an adapter made for a larger weight).
    """
    idx = indices.long()
    if idx.numel() and (int(idx[0].max()) >= shape[0] or int(idx[1].max()) >= shape[1]):
        raise ValueError(
            f"AdapterBank.add: the adapter's {path} indexes entries up to ({int(idx[0].max())}, {int(idx[1].max())}), "
            f"outside this model's {shape[0]} x {shape[1]} weight; add adapters trained on this base"
        )
    flat = idx[0] * shape[1] + idx[1]  # (n,)
    found = find_tiles(flat, values != 0, shape[1])
    if found is not None:
        tiles, b = found
        grid = values.new_zeros(tiles.numel() * b)  # (T * b,) in tile order
        inside = torch.isin(flat, expand_tiles(tiles, b))  # padding outside the tiles holds zeros only
        pos = torch.searchsorted(tiles, flat[inside] // b) * b + flat[inside] % b
        grid[pos] = values[inside].detach()
        return TileTerm(tiles, grid.view(-1, b), (int(shape[0]), int(shape[1])))
    keep = values != 0
    flat, vals = flat[keep], values[keep]
    order = torch.argsort(flat)
    return SparseTerm(SparseIndex.from_flat(flat[order], shape), vals[order].detach().clone())


def lora_scale(config: Any, r: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of a LoRA folder's config.

    Raises:
        ValueError: per-module ranks or alphas (``rank_pattern``/``alpha_pattern``).
    """
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ValueError("AdapterBank reads LoRA folders with one r and alpha only (rank_pattern/alpha_pattern are set)")
    return config.lora_alpha / (r**0.5 if config.use_rslora else r)
