"""Old public names kept for one release: a module ``__getattr__`` that hands them out with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def deprecated_names(module: str, aliases: dict[str, tuple[Any, str]]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``module`` for ``{old name: (object, "the new name")}`` (see CHANGELOG.md)."""

    def __getattr__(name: str) -> Any:
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value, new = aliases[name]
        warnings.warn(f"{module}.{name} is deprecated and goes in the next release: use {new}", DeprecationWarning,
                      stacklevel=2)
        return value

    return __getattr__
