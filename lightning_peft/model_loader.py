"""One way to load a base model by name, with an adapter on it if asked, optionally keeping it for the next use.

Transfer (generator, discriminator, teacher), the fleet upgrade (old and new base, for every adapter)
and the drift analysis (two versions of a base) all load models by the name a user gave (zoo name,
local folder, Hub name, :func:`lightning_peft.zoo.resolve`). :class:`ModelLoader` does it for all of
them; with ``keep > 0`` it keeps the last ``keep`` bases it loaded and hands out copies (loading an
adapter changes a model in place), so a fleet of adapters on two bases reads each base from disk once.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

from torch import nn

from lightning_peft.adapter_io import BaseModelMismatchWarning, load_adapter

__all__ = ["ModelLoader"]


class ModelLoader:
    """Loads causal LMs by name (:func:`lightning_peft.zoo.load`: float32 unless ``dtype=``), in eval mode, with their
    tokenizer.

    Args:
        keep: How many bases to keep loaded for later calls (``0``: load every time; ``2``: an old and a
            new base). Kept ones are deep-copied for each call.
        tokenizer: Load each model's tokenizer too (``False``: ``load`` returns ``(model, None)``).
        **from_pretrained_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained`` (e.g.
            ``attn_implementation="eager"``, ``dtype=torch.bfloat16``).
    """

    def __init__(self, keep: int = 0, tokenizer: bool = True, **from_pretrained_kwargs: Any) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"ModelLoader keep is how many bases stay loaded, an integer >= 0, got {keep!r}; e.g. 2")
        self.keep, self.tokenizer, self.kwargs = keep, tokenizer, from_pretrained_kwargs
        self._kept: dict[str, tuple[nn.Module, Any]] = {}

    def load(self, name: str | os.PathLike[str], adapter: str | os.PathLike[str] | None = None, *,
             other_base: bool = False) -> tuple[nn.Module, Any]:
        """``(model, tokenizer)`` of the base ``name`` in eval mode, with ``adapter`` loaded (frozen) if given.

        Args:
            name: Zoo name, local folder or Hub name.
            adapter: An adapter folder to load onto it.
            other_base: The adapter was trained on another base (an update): the
                :class:`~lightning_peft.BaseModelMismatchWarning` that this is expected to raise is not shown.

        Raises:
            AdapterFormatError: the adapter's folder is broken or does not fit the model's shapes.
        """
        model, tok = self._base(str(name))
        if adapter is not None:
            with warnings.catch_warnings():
                if other_base:
                    warnings.simplefilter("ignore", BaseModelMismatchWarning)
                load_adapter(model, adapter)
        return model.eval(), tok

    def _base(self, name: str) -> tuple[nn.Module, Any]:
        from lightning_peft import zoo

        if name in self._kept:
            model, tok = self._kept[name]
            return copy.deepcopy(model), tok
        if self.tokenizer:
            model, tok = zoo.load(name, **self.kwargs)
        else:
            model, tok = zoo.load_model(name, **self.kwargs), None
        if self.keep:
            self._kept = {**dict(list(self._kept.items())[-(self.keep - 1):] if self.keep > 1 else []), name: (model, tok)}
            return copy.deepcopy(model), tok
        return model, tok
