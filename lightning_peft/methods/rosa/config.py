"""RoSA configs (Nikdan, Tabesh, Crncevic, Alistarh, ICML 2024, arXiv 2401.04679, section 3).

Two configs, one per layer of the design:

* :class:`RoSAConfig` -- the callback's typed dataclass (mirrored by ``conf/method/rosa.yaml``), like
  ``LoRAConfig`` and ``SHiRAConfig``: adapter shape *and* the training schedule (warm-up, mask
  collection, learning rates).
* :class:`RosaPeftConfig` -- the peft ``PeftConfig`` of the adapter folder (``adapter_config.json``):
  only what is needed to rebuild the layers (``r``, ``alpha``, ``density``...), so a plain
  ``PeftModel.from_pretrained`` can load a RoSA adapter once ``lightning_peft`` is imported.
  (Its old name ``RosaConfig`` is kept for one release.)

peft 0.21's ``register_peft_method`` only accepts names already in its closed ``PeftType`` enum
(``peft/utils/peft_types.py``), so ``ROSA`` is added to the enum here, before any config exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from lightning_peft._deprecated import deprecated_names
from lightning_peft.config import AdapterConfig, check_number
from lightning_peft.methods._sparse.mask import check_density, check_tile

MaskCriterion = Literal["fisher", "mean", "weight_magnitude", "random"]
MASK_CRITERIA: tuple[str, ...] = ("fisher", "mean", "weight_magnitude", "random")
# criteria whose statistic comes from gradients collected during `mask_steps` optimizer steps
GRADIENT_CRITERIA: tuple[str, ...] = ("fisher", "mean")


def _peft_type(name: str) -> PeftType:
    """``PeftType[name]``, adding the member to peft's closed enum if it is not there yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


ROSA_PEFT_TYPE = _peft_type("ROSA")


def _check_r_density(who: str, r: object, density: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"{who}: rank r must be an int >= 0 (0 = sparse-only), got r={r!r}; typical 4-16")
    check_density(density, who, hint="the paper uses 0.0045-0.018 (e.g. 0.006); for LoRA without a sparse part "
                  "use lightning_peft.LoRA")


