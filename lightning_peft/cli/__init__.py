"""The ``lightning-peft`` command: ``lightning-peft <command> [hydra overrides]``.

Commands:
    train   Fine-tune an adapter (Hydra app over ``pkg://lightning_peft.conf``, config ``train``).
    zoo     ``lightning-peft zoo build NAME...`` / ``lightning-peft zoo list``: the local model zoo.
"""

from __future__ import annotations

import sys

USAGE = """usage: lightning-peft <command> [args]

commands:
  train [overrides]     fine-tune an adapter; e.g. `lightning-peft train method.r=16 task=sql`
                        (Hydra: `--help`, `--cfg job`, `-m` for multirun)
  zoo list              list the local zoo models
  zoo build NAME...     build (and cache) zoo models
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from lightning_peft.cli.train import hydra_main

        sys.argv = [f"{sys.argv[0]} train", *rest]  # Hydra reads sys.argv
        hydra_main()
        return 0
    if command == "zoo":
        from lightning_peft.cli.zoo import zoo_main

        return zoo_main(rest)
    print(f"unknown command {command!r}; expected one of: train, zoo\n\n{USAGE}", file=sys.stderr)
    return 2
