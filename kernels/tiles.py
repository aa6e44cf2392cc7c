"""Tile-structured sparse deltas: runs of ``b`` entries along a weight's contiguous dimension, moved whole.

Why tiles (SMT, Sparse Matrix Tuning, ICLR 2025, switches 256 x 256 blocks by writing
``weight[...]`` slices): a scattered 4-byte store touches its own 64-byte cache line (a 32-byte sector on
a GPU), so an unstructured scatter moves ~17x the bytes of a contiguous copy of the same fp32 values. A
run of ``b >= 16`` fp32 values fills a whole line, so writing a tile costs what a copy of it costs.

Layout. ``W`` is ``(out, in)``, row-major and contiguous, ``b`` divides ``in``. Tile ``t`` is the
``b`` flat positions ``t * b ... t * b + b - 1``, i.e. row ``t // (in / b)``, columns
``(t % (in / b)) * b + [0, b)``; ``W.view(-1, b)[t]`` is the tile. A tile delta is ``tiles`` ``(T,)``
int64 (8 bytes per tile, ``8 / b`` per value; PyTorch's CPU ``index_add_`` is ~5x slower with int32 indices,
measured on a 11008 x 4096 weight) and ``values`` ``(T, b)``:

===============  =====================================================================  ==========
op               what it does                                                           bytes moved
===============  =====================================================================  ==========
``tile_add``     ``saved = W[tiles]`` (gather), ``W[tiles] += alpha * values``          ``5 S``
``tile_restore`` ``W[tiles] = saved`` (exact: the saved bits are copied back)           ``2 S``
===============  =====================================================================  ==========

``S = T * b * itemsize``: a switch (restore the previous adapter, add the next) moves about ``7 S``,
every byte in runs of ``b`` contiguous values (:func:`switch_bytes`). On CPU both ops run as one C loop each
(:mod:`._tiles_native`: save and add in one pass, whole-row copies back), prefetching the tile 4 KiB of rows
ahead: the writes land on random lines of a weight far larger than the cache, so the switch is bound by miss
latency, and the row ops (``index_select`` / ``index_add_`` / ``index_copy_`` on a ``(-1, b)`` view, still the
reference, the path for other devices, dtypes and ``alpha != 1``, and the fallback without a C compiler) keep
only one tile's misses in flight. Measured on one CPU thread of a loaded 2-core machine, LLaMA-7B layer (7
weights, 1.25 M values, ``benchmarks/README.md``, "Tile-structured SHiRA"): a bank switch takes 0.74-0.76 ms
at b = 16, 32 and 64 (median of 31; the row ops, same machine: 3.4-5.6 ms; peft's hotswap 0.78 ms in the same
run), 71-78% of a contiguous copy's bandwidth on its bytes. ``AdapterBank`` restores and applies weight by weight
and passes the just-restored ``saved`` back as ``out`` (:meth:`~lightning_peft.deltas.MergeStack.replace`).
The C loops give the row ops' bits (tests compare them, NaN and rounding included).
"""

from __future__ import annotations

import torch
from lightning_peft.kernels import _tiles_native

__all__ = [
    "TILE_WIDTHS", "expand_tiles", "find_tiles", "switch_bytes", "tile_add", "tile_linear_add", "tile_restore", "tile_span",
]

TILE_WIDTHS = (16, 32, 64)  # 64 B, 128 B, 256 B runs in fp32: at least one cache line each


def _tile_view(weight: torch.Tensor, b: int) -> torch.Tensor:
    """``W`` as ``(out * in / b, b)`` rows, one per tile (a view: writes land in ``W``)."""
    if not weight.is_contiguous() or weight.shape[-1] % b:
        raise ValueError(
            f"tile ops need a contiguous weight whose last dimension ({weight.shape[-1]}) is a multiple of the tile "
            f"width b={b} (contiguous: {weight.is_contiguous()}); use an unstructured mask (tile=None) for this layer"
        )
    return weight.view(-1, b)


def expand_tiles(tiles: torch.Tensor, b: int) -> torch.Tensor:
    """Flat positions ``(T * b,)`` int64 of tiles ``(T,)``, tile by tile (sorted when ``tiles`` is)."""
    return (tiles.long()[:, None] * b + torch.arange(b, device=tiles.device)).reshape(-1)


