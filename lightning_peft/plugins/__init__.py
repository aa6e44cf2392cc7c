"""Lightning plugins: ``AdapterCheckpointIO`` (atomic adapter-only checkpoints)."""

from lightning_peft.plugins.checkpoint_io import AdapterCheckpointIO

__all__ = ["AdapterCheckpointIO"]
