"""The sparse-delta core of RoSA and SHiRA: masks (:mod:`.mask`) and the layer mixin (:mod:`.core`)."""

from lightning_peft.methods._sparse import mask
from lightning_peft.methods._sparse.core import SparseDeltaCore
from lightning_peft.methods._sparse.mask import *  # noqa: F403  (its __all__: one list of the mask names)

__all__ = ["SparseDeltaCore", *mask.__all__]
