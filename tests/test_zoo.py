"""The model zoo: names, local build/cache/load, tokenizers, v1 -> v2 continuation.

Only ``micro`` models are built here (about a second each); the session cache comes from
the ``_isolated_cache`` fixture in conftest, and tests that need a cache of their own point
``LIGHTNING_PEFT_CACHE`` at a ``tmp_path``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft import zoo
from lightning_peft.zoo import builder as build_mod
from lightning_peft.zoo import train as train_mod

MICRO_V1 = ["llama-micro-v1", "qwen2-micro-v1", "gpt2-micro-v1"]
TASK_TEXT = (
    "inform(name[Brairair], genre[racing], year[2011]) -> Brairair is a racing game from 2011.\n"
    "SELECT name, salary FROM employees WHERE city = 'Kidex' AND salary > 70;\n"
    "7 + 15 = 22. Liste: äpfel, 😀!"
)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache for this test only."""
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path))
    return tmp_path / "zoo"


def test_names_specs_and_public_api() -> None:
    assert zoo.__all__ == sorted(zoo.__all__)
    names = zoo.names()
    assert len(names) == 18 and names == sorted(names)  # 3 families x 2 sizes x (v1, v2, v2-major)
    for name in ("llama-v1", "qwen2-v2", "gpt2-v1", "llama-micro-v1", "gpt2-micro-v2"):
        assert zoo.is_zoo_name(name) and zoo.spec(name).name == name
    assert zoo.spec("llama-v1").size == "tiny" and zoo.spec("llama-micro-v1").size == "micro"
    assert zoo.spec("qwen2-micro-v2").init == "qwen2-micro-v1" and zoo.spec("qwen2-micro-v1").init is None
    assert not zoo.is_zoo_name("gpt2") and not zoo.is_zoo_name("meta-llama/Llama-3.2-1B")
    # The folder hash follows the spec (and the v1 spec it continues).
    assert zoo.spec("llama-v1").digest() != zoo.spec("llama-micro-v1").digest()
    assert zoo.model_dir("llama-micro-v1").name.startswith("llama-micro-v1-")


def test_unknown_name_lists_closest_first() -> None:
    with pytest.raises(ValueError, match="lama-micro-v1") as err:
        zoo.spec("lama-micro-v1")
    msg = str(err.value)
    available = msg.split("closest first): ")[1]
    assert available.startswith("llama-micro-v1") and "Fix:" in msg
    with pytest.raises(ValueError, match="qwen2-v3"):
        zoo.build("qwen2-v3")
    # Zoo-looking typos must not reach the Hub; everything else passes through.
    with pytest.raises(ValueError, match="gpt2-micro-v9"):
        zoo.resolve("gpt2-micro-v9")
    for other in ("gpt2", "Qwen/Qwen2.5-0.5B", "/some/local/folder"):
        assert zoo.resolve(other) == other


@pytest.mark.parametrize("name", MICRO_V1)
def test_build_load_roundtrip(name: str) -> None:
    folder = zoo.build(name, progress=False)
    assert folder.parent == zoo.cache_dir() and folder.name == zoo.spec(name).folder_name
    assert {"config.json", "model.safetensors", "tokenizer.json", "zoo.json"} <= {
        p.name for p in folder.iterdir()
    }
    meta = json.loads((folder / "zoo.json").read_text())
    assert meta["spec"] == zoo.spec(name).to_dict() and meta["final_loss"] < meta["first_loss"]

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.name_or_path == str(folder) == zoo.resolve(name)
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.unk_token
    # Retrain in memory: same spec -> bit-identical weights, and the saved copy computes the same logits.
    before = torch.get_num_threads()
    torch.set_num_threads(build_mod.build_threads())  # GPT-2's Conv1D sums depend on the thread count
    rng = torch.get_rng_state()
    try:
        trained = build_mod.train_model(zoo.spec(name))
    finally:
        torch.set_num_threads(before)
    # the caller's RNG is untouched: a run seeded before a cold-cache build equals a warm-cache run
    assert torch.equal(torch.get_rng_state(), rng)
    ids = tok("The genre of Brairair is", return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained.model(ids).logits)  # (1, T, vocab)
    assert trained.tokenizer.get_vocab() == tok.get_vocab()
    assert trained.tokenizer(TASK_TEXT)["input_ids"] == tok(TASK_TEXT)["input_ids"]