@dataclass
class RoSAConfig(AdapterConfig):
    """Robust adaptation: ``Delta W = s * B A + S``, ``S`` sparse at ``density`` (unstructured, or in tiles).

    Schedule (the paper's code, schedule "wl64"), counted in optimizer steps (``global_step``):

    * ``[0, warmup_steps)``: LoRA only (``S`` inactive);
    * ``[warmup_steps, warmup_steps + mask_steps)``: LoRA keeps training while the dense weight
      gradients of every adapted layer are accumulated (``fisher``/``mean`` criteria only);
    * then each layer's mask is the top ``round(density * out * in)`` entries of the statistic and
      LoRA and ``S`` train jointly (``restart_after_mask`` first re-initialises the adapter).

    With ``r = 0`` (sparse-only) there is nothing to warm up: ``warmup_steps`` is ignored and the
    mask comes from the gradients of the first ``mask_steps`` steps.

    Attributes:
        r: LoRA rank, >= 0 (0 = sparse-only). Paper: 16 (GSM8K, ViGGO), 4 (SQL).
        density: Fraction of each adapted weight in ``S``, in (0, 1]. Paper: 0.0045-0.018.
        alpha: LoRA scaling numerator, ``s = alpha / r`` (paper: 16).
        dropout: Dropout on the LoRA input, in [0, 1).
        use_rslora: Scale by ``alpha / sqrt(r)``.
        mask_criterion: ``fisher`` (mean of squared per-micro-batch gradients, the paper's
            default), ``mean`` (magnitude of the mean gradient), ``weight_magnitude`` (``|W|``,
            no collection) or ``random`` (seeded, no collection).
        warmup_steps: LoRA-only optimizer steps before mask collection (paper: 64).
        mask_steps: Optimizer steps over which gradients are collected (paper: 1 step of 32
            micro-batches).
        lora_lr: Learning rate of the LoRA factors (paper: 7e-4); ``None`` keeps the user's.
        sparse_lr: Learning rate of the sparse values (paper: 2e-4); ``None``: ``sparse_lr_ratio``
            times the user's.
        sparse_lr_ratio: With ``sparse_lr=None``, the sparse values train at this fraction of the
            learning rate of the param group they are in. Default ``2/7``: the paper's 2e-4 for ``S``
            against 7e-4 for LoRA (its released configs). At the full LoRA rate the Fisher-selected
            entries (the most sensitive ones) undo the warm-up at the first joint step (reported on a
            270M pretrained model at lr 2e-3: loss 1.29 -> 3.75). ``1.0`` keeps the user's rate; on
            the zoo's tiny Llama (far from a sharp optimum) it gives the better adapter.
        restart_after_mask: Re-initialise the adapter (LoRA Kaiming/zero, ``S`` zero, fresh
            optimizer state) once the masks exist: the paper's recipe.
        grad_accumulator_device: ``cpu`` keeps the dense per-layer accumulators in host memory (as
            the paper's code); ``same`` keeps them next to the weight (faster, costs device memory).
        seed: Seed of the ``random`` criterion and of the re-initialisation after a restart.
        tile: ``None`` (default): ``S`` is unstructured, as in the paper. ``16``/``32``/``64``: ``S`` holds whole
            1 x ``tile`` runs along each weight's contiguous (input) dimension, the tiles with the largest
            criterion summed per tile (the pooled Fisher, ``|mean G|`` or ``|W|``; uniform tiles for ``random``),
            ``round(density * out * in) // tile`` tiles per layer (at least one): the same budget, or up to
            ``tile - 1`` entries less. An ``AdapterBank`` then switches ``S`` by whole-tile copies (SMT, ICLR
            2025). Every target's ``in_features`` must be a multiple of ``tile``; not for GPT-2 ``Conv1D``
            targets (stored ``(in, out)``: their contiguous dimension is ``out``).
    """

    r: int = 16
    density: float = 0.006
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    mask_criterion: MaskCriterion = "fisher"
    warmup_steps: int = 64
    mask_steps: int = 1
    lora_lr: float | None = None
    sparse_lr: float | None = None
    sparse_lr_ratio: float = 2 / 7
    restart_after_mask: bool = False
    grad_accumulator_device: Literal["cpu", "same"] = "cpu"
    seed: int = 0
    tile: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_r_density("RoSA", self.r, self.density)
        check_tile(self.tile, "RoSA")
        check_number("RoSA", "alpha", self.alpha, low=0, hint="the paper uses alpha=16")
        check_number("RoSA", "dropout", self.dropout, low=0, high=1, low_open=False, high_open=True)
        if self.mask_criterion not in MASK_CRITERIA:
            raise ValueError(
                f"RoSA mask_criterion must be one of {', '.join(MASK_CRITERIA)}, got {self.mask_criterion!r}; "
                "'fisher' is the paper's default"
            )
        for key in ("warmup_steps", "mask_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "mask_steps" else 0):
                low = 1 if key == "mask_steps" else 0
                raise ValueError(f"RoSA {key} must be an int >= {low} (optimizer steps), got {key}={value!r}")
        for key in ("lora_lr", "sparse_lr"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"RoSA {key} must be a positive float or None (keep the optimizer's), got {value!r}")
        check_number("RoSA", "sparse_lr_ratio", self.sparse_lr_ratio, low=0, high=1,
                     hint="the paper's ratio is 2/7 (2e-4 vs 7e-4); 1.0 keeps the optimizer's lr")
        if self.r == 0 and self.lora_lr is not None:
            raise ValueError(f"RoSA lora_lr={self.lora_lr!r} with r=0: a sparse-only adapter has no LoRA part; drop lora_lr")
        if self.grad_accumulator_device not in ("cpu", "same"):
            raise ValueError(
                f"RoSA grad_accumulator_device must be 'cpu' or 'same', got {self.grad_accumulator_device!r}"
            )

    @property
    def collect_start(self) -> int:
        """First optimizer step of gradient collection (``0`` for sparse-only)."""
        return self.warmup_steps if self.r > 0 else 0

    @property
    def mask_step(self) -> int:
        """Optimizer step (``global_step``) at which the masks are built and ``S`` becomes active."""
        needs_collection = self.mask_criterion in GRADIENT_CRITERIA
        return self.collect_start + (self.mask_steps if needs_collection else 0)


@dataclass
class RosaPeftConfig(PeftConfig):
    """peft config of a RoSA adapter (``peft_type="ROSA"``, registered on ``import lightning_peft``).

    Attributes:
        r: LoRA rank (0 = sparse-only).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: Dropout on the LoRA input.
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        density: Sparse fraction; each layer holds exactly ``round(density * out * in)`` (>= 1)
            values, allocated at injection so the optimizer never has to be rebuilt.
        tile: ``None`` or the tile width ``b`` of a tile-structured ``S``: the layer then holds
            ``max(1, round(density * out * in) // b) * b`` values (:func:`~lightning_peft.methods._sparse.tile_nnz`).
        target_modules: Module names/regex to adapt (``nn.Linear`` or transformers ``Conv1D``).
        exclude_modules: Module names/regex to leave alone.
        fan_in_fan_out: Weights stored ``(in, out)`` (GPT-2 ``Conv1D``); set automatically.
    """

    r: int = field(default=16, metadata={"help": "LoRA rank, >= 0 (0 = sparse-only)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r)"})
    density: float = field(default=0.006, metadata={"help": "fraction of each weight in the sparse part"})
    tile: int | None = field(default=None, metadata={"help": "None: unstructured S; 16/32/64: S in 1 x b tiles along in"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to leave alone"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "weights stored (in, out), e.g. GPT-2 Conv1D"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ROSA_PEFT_TYPE
        _check_r_density("RosaPeftConfig", self.r, self.density)
        check_tile(self.tile, "RosaPeftConfig")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)


__getattr__ = deprecated_names(__name__, {"RosaConfig": (RosaPeftConfig, "RosaPeftConfig")})
