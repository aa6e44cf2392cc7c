"""Which modules get adapted, and the errors for bad method arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import EagerLM, WrappedPlainLM, save_random_llama
from lightning.pytorch.utilities.model_helpers import is_overridden
from transformers import GPT2Config, GPT2LMHeadModel

import lightning_peft as lp
from lightning_peft.callback import AdapterCallback


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_random_llama(tmp_path_factory.mktemp("t") / "llama")


def test_all_linear_covers_gpt2_conv1d_and_skips_the_tied_head() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    targets = lp.find_target_modules(model, "all-linear")
    assert targets == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_head_tied_to_an_embedding_is_excluded_whatever_its_name() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.body, self.unembed = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10)
            self.unembed.weight = self.emb.weight

    assert lp.find_target_modules(Tied(), "all-linear") == ["body"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
        (r".*layers\.1\.mlp\.(up|down)_proj", {"up_proj", "down_proj"}),
    ],
)
def test_lists_match_suffixes_and_strings_are_regexes(llama: str, spec, expected) -> None:
    targets = lp.find_target_modules(EagerLM(llama), spec)
    assert {t.rsplit(".", 1)[-1] for t in targets} == expected
    assert all(t.startswith("model.model.layers.") for t in targets)


def test_exclude_modules(llama: str) -> None:
    targets = lp.find_target_modules(EagerLM(llama), "all-linear", exclude_modules=["mlp.down_proj", "o_proj"])
    assert not any(t.endswith(("down_proj", "o_proj")) for t in targets) and len(targets) == 10


def test_no_match_lists_close_names(llama: str) -> None:
    with pytest.raises(lp.NoTargetModulesError, match=r"target_modules=\['q_prj'\].*Close names: q_proj") as err:
        lp.LoRA(target_modules=["q_prj"]).inject(EagerLM(llama))
    assert "Fix target_modules" in str(err.value)


def test_non_linear_target_is_rejected(llama: str) -> None:
    with pytest.raises(ValueError, match=r"not linear or embedding layers: .*LlamaDecoderLayer"):
        lp.find_target_modules(EagerLM(llama), ["layers.0"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"r=0.*use r >= 1"),
        ({"r": -3}, r"r=-3"),
        ({"r": 2.5}, r"r=2.5"),
        ({"alpha": 0}, r"alpha=0"),
        ({"alpha": "x"}, r"LoRA alpha must be a number in \(0, inf\), got alpha='x'; the usual choice is alpha = 2 \* r"),
        ({"dropout": 1.0}, r"LoRA dropout must be a number in \[0, 1\), got dropout=1.0"),
        ({"adapter_name": "my adapter"}, r"identifier.*'my adapter'"),
        ({"target_modules": []}, r"target_modules is empty"),
    ],
)
def test_bad_lora_arguments(kwargs, match: str, llama: str) -> None:
    with pytest.raises(ValueError, match=match):
        lp.LoRA(**kwargs).inject(EagerLM(llama))


def test_registry_lookup_and_unknown_name() -> None:
    assert lp.get_method("lora") is lp.LoRA
    assert isinstance(lp.create_method("lora", r=2), AdapterCallback)
    with pytest.raises(ValueError, match=r"unknown adapter method 'lorra'.*Did you mean 'lora'"):
        lp.get_method("lorra")


def test_configure_model_wrapper_keeps_lightning_calling_it(llama: str) -> None:
    class Lazy(EagerLM):
        def __init__(self) -> None:
            L.LightningModule.__init__(self)
            self.model = None

        def configure_model(self) -> None:
            if self.model is None:
                self.model = EagerLM(llama).model

    module = Lazy()
    lp.LoRA(r=2).setup(L.Trainer(logger=False), module, "fit")
    assert is_overridden("configure_model", module) and not hasattr(module.configure_model, "__wrapped__")
    wrapper = module.configure_model
    lp.LoRA(r=2).setup(L.Trainer(logger=False), module, "validate")  # a second stage: no second wrapper
    module.configure_model()
    module.configure_model()  # Lightning calls it again on every fit/validate: injection is idempotent
    assert module.configure_model is wrapper
    assert len(module.peft_config) == 1 and "lora_A" in str(module.model.model.layers[0].self_attn.q_proj)


def test_exactly_the_chosen_modules_are_adapted(llama: str) -> None:
    module = EagerLM(llama)
    module.ema = EagerLM(llama).model  # a second copy whose names end like the first's
    lp.LoRA(r=2, target_modules=r"model\..*q_proj").inject(module)
    adapted = [n for n, m in module.named_modules() if hasattr(m, "lora_A") and n.endswith("q_proj")]
    assert adapted == ["model.model.layers.0.self_attn.q_proj", "model.model.layers.1.self_attn.q_proj"]


def test_a_bare_string_gets_a_list_hint(llama: str) -> None:
    with pytest.raises(lp.NoTargetModulesError, match=r"for a name or suffix pass a list: \['q_proj'\]"):
        lp.find_target_modules(EagerLM(llama), "q_proj")


def test_plain_module_targets(tmp_path) -> None:
    assert lp.find_target_modules(WrappedPlainLM(), "all-linear") == ["net.blocks.0", "net.blocks.2"]
