"""Deprecated (kept for one release): Trans-PEFT is a training regulariser, not an adapter method; it moved to
:mod:`lightning_peft.trans_peft` (the FFN discovery to :mod:`lightning_peft.ffn_sites`). The old module paths
(``lightning_peft.methods.trans_peft[.config|.ffn|.hooks]``) still import, with a ``DeprecationWarning``."""

import sys
import warnings

from lightning_peft import ffn_sites
from lightning_peft.trans_peft import (
    FFNSite,
    NoFFNFoundError,
    TransPEFT,
    TransPEFTConfig,
    config,
    find_ffn_sites,
    hooks,
)

__all__ = ["FFNSite", "NoFFNFoundError", "TransPEFT", "TransPEFTConfig", "find_ffn_sites"]

sys.modules.update({f"{__name__}.config": config, f"{__name__}.ffn": ffn_sites, f"{__name__}.hooks": hooks})
warnings.warn("lightning_peft.methods.trans_peft is deprecated: import lightning_peft.trans_peft (TransPEFT) or "
              "lightning_peft.ffn_sites (find_ffn_sites)", DeprecationWarning, stacklevel=2)
