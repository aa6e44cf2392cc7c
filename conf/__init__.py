"""Hydra configs shipped inside the package (``pkg://lightning_peft.conf``)."""
