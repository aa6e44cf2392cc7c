"""`AdapterFolder`: adapter folders written before it (both discriminator conventions, committed under
`tests/fixtures/old_adapter_folders/` by `tests/fixtures/make_old_adapter_folders.py` at cf540fe) still read,
load and feed a transfer and an upgrade; new folders use the one convention; the record is explicit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lightning_peft as lp
from lightning_peft import transfer
from lightning_peft.model_loader import ModelLoader
from lightning_peft.upgrade import AdapterRecord, UpgradeConfig, find_adapters
from lightning_peft.upgrade.routes import RouteContext

OLD = Path(__file__).resolve().parent / "fixtures" / "old_adapter_folders"
# what make_old_adapter_folders.py wrote (its EXPECTED)
SEEDS = ["Question: 2 + 3 =\nAnswer:", "Question: 7 - 4 =\nAnswer:"]
TRAIN_SIZE = 24


def test_the_nested_convention_reads_its_record_and_discriminator() -> None:
    folder = lp.AdapterFolder(OLD / "nested" / "adapter")
    assert folder.record == AdapterRecord(task="arithmetic", seeds=SEEDS, train_size=TRAIN_SIZE,
                                          task_kwargs={"max_length": 64}, base="llama-micro-v1",
                                          discriminator=str(OLD / "nested" / "adapter" / "discriminator"))
    assert folder.discriminator.path == OLD / "nested" / "adapter" / "discriminator"
    assert folder.train_size == TRAIN_SIZE


def test_the_sibling_convention_reads_its_discriminator_and_the_size_in_its_metadata() -> None:
    folder = lp.AdapterFolder(OLD / "sibling" / "adapter")
    assert folder.record == AdapterRecord(discriminator=str(OLD / "sibling" / "adapter-discriminator"))
    assert folder.discriminator.metadata["train_size"] == TRAIN_SIZE and folder.train_size == TRAIN_SIZE


def test_neither_discriminator_convention_counts_as_an_adapter_of_the_fleet() -> None:
    assert find_adapters(OLD) == [OLD / "nested" / "adapter", OLD / "sibling" / "adapter"]


@pytest.mark.parametrize("convention", ["nested", "sibling"])
def test_old_folders_load_with_the_tensors_they_hold(convention: str) -> None:
    adapter = OLD / convention / "adapter"
    disc = lp.AdapterFolder(adapter).discriminator.path
    for folder, targets in ((adapter, {"q_proj", "v_proj"}), (disc, {"q_proj"})):
        saved = load_file(folder / "adapter_model.safetensors")  # read independently of AdapterFolder
        model = lp.analysis.load_base("llama-micro-v1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lp.BaseModelMismatchWarning)  # the zoo build may have moved on
            lp.load_adapter(model, folder)
        loaded = {f"base_model.model.{n.replace('.default.', '.')}": p for n, p in model.named_parameters()
                  if ".lora_" in n}
        assert loaded.keys() == saved.keys() and {k.split(".")[-3] for k in saved} == targets
        assert all(torch.equal(loaded[k], v) for k, v in saved.items())
        assert any(bool(v.abs().sum()) for k, v in saved.items() if ".lora_B." in k)  # a real change of the model


@pytest.mark.parametrize("convention", ["nested", "sibling"])
def test_old_folders_feed_a_transfer_and_an_upgrade(convention: str, tmp_path: Path) -> None:
    adapter = OLD / convention / "adapter"
    disc = lp.AdapterFolder(adapter).discriminator
    cfg = transfer.TransferConfig(source_model="llama-micro-v1", source_adapter=str(adapter),
                                  target_model="llama-micro-v2", task="arithmetic")
    assert transfer.pipeline.resolve_num_synthetic(cfg) == TRAIN_SIZE  # the paper's default synthetic-set size
    assert transfer.config.discriminator_folder(cfg).path == disc.path
    record = lp.AdapterFolder(adapter).record
    context = RouteContext(adapter, record, "llama-micro-v1", "lora", UpgradeConfig(adapters=str(OLD), new="llama-micro-v2"),
                           tmp_path, ModelLoader())
    synthesis = context.transfer_config(4)
    assert synthesis.filter and synthesis.discriminator == str(disc.path)  # the upgrade filters with it


def test_a_resaved_old_folder_carries_its_discriminator_inside(tmp_path: Path) -> None:
    """The one convention for new folders: `discriminator/` inside, given explicitly as `record=`."""
    old = lp.AdapterFolder(OLD / "sibling" / "adapter")
    model = lp.analysis.load_base("llama-micro-v1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lp.BaseModelMismatchWarning)
        lp.load_adapter(model, old.path)
    new = lp.AdapterFolder(lp.save_adapter(model, tmp_path / "new", record=old.record))
    assert new.discriminator.path == tmp_path / "new" / "discriminator" and new.train_size == TRAIN_SIZE
    assert (new.discriminator.path / "adapter_model.safetensors").read_bytes() == (
        OLD / "sibling" / "adapter-discriminator" / "adapter_model.safetensors").read_bytes()
    plain = lp.AdapterFolder(lp.save_adapter(model, tmp_path / "plain"))  # no record given: none written
    assert plain.record == AdapterRecord() and plain.discriminator is None and plain.train_size is None
    with pytest.raises(FileNotFoundError, match="names the discriminator .* holds no adapter_config.json"):
        lp.save_adapter(model, tmp_path / "broken", record=AdapterRecord(discriminator=str(tmp_path / "nowhere")))


def test_a_record_merges_what_the_callbacks_recorded() -> None:
    seeds = AdapterRecord(task="sql", seeds=["Q?"], train_size=3, task_kwargs={"max_length": 8})
    disc = AdapterRecord(discriminator="d")
    assert AdapterRecord.merge(seeds, None, disc) == AdapterRecord(task="sql", seeds=["Q?"], train_size=3,
                                                                  task_kwargs={"max_length": 8}, discriminator="d")
    assert AdapterRecord.merge(disc, seeds) == AdapterRecord.merge(seeds, disc)  # defaults never overwrite facts
    assert AdapterRecord.merge(None) is None