def test_load_returns_model_and_tokenizer(micro_model_dir: str) -> None:
    model, tok = zoo.load("llama-micro-v1")
    assert type(model).__name__ == "LlamaForCausalLM" and model.name_or_path == micro_model_dir
    assert hasattr(model.model.layers[0].mlp, "gate_proj") and tok.bos_token == "<s>"


def test_tokenizers_roundtrip_and_differ() -> None:
    toks = {n.split("-")[0]: AutoTokenizer.from_pretrained(zoo.build(n, progress=False)) for n in MICRO_V1}
    for family, tok in toks.items():
        ids = tok(TASK_TEXT)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == TASK_TEXT, family
        assert tok.unk_token_id not in ids[1:], family  # byte-level / byte fallback: nothing unknown
    assert toks["llama"](TASK_TEXT)["input_ids"][0] == toks["llama"].bos_token_id  # Llama adds <s>
    # Qwen2-style splits numbers into single digits; GPT-2-style merges them.
    assert toks["qwen2"].tokenize(" 2011") == ["Ġ", "2", "0", "1", "1"]
    assert len(toks["gpt2"].tokenize(" 2011")) < 5
    encodings = {f: tuple(t(TASK_TEXT)["input_ids"]) for f, t in toks.items()}
    assert len(set(encodings.values())) == 3 and len({len(t) for t in toks.values()}) >= 2


def test_v2_continues_v1(micro_model_dir: str) -> None:
    v1 = Path(micro_model_dir)
    v2 = zoo.build("llama-micro-v2", progress=False)
    meta1, meta2 = (json.loads((d / "zoo.json").read_text()) for d in (v1, v2))
    # Saved provenance: v2 started from exactly these v1 weights ...
    assert meta2["init"]["name"] == "llama-micro-v1" and meta2["init"]["folder"] == v1.name
    assert meta2["init"]["weights_sha256"] == meta1["weights_sha256"]
    assert meta2["world_version"] == "v2" and meta2["corpus_docs"] > meta1["corpus_docs"]
    # ... so its first loss is v1's end point, not a random init's ln(vocab).
    assert meta2["first_loss"] < meta1["first_loss"] - 0.5
    w1, w2 = _weights(v1), _weights(v2)
    assert w1.keys() == w2.keys()
    diff = sum((w2[k] - w1[k]).pow(2).sum() for k in w1).sqrt()
    norm = sum(w1[k].pow(2).sum() for k in w1).sqrt()
    assert 0.0 < diff / norm < 0.5, "v2 must drift from v1, not be re-initialised"
    assert (v1 / "tokenizer.json").read_text() == (v2 / "tokenizer.json").read_text()


