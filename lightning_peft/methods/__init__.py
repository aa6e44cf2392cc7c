"""Adapter methods, one folder each; importing this package registers them all."""

from lightning_peft.methods import (
    lora,  # noqa: F401  (registers "lora")
    rosa,  # noqa: F401  (registers "rosa" and peft's ROSA type)
    shira,  # noqa: F401  (registers "shira")
)
