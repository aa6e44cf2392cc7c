"""Mixed-adapter batches: one forward whose batch rows name different adapters of an :class:`AdapterBank`.

Multi-LoRA servers (Punica, S-LoRA, vLLM) and peft (``adapter_names=``) batch requests for different LoRA adapters:
the base GEMM runs once over the batch, and each adapter's unmerged branch on the rows that name it. The same works
for sparse adapters without ever fusing them: each adapted ``nn.Linear`` gets a forward hook that adds, for every
adapter in the batch, ``y[rows_a] += x[rows_a] S_a^T`` (:meth:`~lightning_peft.deltas.DeltaTerm.linear_add`; for a
tile-structured SHiRA ``S_a`` a C loop over whole tiles, ``rows_a * nnz_a`` multiply-adds like LoRA's
``rows_a * r (in + out)``). Rows that name ``None`` get the bare base. The result equals running each row alone
with its adapter activated (up to the rounding of ``x (W + S)^T`` against ``x W^T + x S^T``; tested).

Rows are matched to the batch's leading dimension: a batch of ``k * len(adapters)`` rows (``generate`` with
``num_beams=k`` or ``num_return_sequences=k`` repeats each input ``k`` times in place) gives each adapter's rows
``k`` times over.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["mixed_rows"]


def _groups(adapters: Sequence[str | None], batch: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """``[(adapter, rows (k,) int64)]`` for a batch of ``batch`` rows (each name repeated ``batch / len`` times)."""
    if batch % len(adapters):
        raise ValueError(f"AdapterBank.mixed: the batch has {batch} rows but {len(adapters)} adapter names were given; "
                         f"pass one name (or None for the base) per row of the batch")
    repeat = batch // len(adapters)
    found: dict[str, list[int]] = {}
    for i, name in enumerate(adapters):
        if name is not None:
            found.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
    return [(name, torch.tensor(rows, dtype=torch.int64, device=device)) for name, rows in found.items()]


@contextmanager
def mixed_rows(modules: dict[str, nn.Module], terms: dict[str, dict[str, list]], adapters: Sequence[str | None],
               ) -> Iterator[None]:
    """Hooks on ``modules`` (path -> ``nn.Linear``) that add each row's adapter delta to the layer's output.

    Args:
        modules: The adapted layers by weight path (the bank's base layers).
        terms: ``{adapter: {path: [term, ...]}}`` for the adapters the batch names.
        adapters: One adapter name (or ``None``) per batch row.
    """
    cache: dict[tuple, list[tuple[str, torch.Tensor]]] = {}

    def token_rows(x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Each adapter's rows of ``x`` flattened to ``(batch * tokens, in)``, per batch shape (kept for the call)."""
        key = (x.shape[:-1], x.device)
        if key not in cache:
            tokens = x.shape[1:-1].numel()
            steps = torch.arange(tokens, device=x.device)
            cache[key] = [(name, (rows[:, None] * tokens + steps).reshape(-1))
                          for name, rows in _groups(adapters, x.shape[0], x.device)]
        return cache[key]

    def hook(path: str):
        def add_deltas(module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> torch.Tensor:
            if y.requires_grad:
                raise RuntimeError("AdapterBank.mixed serves inference (the deltas are added in place and get no "
                                   "gradient): run the forward under torch.no_grad() or torch.inference_mode()")
            x = args[0]
            y2 = y.reshape(-1, y.shape[-1]).contiguous()  # (batch * tokens, out); y itself when it is contiguous
            x2 = x.reshape(-1, x.shape[-1])
            for name, rows in token_rows(x):
                for term in terms[name].get(path, ()):
                    term.linear_add(y2, x2, rows)
            return y2.view(y.shape)
        return add_deltas

    handles = []
    try:
        for path, module in modules.items():
            handles.append(module.register_forward_hook(hook(path)))
        yield
    finally:
        for h in handles:
            h.remove()
