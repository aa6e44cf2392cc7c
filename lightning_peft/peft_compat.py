"""Checks that the two places where lightning-peft reaches into peft still work with the installed peft.

1. RoSA adds ``ROSA`` to peft's closed ``PeftType`` enum and registers its tuner
   (:mod:`lightning_peft.methods.rosa.model`); a peft that rebuilt the enum or the mapping would
   silently hand RoSA folders to another tuner.
2. SHiRA swaps the layer class peft's ``shira`` tuner builds (``peft.tuners.shira.model.Linear``,
   :func:`lightning_peft.methods.shira.layer.shira_layer_class`); a peft that looks the class up
   elsewhere would silently train on peft's dense path.

Both are checked once on ``import lightning_peft`` (:func:`check_peft`) and the second again after
each SHiRA injection (:func:`check_shira_layers`). The versions tested are the bounds in
``pyproject.toml``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["PeftIncompatibleError", "check_peft", "check_shira_layers"]

TESTED = "peft 0.17-0.21, transformers 4.45-5.x"


class PeftIncompatibleError(ImportError):
    """The installed peft no longer offers what lightning-peft's RoSA/SHiRA hook into."""


def _versions() -> str:
    import peft
    import transformers

    return f"installed peft {peft.__version__}, transformers {transformers.__version__}; tested: {TESTED}"


def check_peft() -> None:
    """Raise if RoSA's peft type or SHiRA's layer hook do not resolve to lightning-peft's classes.

    Raises:
        PeftIncompatibleError: naming what broke and the versions; install a tested peft.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.shira import model as peft_shira_model
    from peft.utils import PeftType

    from lightning_peft.methods.rosa.model import ROSA_PEFT_TYPE, RosaModel
    from lightning_peft.methods.shira.layer import ShiraLinear, shira_layer_class

    fix = "install a tested peft (pip install 'peft>=0.17,<0.22')"
    if PeftType.__members__.get("ROSA") is not ROSA_PEFT_TYPE or PEFT_TYPE_TO_TUNER_MAPPING.get(ROSA_PEFT_TYPE) is not RosaModel:
        raise PeftIncompatibleError(f"RoSA's peft type 'ROSA' does not map to lightning-peft's RosaModel ({_versions()}); {fix}")
    with shira_layer_class():
        swapped = getattr(peft_shira_model, "Linear", None) is ShiraLinear
    if not swapped:
        raise PeftIncompatibleError(
            f"peft's shira tuner no longer builds its layers from peft.tuners.shira.model.Linear, so SHiRA would train "
            f"on peft's dense path ({_versions()}); {fix}"
        )


def check_shira_layers(built: Iterable[nn.Module], method: str = "SHiRA") -> None:
    """Raise if a SHiRA injection built peft's own layer class instead of ``ShiraLinear``.

    Raises:
        PeftIncompatibleError: the injected layers are not lightning-peft's.
    """
    from peft.tuners.shira.layer import ShiraLayer

    from lightning_peft.methods.shira.layer import ShiraLinear

    foreign = sorted({type(m).__name__ for m in built if isinstance(m, ShiraLayer) and not isinstance(m, ShiraLinear)})
    if foreign:
        raise PeftIncompatibleError(
            f"{method}: peft built {', '.join(foreign)} layers instead of lightning-peft's ShiraLinear ({_versions()}); "
            "install a tested peft (pip install 'peft>=0.17,<0.22')"
        )
