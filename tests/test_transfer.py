"""Trans-LoRA data side: seed prompts, parsing awkward generations, de-duplication, the
rejection filter, MMD, and synthetic-set provenance files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from lightning_peft.transfer import (
    Deduplicator,
    ProvenanceMismatchError,
    SeedFormat,
    SyntheticSet,
    mmd_rbf,
    parse_generation,
    rejection_sample,
    seed_list_prompt,
)

SEEDS = ["Question: Ana has 3 pens.\nAnswer:", "Question: Bo has 4 cups.\nAnswer:"]


def test_seed_list_prompt_is_the_papers_numbered_list() -> None:
    assert seed_list_prompt(SEEDS, "arithmetic") == (
        "Here are 4 examples of arithmetic inputs:\n"
        "1. Question: Ana has 3 pens.\nAnswer:\n"
        "2. Question: Bo has 4 cups.\nAnswer:\n"
        "3."
    )
    assert seed_list_prompt(["a b c"] * 5).startswith("Here are 10 examples")  # 5 seeds: the paper's 10
    with pytest.raises(ValueError, match="at least one seed"):
        seed_list_prompt([])
    with pytest.raises(ValueError, match="empty seed"):
        seed_list_prompt(["ok text", "  "])
    with pytest.raises(ValueError, match="total >= 3"):
        seed_list_prompt(SEEDS, total=2)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" Question: Cy has 5 hats.\nAnswer:\n4. Question: next", "Question: Cy has 5 hats.\nAnswer:"),  # multi-line item
        (" Dan buys 2.5 kg of rice for 3.75.\n7) another", "Dan buys 2.5 kg of rice for 3.75."),  # decimals stay, "7)" cuts
        ("3. 3. Eve has 9 keys.</s>", "Eve has 9 keys."),  # repeated open number, special-token text
        (' "Fay has 1 dog."\n\n5. x', "Fay has 1 dog."),  # quotes, blank line before the next item
        ("  12 . Gil counts to 12.\n 13. more", "Gil counts to 12."),
        ("", None),
        ("\n4. nothing before the next number", None),  # the model skipped the item
        (" 42", None),  # too short
        (" word" * 400, None),  # never closed
    ],
)
def test_parse_generation_on_awkward_generations(completion: str, expected: str | None) -> None:
    assert parse_generation(completion) == expected


@pytest.mark.parametrize(
    ("task", "prefix", "suffix"),
    [
        ("arithmetic", "Question:", "\nAnswer:"),
        ("sql", "Tables: games(name, genre, developer, year, rating, platform); employees(name, department, salary, "
                "city)\nQuestion:", "\nSQL:"),
        ("data2text", "", " ->"),
    ],
)
def test_seed_format_of_the_zoo_tasks(task: str, prefix: str, suffix: str) -> None:
    from lightning_peft.tasks import get_task

    seeds = [e.prompt for e in get_task(task, tokenizer="llama-v1", num_train=8).get_examples()["train"][:5]]
    fmt = SeedFormat(seeds)
    assert (fmt.prefix, fmt.suffix) == (prefix, suffix)
    assert all(fmt.parse(s[len(prefix):]) == s for s in seeds)  # a seed written after the opening parses back whole


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" Cy has 5 hats.\nAnswer: 5 hats\n4. Question: x", "Question: Cy has 5 hats.\nAnswer:"),  # its own answer cut
        (" Cy has 5 hats.\n4. Question: Dan has 2.\nAnswer:", None),  # the item ended without the ending
        (" Cy has 5 hats.", None),  # no ending at all
        ("", None),
    ],
)
def test_seed_format_cuts_after_the_ending_and_rejects_items_without_it(completion: str, expected: str | None) -> None:
    fmt = SeedFormat(SEEDS)
    assert seed_list_prompt(SEEDS, "arithmetic", opening=fmt.prefix).endswith("\n3. Question:")
    assert fmt.parse(completion) == expected
    single = SeedFormat(SEEDS[:1])  # one seed: nothing shared to compare, the paper's free parse
    assert (single.prefix, single.suffix) == ("", "") and single.parse(" Cy has 5 hats.") == "Cy has 5 hats."
    assert SeedFormat(["abc def ->", "xyz ->"]).suffix == " ->" and SeedFormat(["What is c", "What is d"]).prefix == ""


def test_deduplicator_rejects_seeds_and_near_copies() -> None:
    dedup = Deduplicator(SEEDS)
    assert not dedup.add("question: ana has 3 pens.  answer:")  # a seed, case and spacing changed
    assert dedup.add("Question: Cy has 5 hats.\nAnswer:")
    assert not dedup.add("Question: Cy has 5 hats. Answer: ")
    assert dedup.add("Question: Cy has 6 hats.\nAnswer:")
    assert dedup.rejected == 2


def test_mmd_hand_computed_and_separates_shifted_samples() -> None:
    x, y = torch.zeros(2, 1), torch.ones(2, 1)
    # unbiased: k(x,x') = 1, k(y,y') = 1, k(x,y) = exp(-1/2) with h = 1
    assert mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(2 - 2 * math.exp(-0.5))
    assert mmd_rbf(x, x.clone(), bandwidth=1.0) == pytest.approx(0.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    shifted = torch.randn(200, 8, generator=g) + 1.0
    assert abs(mmd_rbf(a, b)) < 0.02 < mmd_rbf(a, shifted)
    with pytest.raises(ValueError, match="same d"):
        mmd_rbf(a, shifted[:, :3])


def _proposals(texts: list[str], batch: int):
    for i in range(0, len(texts), batch):
        yield texts[i : i + batch]


def test_rejection_sample_stops_at_target_and_records_acceptance() -> None:
    texts = [f"item {i}" for i in range(100)]
    score = lambda batch: torch.tensor([1.0 if int(t.split()[1]) % 3 == 0 else -1.0 for t in batch])  # noqa: E731
    result = rejection_sample(_proposals(texts, 7), score, target=10, progress=False)
    assert result.kept == [f"item {i}" for i in range(0, 30, 3)]  # exactly 10, in order
    assert result.proposed == 28 and result.acceptance_rate == pytest.approx(10 / 28)
    assert all(s > 0 for s in result.kept_scores) and all(s <= 0 for s in result.rejected_scores)
    short = rejection_sample(_proposals(texts, 7), score, target=50, max_proposed=20, progress=False)
    assert short.proposed == 20 and len(short.kept) == 7
    with pytest.raises(ValueError, match="target must be an int >= 1"):
        rejection_sample(_proposals(texts, 7), score, target=0)
    with pytest.raises(ValueError, match=r"return \(B,\) margins"):
        rejection_sample(_proposals(texts, 7), lambda b: torch.zeros(len(b), 2), target=1, progress=False)


def test_synthetic_set_round_trip_mismatch_and_atomic_replace(tmp_path, monkeypatch) -> None:
    header = {"task": "arithmetic", "seeds": SEEDS, "sampling": {"temperature": 0.8, "top_p": 0.95}}
    records = [{"input": "Question: x?\nAnswer:", "output": " 4", "accepted": True, "score": 1.25},
               {"input": "noise", "output": None, "accepted": False, "score": -0.5}]
    path = SyntheticSet(header, records).save(tmp_path / "syn.jsonl")
    back = SyntheticSet.load(path)
    assert back.header == header and back.records == records and back.acceptance_rate == 0.5
    back.check_header({"task": "arithmetic", "sampling": {"top_p": 0.95, "temperature": 0.8}})
    with pytest.raises(ProvenanceMismatchError, match=r"sampling: file .*temperature': 0.8.* vs now .*temperature': 1.0"):
        back.check_header({"sampling": {"temperature": 1.0, "top_p": 0.95}})

    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        SyntheticSet(header, records[:1]).save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["syn.jsonl"]

    monkeypatch.undo()
    (tmp_path / "bad.jsonl").write_text('{"kind": "example", "input": "x"}\n')
    with pytest.raises(ValueError, match="no provenance header"):
        SyntheticSet.load(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="is not JSON"):
        SyntheticSet.load(tmp_path / "broken.jsonl")


# ------------------------------------------------------------------ model roles (micro zoo model)
def _gibberish(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    letters = "qwxzjkvbp"
    return [" ".join("".join(letters[int(i)] for i in torch.randint(0, len(letters), (5,), generator=g))
                     for _ in range(6)) for _ in range(n)]


def test_discriminator_learns_a_separable_toy_case(micro_model_dir: str, tmp_path) -> None:
    from lightning_peft import load_adapter
    from lightning_peft.tasks import get_task
    from lightning_peft.transfer import discriminator_accuracy, train_discriminator

    prompts = [e.prompt for e in get_task("arithmetic", tokenizer=micro_model_dir, num_train=60, num_val=1,
                                            num_test=1).get_examples()["train"]]
    real, held_real = prompts[:40], prompts[40:60]
    fake, held_fake = _gibberish(40, 0), _gibberish(20, 1)
    module, folder = train_discriminator(micro_model_dir, real, fake, "arithmetic", tmp_path / "disc",
                                         max_steps=80, batch_size=8, lr=1e-2, max_length=160,
                                         trainer_kwargs={"enable_progress_bar": False})
    assert discriminator_accuracy(module, held_real, held_fake, "arithmetic") >= 0.9
    # the saved folder is a plain adapter: reloaded onto a fresh base it scores the same
    from lightning_peft.module import CausalLMModule
    fresh = CausalLMModule(model=micro_model_dir)
    fresh.configure_model()
    untrained = discriminator_accuracy(fresh, held_real, held_fake, "arithmetic")
    load_adapter(fresh, folder)
    assert discriminator_accuracy(fresh, held_real, held_fake, "arithmetic") >= 0.9 > untrained


def test_adapters_disabled_runs_the_base_and_restores_the_adapter(micro_model_dir: str) -> None:
    """Inside the context the adapted model's logits equal the bare base's; after it, the adapter's."""
    import lightning_peft as lp
    from lightning_peft.module import CausalLMModule
    from lightning_peft.transfer import adapters_disabled

    bare = CausalLMModule(model=micro_model_dir)
    bare.configure_model()
    module = CausalLMModule(model=micro_model_dir)
    module.configure_model()
    lp.LoRA(r=2).inject(module)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)  # a non-zero delta
    ids = torch.tensor([[1, 5, 9, 13]])
    logits = lambda m: m(input_ids=ids).logits  # noqa: E731
    adapted = logits(module.model)
    with adapters_disabled(module.model):
        assert torch.allclose(logits(module.model), logits(bare.model), atol=1e-6)
    assert torch.equal(logits(module.model), adapted) and not torch.allclose(adapted, logits(bare.model))
    assert all(p.requires_grad for n, p in module.model.named_parameters() if "lora_" in n)


