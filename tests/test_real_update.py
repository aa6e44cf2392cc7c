"""A real model's v2 by continued pre-training (:mod:`lightning_peft.zoo.real_update`).

The corpus reader against hand-written library files; the build on the micro zoo model as the
base (a real save_pretrained folder, a few steps): folder, record, held-out loss against
transformers' own loss, atomic failure, caching; the names. The ``slow`` test builds the real
``smollm2-135m-v2`` (~35 min on 2 cores) and checks its drift against the documented range.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft import zoo
from lightning_peft.analysis.evolve_stats import newer_version
from lightning_peft.zoo import real_update as ru
from lightning_peft.zoo.train import pack

DOCS = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (3 + i % 4) for i in range(24)]


def test_python_docs_reads_long_docstrings_with_their_names_and_skips_tests(tmp_path: Path) -> None:
    long = "Explains a thing at length. " * 10
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        f'"""{long}"""\n\nclass Box:\n    """{long}box"""\n\n    def open(self):\n        """short"""\n\n'
        f'async def run():\n    """{long}run"""\n\ndef alias():\n    """{long}run"""\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_mod.py").write_text(f'"""{long}test"""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    docs = ru.python_docs(min_chars=200, stdlib=tmp_path)
    from pydoc_data.topics import topics

    assert [d.split("\n")[0] for d in docs[: len(topics)]] == sorted(topics)  # the language reference first
    own = docs[len(topics):]  # no test folder, no short docstring, the broken file skipped
    assert [d.split("\n")[0] for d in own] == ["pkg.mod", "pkg.mod.Box", "pkg.mod.run", "pkg.mod.alias"]
    assert own[1].endswith("box") and "short" not in "".join(own)


def test_python_docs_keeps_a_name_defined_twice_with_one_docstring_once(tmp_path: Path) -> None:
    text = "Same words in two places, long enough to be kept as a document. " * 5
    (tmp_path / "a.py").write_text(
        f'import sys\nif sys:\n    def f():\n        """{text}"""\nelse:\n    def f():\n        """{text}"""\n'
        f'def g():\n    """{text}"""\n'
    )
    own = [d.split("\n")[0] for d in ru.python_docs(stdlib=tmp_path) if d.startswith("a.")]
    assert own == ["a.g", "a.f"]  # breadth first: the module level, then inside the `if`


@pytest.fixture
def tiny_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, micro_model_dir: str):
    """``tiny-v2``: the micro zoo model continued 4 steps on DOCS, in a fresh cache."""
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path / "cache"))
    update = ru.RealUpdate("tiny-v2", base="tiny", steps=4, batch=2, seq_len=32, warmup=1, held_out_every=4)
    monkeypatch.setitem(ru.REAL_UPDATES, update.name, update)
    monkeypatch.setattr(ru, "python_docs", lambda min_chars=200: list(DOCS))
    return update, Path(micro_model_dir)


def test_build_continues_the_base_and_records_the_update(tiny_update) -> None:
    update, base = tiny_update
    folder = ru.build_real_update(update.name, base=base, progress=False)
    assert folder == zoo.cache_dir() / update.folder_name
    meta = json.loads((folder / "zoo.json").read_text())
    assert meta["spec"]["steps"] == 4 and len(meta["losses"]) == 4 and meta["tokens_seen"] == 4 * 2 * 32
    assert meta["held_out_docs"] == 6 and meta["corpus_docs"] == 18  # every 4th of 24 documents held out
    v1 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    v2 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert str(v2.dtype).removeprefix("torch.") == meta["dtype"] == json.loads((base / "config.json").read_text())["dtype"]
    changed = [n for (n, a), b in zip(v1.named_parameters(), v2.parameters(), strict=True) if not torch.equal(a, b)]
    assert len(changed) == len(list(v1.parameters()))  # every tensor moved (AdamW, lr 2e-4)
    # The held-out loss is the model's own mean next-token loss on the held-out blocks (transformers' loss).
    tok = AutoTokenizer.from_pretrained(folder)
    ids, labels = pack(tok, DOCS[::4], update.seq_len)
    for model, key in ((v1, "held_out_loss_v1"), (v2, "held_out_loss_v2")):
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss.item()
        assert meta[key] == pytest.approx(ref, abs=2e-3)  # one batch of <= 4 blocks: the same mean


def test_build_is_cached_and_a_failed_build_leaves_nothing(tiny_update, monkeypatch: pytest.MonkeyPatch) -> None:
    update, base = tiny_update

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr("lightning_peft.zoo.train.pretrain", boom)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        ru.build_real_update(update.name, base=base, progress=False)
    assert not [p for p in zoo.cache_dir().iterdir() if not p.name.endswith(".lock")]
    monkeypatch.undo()
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(zoo.cache_dir().parent))
    monkeypatch.setitem(ru.REAL_UPDATES, update.name, update)
    monkeypatch.setattr(ru, "python_docs", lambda min_chars=200: list(DOCS))
    folder = ru.build_real_update(update.name, base=base, progress=False)
    monkeypatch.setattr("lightning_peft.zoo.train.pretrain", boom)  # a second call reuses the folder
    assert ru.build_real_update(update.name, base=base, progress=False) == folder


def test_cli_builds_and_lists_the_update(tiny_update, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from lightning_peft.cli import main as cli_main

    update, base = tiny_update
    assert cli_main(["zoo", "list"]) == 0
    assert f"{update.name:22s} not built (tiny continued 4 steps)" in capsys.readouterr().out
    monkeypatch.setattr("lightning_peft.zoo.packaged.resolve_packaged", lambda name: base)  # the packaged base
    assert cli_main(["zoo", "build", update.name]) == 0
    folder = zoo.cache_dir() / update.folder_name
    assert capsys.readouterr().out.strip().endswith(str(folder)) and (folder / "zoo.json").is_file()
    assert cli_main(["zoo", "list"]) == 0
    assert f"{update.name:22s} built: {folder}" in capsys.readouterr().out


def test_names_resolve_and_evolve_finds_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    assert newer_version("smollm2-135m") == "smollm2-135m-v2"
    assert newer_version("llama-v1") == "llama-v2"
    built = []
    monkeypatch.setattr("lightning_peft.zoo.builder.build_real_update", lambda name: built.append(name) or f"/x/{name}")
    assert zoo.resolve("smollm2-135m-v2") == "/x/smollm2-135m-v2" and built == ["smollm2-135m-v2"]
    with pytest.raises(ValueError, match="real updates are: smollm2-135m-v2.*Fix"):
        ru.build_real_update("smollm2-135m-v3")
    recipe = ru.REAL_UPDATES["smollm2-135m-v2"]
    assert recipe.digest() != ru.RealUpdate(recipe.name, recipe.base, lr=1e-4).digest()  # another recipe, another folder


@pytest.mark.slow
def test_real_v2_drift_is_within_its_documented_range(real_registry) -> None:
    """The documented drift of ``smollm2-135m-v2`` (module docstring and benchmarks/README.md)."""
    from lightning_peft.analysis.compare import weight_drift

    folder = ru.build_real_update("smollm2-135m-v2")
    meta = json.loads((folder / "zoo.json").read_text())
    assert meta["held_out_loss_v2"] < meta["held_out_loss_v1"] - 0.1  # it learned the domain
    v1 = AutoModelForCausalLM.from_pretrained(zoo.resolve("smollm2-135m"), dtype=torch.float32)
    v2 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = weight_drift(v1, v2)
    by_group = {g: [r["rel_change"] for r in rows if r["group"] == g] for g in ("attention", "ffn")}
    means = {g: sum(v) / len(v) for g, v in by_group.items()}
    low, high = ru.DOCUMENTED_DRIFT
    assert all(low <= m <= high for m in means.values()), means


@pytest.mark.slow
def test_readme_real_evolve_command_runs_as_typed(real_registry, tmp_path: Path) -> None:
    """The README's `lightning-peft evolve model=smollm2 ...` (v_n: the real update), in short steps."""
    import subprocess
    import sys

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (command,) = [line.strip() for line in readme.splitlines() if line.strip().startswith("lightning-peft evolve model=smollm2")]
    short = ["trainer.max_steps=2", "task.num_train=32", "task.num_test=16", "evolve.seeds=1", "evolve.drift_batches=1",
             f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "lightning_peft.cli", *command.split()[1:], *short],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["old"], results["new"]) == ("smollm2-135m", "smollm2-135m-v2")
    assert set(results["rows"]) == {"Fine-tune_o", "Direct transfer o->n", "Trans-PEFT o->n", "Fine-tune_n"}
    groups = {line.split(",")[2] for line in (tmp_path / "drift" / "attribution.csv").read_text().splitlines()[1:]}
    assert {"ffn", "attention", "outside"} <= groups  # the causal attribution ran on the real pair