def find_tiles(flat: torch.Tensor, nonzero: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int] | None:
    """The tiles that hold a delta, if every one of them is whole in ``flat``; ``None`` for unstructured masks.

    Widths are tried largest first (fewest indices). A tile counts when one of its entries is nonzero, and
    qualifies when all ``b`` of its positions are in ``flat``, so positions with exact-zero values (peft's
    padding, untouched entries) are allowed anywhere.

    Args:
        flat: ``(n,)`` flat positions ``row * in + col`` of the delta (any order, unique).
        nonzero: ``(n,)`` bool, which positions hold a nonzero value.
        in_features: ``in`` of the ``(out, in)`` weight.

    Returns:
        ``(tiles (T,) int64 sorted, b)`` or ``None``.
    """
    flat = flat.long()
    hot = flat[nonzero]
    if hot.numel() == 0:
        return None
    for b in sorted(TILE_WIDTHS, reverse=True):
        if in_features % b:
            continue
        tiles = torch.unique(hot // b)  # (T,) sorted
        if tiles.numel() * b <= flat.numel() and bool(torch.isin(expand_tiles(tiles, b), flat).all()):
            return tiles, b
    return None


def tile_span(tiles: torch.Tensor) -> tuple[int, int] | None:
    """``(lowest, highest)`` tile number of ``tiles`` (``None`` when empty): what the bounds check of :func:`tile_add`
    and :func:`tile_restore` needs, for a caller that holds the same tiles across many calls to compute once."""
    return tuple(int(x) for x in torch.aminmax(tiles)) if tiles.numel() else None


def _check_tiles(rows: torch.Tensor, tiles: torch.Tensor, span: tuple[int, int] | None = None) -> None:
    """Refuse tile numbers outside ``rows`` before anything is written (the C loop does not check; the row ops
    would fail halfway, or wrap negative numbers). ``span``: :func:`tile_span` of ``tiles``, if the caller has it.

    Raises:
        IndexError: naming the span of the tile numbers and the weight's tile count.
    """
    if tiles.numel():
        low, high = span if span is not None else tile_span(tiles)
        if low < 0 or high >= rows.shape[0]:
            raise IndexError(f"tile numbers span [{low}, {high}] but the weight has {rows.shape[0]} tiles of "
                             f"{rows.shape[1]}; pass tiles of this weight (an adapter made for another shape?)")


def _native_ok(rows: torch.Tensor, tiles: torch.Tensor, other: torch.Tensor, native: bool | None) -> bool:
    """Whether the C loop (:mod:`._tiles_native`) takes this call: CPU, contiguous, int64 tiles, and built."""
    if native is False or not (rows.is_cpu and other.is_cpu and tiles.is_cpu):  # is_cpu: no device object per call
        return False
    ok = rows.is_contiguous() and other.is_contiguous() and tiles.is_contiguous() and tiles.dtype == torch.int64
    return ok and _tiles_native.library() is not None


def _ahead(row_bytes: int) -> int:
    """Prefetch distance in tiles: about 4 KiB of rows ahead, at least 16 rows (measured best at b = 16-64)."""
    return max(16, 4096 // row_bytes)


_increment_version = getattr(torch.autograd.graph, "increment_version", None)


def _bump(weight: torch.Tensor) -> None:
    """Count a write through a raw pointer in ``weight``'s version (as an in-place op would)."""
    if _increment_version is not None:
        _increment_version(weight)


def tile_add(weight: torch.Tensor, tiles: torch.Tensor, values: torch.Tensor, alpha: float = 1.0,
             *, native: bool | None = None, out: torch.Tensor | None = None,
             span: tuple[int, int] | None = None) -> torch.Tensor:
    """``W[tiles] += alpha * values`` in place; returns the overwritten tiles ``(T, b)`` for :func:`tile_restore`.

    Same dtype: ``index_add_`` (one rounding of ``w + alpha * v``, as :func:`~.scatter.scatter_add` in fp32).
    Otherwise the sum is formed in fp32 and rounded once to ``W``'s dtype. On CPU with ``alpha == 1`` and an
    fp32 or bf16 ``W`` (values fp32, or bf16 for a bf16 ``W``), one C loop saves and adds each tile with
    prefetch (:mod:`._tiles_native`): the same bits, 2-4x faster on weights larger than the cache.

    Args:
        weight: ``(out, in)`` contiguous; ``b = values.shape[1]`` divides ``in``.
        tiles: ``(T,)`` int64 tile numbers, unique (int32 works, slower).
        values: ``(T, b)``.
        alpha: Scale of the delta.
        native: ``None``: the C loop where it applies; ``False``: PyTorch's row ops (the reference).
        out: Where to save the overwritten tiles (returned): a contiguous ``(T, b)`` tensor of ``W``'s dtype and
            device, e.g. the ``saved`` of an earlier :func:`tile_restore` (a switch then allocates nothing).
            Default: a new tensor.
        span: :func:`tile_span` of ``tiles`` (skips computing it; the bounds check itself still runs).

    Raises:
        IndexError: a tile number outside ``W`` (nothing written).
        ValueError: ``out`` of another shape, dtype or device, or not contiguous.
    """
    rows = _tile_view(weight, values.shape[1])  # (out * in / b, b)
    _check_tiles(rows, tiles, span)
    if out is not None and (out.shape != values.shape or out.dtype != weight.dtype or not out.is_contiguous()
                            or out.device != weight.device):
        raise ValueError(f"tile_add: out must be a contiguous {tuple(values.shape)} {weight.dtype} tensor on "
                         f"{weight.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if float(alpha) == 1.0 and _native_ok(rows, tiles, values, native):
        lib, n, b = _tiles_native.library(), tiles.numel(), values.shape[1]
        if weight.dtype == torch.float32 and values.dtype == torch.float32:
            saved = torch.empty_like(values) if out is None else out
            lib.lp_tile_save_add_f32(weight.data_ptr(), tiles.data_ptr(), n, values.data_ptr(), saved.data_ptr(), b,
                                     _ahead(4 * b))
            _bump(weight)
            return saved
        if weight.dtype == torch.bfloat16 and values.dtype in (torch.float32, torch.bfloat16):
            saved = torch.empty(values.shape, dtype=torch.bfloat16) if out is None else out
            lib.lp_tile_save_add_bf16(weight.data_ptr(), tiles.data_ptr(), n, values.data_ptr(),
                                      int(values.dtype == torch.bfloat16), saved.data_ptr(), b, _ahead(2 * b))
            _bump(weight)
            return saved
    # (T, b), the bits restore writes back
    saved = rows.index_select(0, tiles) if out is None else torch.index_select(rows, 0, tiles, out=out)
    if values.dtype == weight.dtype:
        rows.index_add_(0, tiles, values, alpha=alpha)
    else:
        rows.index_copy_(0, tiles.long(), (saved.float() + float(alpha) * values.float()).to(weight.dtype))
    return saved


def tile_restore(weight: torch.Tensor, tiles: torch.Tensor, saved: torch.Tensor, *, native: bool | None = None,
                 span: tuple[int, int] | None = None) -> None:
    """``W[tiles] = saved`` ``(T, b)``: undo one :func:`tile_add` bit-exactly (a C copy loop with prefetch on CPU,
    else ``index_copy_``; ``native`` and ``span`` as in :func:`tile_add`). ``saved`` is only read: it may then be
    handed to the next :func:`tile_add` as ``out``."""
    rows = _tile_view(weight, saved.shape[1])
    _check_tiles(rows, tiles, span)
    if saved.dtype == weight.dtype and _native_ok(rows, tiles, saved, native):
        row_bytes = saved.shape[1] * saved.element_size()
        _tiles_native.library().lp_tile_copy_in(weight.data_ptr(), tiles.data_ptr(), tiles.numel(), saved.data_ptr(),
                                                row_bytes, _ahead(row_bytes))
        _bump(weight)
        return
    rows.index_copy_(0, tiles.long(), saved)


def switch_bytes(values: torch.Tensor, weight_itemsize: int) -> int:
    """Bytes one switch into and out of a tile delta moves: restore ``2 S``, gather ``2 S``, add ``2 S`` plus
    the values read (``7 S`` when values and ``W`` share a dtype; see the module docstring)."""
    return 6 * values.numel() * weight_itemsize + values.numel() * values.element_size()


# Rows of the reference path's (rows, T, b) gather at a time: ~16 MB fp32 per chunk at most.
_GATHER_ELEMS = 1 << 22


def tile_linear_add(y: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, values: torch.Tensor,
                    rows: torch.Tensor | None = None, *, native: bool | None = None) -> None:
    """``y[rows] += x[rows] S^T`` in place: a tile delta's share of a linear layer's output, the weight unfused.

    What a batch whose rows name different adapters needs (:meth:`lightning_peft.AdapterBank.mixed`): the base GEMM
    once over the batch, then each adapter's delta on its rows. ``S`` ``(out, in)`` holds ``values[i]`` at tile
    ``tiles[i]`` (row ``tiles[i] // (in / b)``, columns ``(tiles[i] % (in / b)) * b + [0, b)``), so the cost is
    ``rows * T * b`` multiply-adds, as LoRA's ``rows * r * (in + out)`` at the same trainable count. On CPU in fp32 a
    C loop (:mod:`._tiles_native`) takes 16 rows at a time past every tile (one 16-lane product per 16 columns, then
    the lanes summed; ``b`` a multiple of 16); elsewhere (and for an unstructured delta as tiles of width 1) the row ops gather ``x``'s tile columns ``(rows, T, b)`` in chunks and ``index_add_``
    the products into ``y``'s columns. ``tiles`` need not be sorted (sorted is faster in C).

    Args:
        y: ``(R, out)`` contiguous, written in place.
        x: ``(R, in)``, ``y``'s dtype and device.
        tiles: ``(T,)`` int64 tile numbers.
        values: ``(T, b)``; ``b`` divides ``in``.
        rows: ``(k,)`` int64 row numbers of ``x`` and ``y`` (unique); ``None``: every row.
        native: ``None``: the C loop where it applies; ``False``: the row ops (the reference).

    Raises:
        ValueError: shapes that do not fit; IndexError: a tile number outside ``S``.
    """
    b, (n_rows, out), inp = values.shape[1], y.shape, x.shape[-1]
    if x.shape[0] != n_rows or x.ndim != 2 or y.ndim != 2 or not y.is_contiguous() or inp % b:
        raise ValueError(f"tile_linear_add needs y (R, out) contiguous and x (R, in) with b={b} dividing in, got "
                         f"y {tuple(y.shape)} (contiguous: {y.is_contiguous()}) and x {tuple(x.shape)}")
    _check_tiles(torch.empty(out * inp // b, b, device="meta"), tiles)  # S as tile rows: only its shape is read
    rows = torch.arange(n_rows, device=y.device) if rows is None else rows.long()
    if (native is not False and b % 16 == 0 and y.dtype == x.dtype == values.dtype == torch.float32 and y.is_cpu
            and x.is_cpu and tiles.dtype == torch.int64 and _tiles_native.library() is not None):
        x, tiles, values, rows = x.contiguous(), tiles.contiguous(), values.contiguous(), rows.contiguous()
        _tiles_native.library().lp_tile_matmul_f32(x.data_ptr(), inp, y.data_ptr(), out, rows.data_ptr(), rows.numel(),
                                                   tiles.data_ptr(), tiles.numel(), values.data_ptr(), b)
        return
    tiles = tiles.long()
    out_row, block = tiles // (inp // b), tiles % (inp // b)  # (T,) each
    step = max(1, _GATHER_ELEMS // max(1, tiles.numel() * b))
    for lo in range(0, rows.numel(), step):
        r = rows[lo: lo + step]
        gathered = x.index_select(0, r).view(r.numel(), inp // b, b).index_select(1, block)  # (k, T, b)
        part = (gathered * values.to(x.dtype)).sum(-1)  # (k, T)
        y.index_add_(0, r, torch.zeros(r.numel(), out, dtype=y.dtype, device=y.device).index_add_(1, out_row, part))
