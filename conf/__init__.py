"""Hydra configs shipped inside the package (``pkg://lightning_peft.conf``).

Importing the package (Hydra does, to read ``pkg://`` configs) registers the ``lp.cpu_precision`` resolver that
``trainer/cpu.yaml`` uses.
"""

from omegaconf import OmegaConf

from lightning_peft.config import cpu_precision

OmegaConf.register_new_resolver("lp.cpu_precision", cpu_precision, replace=True)
