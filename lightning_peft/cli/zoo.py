"""``lightning-peft zoo``: list and build the local model zoo."""

from __future__ import annotations

import sys

from lightning_peft import zoo


def zoo_main(args: list[str]) -> int:
    """``zoo list`` or ``zoo build NAME...``; returns the exit code."""
    if args[:1] == ["list"]:
        for name in zoo.names():
            print(f"{name:22s} {'built: ' + str(zoo.model_dir(name)) if zoo.is_built(name) else 'not built'}")
        return 0
    if args[:1] == ["build"] and len(args) > 1:
        for name in args[1:]:
            print(zoo.build(name))
        return 0
    print("usage: lightning-peft zoo list | lightning-peft zoo build NAME...", file=sys.stderr)
    return 2
