"""RoSA tuner layer: a frozen linear layer plus, per adapter, LoRA factors and a sparse delta.

Nikdan et al., ICML 2024 (arXiv 2401.04679), section 3::

    x (..., in) ──► W (out, in), frozen ──┐
         │          + S_1 + ... + S_k      ├─► y = x (W + sum_a S_a)^T + b + sum_a s_a dropout(x) A_a^T B_a^T
         └─► dropout ─► A_a (r, in) ─► B_a (out, r) ┘

Per adapter ``a`` the layer holds ``rosa_A[a]`` ``(r, in)`` (Kaiming), ``rosa_B[a]`` ``(out, r)``
(zero), ``rosa_values[a]`` ``(nnz,)`` (zero) and the persistent int32 buffers ``rosa_row[a]`` /
``rosa_col[a]`` ``(nnz,)``, all at their final size ``nnz = round(density * out * in)`` (with ``tile=b``
rounded down to whole tiles) from the start, so neither the optimizer nor a checkpoint ever sees a shape
change. Until the mask is built the index holds the sentinel ``-1`` and the sparse part is inactive.

The sparse part is the shared core (:class:`~lightning_peft.methods._sparse.core.SparseDeltaCore`):
:func:`lightning_peft.kernels.sparse_delta_linear` (in-place ``W[idx] += S``, one GEMM, exact
restore; ``dS`` by SDDMM, never a dense ``dW``), several active adapters summed on the cached
union of their masks, and the exact merge stack.

GPT-2's ``Conv1D`` stores ``W`` as ``(in, out)``: masks and deltas are always in ``(out, in)``
coordinates and the kernel is handed the transposed view ``W.T``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from lightning_peft.kernels import SparseIndex, scatter_add
from lightning_peft.methods._sparse import SparseDeltaCore, nnz_for, tile_nnz
from lightning_peft.methods._sparse.storage import INDEX_CODES, decode_index, encode_index

__all__ = ["Linear", "RosaLayer"]

_UNSET = -1  # index sentinel: the mask of this adapter is not built yet


class _CollectHook:
    """Tensor hook on a layer's output: hands ``(dO, X)`` to each gradient collector."""

    def __init__(self, collectors: list[Any], x: torch.Tensor) -> None:
        self.collectors, self.x = collectors, x

    def __call__(self, grad_out: torch.Tensor) -> None:
        for collect in self.collectors:
            collect(grad_out, self.x)


def _refresh_after_load(module: RosaLayer, incompatible_keys: Any) -> None:
    module.refresh_mask_state()


