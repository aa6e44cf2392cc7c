"""SHiRA config (Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175): Delta W = S, sparse, high rank."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lightning_peft.config import AdapterConfig
from lightning_peft.methods._sparse.mask import check_density, check_tile

MaskKind = Literal["random", "struct", "wm", "grad", "snip"]
MASK_KINDS: tuple[str, ...] = ("random", "struct", "wm", "grad", "snip")
# masks that need gradient statistics from calibration batches before training starts
CALIBRATED_MASKS = frozenset({"grad", "snip"})


@dataclass
class SHiRAConfig(AdapterConfig):
    """Sparse high-rank adapter: train ``nnz`` chosen entries of each frozen weight, nothing else.

    For a linear layer ``W`` ``(out, in)`` the adapter is ``(values (nnz,), index (2, nnz))`` and
    ``y = x (W + S)^T + b`` with ``S[index] = values`` (SHiRA section 3). Per layer
    ``nnz = round(density * out * in)`` (at least 1), or ``r * (out + in)`` when ``r`` is given
    (peft's LoRA-equivalent budget, no padding in the saved file).

    Attributes:
        density: Fraction of each weight that is trained, in (0, 1] (paper: 1-2%).
        mask: How the ``nnz`` positions are chosen (SHiRA section 3.1): ``random`` (uniform,
            seeded), ``struct`` (every f-th row and column plus the diagonal), ``wm`` (top
            ``|W|``), ``grad`` (top RMS gradient over ``calibration_batches`` train batches),
            ``snip`` (top ``|W| * RMS grad``); or a callable ``(weight, grad_stats) ->
            SparseIndex | bool mask`` returning exactly the layer's ``nnz`` positions.
        r: If set (>= 1), ``nnz = r * (out + in)`` per layer instead of the density budget.
        calibration_batches: Train batches whose gradients score ``grad``/``snip`` masks (and are
            handed to a callable mask); 0 skips calibration.
        seed: Seed of the random mask (per layer it is offset by a hash of the layer name).
        use_triton: Kernel dispatch of the sparse ops (None: Triton on CUDA, reference on CPU).
        lr_ratio: The values train at ``lr_ratio`` x the optimizer's lr (its own param group,
            schedule kept). Default 2.5: the paper trains SHiRA at 5e-4 where LoRA gets 2e-4
            (section 5), and a sparse update moves ~1-2% of the entries, each by about the lr
            under Adam, so it needs a larger step than LoRA's dense B A to change the layer as
            much (measured: ``benchmarks/README.md``, "SHiRA's learning rate"). ``1.0`` keeps the
            optimizer's lr.
        tile: ``None`` (default): unstructured entries. ``16``/``32``/``64``: entries in 1 x ``tile`` runs
            along each weight's contiguous (input) dimension, chosen by the mask's score summed per tile
            (``random``: uniform tiles), ``nnz // tile`` tiles per layer (at least one): the same budget, or
            up to ``tile - 1`` entries less. An ``AdapterBank`` then switches the adapter by whole-tile
            copies (SMT, ICLR 2025) and holds ``4 + 8 / tile`` bytes per fp32 entry. Every target's
            ``in_features`` must be a multiple of ``tile``; ``struct`` masks cannot be tiled.
    """

    density: float = 0.01
    mask: MaskKind | Callable[..., Any] = "grad"
    r: int | None = None
    calibration_batches: int = 8
    seed: int = 0
    use_triton: bool | None = None
    lr_ratio: float = 2.5
    tile: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_tile(self.tile, "SHiRA")
        if self.tile is not None and self.mask == "struct":
            raise ValueError(
                f"SHiRA mask='struct' (every f-th row and column plus the diagonal) cannot be tiled, got tile={self.tile}; "
                "its columns and diagonal are one entry per row: use mask='wm'/'grad'/'snip'/'random' with tile, or tile=None"
            )
        if isinstance(self.lr_ratio, bool) or not isinstance(self.lr_ratio, (int, float)) or not self.lr_ratio > 0:
            raise ValueError(
                f"SHiRA lr_ratio must be a number > 0 (the values' lr as a multiple of the optimizer's), got "
                f"lr_ratio={self.lr_ratio!r}; use 2.5 (the paper's 5e-4 : 2e-4) or 1.0 to keep the optimizer's lr"
            )
        check_density(self.density, "SHiRA", hint="the paper uses 0.01-0.02")
        if not callable(self.mask) and self.mask not in MASK_KINDS:
            raise ValueError(
                f"SHiRA mask must be one of {', '.join(MASK_KINDS)} or a callable (weight, grad_stats) -> "
                f"SparseIndex | bool mask, got mask={self.mask!r}"
            )
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0):
            raise ValueError(
                f"SHiRA r must be None (use density) or a positive int (nnz = r * (in + out) per layer), got r={self.r!r}"
            )
        cb = self.calibration_batches
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 0:
            raise ValueError(f"SHiRA calibration_batches must be an int >= 0, got {cb!r}; the default is 8")
        if self.mask in CALIBRATED_MASKS and cb == 0:
            raise ValueError(
                f"SHiRA mask={self.mask!r} scores weights by their gradients and needs calibration_batches >= 1, "
                "got 0; pass e.g. calibration_batches=8 or use mask='wm'/'random'/'struct'"
            )

    @property
    def mask_name(self) -> str:
        """The mask's name as written into the saved adapter config (``custom`` for a callable)."""
        return self.mask if isinstance(self.mask, str) else "custom"


