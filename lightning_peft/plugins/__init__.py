"""Lightning plugins: ``AdapterCheckpointIO`` (atomic adapter-only checkpoints) and the adapter-aware
strategies ``adapter_ddp``, ``adapter_ddp_spawn``, ``adapter_ddp_fork`` and ``adapter_fsdp``, registered
in Lightning's ``StrategyRegistry`` on import (re-importing re-registers the same names silently)."""

from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.strategies import StrategyRegistry

from lightning_peft.plugins.checkpoint_io import AdapterCheckpointIO
from lightning_peft.plugins.fsdp import AdapterFSDPStrategy
from lightning_peft.plugins.strategies import ADAPTER_STRATEGIES, AdapterDDPStrategy


def register_strategies(registry: _StrategyRegistry = StrategyRegistry) -> None:
    """Register ``adapter_ddp``, ``adapter_ddp_spawn``, ``adapter_ddp_fork`` and ``adapter_fsdp`` (idempotent)."""
    AdapterDDPStrategy.register_strategies(registry)
    AdapterFSDPStrategy.register_strategies(registry)


register_strategies()

__all__ = ["ADAPTER_STRATEGIES", "AdapterCheckpointIO", "AdapterDDPStrategy", "AdapterFSDPStrategy", "register_strategies"]
