"""The two Trans-PEFT interventions as hooks on FFN sites, driven by keyed random numbers.

Randomness is a pure function of a key ``(batch_seed, rank, site, purpose)`` mixed with
SplitMix64, where ``batch_seed`` is drawn once per training micro-batch from the callback's
``torch.Generator``. So

* the activation-checkpoint recompute of a layer draws exactly the masks and the drop
  decision of its first forward (a stream consumed per forward would not: the released
  code's Python ``random`` calls disagree between forward and recompute);
* resuming restores the generator and ``batch_seed``: the run continues with the same
  masks as an uninterrupted one;
* the drop decision is a Python computation (no device sync).

Consequence (documented): a layer run twice within one micro-batch gets the same mask twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.ffn_sites import FFNSite, out_features

_MASK64 = (1 << 64) - 1


def splitmix64(*values: int) -> int:
    """Fold integers into one well-mixed 64-bit integer (SplitMix64, Steele et al. 2014)."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (v & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


_DROP, _MASK = 0, 1
# Test-only switch: the DDP test's control run disables the zero-weighted term to show it matters.
_NO_ANCHOR = os.environ.get("LIGHTNING_PEFT_TRANS_PEFT_NO_ANCHOR") == "1"


class KeyedRandom:
    """Random decisions keyed on ``(batch_seed, rank, site)``: identical on recompute."""

    def __init__(self, mask_p: float, drop_p: float, rank: int = 0) -> None:
        self.mask_p, self.drop_p, self.rank = mask_p, drop_p, rank
        self.batch_seed = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def dropped(self, site: int) -> bool:
        """Whether FFN ``site`` is skipped in the current micro-batch (prob. ``drop_p``)."""
        if self.drop_p <= 0.0:
            return False
        return splitmix64(self.batch_seed, self.rank, site, _DROP) / 2.0**64 < self.drop_p

    def keep_mask(self, site: int, like: torch.Tensor) -> torch.Tensor:
        """Bernoulli(1 - mask_p) keep-mask shaped and typed like ``like`` (1 = kept, 0 = masked)."""
        g = self._generators.get(like.device)
        if g is None:
            g = self._generators[like.device] = torch.Generator(device=like.device)
        g.manual_seed(splitmix64(self.batch_seed, self.rank, site, _MASK) >> 1)  # torch seeds are < 2**63
        return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1.0 - self.mask_p, generator=g)


def _zeros_for(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    width = out_features(module) if len(list(module.children())) == 0 or hasattr(module, "base_layer") else None
    shape = x.shape if width is None else (*x.shape[:-1], width)
    return x.new_zeros(shape)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("Trans-PEFT: an FFN module was called without a tensor argument; name another ffn_modules entry")


class SiteHooks:
    """Installs and removes the hooks of one :class:`FFNSite` (site index ``index``)."""

    def __init__(self, site: FFNSite, index: int, rng: KeyedRandom) -> None:
        self.site, self.index, self.rng = site, index, rng
        self._handles: list[RemovableHandle] = []
        self._patched: list[tuple[nn.Module, Callable[..., Any] | None]] = []

    def attach(self, mask: bool, drop: bool) -> None:
        if drop:
            for module in self.site.skip:
                self._patch_forward(module)
        if mask and self.site.project is not None:
            self._handles.append(self.site.project.register_forward_pre_hook(self._mask_input))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, previous in reversed(self._patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous  # type: ignore[method-assign]
        self._handles, self._patched = [], []

    # -------------------------------------------------------------- knowledge masking
    def _mask_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not module.training or not args or not isinstance(args[0], torch.Tensor):
            return None
        h = args[0]  # (B, T, d_ff): the FFN intermediate activation
        return (h * self.rng.keep_mask(self.index, h), *args[1:])  # no 1 / (1 - p) rescaling

    # -------------------------------------------------------------- knowledge dropping
    def _patch_forward(self, module: nn.Module) -> None:
        previous = module.__dict__.get("forward")
        original = module.forward
        rng, index = self.rng, self.index

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not (module.training and rng.dropped(index)):
                return original(*args, **kwargs)
            out = _zeros_for(module, _first_tensor(args, kwargs))  # the FFN is not run at all
            if torch.is_grad_enabled() and not _NO_ANCHOR:
                # Touch the skipped trainable parameters with a zero-weighted term: their gradient
                # is 0 instead of None, so DDP (find_unused_parameters=False) does not fail.
                trainable = [p for p in module.parameters() if p.requires_grad]
                if trainable:
                    out = out + 0.0 * sum(p.sum() for p in trainable)
            return out

        module.forward = forward  # type: ignore[method-assign]
        self._patched.append((module, previous))
