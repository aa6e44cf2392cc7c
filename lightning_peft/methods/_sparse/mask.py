"""Masks of the sparse-delta core: how many entries (``nnz``), which ones, and when dense wins.

* ``nnz = round(density * out * in)``, at least 1 (:func:`nnz_for`), the budget of both RoSA
  (Nikdan et al., ICML 2024, arXiv 2401.04679, section 3) and SHiRA's density form (Bhardwaj et al.,
  NeurIPS 2024, arXiv 2406.13175);
* :func:`topk_mask` (RoSA's Fisher mask, SHiRA-WM/Grad/SNIP) and :func:`random_mask` (SHiRA-Rand);
* tiles (``tile=b``, RoSA and SHiRA alike): :func:`check_tile` (the config rule), :func:`tile_nnz` (the budget in
  whole tiles), :func:`tile_mask` (the best tiles by pooled score) and :func:`check_tiles` (a custom mask's tiles);
* :data:`DENSE_FALLBACK_DENSITY`: above it a training step takes "dense GEMM + gather" instead of
  SDDMM (:meth:`~lightning_peft.methods._sparse.core.SparseDeltaCore.sparse_linear`).
"""

from __future__ import annotations

import torch

from lightning_peft.kernels import TILE_WIDTHS, SparseIndex, expand_tiles

__all__ = [
    "DENSE_FALLBACK_DENSITY",
    "check_density",
    "check_tile",
    "check_tiles",
    "dense_fallback_density",
    "nnz_for",
    "random_mask",
    "tile_mask",
    "tile_nnz",
    "topk_mask",
]

# Density above which a *training* step uses dense GEMM + gather instead of SDDMM for dS, per
# device type (RoSA, Nikdan et al. 2024; its SDDMM kernels IST-DASLab/spops).
# cpu: benchmarks/sparse_ops.py, train_step_ms_vs_dense_fallback (fwd + dX + dS, fp32, W 1024x1024
#   and 2048x1024, T 256/1024, 2 cores; two quiet runs in benchmarks/results.csv): the sparse path
#   takes 0.61-1.20x the dense fallback's time up to d = 5% (median 0.82x), 0.87-1.34x at 10%
#   (median ~1.0x) and 0.94-1.61x at 20%. The crossover is about 10%, and below it the sparse
#   path also never allocates the dense (out, in) gradient: 0.1.
# cuda: the RoSA paper's kernels' range, "~3%" (SDDMM target <= 0.4x cuBLAS dW at 1%, <= 0.8x at 2%). NOT measured
#   here: no GPU was lent yet; re-run benchmarks/sparse_ops.py on one and set it from the crossover.
DENSE_FALLBACK_DENSITY: dict[str, float] = {"cpu": 0.1, "cuda": 0.03}


def dense_fallback_density(device: torch.device | str) -> float:
    """The training-density threshold above which dense GEMM + gather beats SDDMM on ``device``."""
    return DENSE_FALLBACK_DENSITY.get(torch.device(device).type, DENSE_FALLBACK_DENSITY["cuda"])


# ---------------------------------------------------------------------------- masks
def check_density(density: object, who: str, hint: str = "e.g. pass 0.01 for 1%") -> None:
    """Raise unless ``density`` is a number in ``(0, 1]`` (the one density rule of RoSA and SHiRA)."""
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < float(density) <= 1.0:
        raise ValueError(
            f"{who}: density must be a float in (0, 1] (fraction of each weight trained sparsely), got "
            f"density={density!r}; {hint}"
        )


def nnz_for(density: float, numel: int) -> int:
    """``round(density * numel)``, at least 1 (a positive density keeps something) and at most ``numel``."""
    return min(numel, max(1, round(float(density) * numel)))


