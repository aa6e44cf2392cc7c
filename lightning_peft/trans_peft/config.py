"""Trans-PEFT config (Gu et al., ACL 2025, arXiv 2506.06844, section 3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TransPEFTConfig:
    """Training-time FFN interventions that make an adapter transferable to an updated base.

    Attributes:
        mask_p: Intra-layer knowledge masking probability p_m, in [0, 1): every element of
            every FFN intermediate activation (the input of ``down_proj``/``c_proj``/``fc2``,
            shape (B, T, d_ff)) is zeroed with this probability, without 1/(1-p) rescaling.
            Default 0, as in the released configuration (github.com/gccnlp/Trans-PEFT, the
            Qwen2-7B -> Qwen2.5-7B script); values of 0.1-0.3 are reported beside the paper.
        drop_p: Cross-layer knowledge dropping probability p_d, in [0, 1]: per decoder layer
            and micro-batch, the whole FFN sub-block is skipped with this probability
            (x_{l+1} = x_l + Attn(LN(x_l))). Default 0.1, the released configuration.
        ffn_modules: ``"auto"`` (Llama/Mistral/Qwen2/Gemma gated MLPs, GPT-2 MLPs, OPT
            ``fc1``/``fc2`` pairs), a regex that full module names must match, or a list of
            full module names / dotted suffixes (e.g. ``["mlp"]``) of FFN sub-blocks whose
            output has the shape of their input.
        seed: Seed of the callback's torch generator (the masks and drop decisions).
    """

    mask_p: float = 0.0
    drop_p: float = 0.1
    ffn_modules: str | list[str] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.mask_p, bool) or not isinstance(self.mask_p, (int, float)) or not 0.0 <= self.mask_p < 1.0:
            raise ValueError(
                f"Trans-PEFT mask_p (intra-layer knowledge masking) must be in [0, 1), got mask_p={self.mask_p!r}; "
                "use 0.0 to disable it (reported values 0.1-0.3)"
            )
        if isinstance(self.drop_p, bool) or not isinstance(self.drop_p, (int, float)) or not 0.0 <= self.drop_p <= 1.0:
            raise ValueError(
                f"Trans-PEFT drop_p (cross-layer knowledge dropping) must be in [0, 1], got drop_p={self.drop_p!r}; "
                "use 0.0 to disable it (the paper uses 0.1)"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Trans-PEFT seed must be a non-negative integer, got seed={self.seed!r}; e.g. 0")
        if not isinstance(self.ffn_modules, str):  # OmegaConf ListConfig -> list
            self.ffn_modules = list(self.ffn_modules)
            if not self.ffn_modules or not all(isinstance(n, str) and n for n in self.ffn_modules):
                raise ValueError(
                    f"Trans-PEFT ffn_modules must be 'auto', a regex or a non-empty list of module names, got "
                    f"{self.ffn_modules!r}; e.g. ffn_modules=['mlp'] or 'auto'"
                )
        elif not self.ffn_modules:
            raise ValueError("Trans-PEFT ffn_modules must not be empty; use 'auto' or name the FFN modules")
