"""LoRA config (Hu et al., 2021, arXiv 2106.09685): Delta W = (alpha / r) * B A."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_peft.config import AdapterConfig, check_number


@dataclass
class LoRAConfig(AdapterConfig):
    """Low-rank adapter, backed by peft's ``LoraConfig``.

    For a linear layer W (out x in): A (r x in, Kaiming init), B (out x r, zero init), and
    y = x W^T + (alpha / r) * dropout(x) A^T B^T (alpha / sqrt(r) with ``use_rslora``).

    Attributes:
        r: Rank, >= 1 (typical 4-64).
        alpha: Scaling numerator; the update is scaled by alpha / r.
        dropout: Dropout on the adapter input, in [0, 1).
        use_rslora: Scale by alpha / sqrt(r) (Kalajdzievski, 2023).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={self.r!r}; use r >= 1 (typical 4-64)")
        check_number("LoRA", "alpha", self.alpha, low=0, hint="the usual choice is alpha = 2 * r")
        check_number("LoRA", "dropout", self.dropout, low=0, high=1, low_open=False, high_open=True, hint="e.g. 0.05")
