"""``AdapterBank``: many adapters for one loaded base model, switched in place (SHiRA section 4).

SHiRA's rapid switching (Bhardwaj et al. 2024, arXiv 2406.13175,
section 4): a sparse adapter is ``nnz`` (position, value) pairs, so serving it means writing
the values into the base weights in place, and undoing it means writing the overwritten
originals back. No fused copy of the model, no dense ``(out, in)`` delta::

    activate("a"):   saved_a = W[idx_a];  W[idx_a] += S_a          (scatter_add, nnz elements)
    activate("b"):   W[idx_a] = saved_a  (bit-exact undo)  then  W[idx_b] += S_b
    fuse({"a": 1, "b": .5}):  W[idx_a] += 1 * S_a;  W[idx_b] += .5 * S_b   (W + a1 S1 + a2 S2)
    deactivate():    originals written back in reverse order -> W bit-identical to the base

Each add is computed in fp32 and rounded once to ``W``'s dtype (``scatter_add``); where two
fused masks overlap, the second add rounds the first's result again (exact for fp32 sums that
fit, within one ulp per add otherwise). ``deactivate`` never subtracts, so the base comes back
bit-exactly whatever was applied.

RoSA adapters are applied as their two parts: the sparse ``S`` by scatter (exact undo), the
low-rank ``s B A`` like a LoRA. Which layers a method builds and how to read their deltas comes
from the method's :class:`~lightning_peft.registry.MethodSpec` (``bank_deltas``, ``bank_tensors``);
the deltas are terms of :mod:`lightning_peft.deltas` (``apply``/``restore``/``dense``/``to``), applied and
undone through the same :class:`~lightning_peft.deltas.MergeStack` the sparse layers merge with, so the
bank never asks which kind of term it holds.

LoRA adapters are accepted for comparison with peft's merge semantics: ``W += scale * B @ A``
(a dense ``(out, in)`` GEMM and add over every weight element). Undo is ``lora_restore="copy"``
(default: a saved copy of each touched ``W``, bit-exact, costs one weight copy of memory) or
``"subtract"`` (peft's ``unmerge``: ``W -= scale * B @ A``, no extra memory, **not** bit-exact:
rounding leaves ~1 ulp errors that accumulate over switches).

Scatter ops dispatch to Triton on CUDA and to PyTorch index ops on CPU
(:mod:`lightning_peft.kernels.scatter`). A switch costs two scattered passes over ``nnz`` entries
(restore the previous adapter, add the next); each scattered entry touches its own cache line, so on CPU it
is slower than a contiguous copy of as many values (peft's LoRA hotswap) once the weights leave the cache,
while generation then runs the plain fused base (``benchmarks/serving.py``). Each held adapter keeps its
values (4 B/entry in fp32), int32 row and column (8 B) and, after its first use, cached int64 storage
offsets (8 B; :meth:`~lightning_peft.kernels.SparseIndex.offsets`).

Tile-structured adapters (SHiRA ``tile=b``: entries in 1 x b runs along ``in``) are held as
:class:`~lightning_peft.deltas.TileTerm` s, chosen automatically from the positions
(:func:`~lightning_peft.deltas.sparse_term`): one int64 per tile and ``(tiles, b)`` values, ``4 + 8 / b``
bytes per fp32 entry (LoRA: 4 per parameter; 1.125x at b = 16), and a switch gathers, adds and copies back whole tiles,
every byte in runs of ``4 b`` bytes, like a contiguous copy (SMT, ICLR 2025, switches blocks the same way).
A switch (``activate``/``fuse`` while something is applied) goes weight by weight
(:meth:`~lightning_peft.deltas.MergeStack.replace`): each weight's applied terms are undone last first, then the
next adapters' terms applied, the same bits as ``deactivate`` followed by the applies (changes of different weights
commute), and each new tile ``saved`` is written into a buffer the restore just freed, so a switch allocates
nothing when the adapters have the same tile counts. A switch that fails leaves the base, bit-exactly.

Mixed-adapter batches (:meth:`AdapterBank.mixed`, :meth:`AdapterBank.generate` with ``adapters=[...]``): no adapter is
fused; each row of the batch gets its own adapter's delta added to the adapted layers' outputs
(:mod:`lightning_peft.mixed_batch`), as multi-LoRA servers and peft's ``adapter_names=`` do for LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lightning_peft.adapter_folder import AdapterFolder
from lightning_peft.deltas import (
    DeltaTerm,
    LowRankTerm,
    MergeStack,
    SparseTerm,
    TileTerm,
    lora_scale,
    sparse_term,
)
from lightning_peft.fingerprint import find_base_model
from lightning_peft.mixed_batch import mixed_rows
from lightning_peft.registry import method_specs, spec_for_layer, spec_for_peft_type

__all__ = ["AdapterBank", "LowRankTerm", "SparseTerm", "TileTerm", "lora_scale", "sparse_term"]


class AdapterBank:
    """Holds many SHiRA (and LoRA) adapters of one base model and applies them in place.

    Args:
        model: The base model (an ``nn.Module`` or LightningModule). Adapter paths are relative
            to its base model as in :func:`lightning_peft.fingerprint.find_base_model`; modules
            that still hold a peft tuner layer are written through their ``base_layer``.
        lora_restore: ``"copy"`` (bit-exact) or ``"subtract"`` (peft's unmerge, inexact).
        use_triton: Scatter dispatch (``None``: Triton on CUDA, PyTorch on CPU).

    Example::

        bank = AdapterBank(model)
        bank.add("sql", "adapters/sql")          # a folder saved by save_adapter / peft
        bank.add("chat", trained_module)         # adapters taken from a module
        bank.activate("sql"); ...; bank.activate("chat"); ...; bank.deactivate()
    """

    def __init__(
        self, model: nn.Module, lora_restore: Literal["copy", "subtract"] = "copy", use_triton: bool | None = None
    ) -> None:
        if lora_restore not in ("copy", "subtract"):
            raise ValueError(f"AdapterBank lora_restore must be 'copy' or 'subtract', got {lora_restore!r}")
        self.model = model
        self.base_prefix, self.base = find_base_model(model)
        self.lora_restore = lora_restore
        self.use_triton = use_triton
        self.adapters: dict[str, list[tuple[str, DeltaTerm]]] = {}  # name -> [(path, term)]
        self.kinds: dict[str, str] = {}
        self._applied = MergeStack()
        self.active: dict[str, float] = {}
        self._paths: dict[str, list[str]] = {}  # adapter path -> module name in the base, split at dots

    # ------------------------------------------------------------------ filling
    def names(self) -> list[str]:
        """Names of the held adapters, in insertion order."""
        return list(self.adapters)

    def add(self, name: str, source: str | Path | nn.Module, adapter_name: str | None = None) -> AdapterBank:
        """Add adapter ``name`` from a saved folder (ours or peft's) or from a module holding it.

        Args:
            name: Name in the bank.
            source: An adapter folder (ours or peft's) of a switchable method (SHiRA, RoSA, LoRA), or a
                module with injected adapters (their tuner layers are read; tensors are copied).
            adapter_name: Which adapter of a module (default: ``"default"``); ignored for folders.

        Raises:
            ValueError: name taken, unsupported peft type, or a path that does not exist in the model.
        """
        if name in self.adapters:
            raise ValueError(f"AdapterBank already holds an adapter named {name!r}; pick another name or remove() it")
        if isinstance(source, nn.Module):
            deltas, kind = _from_module(source, adapter_name or "default")
        else:
            deltas, kind = _from_folder(Path(source), lambda p: tuple(self._weight(p).shape))
        if not deltas:
            switchable = [s.name for s in method_specs() if s.bank_deltas]
            raise ValueError(f"AdapterBank.add({name!r}): the source holds no adapter of a switchable method ({switchable})")
        for path, d in deltas:  # fail now, before anything is stored, not at activation
            want, got = tuple(self._weight(path).shape), d.shape
            if got != want:
                raise ValueError(
                    f"AdapterBank.add({name!r}): the adapter's {path} is made for a {got[0]} x {got[1]} weight, but this "
                    f"model's is {want[0]} x {want[1]}; add adapters trained on this base (same architecture and size)"
                )
        self.adapters[name] = [(p, d.to(self._weight(p).device)) for p, d in deltas]
        self.kinds[name] = kind
        return self

    def remove(self, name: str) -> None:
        """Forget an adapter (deactivate it first if it is applied)."""
        if name in self.active:
            self.deactivate()
        self.adapters.pop(name)
        self.kinds.pop(name)

    def _layer(self, path: str) -> nn.Module:
        """The layer at ``path`` (relative to the base model; else the one module whose name ends with it), unwrapped
        from a peft tuner layer."""
        if path not in self._paths:
            names = [n for n, _ in self.base.named_modules()]
            found = [n for n in names if n == path] or [n for n in names if n.endswith("." + path)]
            if len(found) != 1:
                raise ValueError(
                    f"AdapterBank: adapter path {path!r} does not exist in the base model {type(self.base).__name__}"
                    f"{' (several modules end with it)' if found else ''}; add adapters trained on this architecture"
                )
            self._paths[path] = found[0].split(".") if found[0] else []
        module = self.base
        for part in self._paths[path]:  # get_submodule's walk without its checks (resolved above): 1 us, not 8
            module = module._modules[part]
        return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module

    def _weight(self, path: str) -> torch.Tensor:
        return self._layer(path).weight.data

    def held_bytes(self, name: str) -> int:
        """Bytes adapter ``name`` keeps in the bank: values and positions of every term (cached offsets included)."""
        return sum(term.nbytes for _, term in self.adapters[name])

    def dense_deltas(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s dense fp32 ``(out, in)`` delta per weight path (analysis only: allocates)."""
        out: dict[str, torch.Tensor] = {}
        for path, d in self.adapters[name]:
            dense = d.dense(torch.float32)
            out[path] = out[path] + dense if path in out else dense
        return out

    # ------------------------------------------------------------------ switching
    def activate(self, name: str) -> None:
        """Apply adapter ``name`` alone (undoing whatever is applied first)."""
        self.fuse({name: 1.0})

    @torch.no_grad()
    def fuse(self, weights: Mapping[str, float]) -> None:
        """Apply several adapters at once: ``W + sum_i a_i S_i`` (undoing whatever is applied first).

        Raises:
            KeyError: an unknown adapter name.
        """
        unknown = [n for n in weights if n not in self.adapters]
        if unknown:
            raise KeyError(f"AdapterBank holds no adapter {unknown[0]!r}; it holds {self.names()}")
        changes = [(term, self._weight(path), float(alpha)) for name, alpha in weights.items()
                   for path, term in self.adapters[name]]
        self.active = {}
        try:  # undo what is applied and apply the next, weight by weight (same bits as deactivate + pushes)
            self._applied.replace(changes, use_triton=self.use_triton, copy_undo=self.lora_restore == "copy")
        except BaseException:
            self.deactivate()  # nothing half-applied: the base, bit-exactly
            raise
        self.active = {name: float(alpha) for name, alpha in weights.items()}

    @torch.no_grad()
    def deactivate(self) -> None:
        """Restore the base weights (bit-exactly for SHiRA, and for LoRA with ``lora_restore='copy'``)."""
        self._applied.pop_all(use_triton=self.use_triton)
        self.active = {}

    @contextmanager
    def applied(self, weights: str | Mapping[str, float]) -> Iterator[AdapterBank]:
        """Context manager: ``with bank.applied("a"):`` or ``bank.applied({"a": 1, "b": .5})``."""
        self.fuse({weights: 1.0} if isinstance(weights, str) else weights)
        try:
            yield self
        finally:
            self.deactivate()

    # ------------------------------------------------------------------ mixed-adapter batches
    @contextmanager
    def mixed(self, adapters: Sequence[str | None]) -> Iterator[AdapterBank]:
        """Context manager: forwards inside it run each batch row with its own adapter, the base weights unfused.

        ``with bank.mixed(["sql", "chat", None, "sql"]): model(input_ids)``: row ``i`` of the batch uses
        ``adapters[i]`` (``None``: the bare base); the base GEMM runs once over the batch and each adapter's delta
        is added on its rows (:mod:`lightning_peft.mixed_batch`), as peft's ``adapter_names=`` does for LoRA.
        Whatever is applied is undone first. Inference only (``torch.no_grad()`` / ``inference_mode()``).

        Raises:
            KeyError: an unknown adapter name.
            ValueError: no names, or an adapted layer that is not an ``nn.Linear`` (e.g. GPT-2's ``Conv1D``: switch
                with :meth:`activate` instead).
        """
        if not adapters:
            raise ValueError("AdapterBank.mixed needs one adapter name (or None for the base) per batch row, got none")
        named = list(dict.fromkeys(a for a in adapters if a is not None))
        unknown = [n for n in named if n not in self.adapters]
        if unknown:
            raise KeyError(f"AdapterBank holds no adapter {unknown[0]!r}; it holds {self.names()}")
        terms: dict[str, dict[str, list[DeltaTerm]]] = {n: {} for n in named}
        for name in named:
            for path, term in self.adapters[name]:
                terms[name].setdefault(path, []).append(term)
        layers = {path: self._layer(path) for name in named for path in terms[name]}
        wrong = [p for p, m in layers.items() if not isinstance(m, nn.Linear)]
        if wrong:
            raise ValueError(f"AdapterBank.mixed adds deltas to nn.Linear outputs, but {wrong[0]} is a "
                             f"{type(layers[wrong[0]]).__name__}; serve this model one adapter at a time (activate)")
        self.deactivate()
        with mixed_rows(layers, terms, list(adapters)):
            yield self

    def generate(self, inputs: torch.Tensor | Mapping[str, torch.Tensor], adapters: Sequence[str | None],
                 **generate_kwargs: Any) -> torch.Tensor:
        """``generate`` with batch row ``i`` under ``adapters[i]`` (:meth:`mixed`), under ``torch.no_grad()``.

        Args:
            inputs: ``input_ids`` ``(batch, tokens)``, or a tokenizer's output (``input_ids``, ``attention_mask``).
            adapters: One adapter name (or ``None``: the base) per row.
            **generate_kwargs: Passed to the model's ``generate`` (``max_new_tokens``, ``num_beams``, ...).

        Returns:
            What the model's ``generate`` returns.
        """
        model = self.model if hasattr(self.model, "generate") else self.base
        with torch.no_grad(), self.mixed(adapters):
            if isinstance(inputs, torch.Tensor):
                return model.generate(inputs, **generate_kwargs)
            return model.generate(**inputs, **generate_kwargs)

    # ------------------------------------------------------------------ Lightning
    def validate(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        adapters: Iterable[str | Mapping[str, float]] | None = None,
        **validate_kwargs: Any,
    ) -> dict[str, list[dict[str, float]]]:
        """Run ``trainer.validate`` once per adapter (or fusion) on the one loaded base.

        Args:
            trainer: A Lightning ``Trainer``.
            module: The LightningModule whose base the bank writes into.
            adapters: Names or fusion dicts (default: every adapter alone).
            **validate_kwargs: Passed to ``trainer.validate`` (e.g. ``dataloaders=``).

        Returns:
            ``{label: trainer.validate(...) result}``; a fusion's label is ``"a+b"`` with weights
            (``"a*1.0+b*0.5"``).
        """
        results: dict[str, list[dict[str, float]]] = {}
        for item in adapters if adapters is not None else self.names():
            label = item if isinstance(item, str) else "+".join(f"{k}*{v}" for k, v in item.items())
            with self.applied(item):
                results[label] = trainer.validate(module, verbose=False, **validate_kwargs)
        return results


# ---------------------------------------------------------------------- readers
def _from_folder(path: Path, shape_of: Any) -> tuple[list[tuple[str, DeltaTerm]], str]:
    """The folder's terms per weight path, read by its method's ``bank_tensors``."""
    config, tensors, _ = AdapterFolder(path).read()
    spec = spec_for_peft_type(config.peft_type)
    if spec is None or spec.bank_tensors is None:
        switchable = [s.peft_type for s in method_specs() if s.bank_tensors]
        raise ValueError(f"AdapterBank holds adapters of {switchable}; {path} is a {config.peft_type} adapter")
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        rel = AdapterFolder.module_key(key)
        cut = rel.find("." + spec.prefix)
        if cut > 0:
            by_path.setdefault(rel[:cut], {})[rel[cut + 1 :]] = tensor
    terms = [(p, t) for p, parts in by_path.items() for t in spec.bank_tensors(parts, config, shape_of(p), p)]
    return terms, spec.name


def _from_module(source: nn.Module, adapter: str) -> tuple[list[tuple[str, DeltaTerm]], str]:
    """The terms of ``adapter`` in every tuner layer of ``source``, read by each layer's method's ``bank_deltas``."""
    from peft import PeftModel

    if isinstance(source, PeftModel):
        source = source.get_base_model()  # paths relative to the wrapped model, as in a saved folder
    prefix, _ = find_base_model(source)
    terms: list[tuple[str, DeltaTerm]] = []
    kinds = set()
    for name, m in source.named_modules():
        spec = spec_for_layer(m) if isinstance(m, BaseTunerLayer) else None
        if spec is None or spec.bank_deltas is None:
            continue
        found = spec.bank_deltas(m, adapter)
        rel = name[len(prefix) + 1 :] if prefix else name
        terms += [(rel, t) for t in found]
        kinds |= {spec.name} if found else set()
    return terms, "+".join(sorted(kinds))
