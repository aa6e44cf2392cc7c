"""lightning-peft: parameter-efficient fine-tuning adapters as PyTorch Lightning plugins.

Attach an adapter callback to a ``Trainer`` and any LightningModule is adapted::

    trainer = L.Trainer(callbacks=[lightning_peft.LoRA(r=8)])
    trainer.fit(my_module)
    lightning_peft.save_adapter(my_module, "adapter/")   # peft's folder format

Importing it registers the strategies ``adapter_ddp``, ``adapter_ddp_spawn``, ``adapter_ddp_fork``
and ``adapter_fsdp``: ``L.Trainer(strategy="adapter_ddp", devices=4, callbacks=[...])``.
"""

from lightning_peft import methods, transfer  # noqa: F401  (registers the methods; lp.transfer: Trans-LoRA)
from lightning_peft._deprecated import deprecated_names
from lightning_peft.adapter_folder import AdapterFolder, AdapterRecord
from lightning_peft.adapter_io import (
    AdapterFormatError,
    BaseModelMismatchWarning,
    base_fingerprint,
    load_adapter,
    save_adapter,
)
from lightning_peft.analysis import DriftAnalysis
from lightning_peft.bank import AdapterBank
from lightning_peft.callback import AdapterCallback
from lightning_peft.config import AdapterConfig
from lightning_peft.methods.lora import LoRA, LoRAConfig
from lightning_peft.methods.rosa import RoSA, RoSAConfig, RosaPeftConfig
from lightning_peft.methods.shira import SHiRA, SHiRAConfig
from lightning_peft.peft_compat import check_peft
from lightning_peft.plugins import AdapterCheckpointIO, AdapterDDPStrategy, AdapterFSDPStrategy
from lightning_peft.registry import available_methods, create_method, get_method, register_method
from lightning_peft.targeting import NoTargetModulesError, find_target_modules
from lightning_peft.trans_peft import TransPEFT, TransPEFTConfig
from lightning_peft.upgrade import UpgradeRecord

check_peft()  # RoSA's peft type and SHiRA's layer hook still resolve to our classes (fails naming the versions)
__getattr__ = deprecated_names(__name__, {"RosaConfig": (RosaPeftConfig, "RosaPeftConfig")})

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "AdapterCallback",
    "AdapterCheckpointIO",
    "AdapterConfig",
    "AdapterDDPStrategy",
    "AdapterFSDPStrategy",
    "AdapterFolder",
    "AdapterFormatError",
    "AdapterRecord",
    "BaseModelMismatchWarning",
    "DriftAnalysis",
    "LoRA",
    "LoRAConfig",
    "NoTargetModulesError",
    "RoSA",
    "RoSAConfig",
    "RosaPeftConfig",
    "SHiRA",
    "SHiRAConfig",
    "TransPEFT",
    "TransPEFTConfig",
    "UpgradeRecord",
    "__version__",
    "available_methods",
    "base_fingerprint",
    "create_method",
    "find_target_modules",
    "get_method",
    "load_adapter",
    "register_method",
    "save_adapter",
]
