"""The sparse-delta core shared by RoSA and SHiRA: a frozen ``nn.Linear`` plus trainable ``S``.

Both methods train an unstructured sparse delta ``S`` of a frozen weight ``W`` ``(out, in)``:

* RoSA (Nikdan, Tabesh, Crncevic, Alistarh, ICML 2024, arXiv 2401.04679, section 3):
  ``Delta W = s * B A + S`` with ``s = alpha / r``, ``A`` Kaiming, ``B = 0``, ``S = 0`` at init;
  the mask is the per-layer top ``d * numel`` of accumulated squared gradients.
* SHiRA (Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175): ``Delta W = S`` only (1-2% of the
  weights, high rank); masks Rand / WM (top ``|W|``) / Grad / SNIP; rapid switching scatters the
  values into ``W`` in place and undoes it by restoring the saved originals.

So :class:`SparseDelta` is SHiRA with ``r = 0`` and RoSA with ``r > 0``::

    x (..., in) ──► base W (out, in), frozen ──┐
         │          + S   (nnz values, trained) ├─► y = x (W + S)^T + b + s * dropout(x) A^T B^T
         └─► dropout ─► A (r, in) ─► B (out, r) ┘

Forward/backward go through :func:`lightning_peft.kernels.sparse_delta_linear` (in-place
``W[idx] += S``, one dense GEMM, exact restore; ``dS`` by SDDMM, no ``dW``). Above the device's
:data:`DENSE_FALLBACK_DENSITY` (measured crossover) a training step switches to "dense GEMM + gather" (methods.md section 5:
SDDMM costs ``d`` times the dense ``dO^T X`` GEMM but runs far below GEMM throughput, so past a few
percent the dense GEMM wins). Neither path ever gives ``W`` a gradient: ``W`` is frozen, and the
dense path's ``(out, in)`` temporary is the gradient of the merged copy, gathered at the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_peft.kernels import (
    SparseIndex,
    scatter_add,
    scatter_restore,
    sparse_delta_linear,
    sparse_delta_linear_reference,
)

__all__ = [
    "DENSE_FALLBACK_DENSITY",
    "MaskBuilder",
    "RandomMaskBuilder",
    "SparseDelta",
    "TopKMaskBuilder",
    "dense_fallback_density",
    "random_mask",
    "topk_mask",
]

# Density above which a *training* step uses dense GEMM + gather instead of SDDMM for dS, per
# device type (methods.md section 5).
# cpu: benchmarks/sparse_ops.py, train_step_ms_vs_dense_fallback (fwd + dX + dS, fp32, W 1024x1024
#   and 2048x1024, T 256/1024, 2 cores; two quiet runs in benchmarks/results.csv): the sparse path
#   takes 0.61-1.20x the dense fallback's time up to d = 5% (median 0.82x), 0.87-1.34x at 10%
#   (median ~1.0x) and 0.94-1.61x at 20%. The crossover is about 10%, and below it the sparse
#   path also never allocates the dense (out, in) gradient: 0.1.
# cuda: methods.md's "~3%" (SDDMM target <= 0.4x cuBLAS dW at 1%, <= 0.8x at 2%). NOT measured
#   here: no GPU was lent yet; re-run benchmarks/sparse_ops.py on one and set it from the crossover.
DENSE_FALLBACK_DENSITY: dict[str, float] = {"cpu": 0.1, "cuda": 0.03}


def dense_fallback_density(device: torch.device | str) -> float:
    """The training-density threshold above which dense GEMM + gather beats SDDMM on ``device``."""
    return DENSE_FALLBACK_DENSITY.get(torch.device(device).type, DENSE_FALLBACK_DENSITY["cuda"])


# ---------------------------------------------------------------------------- masks
def _check_density(density: float, who: str) -> None:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < float(density) <= 1.0:
        raise ValueError(
            f"{who}: density must be a float in (0, 1] (fraction of weights kept), got {density!r}; "
            "e.g. pass 0.01 for 1%."
        )


def _nnz_for(density: float, numel: int) -> int:
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
    _check_density(density, "topk_mask")
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(
            f"topk_mask needs a 2-D float score tensor (out, in), got {scores.ndim}-D {scores.dtype}; "
            "pass e.g. weight.abs() or accumulated grad**2."
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError("topk_mask got NaN scores; replace them (torch.nan_to_num) before building a mask.")
    k = _nnz_for(density, scores.numel())
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
    _check_density(density, "random_mask")
    if len(shape) != 2 or min(int(s) for s in shape) <= 0:
        raise ValueError(f"random_mask needs shape (out, in) with positive dims, got {tuple(shape)}.")
    numel = int(shape[0]) * int(shape[1])
    flat = torch.randperm(numel, generator=generator)[: _nnz_for(density, numel)]  # (k,) int64
    return SparseIndex.from_flat(flat, (int(shape[0]), int(shape[1])))


@runtime_checkable
class MaskBuilder(Protocol):
    """Builds a layer's mask for a target density: ``(weight, stats) -> SparseIndex``.

    ``weight`` is the frozen ``(out, in)`` base weight; ``stats`` is whatever the builder
    collected for that layer (RoSA: mean squared gradients ``(out, in)``), or ``None``.
    """

    density: float

    def __call__(self, weight: torch.Tensor, stats: torch.Tensor | None) -> SparseIndex: ...


@dataclass
class TopKMaskBuilder:
    """Top-k on ``stats`` (RoSA grad mask, SHiRA-Grad) or on ``|W|`` (SHiRA-WM)."""

    density: float
    score: Literal["stats", "weight_magnitude"] = "stats"

    def __call__(self, weight: torch.Tensor, stats: torch.Tensor | None) -> SparseIndex:
        if self.score == "weight_magnitude":
            return topk_mask(weight.detach().abs().float(), self.density)
        if stats is None:
            raise ValueError(
                "TopKMaskBuilder(score='stats') needs per-layer stats (e.g. accumulated grad**2), got None; "
                "collect gradients first or use score='weight_magnitude'."
            )
        return topk_mask(stats, self.density)


@dataclass
class RandomMaskBuilder:
    """Uniform random mask (SHiRA-Rand); ``seed`` makes it reproducible."""

    density: float
    seed: int = 0

    def __call__(self, weight: torch.Tensor, stats: torch.Tensor | None) -> SparseIndex:
        g = torch.Generator().manual_seed(self.seed)
        return random_mask((weight.shape[0], weight.shape[1]), self.density, g).to(weight.device)


# ---------------------------------------------------------------------------- module
class SparseDelta(nn.Module):
    """Frozen ``nn.Linear`` plus a trainable sparse delta ``S`` and an optional LoRA branch.

    ``y = x (W + S)^T + b + (alpha / r) * dropout(x) A^T B^T`` (RoSA, Nikdan et al. 2024,
    section 3; with ``r = 0`` it is SHiRA, Bhardwaj et al. 2024).

    Attributes:
        base_layer: The wrapped ``nn.Linear`` (frozen: ``requires_grad`` off for weight and bias).
        values: ``(nnz,)`` trainable sparse values (``nn.Parameter``), zeros after :meth:`set_mask`.
        row, col: ``(nnz,)`` int32 persistent buffers (saved in ``state_dict``), sorted row-major.
        lora_A: ``(r, in)`` Kaiming-uniform init, or ``None`` when ``r = 0``.
        lora_B: ``(out, r)`` zero init, or ``None``.
        scaling: ``alpha / r`` (0 when ``r = 0``).
        dense_fallback_density: training above this density uses dense GEMM + gather (``None``:
            the device's default from :data:`DENSE_FALLBACK_DENSITY`, looked up at each forward).
        use_triton: passed to the kernels (``None`` auto: Triton on CUDA).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        index: SparseIndex | None = None,
        *,
        r: int = 0,
        alpha: float = 16.0,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        dense_fallback_density: float | None = None,
        use_triton: bool | None = None,
    ) -> None:
        """Wrap ``base_layer``.

        Args:
            base_layer: ``nn.Linear`` with weight ``(out, in)``; frozen in place.
            index: Initial mask; ``None`` starts with an empty mask (call :meth:`set_mask`).
            r: LoRA rank; 0 disables the LoRA branch (SHiRA / sparse-only RoSA).
            alpha: LoRA alpha (``scaling = alpha / r``; RoSA uses 16).
            dropout: LoRA input dropout probability in ``[0, 1)``.
            dtype: dtype of ``values`` and the LoRA factors (fp32 default; bf16 halves storage).
            dense_fallback_density: ``None`` (per-device default, :data:`DENSE_FALLBACK_DENSITY`) or a
                fixed threshold.
            use_triton: kernel dispatch, see :mod:`lightning_peft.kernels`.

        Raises:
            TypeError: ``base_layer`` is not an ``nn.Linear``.
            ValueError: negative ``r``, dropout outside ``[0, 1)``, or an index of the wrong shape.
        """
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"SparseDelta wraps an nn.Linear, got {type(base_layer).__name__}; target linear layers only."
            )
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"SparseDelta: r must be an int >= 0 (0 disables LoRA), got {r!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SparseDelta: dropout must be in [0, 1), got {dropout!r}.")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)  # W (and b) frozen: only S (and A, B) train
        w = base_layer.weight
        self.out_features, self.in_features = w.shape
        self.dtype = dtype
        self.dense_fallback_density = None if dense_fallback_density is None else float(dense_fallback_density)
        self.use_triton = use_triton
        self.r = r
        self.scaling = alpha / r if r > 0 else 0.0
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=w.device))  # (r, in)
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=w.device))  # (out, r)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / peft LoRA
            self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        else:
            self.lora_A = self.lora_B = None
            self.lora_dropout = nn.Identity()
        empty = torch.empty(0, dtype=torch.int32, device=w.device)
        self.register_buffer("row", empty.clone(), persistent=True)  # (nnz,) int32
        self.register_buffer("col", empty.clone(), persistent=True)  # (nnz,) int32
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype, device=w.device))  # (nnz,)
        self._merge_saved: torch.Tensor | None = None  # (nnz,) or (out, in) when merged
        if index is not None:
            self.set_mask(index)

    # ------------------------------------------------------------------ mask
    @property
    def index(self) -> SparseIndex:
        """The current mask as a :class:`SparseIndex` (views of the ``row``/``col`` buffers)."""
        return SparseIndex(self.row, self.col, (self.out_features, self.in_features))

    @property
    def nnz(self) -> int:
        """Number of trainable sparse values."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """``nnz / (out * in)``."""
        return self.nnz / max(1, self.out_features * self.in_features)

    def set_mask(self, index: SparseIndex) -> None:
        """Install a new mask; ``values`` becomes a fresh zero ``nn.Parameter`` of the new ``nnz``.

        Re-create the optimizer (or its param group) afterwards: the old parameter is gone.

        Raises:
            ValueError: ``index`` addresses a different shape, or the layer is merged.
        """
        if self.merged:
            raise ValueError("SparseDelta.set_mask on a merged layer; call unmerge() first.")
        index.check_weight(self.base_layer.weight)
        dev = self.base_layer.weight.device
        self.row = index.row.to(dev, torch.int32).contiguous()
        self.col = index.col.to(dev, torch.int32).contiguous()
        self.values = nn.Parameter(torch.zeros(index.nnz, dtype=self.dtype, device=dev))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001
        # A checkpoint's nnz generally differs from a fresh module's (empty mask): resize first so
        # the default copy_ into row/col/values succeeds.
        key = prefix + "values"
        if key in state_dict and state_dict[key].shape != self.values.shape:
            n, dev = state_dict[key].numel(), self.base_layer.weight.device
            self.row = torch.empty(n, dtype=torch.int32, device=dev)
            self.col = torch.empty(n, dtype=torch.int32, device=dev)
            self.values = nn.Parameter(torch.empty(n, dtype=self.dtype, device=dev))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ weights
    def delta_weight(self, include_lora: bool = False) -> torch.Tensor:
        """Dense ``S`` ``(out, in)`` in ``values``'s dtype (plus ``s * B A`` if ``include_lora``).

        Allocates ``out * in`` elements: for merging, export and tests, not the training path.
        """
        s = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        s.index_put_((self.row.long(), self.col.long()), self.values.detach())
        if include_lora and self.lora_A is not None:
            s = s + (self.lora_B.detach() @ self.lora_A.detach()).to(s.dtype) * self.scaling  # (out, in)
        return s

    @property
    def merged(self) -> bool:
        """Whether the delta currently lives inside ``base_layer.weight``."""
        return self._merge_saved is not None

    @torch.no_grad()
    def merge(self) -> None:
        """Write the delta into ``base_layer.weight`` in place (SHiRA's rapid switch).

        Sparse-only: ``scatter_add`` saves the ``nnz`` overwritten values (``2 * nnz`` bytes in
        bf16). With LoRA the dense ``s * B A`` touches every entry, so a full copy of ``W`` is
        saved instead; :meth:`unmerge` writes the saved bits back either way (never subtracts).

        Raises:
            ValueError: already merged.
        """
        if self.merged:
            raise ValueError("SparseDelta.merge called twice; call unmerge() before merging again.")
        w = self.base_layer.weight.data
        if self.lora_A is None:
            self._merge_saved = scatter_add(w, self.index, self.values.detach(), 1.0, use_triton=self.use_triton)
            return
        self._merge_saved = w.clone()  # (out, in): exact undo of a dense add
        scatter_add(w, self.index, self.values.detach(), 1.0, use_triton=self.use_triton)
        w.copy_((w.float() + (self.lora_B @ self.lora_A).float() * self.scaling).to(w.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``base_layer.weight`` bit-exactly to its pre-:meth:`merge` value.

        Raises:
            ValueError: not merged.
        """
        if not self.merged:
            raise ValueError("SparseDelta.unmerge called on a layer that is not merged; call merge() first.")
        saved, self._merge_saved = self._merge_saved, None
        w = self.base_layer.weight.data
        if saved.shape == w.shape and self.lora_A is not None:
            w.copy_(saved)
        else:
            scatter_restore(w, self.index, saved, use_triton=self.use_triton)

    # ------------------------------------------------------------------ forward
    def uses_dense_fallback(self) -> bool:
        """True when this forward will take dense GEMM + gather (training above the threshold)."""
        if not (torch.is_grad_enabled() and self.values.requires_grad):
            return False  # no dS needed: in-place merge + one GEMM is always the cheaper forward
        threshold = self.dense_fallback_density
        if threshold is None:
            threshold = dense_fallback_density(self.values.device)
        return self.density > threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x (W + S)^T + b + s * dropout(x) A^T B^T``.

        Args:
            x: ``(..., in)``; cast to the base weight's dtype for the sparse part.

        Returns:
            ``(..., out)`` in the base weight's dtype.
        """
        w, b = self.base_layer.weight, self.base_layer.bias
        xw = x.to(w.dtype)
        if self.merged:
            y = F.linear(xw, w, b)  # delta (and LoRA) already inside W
            return y
        if self.uses_dense_fallback():
            # Dense GEMM + gather: autograd forms the (out, in) gradient of the merged *copy*, not
            # of W (frozen), and index_put's backward gathers dS from it.
            y = sparse_delta_linear_reference(xw, w, self.values, self.index, b)
        else:
            y = sparse_delta_linear(xw, w, self.values, self.index, b, use_triton=self.use_triton)
        if self.lora_A is not None:
            h = self.lora_dropout(x.to(self.lora_A.dtype))  # (..., in)
            y = y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)  # (..., out)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, nnz={self.nnz}, density={self.density:.4g}, "
            f"r={self.r}, scaling={self.scaling:.4g}, dtype={self.dtype}"
        )
