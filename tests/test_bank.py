"""AdapterBank: in-place switching and fusion, bit-exact restore, folders and modules, Lightning validate."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PlainNet, WrappedPlainLM, plain_base, shira_net, token_loader
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft.methods.shira.fusion import orthogonality

TARGETS = ("blocks.0", "blocks.2")


def _shira_net(seed: int, density: float = 0.1) -> PlainNet:
    """A PlainNet (base seed 0) holding one SHiRA adapter with random values (mask seed ``seed``)."""
    return shira_net(seed, density=density, mask="random")


def _base() -> PlainNet:
    return plain_base()


def _bits(net: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in net.state_dict().items()}


@pytest.fixture
def bank_and_sources():
    base = _base()
    sources = {n: _shira_net(i) for i, n in enumerate("abc")}
    bank = lp.AdapterBank(base)
    for n, src in sources.items():
        bank.add(n, src)
    return base, bank, sources


def test_fifty_random_switches_restore_the_base_bit_exactly(bank_and_sources) -> None:
    base, bank, _ = bank_and_sources
    clean = _bits(base)
    rng = random.Random(0)
    for _ in range(50):
        op = rng.choice(["activate", "fuse", "deactivate"])
        if op == "activate":
            bank.activate(rng.choice("abc"))
            assert _bits(base) != clean
        elif op == "fuse":
            bank.fuse({n: rng.uniform(-1, 1) for n in rng.sample("abc", rng.randint(2, 3))})
        else:
            bank.deactivate()
            assert _bits(base) == clean
    bank.deactivate()
    assert _bits(base) == clean


def test_activate_equals_the_dense_merged_weight(bank_and_sources) -> None:
    base, bank, sources = bank_and_sources
    reference = _base()
    bank.activate("b")
    for name in TARGETS:
        dense = reference.get_submodule(name).weight + sources["b"].get_submodule(name).get_delta_weight("default")
        assert torch.equal(base.get_submodule(name).weight, dense)  # fp32 sum rounded once: the fp32 dense sum
        assert bank.active == {"b": 1.0}


def test_fuse_equals_w_plus_weighted_sum_computed_densely(bank_and_sources) -> None:
    base, bank, sources = bank_and_sources
    reference = _base()
    weights = {"a": 1.0, "b": 0.5, "c": -0.25}
    bank.fuse(weights)
    for name in TARGETS:
        w0 = reference.get_submodule(name).weight.detach().double()
        expected = w0 + sum(a * sources[n].get_submodule(name).get_delta_weight("default").double()
                            for n, a in weights.items())
        torch.testing.assert_close(base.get_submodule(name).weight.double(), expected, rtol=0, atol=1e-6)


def test_switching_a_to_b_equals_activating_b_from_clean(bank_and_sources) -> None:
    base, bank, _ = bank_and_sources
    bank.activate("a")
    bank.activate("b")
    switched = _bits(base)
    bank.deactivate()
    bank.activate("b")
    assert _bits(base) == switched


def test_folder_and_module_sources_apply_the_same_delta(tmp_path: Path) -> None:
    module = WrappedPlainLM(seed=0)
    L.Trainer(max_steps=3, callbacks=[lp.SHiRA(density=0.03, mask="wm")], accelerator="cpu", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(module, token_loader())
    folder = lp.save_adapter(module, tmp_path / "adapter")  # padded to peft's r * (in + out)
    by_module, by_folder = WrappedPlainLM(seed=0), WrappedPlainLM(seed=0)
    lp.AdapterBank(by_module).add("x", module).activate("x")
    lp.AdapterBank(by_folder).add("x", folder).activate("x")
    assert _bits(by_module) == _bits(by_folder)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(by_folder.net(ids), module.net(ids), rtol=0, atol=1e-6)


def test_lora_adapters_merge_like_peft_and_restore_exactly_with_copy(tmp_path: Path) -> None:
    torch.manual_seed(1)
    lora = get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS), init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    merged = copy.deepcopy(lora).merge_and_unload()  # peft's own merge
    for restore in ("copy", "subtract"):
        base = _base()
        clean = _bits(base)
        bank = lp.AdapterBank(base, lora_restore=restore).add("l", tmp_path / "lora")
        bank.activate("l")
        for name in TARGETS:
            torch.testing.assert_close(base.get_submodule(name).weight, merged.get_submodule(name).weight)
        bank.deactivate()
        if restore == "copy":
            assert _bits(base) == clean
        else:  # peft's unmerge semantics: W - BA*s rounds; close, not necessarily bit-exact
            for name in TARGETS:
                torch.testing.assert_close(base.get_submodule(name).weight, _base().get_submodule(name).weight)


def test_errors_name_the_problem(bank_and_sources) -> None:
    _, bank, sources = bank_and_sources
    with pytest.raises(ValueError, match="already holds an adapter named 'a'"):
        bank.add("a", sources["a"])
    with pytest.raises(KeyError, match="holds no adapter 'zzz'"):
        bank.activate("zzz")
    with pytest.raises(ValueError, match="lora_restore must be"):
        lp.AdapterBank(_base(), lora_restore="nope")
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="does not exist in the base model"):
        lp.AdapterBank(other).add("a", sources["a"])


class _EvalLM(WrappedPlainLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch[0]))


def test_validate_evaluates_each_adapter_on_one_loaded_base(tmp_path: Path) -> None:
    base = _EvalLM(seed=0)
    clean = _bits(base)
    sources = {n: _shira_net(i, density=0.2) for i, n in enumerate("ab")}
    bank = lp.AdapterBank(base)
    for n, src in sources.items():
        bank.add(n, src)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    ids = torch.randint(0, 101, (16, 12), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=8)  # a plain (stateless) validation loader
    results = bank.validate(trainer, base, ["a", "b", {"a": 1.0, "b": 1.0}], dataloaders=loader)
    assert list(results) == ["a", "b", "a*1.0+b*1.0"]
    assert _bits(base) == clean
    for n, src in sources.items():  # the same loss as the adapter injected (unmerged) in its own model
        direct = _EvalLM(seed=0)
        direct.net = src
        fresh = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        expected = fresh.validate(direct, dataloaders=loader, verbose=False)[0]["val_loss"]
        assert results[n][0]["val_loss"] == pytest.approx(expected, abs=1e-5)


def test_sparse_adapters_are_more_orthogonal_than_lora(bank_and_sources, tmp_path: Path) -> None:
    _, bank, _ = bank_and_sources
    shira = orthogonality(bank.dense_deltas("a"), bank.dense_deltas("b"))
    for seed, name in ((1, "la"), (2, "lb")):
        torch.manual_seed(seed)
        lora = get_peft_model(_base(), LoraConfig(r=2, target_modules=list(TARGETS), init_lora_weights=False))
        bank.add(name, lora)
    lora = orthogonality(bank.dense_deltas("la"), bank.dense_deltas("lb"))
    assert lora["awor"] == 0.0 < shira["awor"]  # two dense rank-2 products have no exact zero


@pytest.mark.parametrize("kind", ["shira", "lora"])
@pytest.mark.parametrize("source", ["module", "folder"])
def test_adapters_for_other_shapes_are_refused_before_anything_is_stored(kind: str, source: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    wide = PlainNet(width=32)  # the bank's base has width 24: same module names, other shapes
    if kind == "shira":
        lp.SHiRA(density=0.1, mask="random").inject(wide)
        with torch.no_grad():
            for name in TARGETS:
                wide.get_submodule(name).shira_weight["default"].fill_(0.5)
    else:
        wide = get_peft_model(wide, LoraConfig(r=2, target_modules=list(TARGETS), init_lora_weights=False))
    src = wide
    if source == "folder":
        src = lp.save_adapter(wide, tmp_path / "wide") if kind == "shira" else tmp_path / "wide"
        if kind == "lora":
            wide.save_pretrained(src)
    base = _base()
    clean = _bits(base)
    bank = lp.AdapterBank(base)
    with pytest.raises(ValueError, match=r"AdapterBank.add(\('w'\))?: the adapter's blocks.0 .*(made for a|outside this model's).*24"):
        bank.add("w", src)
    assert bank.names() == [] and _bits(base) == clean


def _rosa_net(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """RoSA (LoRA r=2 + 10% random sparse mask) with random values in every part."""
    lp.RoSA(r=2, density=0.1, mask_criterion="random", warmup_steps=0, target_modules=targets).inject(model)
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if hasattr(m, "rosa_values"):
            w = m.base_weight_out_in()
            from lightning_peft.methods._sparse import random_mask

            m.set_mask("default", random_mask(tuple(w.shape), 0.1, torch.Generator().manual_seed(8)))
            with torch.no_grad():
                for t in (m.rosa_values["default"], m.rosa_A["default"], m.rosa_B["default"]):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["linear", "gpt2-conv1d"])
@pytest.mark.parametrize("source", ["module", "folder"])
def test_rosa_adapters_switch_as_sparse_plus_low_rank(arch: str, source: str, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        if arch == "linear":
            return PlainNet()
        return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()

    targets = list(TARGETS) if arch == "linear" else ["c_attn", "c_fc"]
    adapted = _rosa_net(make(), targets).eval()
    src = lp.save_adapter(adapted, tmp_path / "rosa") if source == "folder" else adapted
    base = make()
    clean = _bits(base)
    bank = lp.AdapterBank(base).add("r", src)
    assert bank.kinds["r"] == "rosa"
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    forward = (lambda m: m(ids)) if arch == "linear" else (lambda m: m(input_ids=ids).logits)  # noqa: E731
    with torch.no_grad():
        bank.activate("r")
        fused = forward(base)
        expected = forward(adapted)
        bank.deactivate()
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert _bits(base) == clean