def test_discriminator_callback_synthesises_with_the_source_base(micro_model_dir: str, tmp_path, monkeypatch) -> None:
    """The "no" inputs come from the source base (adapters off while sampling), the "yes" from the data."""
    import lightning as L
    from peft.tuners.tuners_utils import BaseTunerLayer

    import lightning_peft as lp
    from lightning_peft.module import CausalLMModule
    from lightning_peft.tasks import get_task
    from lightning_peft.transfer import discriminator as disc_mod
    from lightning_peft.transfer import models

    seen: dict = {}

    def fake_stream(model, tok, seeds, task, **kw):
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        for i in range(3):  # checked while the stream is consumed, not when it is created
            seen.setdefault("off", []).append(bool(layers) and all(m.disable_adapters for m in layers))
            yield [f"made-up input number {i} {j}" for j in range(4)]

    monkeypatch.setattr(models, "sample_candidates", fake_stream)
    monkeypatch.setattr(disc_mod, "train_discriminator",
                        lambda source, real, fake, task, out, **kw: seen.update(real=real, fake=fake) or (None, out))
    cb = disc_mod.TransLoRADiscriminator(tmp_path / "d", num_real=6, num_seeds=2)
    module = CausalLMModule(model=micro_model_dir, lr=1e-3)
    L.Trainer(max_steps=1, callbacks=[lp.LoRA(r=2), cb], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        module, get_task("arithmetic", tokenizer=micro_model_dir, num_train=8, num_val=0, num_test=1, max_length=64))
    assert seen["off"] and all(seen["off"]) and len(seen["fake"]) == 6 and len(seen["real"]) == 6
    assert not any(m.disable_adapters for m in module.model.modules() if isinstance(m, BaseTunerLayer))


