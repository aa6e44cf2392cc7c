"""``python -m lightning_peft.cli <command> [overrides]``: the ``lightning-peft`` command (DDP ranks re-run it so)."""

import sys

from lightning_peft.cli import main

if __name__ == "__main__":
    sys.exit(main())
