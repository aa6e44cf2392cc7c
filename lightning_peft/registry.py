"""Registry of adapter methods: the callbacks look methods up by name instead of branching.

A method is an :class:`~lightning_peft.callback.AdapterCallback` subclass registered with
:func:`register_method`; RoSA and SHiRA plug in as new folders under ``methods/`` that
register themselves on import, and nothing else changes.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from lightning_peft.callback import AdapterCallback

_METHODS: dict[str, type[AdapterCallback]] = {}
C = TypeVar("C", bound="type[AdapterCallback]")


def register_method(name: str):
    """Class decorator that registers an adapter callback under ``name``.

    Raises:
        ValueError: ``name`` is already taken by another class.
    """

    def decorator(cls: C) -> C:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(
                f"adapter method {name!r} is already registered by {_METHODS[name].__qualname__}; "
                "pick another name for your method"
            )
        _METHODS[name] = cls
        cls.method_name = name
        return cls

    return decorator


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type[AdapterCallback]:
    """Return the callback class registered under ``name``.

    Raises:
        ValueError: no method has that name; the message lists the closest names.
    """
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=3, cutoff=0.3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown adapter method {name!r}; registered methods: {', '.join(available_methods())}.{hint} "
            "Pick one of them (e.g. `method=lora` on the command line) or register yours with "
            "`lightning_peft.register_method`."
        )
    return _METHODS[name]


def create_method(name: str, **kwargs: Any) -> AdapterCallback:
    """Instantiate the callback registered under ``name`` with ``kwargs``."""
    return get_method(name)(**kwargs)