def test_generator_stream_is_seeded_parsed_and_deduplicated(micro_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.transfer import greedy_completions, sample_candidates

    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    seeds = ["Question: Ana has 3 pens.\nAnswer:", "Question: Bo has 4 cups.\nAnswer:", "Question: Cy has 2 hats.\nAnswer:"]
    run = lambda: list(sample_candidates(model, tok, seeds, "arithmetic", batch_size=6, max_new_tokens=24,  # noqa: E731
                                         seed=3, max_batches=3, anchor_format=False))
    first = run()
    assert first == run() and len(first) == 3  # same seed, same stream; one list per batch
    items = [x for batch in first for x in batch]
    assert len({x.casefold() for x in items}) == len(items) and not set(items) & set(seeds)
    assert all(8 <= len(x) <= 1000 and not x[:1].isspace() for x in items)
    model.train()
    labels = greedy_completions(model, tok, seeds[:2], max_new_tokens=8, progress=False)
    assert model.training and len(labels) == 2 and labels == greedy_completions(model, tok, seeds[:2], max_new_tokens=8,
                                                                               progress=False)
    anchored = [x for b in sample_candidates(model, tok, seeds, "arithmetic", batch_size=6, max_new_tokens=24, seed=3,
                                             max_batches=3) for x in b]
    assert all(x.startswith("Question: ") and x.endswith("\nAnswer:") for x in anchored)
    with pytest.raises(ValueError, match="temperature > 0"):
        next(sample_candidates(model, tok, seeds, "arithmetic", temperature=0.0))


def test_end_to_end_transfer_on_micro_zoo_models(micro_model_dir: str, tmp_path, monkeypatch) -> None:
    """v1 adapter + discriminator -> synthetic set for v2 (cached, with provenance) -> student on v2."""
    import lightning as L

    import lightning_peft as lp
    from lightning_peft import transfer
    from lightning_peft.module import CausalLMModule
    from lightning_peft.tasks import get_task

    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False,
             "enable_checkpointing": False}
    task_kw = {"num_train": 24, "num_val": 0, "num_test": 4, "max_length": 64}
    source = CausalLMModule(model="llama-micro-v1", lr=3e-3)
    disc = transfer.TransLoRADiscriminator(tmp_path / "source_adapter-discriminator", num_real=8, num_seeds=1,
                                           max_new_tokens=24, max_steps=4, max_length=64,
                                           trainer_kwargs={"enable_progress_bar": False})
    L.Trainer(max_steps=4, callbacks=[lp.LoRA(r=2), disc], **quiet).fit(
        source, get_task("arithmetic", tokenizer="llama-micro-v1", batch_size=4, **task_kw))
    adapter = lp.save_adapter(source, tmp_path / "source_adapter")
    assert disc.path == tmp_path / "source_adapter-discriminator" and (disc.path / "adapter_config.json").exists()
    # the synthetic set's default size is the source training set's, recorded with the discriminator
    bare = {"source_model": "llama-micro-v1", "source_adapter": str(adapter), "target_model": "llama-micro-v2",
            "task": "arithmetic"}
    assert transfer.pipeline.resolve_num_synthetic(transfer.TransferConfig(**bare)) == 24
    with pytest.raises(ValueError, match="num_synthetic is not set and .* records no training set size"):
        transfer.pipeline.resolve_num_synthetic(transfer.TransferConfig(**bare, discriminator=str(adapter)))

    common = {"source_model": "llama-micro-v1", "source_adapter": str(adapter), "target_model": "llama-micro-v2",
              "task": "arithmetic", "num_synthetic": 3, "generate_batch_size": 8, "max_new_tokens": 24,
              "label_max_new_tokens": 12, "task_kwargs": task_kw,
              "generator_context": 256}  # micro models: 64-token context, RoPE runs past it
    # filtered, with a budget of 2 proposals for 3 examples: it must give up, say why, and keep what it scored
    strict = transfer.TransferConfig(**common, max_proposed=2, cache=str(tmp_path / "filtered.jsonl"))
    with pytest.raises(RuntimeError, match=r"kept only \d of the 3 .*acceptance .* over 2 proposals"):
        transfer.synthesize(strict)
    found = transfer.SyntheticSet.load(strict.cache)  # saved before failing: a rerun continues
    assert len(found.records) == 2 and found.header["filter"] is True
    assert all((r["score"] > 0) == r["accepted"] for r in found.records)  # the discriminator's own verdicts
    stats = found.header["stats"]
    assert stats["proposed"] == 2 and stats["acceptance_rate"] == len(found.accepted) / 2
    computable = len(found.header["seeds"]) >= 2 and len(found.records) - len(found.accepted) >= 2
    assert isinstance(stats["mmd_rejected_vs_seeds"], float) if computable else stats["mmd_rejected_vs_seeds"] is None

    # anchored items that nothing accepts for ANCHOR_PROBE_BATCHES generate calls: the free continuation takes over
    def fake_stream(*args, anchor_format: bool, max_batches: int, **kwargs):
        for b in range(max_batches):
            yield [f"{'anchored' if anchor_format else 'free'} {b} {i}" for i in range(2)]

    def verdicts(accept: str):
        return lambda model, tok, batch, task: torch.tensor([1.0 if x.startswith(accept) else -1.0 for x in batch])

    monkeypatch.setattr(transfer.pipeline, "sample_candidates", fake_stream)
    monkeypatch.setattr(transfer.pipeline, "completion_margins", verdicts("free"))
    fell_back = transfer.synthesize(transfer.TransferConfig(**common))
    probe = transfer.pipeline.ANCHOR_PROBE_BATCHES
    assert [r["input"] for r in fell_back.accepted] == ["free 0 0", "free 0 1", "free 1 0"]
    assert [r["input"] for r in fell_back.records if not r["accepted"]] == [f"anchored {b} {i}" for b in range(probe)
                                                                          for i in range(2)]
    assert fell_back.header["stats"]["anchor_fallback"] is True
    monkeypatch.setattr(transfer.pipeline, "completion_margins", verdicts("anchored"))  # accepted: anchored stays
    anchored = transfer.synthesize(transfer.TransferConfig(**common))
    assert [r["input"] for r in anchored.records] == ["anchored 0 0", "anchored 0 1", "anchored 1 0"]
    assert anchored.header["stats"]["anchor_fallback"] is False
    monkeypatch.setattr(transfer.pipeline, "completion_margins", verdicts(""))  # all accepted
    free = transfer.synthesize(transfer.TransferConfig(**common, anchor_format=False))
    assert [r["input"] for r in free.records] == ["free 0 0", "free 0 1", "free 1 0"]
    monkeypatch.undo()

    cfg = transfer.TransferConfig(**common, filter=False, cache=str(tmp_path / "synthetic.jsonl"))
    syn = transfer.synthesize(cfg)
    assert len(syn.accepted) == 3 and all(r["output"] is not None for r in syn.accepted)
    on_disk = transfer.SyntheticSet.load(cfg.cache)
    assert on_disk.records == syn.records
    assert on_disk.header["source_adapter_fingerprint"] == transfer.adapter_fingerprint(adapter)
    assert 1 <= len(on_disk.header["seeds"]) <= 5 and on_disk.header["generator"] == "llama-micro-v2"

    # a second run reuses the cache without generating; other settings are refused, not mixed in
    monkeypatch.setattr(transfer.pipeline, "sample_candidates", lambda *a, **k: pytest.fail("regenerated"))
    assert transfer.synthesize(cfg).records == syn.records
    with pytest.raises(transfer.ProvenanceMismatchError, match="temperature"):
        transfer.synthesize(transfer.TransferConfig(**{**cfg.__dict__, "temperature": 0.5}))
    monkeypatch.undo()

    fresh_cfg = transfer.TransferConfig(**{**cfg.__dict__, "warm_start": False})
    student, metrics = transfer.train_student(fresh_cfg, syn, transfer.StudentConfig(
        method="lora", method_kwargs={"r": 2}, trainer_kwargs={"max_steps": 2, **quiet}, data_kwargs={"batch_size": 2}))
    assert {"test/loss", "test/exact_match"} <= metrics.keys()
    assert any(".lora_A." in n for n, p in student.named_parameters() if p.requires_grad)

    # warm start: the student starts from the source adapter where its shapes fit (same family) ...
    from lightning_peft.adapter_io import read_adapter

    saved = {k.removeprefix("base_model.model."): v for k, v in read_adapter(adapter)[1].items()}
    adapter_params = lambda m: {n.removeprefix("model.").replace(".default.", "."): p  # noqa: E731
                                for n, p in m.named_parameters() if p.requires_grad}
    warm = CausalLMModule(model="llama-micro-v2")
    assert transfer.student.warm_start_from(warm, str(adapter))
    loaded = adapter_params(warm)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert cfg.warm_start  # the default; a warm student runs its own, gentler schedule
    warm_cfg = transfer.TransferConfig(**{**cfg.__dict__, "warm_lr": 1e-4, "warm_steps": 3})
    student, _ = transfer.train_student(warm_cfg, syn, transfer.StudentConfig(
        method="lora", method_kwargs={"r": 4},  # r=4 unused: warm
        module_kwargs={"lr": 3e-3}, trainer_kwargs={"max_steps": 2, **quiet}, data_kwargs={"batch_size": 2}), test=False)
    assert student.trainer.global_step == 3 and student.trainer.optimizers[0].defaults["lr"] == 1e-4
    trained = adapter_params(student)
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in saved.items()}  # the source's r=2
    assert any(not torch.equal(trained[k], v) for k, v in saved.items())  # and it trained from there
    # ... and a fresh adapter where they do not (another family): the model is left as it was
    other = CausalLMModule(model="qwen2-micro-v1")
    assert not transfer.student.warm_start_from(other, str(adapter))
    assert not getattr(other.model, "peft_config", None) and all(p.requires_grad for p in other.parameters())


