"""Compact sparse indices in Lightning checkpoints: ``(row, col)`` int32 pairs become the smaller of two codes.

In memory a layer keeps ``nnz`` int32 rows and columns (what the kernels read: 8 bytes per entry).
A checkpoint stores, per adapter and layer, whichever is smaller for the shape:

* ``csr``: row offsets ``(out + 1,)`` int32 and columns ``(nnz,)`` int16 (``in <= 32767``, positions
  sorted row-major): ``4 (out + 1) + 2 nnz`` bytes, the RoSA paper's storage (Nikdan et al. 2024,
  arXiv 2401.04679: CSR with int16 column indices);
* ``flat``: ``row * in + col`` ``(nnz,)`` int32 (int64 past 2^31 entries), any order: ``4 nnz`` bytes;
* ``tiles``: for a tile-structured mask (SHiRA ``tile=b``: whole 1 x b runs along ``in``,
  :mod:`lightning_peft.kernels.tiles`) the tile numbers ``(nnz / b,)`` int32 and the width ``b``:
  ``4 nnz / b + 4`` bytes, always the smallest when it applies.

Adapter folders (``save_adapter``) keep peft's layout, so plain peft still loads a SHiRA folder; only
checkpoints are encoded (:meth:`~lightning_peft.callback.AdapterCallback.on_save_checkpoint`), and the
layers decode them in a load pre-hook, so ``trainer.fit(ckpt_path=...)`` and ``load_state_dict`` both work.
"""

from __future__ import annotations

import torch

from lightning_peft.kernels import expand_tiles, find_tiles

__all__ = ["INDEX_CODES", "decode_index", "encode_index"]

INDEX_CODES = ("flat", "csr_offsets", "csr_cols", "tiles", "tile_width")  # the suffixes a checkpoint's position keys carry

_INT16_MAX = 32767


def encode_index(row: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``{"flat": ...}`` or ``{"csr_offsets": ..., "csr_cols": ...}`` for ``(nnz,)`` positions in ``shape``.

    Positions with a negative row (RoSA's "mask not built yet" sentinel) are kept as ``flat = -1``.
    """
    out, inp = shape
    row, col = row.detach().cpu().long(), col.detach().cpu().long()
    wide = out * inp >= 2**31
    if bool((row < 0).any()):
        return {"flat": torch.full_like(row, -1, dtype=torch.int64 if wide else torch.int32)}
    flat = row * inp + col
    ordered = flat.numel() < 2 or bool((flat[1:] >= flat[:-1]).all())  # decoding gives row-major order back
    found = find_tiles(flat, torch.ones_like(flat, dtype=torch.bool), inp) if ordered and flat.numel() else None
    if found is not None and found[0].numel() * found[1] == flat.numel():  # every position in a whole tile
        tiles, b = found
        return {"tiles": tiles.to(torch.int64 if wide else torch.int32), "tile_width": torch.tensor([b], dtype=torch.int32)}
    flat_bytes = flat.numel() * (8 if wide else 4)
    if ordered and inp <= _INT16_MAX and 4 * (out + 1) + 2 * flat.numel() < flat_bytes:
        offsets = torch.searchsorted(row, torch.arange(out + 1))  # (out + 1,) first entry of each row
        return {"csr_offsets": offsets.to(torch.int32), "csr_cols": col.to(torch.int16)}
    return {"flat": flat.to(torch.int64 if wide else torch.int32)}


def decode_index(parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(row, col)`` int32 pair that :func:`encode_index` encoded.

    Raises:
        ValueError: ``parts`` holds neither code.
    """
    out, inp = shape
    if "flat" in parts:
        flat = parts["flat"].long()
        row, col = flat // inp, flat % inp
        row[flat < 0], col[flat < 0] = -1, -1
        return row.to(torch.int32), col.to(torch.int32)
    if "tiles" in parts:
        flat = expand_tiles(parts["tiles"], int(parts["tile_width"][0]))
        return (flat // inp).to(torch.int32), (flat % inp).to(torch.int32)
    if "csr_offsets" in parts:
        counts = (parts["csr_offsets"][1:] - parts["csr_offsets"][:-1]).long()  # (out,)
        row = torch.repeat_interleave(torch.arange(out), counts)
        return row.to(torch.int32), parts["csr_cols"].to(torch.int32)
    raise ValueError(f"a compact sparse index needs 'flat', 'csr_offsets'/'csr_cols' or 'tiles'/'tile_width', got {sorted(parts)}")
