"""Adapter folders: peft format, base fingerprints, clear errors, atomic writes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import EagerLM, save_random_llama
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lightning_peft as lp
from lightning_peft import adapter_folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "v1": save_random_llama(root / "v1", hidden=32, seed=0),
        "v2": save_random_llama(root / "v2", hidden=32, seed=1),  # same shapes, other weights
        "wide": save_random_llama(root / "wide", hidden=48, seed=0),  # other shapes
    }


@pytest.fixture()
def saved(bases, tmp_path: Path) -> Path:
    module = EagerLM(bases["v1"])
    lp.LoRA(r=4).inject(module)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    return lp.save_adapter(module, tmp_path / "adapter")


def test_folder_is_peft_format_with_base_metadata(saved: Path, bases) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == bases["v1"]
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lightning_peft"])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    base = meta["base"]
    assert base["name_or_path"] == bases["v1"]
    assert len(base["config_sha256"]) == 64 and len(base["weights_sha256"]) == 64
    # the fingerprint is the base's, independent of the adapter being injected
    assert base["weights_sha256"] == lp.base_fingerprint(AutoModelForCausalLM.from_pretrained(bases["v1"]))["weights_sha256"]


def test_fingerprint_ignores_precision_but_not_updates(bases) -> None:
    fp32 = lp.base_fingerprint(AutoModelForCausalLM.from_pretrained(bases["v1"]))
    bf16 = lp.base_fingerprint(AutoModelForCausalLM.from_pretrained(bases["v1"], dtype=torch.bfloat16))
    other = lp.base_fingerprint(AutoModelForCausalLM.from_pretrained(bases["v2"]))
    assert fp32["weights_sha256"] == bf16["weights_sha256"]
    assert fp32["weights_sha256"] != other["weights_sha256"]


def test_other_base_with_same_shapes_warns_and_names_the_difference(saved: Path, bases) -> None:
    with pytest.warns(lp.BaseModelMismatchWarning, match=r"weight tensors differ \(e\.g\. model\.") as record:
        lp.load_adapter(EagerLM(bases["v2"]), saved)
    message = str(record[0].message)
    assert bases["v1"] in message and bases["v2"] in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", lp.BaseModelMismatchWarning)
        lp.load_adapter(EagerLM(bases["v1"]), saved)  # the same base: silent


def test_other_shapes_fail_and_leave_the_model_untouched(saved: Path, bases) -> None:
    module = EagerLM(bases["wide"])
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()}
    with pytest.raises(lp.AdapterFormatError, match=r"other shapes.*file \(4, 32\) vs model \(4, 48\)"):
        lp.load_adapter(module, saved)
    assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
    assert not hasattr(module.model, "peft_config")
    after = dict(module.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(t, after[n]) and g == after[n].requires_grad for n, (t, g) in before.items())


def test_loaded_adapter_is_frozen_unless_trainable(saved: Path, bases) -> None:
    frozen = lp.load_adapter(EagerLM(bases["v1"]), saved)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = lp.load_adapter(EagerLM(bases["v1"]), saved, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


@pytest.mark.parametrize("make", [lambda: lp.SHiRA(density=0.05, mask="random"),
                                  lambda: lp.RoSA(r=2, density=0.05, mask_criterion="random", warmup_steps=0)],
                         ids=["shira", "rosa"])
def test_sparse_adapters_load_trainable_as_they_trained(make, tmp_path: Path) -> None:
    """is_trainable=True makes trainable exactly what the method's callback trained (SHiRA's values are named
    `shira_weight.default`, with the adapter name last), so a loaded adapter can be trained on (a warm start)."""
    import lightning as L

    from lightning_peft.module import CausalLMModule
    from lightning_peft.tasks import get_task

    quiet = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0)
    data = lambda: get_task("arithmetic", tokenizer="llama-micro-v1", max_length=64, num_train=8, num_val=0,  # noqa: E731
                            num_test=0, batch_size=4)
    trained = CausalLMModule("llama-micro-v1", generate_on_val=False)
    L.Trainer(max_steps=1, callbacks=[make()], **quiet).fit(trained, data())
    expected = {n for n, p in trained.named_parameters() if p.requires_grad}
    loaded = CausalLMModule("llama-micro-v1", generate_on_val=False)
    loaded.configure_model()
    lp.load_adapter(loaded, lp.save_adapter(trained, tmp_path / "adapter"), is_trainable=True)
    assert expected and {n for n, p in loaded.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in loaded.named_parameters() if p.requires_grad}
    L.Trainer(max_steps=1, **quiet).fit(loaded, data())
    assert any(not torch.equal(before[n], p) for n, p in loaded.named_parameters() if n in before)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: __import__("shutil").rmtree(d), "does not exist"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json is corrupted"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 20), "adapter_model.safetensors is corrupted"),
    ],
    ids=["missing-folder", "missing-weights", "corrupted-config", "corrupted-weights"],
)
def test_broken_folders_fail_clearly(saved: Path, bases, damage, match: str) -> None:
    damage(saved)
    with pytest.raises(lp.AdapterFormatError, match=match) as err:
        lp.load_adapter(EagerLM(bases["v1"]), saved)
    assert "save_adapter" in str(err.value) or "re-save" in str(err.value)


def test_pickled_weights_are_never_read(saved: Path, bases) -> None:
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(lp.AdapterFormatError, match="not read: re-save it as safetensors"):
        lp.load_adapter(EagerLM(bases["v1"]), saved)


def test_failed_save_keeps_the_previous_folder(saved: Path, bases, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    module = EagerLM(bases["v1"])
    lp.LoRA(r=2).inject(module)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_folder, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lp.save_adapter(module, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []


def test_save_never_replaces_a_folder_that_is_not_an_adapter(bases, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    module = EagerLM(bases["v1"])
    lp.LoRA(r=2).inject(module)
    with pytest.raises(FileExistsError, match=r"already holds other files \(checkpoints\).*run/adapter"):
        lp.save_adapter(module, run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"precious"


def test_adapter_names_never_clash(saved: Path, bases) -> None:
    trained = EagerLM(bases["v1"])
    lp.LoRA(r=2).inject(trained)
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        lp.load_adapter(trained, saved)
    loaded = lp.load_adapter(EagerLM(bases["v1"]), saved)
    with pytest.raises(ValueError, match="already holds an adapter named 'default'.*another adapter_name"):
        lp.LoRA(r=2).inject(loaded)


def test_loading_onto_a_bare_hf_model_keeps_save_pretrained_whole(saved: Path, bases, tmp_path: Path) -> None:
    model = lp.load_adapter(AutoModelForCausalLM.from_pretrained(bases["v1"]), saved)
    assert "model.embed_tokens.weight" in model.state_dict()


def test_plain_peft_folder_with_short_names(bases, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(bases["v1"]), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        ours = lp.load_adapter(EagerLM(bases["v1"]).eval(), tmp_path / "peft").model(input_ids=ids).logits
        torch.testing.assert_close(ours, peft_model.eval()(input_ids=ids).logits)
    deeper = EagerLM(save_random_llama(tmp_path / "deeper", hidden=32, layers=3))
    with pytest.raises(lp.AdapterFormatError, match="layers.2.self_attn.q_proj.lora_A.weight: in this model but not in the file"):
        lp.load_adapter(deeper, tmp_path / "peft")
    assert not any(isinstance(m, BaseTunerLayer) for m in deeper.modules())


def test_strict_loading_survives_nesting(bases) -> None:
    outer = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "lm": EagerLM(bases["v1"])})
    lp.LoRA(r=2).inject(outer["lm"])
    missing = outer.load_state_dict({}, strict=False).missing_keys
    assert "a.weight" in missing and any(k.startswith("lm.") and "lora_A" in k for k in missing)
    assert not any("base_layer" in k or "embed_tokens" in k for k in missing)


def test_save_without_adapter_or_with_ambiguous_name_fails(bases, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no adapter to save"):
        lp.save_adapter(EagerLM(bases["v1"]), tmp_path / "a")
    module = EagerLM(bases["v1"])
    lp.LoRA(r=2).inject(module)
    lp.LoRA(r=2, target_modules=["q_proj"], adapter_name="other").inject(module)
    with pytest.raises(ValueError, match=r"several adapters \['default', 'other'\]; pass adapter_name="):
        lp.save_adapter(module, tmp_path / "a")
    lp.save_adapter(module, tmp_path / "a", adapter_name="other")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2
    assert not any(p.name.startswith(".a.") for p in tmp_path.iterdir())