def test_transfer_cli_multirun_composes_and_runs(micro_model_dir: str, tmp_path) -> None:
    """`lightning-peft transfer -m kl_weight=0,0.5`: Hydra's own composition and sweep, unfiltered, micro models."""
    import json

    import lightning as L

    import lightning_peft as lp
    from lightning_peft.cli import main
    from lightning_peft.module import CausalLMModule
    from lightning_peft.tasks import get_task

    source = CausalLMModule(model="llama-micro-v1")
    L.Trainer(max_steps=2, callbacks=[lp.LoRA(r=2)], logger=False, enable_progress_bar=False,
              enable_checkpointing=False).fit(source, get_task("arithmetic", tokenizer="llama-micro-v1", num_train=8,
                                                                num_val=0, num_test=2, max_length=64))
    adapter = lp.save_adapter(source, tmp_path / "adapter")
    sweep = tmp_path / "sweep"
    assert main(["transfer", "-m", "kl_weight=0,0.5", f"source_adapter={adapter}", "source_model=llama-micro-v1",
                 "target_model=llama-micro-v2", "filter=false", "num_synthetic=2", "generate_batch_size=4",
                 "max_new_tokens=16", "label_max_new_tokens=6", "generator_context=256", "task=arithmetic",
                 "task.num_train=8", "task.num_val=0", "task.num_test=2", "task.max_length=64",
                 "student.trainer_kwargs.max_steps=1", "student.data_kwargs.batch_size=2",
                 "student.method_kwargs.r=2", "logger=csv", "+student.trainer_kwargs.log_every_n_steps=1",
                 f"hydra.sweep.dir={sweep}"]) == 0
    for job, kl_weight in enumerate((0.0, 0.5)):
        run_dir = sweep / str(job)
        results = json.loads((run_dir / "results.json").read_text())
        assert results["synthetic"] == 2 and "test/exact_match" in results["metrics"]
        assert results["kl_weight"] == kl_weight
        assert (run_dir / "adapter" / "adapter_config.json").exists()
        assert len(lp.transfer.SyntheticSet.load(run_dir / "synthetic.jsonl").accepted) == 2
        (metrics_csv,) = run_dir.glob("**/metrics.csv")
        assert ("train/kl" in metrics_csv.read_text().splitlines()[0]) == (kl_weight > 0)


