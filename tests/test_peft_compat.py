"""The import-time guards against a peft release that moves what RoSA and SHiRA hook into."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
from helpers import PlainNet
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel

import lightning_peft as lp
from lightning_peft import peft_compat
from lightning_peft.methods.rosa.model import ROSA_PEFT_TYPE
from lightning_peft.methods.shira import layer as shira_layer


def test_the_installed_peft_passes() -> None:
    peft_compat.check_peft()


def test_rosa_type_mapped_to_another_tuner_is_refused(monkeypatch) -> None:
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, ROSA_PEFT_TYPE, LoraModel)
    with pytest.raises(peft_compat.PeftIncompatibleError, match=r"'ROSA' does not map to .*RosaModel.*installed peft \d"):
        peft_compat.check_peft()


def test_shira_layer_hook_that_no_longer_swaps_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(shira_layer, "shira_layer_class", nullcontext)  # a peft that looks its class up elsewhere
    with pytest.raises(peft_compat.PeftIncompatibleError, match=r"dense path .*tested: peft 0.17"):
        peft_compat.check_peft()


def test_layers_built_by_peft_itself_are_refused() -> None:
    from peft import ShiraConfig, get_peft_model

    peft_built = get_peft_model(PlainNet(), ShiraConfig(r=2, target_modules=["blocks.0", "blocks.2"]))
    with pytest.raises(peft_compat.PeftIncompatibleError, match=r"SHiRA: peft built Linear layers instead of .*ShiraLinear"):
        peft_compat.check_shira_layers(peft_built.modules())
    ours = lp.SHiRA(density=0.1, mask="random", target_modules=["blocks.0", "blocks.2"]).inject(PlainNet())
    peft_compat.check_shira_layers(ours.modules())