def _decode_index(module: RosaLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    module.decode_index_state(state_dict, prefix)


class RosaLayer(BaseTunerLayer, SparseDeltaCore):
    """Adapter protocol of a RoSA layer (peft ``BaseTunerLayer``); :class:`Linear` is the module.

    Attributes:
        r, scaling, density, tile: Per adapter (``tile``: ``None`` or the width of a tile-structured mask).
        rosa_A: ``ParameterDict`` of ``(r, in)``; absent for ``r = 0``.
        rosa_B: ``ParameterDict`` of ``(out, r)``; absent for ``r = 0``.
        rosa_values: ``ParameterDict`` of ``(nnz,)`` sparse values.
        rosa_row, rosa_col: ``BufferDict`` of ``(nnz,)`` int32 positions (``-1`` until the mask exists).
    """

    adapter_layer_names = ("rosa_A", "rosa_B", "rosa_values")
    other_param_names = ("rosa_row", "rosa_col", "r", "scaling", "density", "tile", "rosa_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.density: dict[str, float] = {}
        self.tile: dict[str, int | None] = {}
        self.rosa_A = nn.ParameterDict({})
        self.rosa_B = nn.ParameterDict({})
        self.rosa_values = nn.ParameterDict({})
        self.rosa_row = BufferDict({}, persistent=True)
        self.rosa_col = BufferDict({}, persistent=True)
        self.rosa_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._ready: dict[str, bool] = {}  # mask built? (cached: reading the sentinel syncs a GPU)
        self.init_sparse_core()
        self.grad_collectors: dict[str, Any] = {}  # adapter -> callable(grad_out, x), see mask.py
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.kwargs = kwargs

    # ------------------------------------------------------------------ creation
    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, density: float,
        use_rslora: bool = False, inference_mode: bool = False, tile: int | None = None,
    ) -> None:
        """Add adapter ``adapter_name`` with all tensors at their final size (``r``, ``density``, ``tile``: checked
        by :class:`~lightning_peft.methods.rosa.config.RosaPeftConfig`)."""
        self.r[adapter_name] = r
        self.density[adapter_name] = float(density)
        self.tile[adapter_name] = tile
        self.scaling[adapter_name] = (lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r) if r > 0 else 0.0
        self.rosa_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if r > 0:
            self.rosa_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))  # (r, in)
            self.rosa_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r))  # (out, r)
            nn.init.kaiming_uniform_(self.rosa_A[adapter_name], a=math.sqrt(5))  # as nn.Linear / peft LoRA
        shape = (self.out_features, self.in_features)
        nnz = tile_nnz(nnz_for(density, shape[0] * shape[1]), shape, tile, "RoSA")  # whole tiles when tiled
        self.rosa_values[adapter_name] = nn.Parameter(torch.zeros(nnz))  # (nnz,)
        self.rosa_row[adapter_name] = torch.full((nnz,), _UNSET, dtype=torch.int32)  # (nnz,)
        self.rosa_col[adapter_name] = torch.full((nnz,), _UNSET, dtype=torch.int32)  # (nnz,)
        self._ready[adapter_name] = False
        self.forget_masks()
        self._move_adapter_to_device_of_base_layer(adapter_name)  # device and float dtype of the base
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ------------------------------------------------------------------ mask
    def mask_ready(self, adapter: str) -> bool:
        """Whether ``adapter``'s mask is built (its sparse part contributes)."""
        if adapter not in self._ready:
            self._ready[adapter] = bool(self.rosa_row[adapter].numel()) and int(self.rosa_row[adapter][0]) != _UNSET
        return self._ready[adapter]

    def sparse_index(self, adapter: str) -> SparseIndex:
        """``adapter``'s mask in ``(out, in)`` coordinates (only meaningful once :meth:`mask_ready`)."""
        return SparseIndex(self.rosa_row[adapter], self.rosa_col[adapter], (self.out_features, self.in_features))

    index = sparse_index

    def encode_index_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Checkpoints: ``rosa_row``/``rosa_col`` become ``rosa_row.<a>:<code>`` (CSR + int16 or flat int32)."""
        for a in self.rosa_values:
            rk, ck = f"{prefix}rosa_row.{a}", f"{prefix}rosa_col.{a}"
            if rk in state_dict and ck in state_dict:
                codes = encode_index(state_dict.pop(rk), state_dict.pop(ck), (self.out_features, self.in_features))
                state_dict.update({f"{rk}:{code}": t for code, t in codes.items()})

    def decode_index_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        for a in self.rosa_values:
            rk = f"{prefix}rosa_row.{a}"
            parts = {c: state_dict.pop(f"{rk}:{c}") for c in INDEX_CODES if f"{rk}:{c}" in state_dict}
            if parts:
                state_dict[rk], state_dict[f"{prefix}rosa_col.{a}"] = decode_index(parts, (self.out_features, self.in_features))

    def sparse_values(self, adapter: str) -> torch.Tensor:
        """``adapter``'s ``(nnz,)`` sparse values (RoSA's ``S`` is not scaled)."""
        return self.rosa_values[adapter]

    @torch.no_grad()
    def set_mask(self, adapter: str, index: SparseIndex) -> None:
        """Install ``index`` as ``adapter``'s mask (in place) and zero its sparse values.

        Raises:
            ValueError: ``index`` has another shape or ``nnz`` than the preallocated values, or the
                layer is merged.
        """
        if self.merged:
            raise ValueError("RoSA: set_mask on a merged layer; unmerge() first")
        if tuple(index.shape) != (self.out_features, self.in_features) or index.nnz != self.rosa_values[adapter].numel():
            raise ValueError(
                f"RoSA mask of shape {index.shape} with nnz={index.nnz} does not fit this layer "
                f"({self.out_features}, {self.in_features}) with nnz={self.rosa_values[adapter].numel()}; "
                "build it with topk_mask(scores, density) at the adapter's density (tile_mask(scores, nnz, b) when tiled)"
            )
        self.rosa_row[adapter].copy_(index.row)
        self.rosa_col[adapter].copy_(index.col)
        self.rosa_values[adapter].zero_()
        self._ready[adapter] = True
        self.forget_masks()

    def refresh_mask_state(self) -> None:
        """Forget cached mask facts (after a state-dict load replaced the index buffers)."""
        self._ready.clear()
        self.forget_masks()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (peft's bookkeeping) and the cached facts about its mask."""
        super().delete_adapter(adapter_name)
        self.grad_collectors.pop(adapter_name, None)
        self.refresh_mask_state()

    def base_weight_out_in(self) -> torch.Tensor:
        """The frozen base weight as an ``(out, in)`` tensor (a transposed view for ``Conv1D``)."""
        w = self.get_base_layer().weight
        return w.T if getattr(self, "fan_in_fan_out", False) else w

    # ------------------------------------------------------------------ weights
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``S + s * B A`` in the base weight's layout (``(in, out)`` for ``Conv1D``), fp32.

        Allocates a weight-sized tensor: for merging, export and tests, not the training path.
        """
        delta = self.delta_out_in(adapter)
        return delta.T if getattr(self, "fan_in_fan_out", False) else delta

    def delta_out_in(self, adapter: str) -> torch.Tensor:
        """Dense fp32 ``(out, in)`` delta ``S + s * B A`` of ``adapter``."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.rosa_values[adapter].device)
        if self.mask_ready(adapter):
            idx = self.index(adapter)
            delta.index_put_((idx.row.long(), idx.col.long()), self.rosa_values[adapter].detach().float())
        if self.r[adapter] > 0:
            delta += (self.rosa_B[adapter].float() @ self.rosa_A[adapter].float()).detach() * self.scaling[adapter]
        return delta