def test_translora_source_experiment_adds_the_discriminator_callback(tmp_path) -> None:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from lightning_peft.transfer import TransLoRADiscriminator

    with initialize_config_module(version_base="1.3", config_module="lightning_peft.conf"):
        cfg = compose("train", overrides=["experiment=translora_source", f"run_dir={tmp_path}"], return_hydra_config=False)
    callback = instantiate(cfg.callbacks.translora_discriminator)
    assert isinstance(callback, TransLoRADiscriminator)
    assert callback.out_dir == tmp_path / "adapter-discriminator"  # next to the run's adapter/
    assert callback.train_kwargs["max_length"] == cfg.task.max_length


def test_token_kl_matches_a_per_position_computation() -> None:
    from lightning_peft.transfer import token_kl

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    tau = 2.0
    terms = []
    for b in range(2):
        for t in range(4):  # position t predicts labels[b, t + 1]
            if labels[b, t + 1] != -100:
                p = torch.softmax(teacher[b, t] / tau, -1)
                q = torch.softmax(student[b, t] / tau, -1)
                terms.append((p * (p.log() - q.log())).sum())
    expected = torch.stack(terms).mean() * tau**2
    torch.testing.assert_close(token_kl(student, teacher, labels, tau), expected)
    assert token_kl(teacher, teacher, labels) == pytest.approx(0.0, abs=1e-6)
    assert token_kl(student, teacher, torch.full_like(labels, -100)) == 0.0
    with pytest.raises(ValueError, match="share the vocabulary"):
        token_kl(student, teacher[..., :6], labels)


