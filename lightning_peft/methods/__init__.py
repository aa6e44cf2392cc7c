"""Adapter methods, one folder each; importing this package registers them all."""

from lightning_peft.methods import lora  # noqa: F401  (registers "lora")
