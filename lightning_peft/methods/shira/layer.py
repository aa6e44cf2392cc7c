"""SHiRA layer: peft's own ``shira.Linear``, trained through the sparse core (no dense ``dW``).

Why a subclass of peft's layer rather than our own module: the model then holds peft's shira
layer with peft's attribute names (``shira_weight[adapter]``, ``shira_indices[adapter]``), so
``get_peft_model_state_dict``/``save_adapter`` write peft's native ``shira`` folder and
``PeftModel.from_pretrained`` (peft's built-in layer) loads it unchanged, and a peft-made
adapter loads into this layer through peft's own injection. What changes (Bhardwaj et al. 2024, section 4):

* ``forward``: peft clones ``W`` (``out * in``), adds a ``sparse_coo`` delta and lets autograd
  form the dense ``(out, in)`` weight gradient. Here the shared sparse core
  (:class:`~lightning_peft.methods._sparse.core.SparseDeltaCore`, also RoSA's) adds ``S`` into ``W``
  in place around one GEMM, restores the bits, and computes ``dS`` by SDDMM: no copy, no dense
  ``dW``; the optimizer only sees ``shira_weight`` ``(nnz,)``. A tile mask (``tile=b``) trains through the
  tile op (whole-tile merge, ``dS`` one GEMM per column block of tiles), its ``(nnz,)`` values being ``(T, b)``
  tile by tile.
* ``merge``/``unmerge``: the core's exact merge stack (``scatter_add`` saving the overwritten
  originals, then ``scatter_restore``) instead of peft's dense ``W +=/-= S`` (which does not round-trip).
* budget: peft fixes ``nnz = r * (in + out)``; here ``nnz`` is the mask's own count (exactly
  ``round(density * numel)``) and ``shira_indices`` is padded to the adapter's ``r * (in + out)``
  with positions whose saved value is exactly 0 (:func:`~.mask.pad_index`), so the folder still
  has peft's shapes. ``shira_indices`` is a persistent ``BufferDict`` (peft keeps a plain dict),
  so Lightning checkpoints hold the mask and resume exactly.

Used through :func:`shira_layer_class`: peft's ``shira`` model looks its layer class up in the
module global ``peft.tuners.shira.model.Linear``; inside that context it builds this layer. The
SHiRA callback and :func:`lightning_peft.load_adapter` (for ``SHIRA`` folders) inject inside it;
anything else in the process (a user's own ``get_peft_model(ShiraConfig(...))``) keeps peft's
layer. Outputs are the same either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peft.tuners.shira.model as peft_shira_model
import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.shira.layer import Linear as PeftShiraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from lightning_peft.kernels import SparseIndex
from lightning_peft.methods._sparse import SparseDeltaCore
from lightning_peft.methods._sparse.storage import INDEX_CODES, decode_index, encode_index
from lightning_peft.methods.shira.mask import pad_index

__all__ = ["PEFT_SHIRA_LINEAR", "ShiraLinear", "shira_layer_class"]

PEFT_SHIRA_LINEAR = PeftShiraLinear  # peft's own layer class (tests and benchmarks compare with it)


class ShiraLinear(PeftShiraLinear, SparseDeltaCore):
    """peft's ``shira.Linear`` with a sparse-core forward, exact merge and a saved mask.

    Per adapter ``a``:

    * ``shira_weight[a]``: ``(nnz,)`` trainable values;
    * ``shira_indices[a]``: ``(2, n_file)`` int32, ``n_file = r * (in + out) >= nnz``; columns
      ``[:nnz]`` are the mask (row, col), the rest padding whose values are saved as 0;
    * ``shira_nnz[a]``: ``nnz``.

    ``state_dict`` pads ``shira_weight`` to ``n_file`` (peft's shapes); loading takes the first
    ``nnz`` back when the padded tail is zero, and otherwise adopts the file's size.
    """

    other_param_names = ("r", "scaling", "shira_indices", "shira_nnz")

    def __init__(self, base_layer: nn.Module, mask: Any, adapter_name: str, config: Any, r: int = 0, **kwargs: Any):
        self.shira_nnz: dict[str, int] = {}
        self.calibrating = False
        self.init_sparse_core()
        super().__init__(base_layer, mask, adapter_name, config=config, r=r, **kwargs)
        self.register_state_dict_post_hook(_pad_values_hook)
        self.register_load_state_dict_pre_hook(_decode_index)  # checkpoints hold compact indices; first
        self.register_load_state_dict_pre_hook(_load_values_hook)
        self.register_load_state_dict_post_hook(_cache_tiles_hook)  # after the loaded positions are in place

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, mask: Any, r: int, config: Any, inference_mode: bool = False,
                     **kwargs: Any) -> None:
        """Add adapter ``adapter_name`` with ``mask`` (a SparseIndex, a peft 0/1 mask, or None).

        ``None`` (peft's config without a mask function, e.g. loading a saved adapter) installs
        the first ``r * (in + out)`` positions as a placeholder that loading overwrites.

        Raises:
            ValueError: ``r <= 0``, ``r * (in + out) > in * out``, or a mask of another size.
        """
        if not isinstance(self.shira_indices, BufferDict):
            self.shira_indices = BufferDict(persistent=True)
        if r <= 0:
            raise ValueError(f"SHiRA r must be a positive integer, got r={r}; it sets r * (in + out) entries per layer")
        shape = (self.out_features, self.in_features)
        n_file = r * (self.in_features + self.out_features)
        if n_file > shape[0] * shape[1]:
            raise ValueError(
                f"SHiRA r={r} gives r * (in + out) = {n_file} entries, more than the {shape[0]}x{shape[1]} layer has; "
                "lower r or the density"
            )
        if mask is None:
            index = SparseIndex.from_flat(torch.arange(n_file), shape)
        elif isinstance(mask, SparseIndex):
            index = mask
        else:  # peft's mask_fn convention: a dense 0/1 (out, in) tensor with r * (in + out) ones
            index = SparseIndex.from_mask(mask.detach().cpu() == 1)
        if index.nnz > n_file:
            raise ValueError(
                f"SHiRA mask of adapter {adapter_name!r} has {index.nnz} entries, more than r * (in + out) = {n_file}; "
                "raise r or pass a smaller mask"
            )
        init = torch.zeros(index.nnz) if config.init_weights else torch.randn(index.nnz)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = 1.0
        self.shira_nnz[adapter_name] = index.nnz
        self.shira_weight[adapter_name] = nn.Parameter(init, requires_grad=True)
        self.shira_indices[adapter_name] = pad_index(index.to("cpu"), n_file)
        self.forget_masks()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.cache_tiles()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def sparse_index(self, adapter: str) -> SparseIndex:
        """The adapter's trainable positions (``nnz`` of them, without padding)."""
        idx = self.shira_indices[adapter]
        n = self.shira_nnz[adapter]
        return SparseIndex(idx[0, :n].contiguous(), idx[1, :n].contiguous(), (self.out_features, self.in_features))

    mask_index = sparse_index

    def cache_tiles(self) -> None:
        """Find, in eager code, which adapters' masks are whole tiles (:meth:`sparse_tiles`), so a compiled
        forward trains them through the tile op too. Called whenever the positions change."""
        for a in self.shira_weight:
            self.sparse_tiles([a], self.sparse_index(a))

    def sparse_values(self, adapter: str) -> torch.Tensor:
        """``scaling * shira_weight`` ``(nnz,)`` of ``adapter``."""
        v = self.shira_weight[adapter]
        return v if self.scaling[adapter] == 1.0 else v * self.scaling[adapter]

    def base_weight_out_in(self) -> torch.Tensor:
        """The frozen ``(out, in)`` base weight (peft's shira adapts ``nn.Linear`` only)."""
        return self.get_base_layer().weight

    def encode_index_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Checkpoints: the ``nnz`` trained positions as ``shira_indices.<a>:<code>`` and the ``nnz`` values; peft's
        padding (positions from :func:`~.mask.pad_index`, values exact zeros) is recomputed on load."""
        for a in self.shira_weight:
            ik, vk, n = f"{prefix}shira_indices.{a}", f"{prefix}shira_weight.{a}", self.shira_nnz[a]
            if ik not in state_dict:
                continue
            idx = state_dict.pop(ik)[:, :n]
            if vk in state_dict:
                state_dict[vk] = state_dict[vk][:n].clone()
            state_dict.update({f"{ik}:{c}": t for c, t in encode_index(idx[0], idx[1], self._out_in()).items()})

    def decode_index_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        for a in self.shira_weight:
            ik = f"{prefix}shira_indices.{a}"
            parts = {c: state_dict.pop(f"{ik}:{c}") for c in INDEX_CODES if f"{ik}:{c}" in state_dict}
            if not parts:
                continue
            row, col = decode_index(parts, self._out_in())
            n_file = self.shira_indices[a].shape[1]
            state_dict[ik] = pad_index(SparseIndex(row, col, self._out_in()), n_file)
            vk = f"{prefix}shira_weight.{a}"
            if vk in state_dict and state_dict[vk].shape[0] < n_file:
                v = state_dict[vk]
                state_dict[vk] = torch.cat([v, v.new_zeros(n_file - v.shape[0])])

    def _out_in(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @torch.no_grad()
    def set_mask(self, adapter: str, index: SparseIndex) -> None:
        """Replace the adapter's mask in place (same ``nnz``; values reset to 0, same Parameter).

        Keeps the ``shira_weight`` Parameter object, so an optimizer built before (calibration
        runs after ``configure_optimizers``) still updates it.

        Raises:
            ValueError: ``index`` has another ``nnz`` or shape.
        """
        if index.nnz != self.shira_nnz[adapter] or tuple(index.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"SHiRA set_mask: adapter {adapter!r} holds {self.shira_nnz[adapter]} entries of a "
                f"{(self.out_features, self.in_features)} weight, got {index.nnz} of {tuple(index.shape)}"
            )
        buf = self.shira_indices[adapter]
        buf.copy_(pad_index(index.to("cpu"), buf.shape[1]).to(buf.device))
        self.shira_weight[adapter].zero_()
        self.forget_masks()
        self.cache_tiles()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``(out, in)`` ``S * scaling`` (for peft utilities and tests; not the training path)."""
        index = self.mask_index(adapter)
        w = self.get_base_layer().weight
        delta = torch.zeros(self.out_features, self.in_features, dtype=self.shira_weight[adapter].dtype, device=w.device)
        delta[index.row.long(), index.col.long()] = self.shira_weight[adapter] * self.scaling[adapter]
        return delta

    # ------------------------------------------------------------------ forward / merge
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``y = x (W + sum_a scaling_a S_a)^T + b`` through the in-place sparse-delta linear.

        Args:
            x: ``(..., in)``.

        Returns:
            ``(..., out)`` in the base weight's dtype.
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.shira_weight]
        if self.merged or self.calibrating or not active:  # delta inside W, calibration (dense dW wanted), none
            return self.base_layer(x, *args, **kwargs)
        return self.sparse_linear(x, active, self.get_base_layer().bias, use_triton=getattr(self, "use_triton", None))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the active adapters into the base weight in place (``scatter_add``), saving originals.

        Raises:
            ValueError: ``safe_merge`` and the merged weight would hold NaN/inf (``W`` is left as it was).
        """
        names = check_adapters_to_merge(self, adapter_names)
        w = self.base_weight_out_in()
        use_triton = getattr(self, "use_triton", None)
        for a in names:
            if a not in self.shira_weight:
                continue
            index = self.sparse_index(a)
            if safe_merge and not torch.isfinite(w[index.row.long(), index.col.long()] + self.sparse_values(a)).all():
                raise ValueError(f"NaN/inf in the merged weights: adapter {a!r} seems to be broken; it was not merged")
            self.push_sparse_merge(index, self.sparse_values(a), use_triton=use_triton)
            self.merged_adapters.append(a)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly (saved originals written back in reverse order)."""
        self.pop_merges(use_triton=getattr(self, "use_triton", None))
        self.merged_adapters.clear()


# ---------------------------------------------------------------------- state-dict hooks
def _pad_values_hook(module: ShiraLinear, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Save ``shira_weight`` padded with zeros to ``shira_indices``' length (peft's shapes)."""
    for a, idx in module.shira_indices.items():
        key = f"{prefix}shira_weight.{a}"
        if key in state_dict and state_dict[key].shape[0] < idx.shape[1]:
            v = state_dict[key]
            state_dict[key] = torch.cat([v.detach(), v.new_zeros(idx.shape[1] - v.shape[0])])


def _decode_index(module: ShiraLinear, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    module.decode_index_state(state_dict, prefix)


def _load_values_hook(module: ShiraLinear, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Fit a saved (padded) ``shira_weight``/``shira_indices`` pair to this layer before torch copies it.

    A tail of exact zeros beyond this layer's ``nnz`` is padding: the first ``nnz`` values are
    kept (resume, or our own saved folder). Otherwise (e.g. a peft-made adapter with all
    ``r * (in + out)`` entries trained) the layer adopts the file's size as its ``nnz``.
    """
    for a in list(module.shira_weight.keys()):
        vkey, ikey = f"{prefix}shira_weight.{a}", f"{prefix}shira_indices.{a}"
        if vkey not in state_dict:
            continue
        v = state_dict[vkey]
        idx = state_dict.get(ikey, module.shira_indices[a])
        nnz = module.shira_nnz[a]
        if ikey in state_dict and tuple(idx.shape) != tuple(module.shira_indices[a].shape):
            module.shira_indices[a] = torch.empty_like(idx, dtype=torch.int32, device=module.shira_indices[a].device)
        if v.shape[0] > nnz and not bool(v[nnz:].any()):
            state_dict[vkey] = v[:nnz]
        elif v.shape[0] != nnz:
            old = module.shira_weight[a]
            module.shira_weight[a] = nn.Parameter(old.new_empty(v.shape[0]), requires_grad=old.requires_grad)
            module.shira_nnz[a] = v.shape[0]
        if ikey in state_dict:
            state_dict[ikey] = idx.to(torch.int32)
    module.forget_masks()


def _cache_tiles_hook(module: ShiraLinear, incompatible_keys: Any) -> None:
    module.cache_tiles()


@contextmanager
def shira_layer_class() -> Iterator[None]:
    """Within the block, peft's ``shira`` tuner builds :class:`ShiraLinear`; peft's own class after."""
    previous = peft_shira_model.Linear
    peft_shira_model.Linear = ShiraLinear
    try:
        yield
    finally:
        peft_shira_model.Linear = previous