def test_distillation_module_adds_the_teachers_kl_and_keeps_the_teacher_out(micro_model_dir: str, tmp_path) -> None:
    """One step on llama-micro v1 (teacher) -> v2 (student): loss = CE + w * KL, recomputed by hand."""
    import lightning as L

    import lightning_peft as lp
    from lightning_peft import zoo
    from lightning_peft.tasks import get_task
    from lightning_peft.transfer import DistillationModule, token_kl

    teacher = zoo.load("llama-micro-v1")
    module = DistillationModule(teacher, kl_weight=0.5, kl_temperature=2.0, model="llama-micro-v2", lr=1e-3)
    assert "teacher" not in module.hparams and module.hparams.kl_weight == 0.5
    data = get_task("arithmetic", tokenizer="llama-micro-v2", num_train=4, num_val=0, num_test=0, batch_size=4,
                    max_length=64)
    seen = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen["loss"], seen["batch"] = outputs["loss"].detach(), batch

    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    L.Trainer(max_steps=1, callbacks=[lp.LoRA(r=2), Record()], logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    assert not any("teacher" in k for k in module.state_dict())
    # recompute the step's loss with the pre-step weights (LoRA B starts at zero: the base v2 model)
    student = zoo.load("llama-micro-v2")[0].eval()
    student.load_state_dict(before)
    b = seen["batch"]
    with torch.no_grad():
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        t = teacher[0](input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    expected = s.loss + 0.5 * token_kl(s.logits, t, b["labels"], 2.0)
    torch.testing.assert_close(seen["loss"], expected, rtol=1e-4, atol=1e-5)


def test_distillation_refuses_different_vocabularies(micro_model_dir: str) -> None:
    from lightning_peft import zoo
    from lightning_peft.transfer import DistillationModule

    module = DistillationModule(zoo.load("llama-micro-v1"), model="gpt2-micro-v1")
    with pytest.raises(ValueError, match="token-level KL needs one vocabulary.*kl_weight=0"):
        module.configure_model()


def _readme_translora_commands() -> list[list[str]]:
    """The README's two Trans-LoRA commands, split as a shell would (comments dropped)."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "lightning-peft transfer" in b]
    return [shlex.split(line, comments=True) for line in block.strip().splitlines()]


def test_readme_translora_steps_as_typed_with_progress_bars(tmp_path) -> None:
    """The README's source step and transfer step, as typed (default trainers, rich progress bars on), with the
    README's own arguments and only short-step / micro-model overrides appended.

    The discriminator's own Trainer runs inside the outer fit's `on_fit_end`; with two rich live displays the
    outer teardown used to crash ("pop from empty list") before the source adapter was written.
    """
    import subprocess
    import sys

    source_cmd, transfer_cmd = _readme_translora_commands()
    assert source_cmd[:3] == ["lightning-peft", "train", "experiment=translora_source"]
    assert transfer_cmd[:2] == ["lightning-peft", "transfer"] and any(a.startswith("num_synthetic=") for a in transfer_cmd)
    run = [sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())"]
    source = tmp_path / "source"
    short = ["task.max_length=64", "task.num_train=16", "task.num_val=0", "task.num_test=4", "logger=csv"]
    proc = subprocess.run([*run, *source_cmd[1:], "model.name_or_path=llama-micro-v1", "trainer.max_steps=2",
                           "module.max_new_tokens=4", "callbacks.translora_discriminator.num_real=8",
                           "callbacks.translora_discriminator.max_steps=2",
                           "callbacks.translora_discriminator.max_new_tokens=16", *short, f"hydra.run.dir={source}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (source / "adapter" / "adapter_config.json").exists()
    assert (source / "adapter-discriminator" / "adapter_config.json").exists()

    args = [f"source_adapter={source / 'adapter'}" if a.startswith("source_adapter=") else a for a in transfer_cmd[1:]]
    args = [a for a in args if not a.startswith(("source_model=", "target_model=", "num_synthetic="))]
    proc = subprocess.run([*run, *args, "source_model=llama-micro-v1", "target_model=qwen2-micro-v1", "num_synthetic=2",
                           "max_proposed=48", "generate_batch_size=8", "max_new_tokens=16", "label_max_new_tokens=8",
                           "generator_context=256", "student.trainer_kwargs.max_steps=2", *short,
                           f"hydra.run.dir={tmp_path / 'transfer'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "transfer" / "synthetic.jsonl").exists()



def test_transfer_and_upgrade_configs_mirror_transfer_config() -> None:
    """conf/transfer.yaml names every TransferConfig field with its default; upgrade's synthesis block names only fields."""
    import dataclasses

    from omegaconf import OmegaConf

    from lightning_peft import transfer

    conf = Path(__file__).resolve().parents[1] / "conf"
    fields = {f.name: f for f in dataclasses.fields(transfer.TransferConfig)}
    top = OmegaConf.to_container(OmegaConf.load(conf / "transfer.yaml"))
    assert set(fields) - set(top) == {"task", "task_kwargs"}  # both come from the `task` config group
    set_here = {"cache"}  # the CLI writes the synthetic set into its run folder
    for name, value in top.items():
        if name in fields and name not in set_here and fields[name].default is not dataclasses.MISSING:
            assert value == fields[name].default, f"conf/transfer.yaml {name}: {value!r} vs {fields[name].default!r}"
    synthesis = OmegaConf.to_container(OmegaConf.load(conf / "upgrade.yaml"))["synthesis"]
    for name, value in synthesis.items():
        assert name in fields, f"conf/upgrade.yaml synthesis.{name} is no TransferConfig field"
        assert value == fields[name].default, f"conf/upgrade.yaml synthesis.{name}: {value!r} vs {fields[name].default!r}"
