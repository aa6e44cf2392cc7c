"""SHiRA masks (Bhardwaj et al. 2024, arXiv 2406.13175, section 3.1): which ``nnz`` weights train.

Every builder returns a :class:`~lightning_peft.kernels.SparseIndex` with **exactly** the
layer's budget ``nnz`` (``round(density * out * in)``, or ``r * (out + in)``):

==========  ==================================================================================
``random``  uniform (SHiRA-Rand, HF peft's only mask): ``random_mask`` seeded per layer
``struct``  every f-th row and every f-th column plus the main diagonal (SHiRA-Struct), see
            :func:`struct_mask` for how f is chosen and how the count is made exact
``wm``      top ``|W|`` (SHiRA-WM)
``grad``    top ``sqrt(mean_b g_b^2)`` over calibration batches (SHiRA-Grad; the RMS is used
            instead of the signed mean so gradients of opposite sign do not cancel)
``snip``    top ``|W| * sqrt(mean_b g_b^2)`` (SHiRA-SNIP, Lee et al. 2019's ``|W * dL/dW|``
            with the same RMS gradient)
==========  ==================================================================================

Ties are broken by the lower flat index (``topk_mask``), so every mask is deterministic.

With ``tile=b`` (:func:`~lightning_peft.methods._sparse.tile_mask`, shared with RoSA) the same scores choose whole
1 x b runs along ``in`` instead of single entries: each tile's score is the sum of its ``b`` entries' scores, the
``nnz // b`` best tiles are kept (``random``: uniform tiles), so an ``AdapterBank`` switches the adapter by
contiguous tile copies (SMT, Sparse Matrix Tuning, ICLR 2025, selects and switches blocks the same way).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch

from lightning_peft.kernels import SparseIndex
from lightning_peft.methods._sparse import check_tiles, nnz_for, random_mask, tile_mask, tile_nnz, topk_mask

__all__ = ["build_mask", "layer_nnz", "pad_index", "struct_mask", "tile_mask"]


def layer_nnz(out_features: int, in_features: int, density: float, r: int | None = None, tile: int | None = None,
              name: str = "") -> int:
    """The layer's exact budget: ``r * (out + in)`` if ``r`` else ``round(density * out * in)`` (>= 1).

    With ``tile=b`` the budget is whole tiles: ``max(1, nnz // b) * b`` (:func:`~lightning_peft.methods._sparse.tile_nnz`,
    rounded down, so it never exceeds peft's ``r * (in + out)`` slots; at most ``b - 1`` entries below the
    unstructured budget).

    Raises:
        ValueError: the budget exceeds the layer (``nnz > out * in``), or ``b`` does not divide ``in`` (the message
            names the layer ``name``).
    """
    numel = out_features * in_features
    nnz = r * (out_features + in_features) if r is not None else nnz_for(density, numel)
    nnz = tile_nnz(nnz, (out_features, in_features), tile, "SHiRA", name)
    if nnz > numel:
        raise ValueError(
            f"SHiRA r={r} asks for r * (in + out) = {nnz} trainable entries in a {out_features}x{in_features} layer "
            f"that has only {numel}; lower r (at most {numel // (out_features + in_features)}) or use density="
        )
    return nnz


def _density(nnz: int, numel: int) -> float:
    return nnz / numel  # round(nnz / numel * numel) == nnz for every numel < 2**52


def _struct_count(out_f: int, in_f: int, f: int) -> int:
    """Entries of the union {rows 0, f, 2f, ...} | {cols 0, f, 2f, ...} | diagonal, counted exactly."""
    nr, nc = math.ceil(out_f / f), math.ceil(in_f / f)
    rows_cols = nr * in_f + nc * out_f - nr * nc
    diag = min(out_f, in_f)
    on_grid = sum(1 for i in range(0, diag) if i % f == 0)  # diagonal entries already on a chosen row
    return rows_cols + diag - on_grid


def struct_mask(shape: tuple[int, int], nnz: int) -> SparseIndex:
    """SHiRA-Struct: every f-th row and column plus the diagonal, with exactly ``nnz`` entries.

    The paper trains "a few rows and columns plus the diagonal" (the diagonal makes the delta
    full rank). Here rows ``0, f, 2f, ...`` and columns ``0, f, 2f, ...`` of the ``(out, in)``
    weight plus ``(i, i)`` for ``i < min(out, in)``; ``f >= 1`` is the one whose count is closest
    to ``nnz`` (ties: the smaller f). The count is then made exact,
    deterministically:

    * too many: drop chosen off-diagonal entries with the largest flat index ``row * in + col``
      (then diagonal entries from the bottom if even the diagonal exceeds ``nnz``);
    * too few: add unchosen entries in ascending flat index (i.e. fill the top rows).

    Example: ``(6, 6)`` with ``nnz = 24``: f = 3 (rows 0 and 3, columns 0 and 3: 20 entries, plus
    the diagonal entries (1,1), (2,2), (4,4), (5,5)) and f = 4 both count 24; f = 3 is taken.

    Args:
        shape: ``(out, in)``.
        nnz: Exact number of entries, in ``[1, out * in]``.

    Returns:
        A CPU :class:`SparseIndex` with ``nnz`` entries.
    """
    out_f, in_f = int(shape[0]), int(shape[1])
    best = min(range(1, max(out_f, in_f) + 1), key=lambda f: (abs(_struct_count(out_f, in_f, f) - nnz), f))
    grid = torch.zeros(out_f, in_f, dtype=torch.bool)
    grid[::best, :] = True
    grid[:, ::best] = True
    diag = torch.zeros_like(grid)
    k = min(out_f, in_f)
    diag[torch.arange(k), torch.arange(k)] = True
    grid &= ~diag  # off-diagonal structured entries
    diag_flat = diag.reshape(-1).nonzero().squeeze(1)  # ascending
    off_flat = grid.reshape(-1).nonzero().squeeze(1)  # ascending
    if diag_flat.numel() >= nnz:
        chosen = diag_flat[:nnz]
    elif diag_flat.numel() + off_flat.numel() >= nnz:
        chosen = torch.cat([diag_flat, off_flat[: nnz - diag_flat.numel()]])
    else:
        taken = diag | grid
        free = (~taken).reshape(-1).nonzero().squeeze(1)[: nnz - int(taken.sum())]
        chosen = torch.cat([diag_flat, off_flat, free])
    return SparseIndex.from_flat(chosen, (out_f, in_f))


def _as_index(result: Any, shape: tuple[int, int], nnz: int, who: str) -> SparseIndex:
    if isinstance(result, torch.Tensor) and result.dtype == torch.bool:
        result = SparseIndex.from_mask(result.cpu())
    if not isinstance(result, SparseIndex):
        raise TypeError(
            f"{who} must return a SparseIndex or a bool (out, in) mask, got {type(result).__name__}; "
            "return e.g. SparseIndex.from_mask(scores >= threshold)"
        )
    if tuple(result.shape) != tuple(shape):
        raise ValueError(f"{who} returned a mask for shape {tuple(result.shape)}, the layer is {tuple(shape)}")
    if result.nnz != nnz:
        raise ValueError(
            f"{who} returned {result.nnz} positions for a {shape[0]}x{shape[1]} layer whose budget is exactly {nnz} "
            "(round(density * numel), or r * (in + out)); return exactly that many (e.g. via topk_mask)"
        )
    return result


def _scores(kind: str, weight: torch.Tensor, stats: torch.Tensor | None, name: str) -> torch.Tensor:
    """``(out, in)`` CPU scores of a ``wm``/``grad``/``snip`` mask (larger is kept first)."""
    if kind == "wm":
        return weight.detach().float().abs().cpu()
    if stats is None:
        raise ValueError(
            f"SHiRA mask={kind!r} needs gradient statistics of layer {name!r}, which were not collected; "
            "train with Trainer.fit (calibration runs at on_train_start) or pick mask='wm'/'random'/'struct'"
        )
    score = stats.float().sqrt().cpu()
    return score * weight.detach().float().abs().cpu() if kind == "snip" else score


def build_mask(
    kind: str | Callable[..., Any],
    weight: torch.Tensor,
    nnz: int,
    *,
    stats: torch.Tensor | None = None,
    seed: int = 0,
    name: str = "",
    tile: int | None = None,
) -> SparseIndex:
    """The ``nnz`` positions of one layer's adapter.

    Args:
        kind: ``random`` / ``struct`` / ``wm`` / ``grad`` / ``snip`` or a callable
            ``(weight, stats) -> SparseIndex | bool mask``.
        weight: ``(out, in)`` frozen base weight.
        nnz: Exact budget of the layer (a multiple of ``tile`` when tiled, see :func:`layer_nnz`).
        stats: ``(out, in)`` mean squared gradient over the calibration batches (``grad``,
            ``snip``; passed to callables, possibly ``None``).
        seed: Random-mask seed; the layer's ``name`` is hashed (crc32) into it so layers differ.
        name: Module name of the layer.
        tile: ``None``: single entries. ``b``: whole 1 x b tiles chosen by the summed score (:func:`tile_mask`).

    Returns:
        A CPU :class:`SparseIndex` with exactly ``nnz`` entries, sorted row-major.

    Raises:
        ValueError: ``grad``/``snip`` without ``stats``; a callable returning another count (or, tiled,
            positions that are not whole tiles); ``struct`` with a tile.
    """
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    numel = shape[0] * shape[1]
    if callable(kind):
        who = f"the SHiRA mask function {getattr(kind, '__name__', kind)!r}"
        index = _as_index(kind(weight, stats), shape, nnz, who)
        return index if tile is None else check_tiles(index, tile, who)
    if kind not in ("random", "struct", "wm", "grad", "snip"):
        raise ValueError(f"unknown SHiRA mask {kind!r}; use random, struct, wm, grad, snip or a callable")
    if kind == "struct" and tile is not None:
        raise ValueError(f"SHiRA mask='struct' cannot be tiled (tile={tile}); use wm/grad/snip/random or tile=None")
    g = torch.Generator().manual_seed((int(seed) + zlib.crc32(name.encode())) % 2**63)
    if tile is not None:
        scores = torch.rand(shape, generator=g) if kind == "random" else _scores(kind, weight, stats, name)
        index = tile_mask(scores, nnz, tile)
    elif kind == "random":
        index = random_mask(shape, _density(nnz, numel), g)
    elif kind == "struct":
        index = struct_mask(shape, nnz)
    else:
        index = topk_mask(_scores(kind, weight, stats, name), _density(nnz, numel))
    if index.nnz != nnz:  # pragma: no cover - guards the density round trip above
        raise RuntimeError(f"SHiRA mask {kind!r} gave {index.nnz} entries instead of {nnz}")
    return index.to("cpu")


def pad_index(index: SparseIndex, total: int) -> torch.Tensor:
    """``(2, total)`` int32 index: ``index``'s entries first, then ``total - nnz`` padding positions.

    peft's shira format holds ``r * (in + out)`` entries per layer for one ``r`` per adapter; a
    layer whose budget is smaller is padded with the first positions (ascending flat index) not
    in the mask. Their values are saved as exact zeros, so the delta is unchanged.

    Raises:
        ValueError: ``total`` is below ``index.nnz`` or above the layer size.
    """
    out_f, in_f = index.shape
    if not index.nnz <= total <= out_f * in_f:
        raise ValueError(f"cannot pad a {index.nnz}-entry mask of a {out_f}x{in_f} layer to {total} entries")
    head = torch.stack([index.row, index.col]).to(torch.int32)  # (2, nnz)
    if total == index.nnz:
        return head
    taken = torch.zeros(out_f * in_f, dtype=torch.bool, device=index.row.device)
    taken[index.flat()] = True
    free = (~taken).nonzero().squeeze(1)[: total - index.nnz]  # ascending flat positions
    tail = torch.stack([free // in_f, free % in_f]).to(torch.int32)
    return torch.cat([head, tail], dim=1)