class Linear(nn.Module, RosaLayer):
    """RoSA around an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out=True``)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int = 16, lora_alpha: float = 16.0,
        lora_dropout: float = 0.0, density: float = 0.006, use_rslora: bool = False,
        fan_in_fan_out: bool = False, tile: int | None = None, **kwargs: Any,
    ) -> None:
        super().__init__()
        RosaLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, density, use_rslora, tile=tile)
        self.register_load_state_dict_pre_hook(_decode_index)  # checkpoints hold compact indices
        self.register_load_state_dict_post_hook(_refresh_after_load)  # a function, not a lambda: picklable

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the active adapters' deltas into the base weight (in place).

        Sparse-only adapters save the ``nnz`` overwritten entries (``scatter_add``); adapters with a
        LoRA part save a full copy of ``W`` (the dense ``s B A`` touches every entry). :meth:`unmerge`
        writes the saved bits back in reverse order, so it restores ``W`` bit-exactly.

        Raises:
            ValueError: ``safe_merge`` found non-finite values.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        w = self.base_weight_out_in()  # (out, in) view
        for name in adapter_names:
            if name not in self.rosa_values:
                continue
            if safe_merge and not torch.isfinite(w.float() + self.delta_out_in(name)).all():
                raise ValueError(f"RoSA: merging adapter {name!r} gives non-finite weights; the adapter is broken")
            if self.r[name] > 0:
                w_data = self.push_weight_copy()  # the dense s B A touches every entry
                if self.mask_ready(name):
                    scatter_add(w_data, self.index(name), self.rosa_values[name].detach(), 1.0)
                lora = (self.rosa_B[name].float() @ self.rosa_A[name].float()) * self.scaling[name]  # (out, in)
                w_data.copy_((w_data.float() + lora).to(w.dtype))
            elif self.mask_ready(name):
                self.push_sparse_merge(self.index(name), self.rosa_values[name])
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly (saved bits, never a subtraction)."""
        if not self.merged:
            warnings.warn("RoSA: already unmerged, nothing to do", stacklevel=2)
            return
        self.pop_merges()
        self.merged_adapters.clear()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``y = x (W + sum S)^T + b + sum s dropout(x) A^T B^T`` over the active adapters.

        Args:
            x: ``(..., in)``.

        Returns:
            ``(..., out)`` in the base layer's dtype.
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.rosa_values]
        sparse = [a for a in active if self.mask_ready(a)]
        bias = self.get_base_layer().bias
        result = self.sparse_linear(x, sparse, bias) if sparse else self.base_layer(x, *args, **kwargs)  # (..., out)
        for a in active:
            if self.r[a] > 0:
                A, B = self.rosa_A[a], self.rosa_B[a]
                h = self.rosa_dropout[a](x.to(A.dtype))  # (..., in)
                result = result + (F.linear(F.linear(h, A), B) * self.scaling[a]).to(result.dtype)  # (..., out)
            if a not in sparse and self.rosa_values[a].requires_grad and torch.is_grad_enabled():
                # S is inactive until its mask exists, but DDP needs every trainable parameter used in
                # every step (torch DDP's reducer, unless find_unused_parameters=True): a zero contribution gives it an exact zero gradient.
                result = result + (self.rosa_values[a].sum() * 0.0).to(result.dtype)
        if self.grad_collectors and torch.is_grad_enabled() and result.requires_grad:
            # dL/dW of the frozen base weight is dO^T X (out, in); RoSA's code forms it the same way
            # from the layer's input and output gradient instead of making W require grad.
            result.register_hook(_CollectHook(list(self.grad_collectors.values()), x.detach()))
        return result

    def __repr__(self) -> str:
        return "rosa." + super().__repr__()
