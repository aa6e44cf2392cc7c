"""RoSA masks: gradient statistics of the frozen weights and per-layer top-k.

Nikdan et al. 2024, section 3 and their code (IST-DASLab/peft-rosa, ``hooks.py``): for every
backward pass of an adapted layer during the collection steps, the weight gradient
``G = dO^T X`` ``(out, in)`` is formed from the layer's input and output gradient (``W`` itself
never requires grad) and averaged over the backward passes -- of ``G**2`` (``fisher``, a diagonal
Fisher estimate, the default) or of ``G`` (``mean``). Each layer then keeps its top
``round(density * out * in)`` entries (uniform density per layer, no global ranking).

The accumulator is one ``(out, in)`` fp32 buffer per adapted layer, on the CPU when asked (as in
their code), dropped as soon as the mask is built. Under DDP the sums and counts are all-reduced
before dividing, so every rank builds the same mask, equal to the mask of one process that saw
the union of the micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GradientCollector", "layer_generator"]


class GradientCollector:
    """Running sum of per-backward weight gradients (``G`` or ``G**2``) of one layer.

    Args:
        shape: ``(out, in)``.
        criterion: ``fisher`` (sum ``G**2``) or ``mean`` (sum ``G``).
        device: Where the accumulator lives (``cpu`` saves device memory: one weight per layer).

    Attributes:
        total: ``(out, in)`` fp32 sum.
        count: Number of backward passes summed.
    """

    def __init__(self, shape: tuple[int, int], criterion: str, device: torch.device | str) -> None:
        self.criterion = criterion
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)  # (out, in)
        self.count = 0

    @torch.no_grad()
    def __call__(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """Add the gradient of one backward pass: ``G = dO^T X``.

        Args:
            grad_out: ``(..., out)`` gradient of the layer output.
            x: ``(..., in)`` layer input of the same forward.
        """
        g = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        if self.criterion == "fisher":
            g.square_()
        self.total += g.to(self.total.device)
        self.count += 1

    def state(self) -> dict[str, torch.Tensor | int]:
        """What resuming needs: the sum and the count."""
        return {"total": self.total, "count": self.count}

    def load(self, state: dict[str, torch.Tensor | int]) -> None:
        """Restore :meth:`state` (the sum is copied to this collector's device)."""
        self.total.copy_(state["total"])
        self.count = int(state["count"])

    def statistic(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The mean over all backward passes (of all ranks when ``all_reduce`` sums over them).

        Returns:
            ``(out, in)`` fp32: mean ``G**2`` (fisher) or ``|mean G|`` (mean).

        Raises:
            RuntimeError: no backward pass reached the layer (nothing to rank).
        """
        total, count = self.total, torch.tensor([float(self.count)], device=self.total.device)
        if all_reduce is not None:
            total, count = all_reduce(total), all_reduce(count)
        if float(count) == 0:
            raise RuntimeError(
                "RoSA collected no gradient for a layer (no backward pass reached it during the collection "
                "steps); check that the layer is used in training_step, or use mask_criterion='weight_magnitude'"
            )
        mean = total / count
        return mean.abs() if self.criterion == "mean" else mean


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the layer's name (same on every rank and on resume)."""
    digest = sum((i + 1) * ord(c) for i, c in enumerate(layer_name)) % (2**31)
    return torch.Generator().manual_seed((seed * 1_000_003 + digest) % (2**63 - 1))
