"""The sparse-delta core of RoSA and SHiRA: masks (:mod:`.mask`) and the layer mixin (:mod:`.core`)."""

from lightning_peft.methods._sparse.core import SparseDeltaCore
from lightning_peft.methods._sparse.mask import (
    DENSE_FALLBACK_DENSITY,
    check_density,
    check_tile,
    check_tiles,
    dense_fallback_density,
    nnz_for,
    random_mask,
    tile_mask,
    tile_nnz,
    topk_mask,
)

__all__ = [
    "DENSE_FALLBACK_DENSITY",
    "SparseDeltaCore",
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