def topk_mask(scores: torch.Tensor, density: float) -> SparseIndex:
    """Per-layer top-k mask: the ``k = round(density * numel)`` largest entries of ``scores``.

    RoSA (Nikdan et al. 2024, section 3) scores with the mean squared gradient (diagonal Fisher);
    SHiRA-WM (Bhardwaj et al. 2024) with ``|W|``; SHiRA-SNIP with ``|W * grad W|``. This function
    ranks the scores **as given** (largest first): pass magnitudes yourself. Ties are broken by
    flat index, lower ``row * in + col`` first, so the result is deterministic.

    Args:
        scores: ``(out, in)`` float tensor, no NaN.
        density: Fraction in ``(0, 1]``; ``k`` is ``round(density * numel)`` clamped to ``>= 1``.

    Returns:
        A :class:`SparseIndex` with exactly ``k`` nonzeros, on ``scores``'s device.

    Raises:
        ValueError: ``scores`` is not 2-D floating point, contains NaN, or ``density`` is not in ``(0, 1]``.
    """
    check_density(density, "topk_mask")
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(
            f"topk_mask needs a 2-D float score tensor (out, in), got {scores.ndim}-D {scores.dtype}; "
            "pass e.g. weight.abs() or accumulated grad**2."
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError("topk_mask got NaN scores; replace them (torch.nan_to_num) before building a mask.")
    k = nnz_for(density, scores.numel())
    # stable descending sort keeps equal scores in ascending index order: ties -> lower index
    order = torch.sort(scores.detach().reshape(-1), descending=True, stable=True).indices[:k]  # (k,) int64
    return SparseIndex.from_flat(order, (scores.shape[0], scores.shape[1]))


def random_mask(
    shape: tuple[int, int], density: float, generator: torch.Generator | None = None
) -> SparseIndex:
    """Uniform random mask with exactly ``round(density * numel)`` nonzeros (SHiRA-Rand, HF peft's shira).

    Args:
        shape: ``(out, in)`` of the weight.
        density: Fraction in ``(0, 1]``; ``k`` is ``round(density * numel)`` clamped to ``>= 1``.
        generator: CPU generator; the same seed gives the same mask.

    Returns:
        A CPU :class:`SparseIndex` with exactly ``k`` nonzeros (move it with ``.to(device)``).

    Raises:
        ValueError: ``density`` not in ``(0, 1]`` or ``shape`` not two positive ints.
    """
    check_density(density, "random_mask")
    if len(shape) != 2 or min(int(s) for s in shape) <= 0:
        raise ValueError(f"random_mask needs shape (out, in) with positive dims, got {tuple(shape)}.")
    numel = int(shape[0]) * int(shape[1])
    flat = torch.randperm(numel, generator=generator)[: nnz_for(density, numel)]  # (k,) int64
    return SparseIndex.from_flat(flat, (int(shape[0]), int(shape[1])))


# ---------------------------------------------------------------------------- tiles
# Tile-structured masks (issue 27): entries in 1 x b runs along the weight's contiguous (input) dimension, so an
# AdapterBank switches an adapter by whole-tile copies (SMT, Sparse Matrix Tuning, ICLR 2025, selects and
# switches blocks the same way; lightning_peft.kernels.tiles). RoSA (Nikdan et al., ICML 2024, arXiv 2401.04679)
# pools its Fisher statistic per tile, SHiRA (arXiv 2406.13175) its mask score: both through these functions.
def check_tile(tile: object, who: str) -> None:
    """Raise unless ``tile`` is ``None`` (unstructured) or one of :data:`~lightning_peft.kernels.TILE_WIDTHS`."""
    if tile is not None and (isinstance(tile, bool) or tile not in TILE_WIDTHS):
        raise ValueError(
            f"{who} tile must be None (unstructured) or one of {', '.join(map(str, TILE_WIDTHS))} (entries per 1 x b "
            f"run along the input dimension), got tile={tile!r}; e.g. tile=16 (64-byte runs in fp32)"
        )


def tile_nnz(nnz: int, shape: tuple[int, int], tile: int | None, who: str, name: str = "") -> int:
    """The budget ``nnz`` in whole tiles: ``max(1, nnz // b) * b`` (``nnz`` itself for ``tile=None``).

    Rounded down, so a tiled layer never holds more than the unstructured budget (at most ``b - 1`` entries
    fewer), except that every layer keeps at least one tile.

    Args:
        nnz: The unstructured budget (``round(density * out * in)``, or SHiRA's ``r * (in + out)``).
        shape: ``(out, in)`` of the weight; ``b`` must divide ``in``.
        tile: ``None`` or the tile width ``b``.
        who: The method, for the error (``"RoSA"``, ``"SHiRA"``).
        name: The layer's module name, for the error.

    Raises:
        ValueError: ``b`` does not divide ``in`` (the message names the layer, the widths that fit and the fixes).
    """
    if tile is None:
        return nnz
    out_f, in_f = int(shape[0]), int(shape[1])
    if in_f % tile:
        fits = ", ".join(str(b) for b in TILE_WIDTHS if in_f % b == 0) or f"none of {'/'.join(map(str, TILE_WIDTHS))} does"
        layer = f"layer {name!r} ({out_f}x{in_f}" if name else f"a {out_f}x{in_f} layer ("
        raise ValueError(
            f"{who} tile={tile} needs every target's in_features to be a multiple of {tile}, got {layer}"
            f"{', ' if name else ''}in_features={in_f}); pick a tile that divides it ({fits}), exclude the layer with "
            "exclude_modules=, or use tile=None"
        )
    return max(1, nnz // tile) * tile


def tile_mask(scores: torch.Tensor, nnz: int, b: int) -> SparseIndex:
    """The ``nnz // b`` tiles (1 x b runs along ``in``) with the largest summed score, as a :class:`SparseIndex`.

    Tile ``t`` holds the flat positions ``t * b ... t * b + b - 1`` (row ``t // (in / b)``). Ties go to the
    lower tile number (stable sort), as :func:`topk_mask` breaks them. Random tiles: pass i.i.d. uniform
    scores (their per-tile sums are exchangeable, so every set of tiles is equally likely).

    Args:
        scores: ``(out, in)`` float scores (RoSA's Fisher ``mean G**2``, ``|W|``, SHiRA's RMS gradient, ...), no NaN.
        nnz: The layer's budget, a multiple of ``b`` (:func:`tile_nnz`).
        b: Tile width; divides ``in``.

    Returns:
        A CPU :class:`SparseIndex` of exactly ``nnz`` entries, sorted row-major.

    Raises:
        ValueError: ``b`` does not divide ``in`` or ``nnz``.
    """
    out_f, in_f = int(scores.shape[0]), int(scores.shape[1])
    if in_f % b or nnz % b:
        raise ValueError(f"tile_mask: b={b} must divide in_features={in_f} and the budget nnz={nnz}; see tile_nnz")
    pooled = scores.detach().float().cpu().reshape(out_f, in_f // b, b).sum(-1).reshape(-1)  # (out * in / b,)
    best = torch.sort(pooled, descending=True, stable=True).indices[: nnz // b]  # (T,) tile numbers
    return SparseIndex.from_flat(expand_tiles(torch.sort(best).values, b), (out_f, in_f))


def check_tiles(index: SparseIndex, tile: int, who: str) -> SparseIndex:
    """``index`` if its sorted positions are whole aligned 1 x ``tile`` runs, else a ValueError naming the fix."""
    flat = torch.sort(index.flat()).values  # (nnz,)
    runs = flat.view(-1, tile) if index.nnz % tile == 0 else None  # (T, tile)
    if runs is None or not bool((runs[:, 0] % tile == 0).all() and (runs - runs[:, :1] == torch.arange(tile)).all()):
        raise ValueError(
            f"{who} returned positions that are not whole 1 x {tile} tiles along in_features, but the adapter has "
            f"tile={tile}; return whole tiles (e.g. via lightning_peft.methods._sparse.tile_mask) or use tile=None"
        )
    return index