def test_cache_env_var_and_default(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert zoo.cache_dir() == fresh_cache
    assert zoo.resolve("gpt2-micro-v1").startswith(str(fresh_cache))
    monkeypatch.delenv("LIGHTNING_PEFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "lightning_peft" / "zoo"


def test_deterministic_across_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = []
    for sub in ("a", "b"):
        monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path / sub))
        folders.append(zoo.build("gpt2-micro-v1", progress=False))
    a, b = (_weights(f) for f in folders)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_crashed_build_leaves_nothing(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(train_mod, "pretrain", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        zoo.build("qwen2-micro-v1", progress=False)
    assert [p.name for p in fresh_cache.iterdir() if not p.name.endswith(".lock")] == []
    assert not zoo.is_built("qwen2-micro-v1")
    # A build killed without cleanup (SIGKILL) leaves its temp folder: the next build removes it.
    monkeypatch.undo()
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(fresh_cache.parent))
    stale = fresh_cache / f".{zoo.spec('qwen2-micro-v1').folder_name}.tmp-killed"
    stale.mkdir()
    folder = zoo.build("qwen2-micro-v1", progress=False)
    assert [p.name for p in fresh_cache.iterdir() if not p.name.endswith(".lock")] == [folder.name]


def test_concurrent_builders_build_once(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = train_mod.pretrain

    def counting(*args: object, **kwargs: object) -> train_mod.TrainResult:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "pretrain", counting)
    out: list[Path] = []
    threads = [
        threading.Thread(target=lambda: out.append(zoo.build("llama-micro-v1", progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0] == out[1] and len(calls) == 1
    before = _weights(out[0])
    assert zoo.build("llama-micro-v1", force=True, progress=False) == out[0] and len(calls) == 2
    after = _weights(out[0])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in fresh_cache.iterdir() if not p.name.endswith(".lock")) == [out[0].name]


def test_corpus_example_lists_are_numbered_inputs_in_the_generator_prompt_format() -> None:
    """`Here are N examples of {kind} inputs:` then exactly N numbered inputs (no answers), like
    the Trans-LoRA seed-list prompt, so the zoo models learn to continue it."""
    import re

    from lightning_peft.transfer import parse_generation, seed_list_prompt
    from lightning_peft.zoo.corpus import _LIST_ACTS, _LIST_HEADERS, corpus

    docs = corpus("v1", seed=0, n_docs=600)
    lists = [d for d in docs if d.startswith("Here are ")]
    assert 0.08 < len(lists) / len(docs) < 0.25
    kinds = set()
    for doc in lists:
        header, body = doc.split("\n", 1)
        n, kind = re.fullmatch(r"Here are (\d+) examples of (\w+) inputs:", header).groups()
        kinds.add(kind)
        starts = re.findall(r"(?m)^(\d+)\. ", body)
        assert starts == [str(i) for i in range(1, int(n) + 1)], doc
        # the generator's parser takes item k+1 back out of the list
        item2 = body.split("\n2. ", 1)[1].split("\n3. ", 1)[0]
        assert parse_generation(body.split("\n2.", 1)[1], min_chars=1) == item2.strip()
        assert "Answer:" not in body and " = " not in body.replace(" =\n", "\n")  # inputs only
    assert {"arithmetic", "data2text", "fact", "sql"} <= kinds <= set(_LIST_HEADERS)
    # record lists use the corpus's own act names, never the task's other acts
    acts = {m.group(1) for d in lists for m in re.finditer(r"(?m)^\d+\. (\w+)\(", d)}
    assert acts == set(_LIST_ACTS)
    assert any("Tables: " in d for d in lists)
    assert seed_list_prompt(["a b c"] * 3, "sql").startswith("Here are 6 examples of sql inputs:\n1. a b c")


@pytest.mark.parametrize("style", ["llama", "qwen2", "gpt2"])
def test_tiny_tokenizers_know_yes_and_no_as_words(style: str) -> None:
    """The corpus's yes/no fact checks make " yes"/" no" single tokens of every tiny tokenizer,
    so the Trans-LoRA discriminator's two answers are one next-token choice, as in real LMs."""
    from lightning_peft.zoo.corpus import corpus
    from lightning_peft.zoo.tokenizer import train_tokenizer

    docs = corpus("v1", seed=0, n_docs=3000)
    checks = [d for d in docs if d.endswith((" yes", " no")) and "?" in d]
    assert 0.02 < len(checks) / len(docs) < 0.12
    tok = train_tokenizer(style, docs, 1024)
    assert [len(tok(w, add_special_tokens=False)["input_ids"]) for w in (" yes", " no")] == [1, 1]


def test_tiny_updates_drift_as_documented() -> None:
    """llama-v1 -> v2 is a moderate drift and -> v2-major a strong one, in the ranges `lightning_peft.zoo` states.

    Builds the three tiny Llama models (about 3 minutes on one core); the figures are those of the
    zoo docstring's table, with a margin for other CPUs' last bits.
    """
    from lightning_peft.analysis import compare_models, load_base
    from lightning_peft.data import first_batches
    from lightning_peft.tasks import get_task

    batches = first_batches(get_task("arithmetic", tokenizer="llama-v1", num_train=16, num_val=0, num_test=32), "test", 2)
    v1 = load_base("llama-v1")
    summaries = {u: compare_models(v1, load_base(f"llama-{u}"), batches).summary() for u in ("v2", "v2-major")}
    documented = {  # (attention, ffn relative weight change, attention JS, CKA) of the zoo docstring
        "v2": (0.135, 0.157, 0.044, 0.91), "v2-major": (0.334, 0.343, 0.098, 0.84),
    }
    for update, (attn, ffn, js, cka) in documented.items():
        s = summaries[update]
        assert s["drift/weight_rel_change/attention"] == pytest.approx(attn, rel=0.1), update
        assert s["drift/weight_rel_change/ffn"] == pytest.approx(ffn, rel=0.1), update
        assert s["drift/attention_js"] == pytest.approx(js, rel=0.25), update
        assert s["drift/cka"] == pytest.approx(cka, abs=0.03), update
    assert summaries["v2"]["drift/weight_rel_change/ffn"] < 0.5 * summaries["v2-major"]["drift/weight_rel_change/ffn"]
