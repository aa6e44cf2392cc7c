"""Registry of adapter methods: one :class:`MethodSpec` per method, looked up instead of branched on.

A method is an :class:`~lightning_peft.callback.AdapterCallback` subclass registered with
:func:`register_method`, which records what the rest of the package needs to know about it:

=====================  ========================================================================
``peft_type``          the ``peft_type`` its folders carry (``adapter_io``, ``upgrade``)
``layer_classes``      the tuner layers it builds (``AdapterBank``, strategy checks)
``injection_context``  a context peft must build its layers inside (SHiRA's layer class)
``prefix``             the prefix of its tensors' names in the model and in folders (``lora_``)
``bank_deltas``        how ``AdapterBank`` reads one layer's delta (``None``: not switchable)
``bank_tensors``       how ``AdapterBank`` reads one weight's delta from a folder's tensors
``encode_checkpoint``  how a layer stores its tensors compactly in a checkpoint (sparse positions)
``decode_checkpoint``  and reads them back before the checkpoint is loaded into the layer
``fsdp``               whether ``adapter_fsdp`` can shard it (its tensors live in leaf modules)
=====================  ========================================================================

The generic code (the callback, checkpoints, ``AdapterBank``, the strategies) calls these hooks and
imports no method.

A new method is one folder under ``methods/``, one ``register_method`` call, one config file in
``conf/method/`` and one row of ``tests/test_contract.py`` (see ``CONTRIBUTING.md``).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from lightning_peft.callback import AdapterCallback

__all__ = [
    "MethodSpec", "available_methods", "create_method", "get_method", "get_spec", "method_specs", "register_method",
    "spec_for_layer", "spec_for_method", "spec_for_peft_type",
]


@dataclass(frozen=True)
class MethodSpec:
    """What lightning-peft knows about one adapter method.

    Attributes:
        name: Registry name (``method=<name>`` on the command line).
        callback: The callback class.
        peft_type: ``peft_type`` of its adapter folders (``"LORA"``, ``"SHIRA"``, ``"ROSA"``).
        layer_classes: Tuner layer classes it injects.
        injection_context: Factory of a context manager that peft's injection of this type runs
            inside (``None``: none needed).
        prefix: Prefix of its adapter tensors' names (peft's ``prefix``, e.g. ``"lora_"``).
        bank_deltas: ``(layer, adapter) -> [term, ...]`` for :class:`~lightning_peft.bank.AdapterBank`
            (:class:`~lightning_peft.deltas.DeltaTerm` s); ``None`` if the method cannot be switched in place.
        bank_tensors: ``(tensors of one weight by name after the path, folder config, weight shape, path)
            -> [term, ...]``, the same from a saved folder.
        encode_checkpoint: ``(layer, state_dict, prefix) -> None``: replace the layer's tensors under
            ``prefix`` in a checkpoint's ``state_dict`` by a compact code, in place (``None``: stored as they are).
        decode_checkpoint: ``(layer, state_dict, prefix) -> None``: undo ``encode_checkpoint`` in place.
        fsdp: ``adapter_fsdp`` supports it (trainable tensors in leaf modules).
    """

    name: str
    callback: type[AdapterCallback]
    peft_type: str
    layer_classes: tuple[type[nn.Module], ...] = ()
    injection_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    prefix: str = ""
    bank_deltas: Callable[[nn.Module, str], list[Any]] | None = field(default=None, compare=False)
    bank_tensors: Callable[..., list[Any]] | None = field(default=None, compare=False)
    encode_checkpoint: Callable[[nn.Module, dict[str, Any], str], None] | None = field(default=None, compare=False)
    decode_checkpoint: Callable[[nn.Module, dict[str, Any], str], None] | None = field(default=None, compare=False)
    fsdp: bool = False

    @property
    def config_cls(self) -> type:
        """The method's typed config dataclass (mirrored by ``conf/method/<name>.yaml``)."""
        return self.callback.config_cls

    def injecting(self) -> contextlib.AbstractContextManager[Any]:
        """The context peft's injection of this method runs inside."""
        return self.injection_context() if self.injection_context else contextlib.nullcontext()


_SPECS: dict[str, MethodSpec] = {}
C = TypeVar("C", bound="type[AdapterCallback]")


def register_method(name: str, *, peft_type: str | None = None, **facts: Any) -> Callable[[C], C]:
    """Class decorator that registers an adapter callback under ``name`` with its :class:`MethodSpec` facts.

    Args:
        name: Registry name.
        peft_type: Its folders' ``peft_type`` (default: ``name.upper()``).
        **facts: The other :class:`MethodSpec` fields.

    Raises:
        ValueError: ``name`` is already taken by another class.
    """

    def decorator(cls: C) -> C:
        if name in _SPECS and _SPECS[name].callback is not cls:
            raise ValueError(
                f"adapter method {name!r} is already registered by {_SPECS[name].callback.__qualname__}; "
                "pick another name for your method"
            )
        _SPECS[name] = MethodSpec(name=name, callback=cls, peft_type=peft_type or name.upper(), **facts)
        cls.method_name = name
        return cls

    return decorator


def update_spec(name: str, **facts: Any) -> None:
    """Fill in facts known only after the method's module is imported (e.g. its layer classes)."""
    _SPECS[name] = replace(get_spec(name), **facts)


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_SPECS)


def method_specs() -> list[MethodSpec]:
    """Every registered method's spec, by name."""
    return [_SPECS[n] for n in available_methods()]


def get_spec(name: str) -> MethodSpec:
    """The spec registered under ``name``.

    Raises:
        ValueError: no method has that name; the message lists the closest names.
    """
    if name not in _SPECS:
        close = difflib.get_close_matches(name, _SPECS, n=3, cutoff=0.3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown adapter method {name!r}; registered methods: {', '.join(available_methods())}.{hint} "
            "Pick one of them (e.g. `method=lora` on the command line) or register yours with "
            "`lightning_peft.register_method`."
        )
    return _SPECS[name]


def spec_for_method(name: str) -> MethodSpec | None:
    """The spec registered under ``name``, or ``None`` (an adapter callback nobody registered)."""
    return _SPECS.get(name)


def get_method(name: str) -> type[AdapterCallback]:
    """The callback class registered under ``name`` (see :func:`get_spec` for the errors)."""
    return get_spec(name).callback


def create_method(name: str, **kwargs: Any) -> AdapterCallback:
    """Instantiate the callback registered under ``name`` with ``kwargs``."""
    return get_method(name)(**kwargs)


def spec_for_peft_type(peft_type: Any) -> MethodSpec | None:
    """The method whose folders carry ``peft_type`` (a ``PeftType`` or its string), or ``None`` (e.g. peft's
    own IA3). Variants sharing a type (``rosa_sparse``) resolve to the first registered."""
    value = str(getattr(peft_type, "value", peft_type)).upper()
    return next((s for s in _SPECS.values() if s.peft_type == value), None)


def spec_for_layer(layer: nn.Module) -> MethodSpec | None:
    """The method whose tuner layer ``layer`` is, or ``None``."""
    return next((s for s in _SPECS.values() if s.layer_classes and isinstance(layer, s.layer_classes)), None)
