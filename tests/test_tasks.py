"""Tests of `lightning_peft.tasks`: generated data, batches, answers and exact resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoTokenizer

from lightning_peft.tasks import (
    IGNORE_INDEX,
    TASKS,
    ArithmeticProblem,
    ArithmeticTask,
    Data2TextTask,
    Example,
    HFDatasetTask,
    SQLTask,
    SyntheticTask,
    get_task,
    tokenize_examples,
    world_tables,
)
from lightning_peft.tasks.arithmetic import Step
from lightning_peft.tasks.data2text import realize
from lightning_peft.zoo.world import make_world

SYNTHETIC = ("arithmetic", "data2text", "sql")
SMALL = dict(num_train=120, num_val=20, num_test=20)


@pytest.fixture(scope="module")
def tok(micro_model_dir: str):
    return AutoTokenizer.from_pretrained(micro_model_dir)


# ---------------------------------------------------------------- generation and splits
@pytest.mark.parametrize("name", SYNTHETIC)
def test_splits_are_deterministic_disjoint_and_sized(name: str, tok) -> None:
    a = get_task(name, tokenizer=tok, **SMALL).get_examples()
    b = get_task(name, tokenizer=tok, **SMALL).get_examples()
    assert a == b
    assert {s: len(v) for s, v in a.items()} == {"train": 120, "val": 20, "test": 20}
    prompts = {s: {e.prompt for e in v} for s, v in a.items()}
    assert all(len(prompts[s]) == len(a[s]) for s in a)  # no duplicates inside a split
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"] or prompts["val"] & prompts["test"])
    # Another data seed gives other examples, still disjoint from this seed's test split.
    other = get_task(name, tokenizer=tok, data_seed=7, **SMALL).get_examples()
    assert other["train"] != a["train"]
    assert not {e.prompt for e in other["train"]} & prompts["test"]
    # The test split does not move when the training set grows.
    bigger = get_task(name, tokenizer=tok, num_train=300, num_val=20, num_test=20).get_examples()
    assert bigger["test"] == a["test"]


def test_arithmetic_problem_renders_as_written() -> None:
    problem = ArithmeticProblem(
        "Zapelx", "She", "apples", 7, (Step("add", 5, 0, "Gur"), Step("sub", 3, 0, "Gur"))
    )
    assert problem.question() == (
        "Zapelx has 7 apples. She buys 5 more. Then she gives 3 to Gur. How many apples does Zapelx have now?"
    )
    assert problem.solution() == "7 + 5 = 12. 12 - 3 = 9. The answer is 9"
    together = ArithmeticProblem("Gur", "He", "pens", 4, (Step("mul", 3),), partner="Vais", partner_amount=5)
    assert together.question() == (
        "Gur has 4 pens and Vais has 5. He triples them. How many pens do Gur and Vais have together now?"
    )
    assert together.solution() == "4 * 3 = 12. 12 + 5 = 17. The answer is 17"


def test_arithmetic_solutions_are_correct(tok) -> None:
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    for ex in ArithmeticTask(tok, **SMALL).get_examples()["train"]:
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", ex.completion)
        assert 1 <= len(steps) <= 3, ex
        running = None
        for a, op, b, r in steps:
            assert ops[op](int(a), int(b)) == int(r), ex
            assert running is None or int(a) == running, ex  # each step continues the last
            running = int(r)
        assert ex.completion.endswith(f"The answer is {running}") and ex.answer == str(running)
        first = re.search(r"has (\d+) ", ex.prompt)
        assert first and int(first.group(1)) == int(steps[0][0])


def test_data2text_sentences_state_the_true_facts(tok) -> None:
    world = make_world("v1")
    assert realize("inform", "Brairair", {"genre": "racing", "rating": "excellent"}, ("rating", "genre")) == (
        "Brairair is a racing game rated excellent."
    )
    assert realize("give_opinion", "Zed", {"rating": "poor", "genre": "adventure"}, ("rating", "genre")) == (
        "I think Zed is a disappointing adventure game."
    )
    examples = Data2TextTask(tok, **SMALL).get_examples()["train"]
    acts = set()
    for ex in examples:
        mr = re.fullmatch(r"(\w+)\((.*)\) ->", ex.prompt)
        assert mr, ex.prompt
        acts.add(mr.group(1))
        slots = dict(re.findall(r"(\w+)\[([^\]]*)\]", mr.group(2)))
        if "name" in slots:
            game = world.game(slots.pop("name"))
            for slot, value in slots.items():
                assert str(getattr(game, slot)) == value, ex  # values are the game's real facts
                assert value in ex.answer or slot == "rating", ex
        assert ex.completion == " " + ex.answer and ex.answer.endswith((".", "?"))
    assert {"inform", "confirm", "give_opinion", "request"} <= acts


_GAMES_COUNT = re.compile(
    r"How many (?:(\w+) )?games(?: by (\w+))?(?: on (\w+))?(?: rated (\w+))?"
    r"(?: released (after|before|in) (\d+))? are there\?"
)


def test_sql_answers_run_and_agree_with_the_world(tok) -> None:
    world = make_world("v1")
    db = world_tables(world)
    checked = 0
    for ex in SQLTask(tok, num_train=400, num_val=20, num_test=20).get_examples()["train"]:
        assert ex.prompt.startswith("Tables: games(name, genre, developer, year, rating, platform); employees(")
        rows = db.execute(ex.answer).fetchall()  # every answer is valid SQL over the tables
        question = ex.prompt.split("Question: ")[1].split("\n")[0]
        if m := _GAMES_COUNT.fullmatch(question):
            genre, dev, platform, rating, when, year = m.groups()
            expected = sum(
                (genre is None or g.genre == genre)
                and (dev is None or g.developer == dev)
                and (platform is None or g.platform == platform)
                and (rating is None or g.rating == rating)
                and (when is None or {"after": g.year > int(year), "before": g.year < int(year), "in": g.year == int(year)}[when])
                for g in world.games
            )
            assert rows == [(expected,)], (question, ex.answer)
            checked += 1
        elif m := re.fullmatch(r"What is the salary of (\w+)\?", question):
            assert rows == [(next(e.salary for e in world.employees if e.name == m.group(1)),)]
            checked += 1
        elif m := re.fullmatch(r"What is the (genre|developer|platform|rating) of (\w+)\?", question):
            assert rows == [(getattr(world.game(m.group(2)), m.group(1)),)]
            checked += 1
    assert checked >= 20


# ---------------------------------------------------------------- tokenisation and batches
def test_labels_mask_exactly_prompt_and_padding(tok) -> None:
    dm = ArithmeticTask(tok, batch_size=8, max_length=256, **SMALL)
    dm.setup()
    examples = dm.get_examples()["train"]
    batch = next(iter(dm.train_dataloader()))
    by_prompt_ids = {}
    for ex in examples:
        by_prompt_ids[tuple(tok(ex.prompt)["input_ids"])] = ex
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (labels[n:] == IGNORE_INDEX).all()
        supervised = (labels != IGNORE_INDEX).nonzero().flatten()
        start = int(supervised[0])
        assert supervised.tolist() == list(range(start, n))  # one block: completion + eos
        assert (labels[start:n] == ids[start:n]).all()
        ex = by_prompt_ids[tuple(ids[:start].tolist())]  # the masked part is exactly the prompt
        assert labels[n - 1] == tok.eos_token_id
        assert tok.decode(labels[start : n - 1]).strip() == ex.completion.strip()


def test_eval_batches_carry_left_padded_prompts_and_answers(tok) -> None:
    dm = Data2TextTask(tok, eval_batch_size=5, **SMALL)
    batch = next(iter(dm.val_dataloader()))
    val = dm.get_examples()["val"][:5]
    assert batch["answers"] == [e.answer for e in val]
    p_ids, p_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert p_mask[:, -1].all()  # left padding: every prompt ends in the last column
    for row, ex in enumerate(val):
        real = p_ids[row][p_mask[row].bool()].tolist()
        assert real == tok(ex.prompt)["input_ids"]
        assert batch["input_ids"][row, : len(real)].tolist() == real


def test_long_prompts_are_cut_from_the_left_never_the_completion(tok) -> None:
    ex = Example("word " * 80 + "Answer:", " 1 + 2 = 3. The answer is 3", "3")
    (out,) = tokenize_examples([ex], tok, max_length=40)
    completion = tok(ex.completion, add_special_tokens=False)["input_ids"]
    assert len(out.input_ids) == 40
    assert list(out.input_ids[out.prompt_length :]) == [*completion, tok.eos_token_id]
    assert out.input_ids[0] == tok.bos_token_id  # the prefix survives the cut
    with pytest.raises(ValueError, match="truncation='error'"):
        tokenize_examples([ex], tok, max_length=40, truncation="error")
    with pytest.raises(ValueError, match="raise max_length to at least"):
        tokenize_examples([ex], tok, max_length=8)


def test_drop_leaves_out_only_examples_whose_completion_cannot_fit(tok, caplog) -> None:
    """A synthetic label that ran away (the upgrade's student data): left out and logged, the rest kept as with "left"."""
    short = Example("word " * 80 + "Answer:", " 3", "3")
    runaway = Example("Q:", " again" * 60, "again")
    kept = tokenize_examples([short, runaway, short], tok, max_length=40, truncation="drop")
    assert kept == tokenize_examples([short, short], tok, max_length=40)  # as "left" does with the fitting ones
    assert "train: left out 1 of 3 examples whose completion alone exceeds max_length=40 tokens" in caplog.text
    with pytest.raises(ValueError, match="raise max_length to at least"):  # none fits: nothing to train on
        tokenize_examples([runaway, runaway], tok, max_length=40, truncation="drop")


@pytest.mark.parametrize("name", [*SYNTHETIC, "hf_dataset"])
def test_extract_answer_of_the_reference_completion_is_the_answer(name: str, tok, tmp_path: Path) -> None:
    dm = _hf_task(tok, tmp_path) if name == "hf_dataset" else get_task(name, tokenizer=tok, **SMALL)
    dm.setup()
    for item in dm.datasets["val"].examples:
        text = tok.decode(item.input_ids[item.prompt_length :], skip_special_tokens=True)
        assert dm.extract_answer(text) == item.answer


@pytest.mark.parametrize(
    ("name", "generation", "expected"),
    [
        ("arithmetic", " 7 + 5 = 12. 12 - 3 = 9. The answer is 9", "9"),
        ("arithmetic", " 7 + 5 = 12. The answer is 12.\nQuestion: Gur has 3", "12"),
        ("arithmetic", "the answer is: 1,200 apples", "1200"),
        ("arithmetic", "7 + 5 = 12. 12 - 3 = 9.0", "9"),
        ("arithmetic", " I do not know", ""),
        ("data2text", "  Brairair is  a racing game.\nBrairair is", "Brairair is a racing game."),
        ("data2text", "\n\n", ""),
        ("sql", " SELECT name  FROM games WHERE genre = 'racing'; SELECT 1;\nQuestion:", "SELECT name FROM games WHERE genre = 'racing';"),
        ("sql", "\n SELECT COUNT(*) FROM games", "SELECT COUNT(*) FROM games"),
    ],
)
def test_extract_answer_on_awkward_generations(name: str, generation: str, expected: str, tok) -> None:
    assert TASKS[name](tok).extract_answer(generation) == expected


# ---------------------------------------------------------------- hf_dataset
def _hf_task(tok, tmp_path: Path, **kwargs) -> HFDatasetTask:
    rows = [{"q": f"What is {i} plus {i}?", "a": f"It is {2 * i}. #### {2 * i}"} for i in range(30)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    args = dict(num_val=5, num_test=5, data_seed=3, load_kwargs={"cache_dir": str(tmp_path / "hf")})
    args.update(kwargs)
    return HFDatasetTask(tok, str(path), "Q: {q}\nA:", " {a}", answer_regex=r"####\s*(\S+)", **args)


def test_hf_dataset_on_a_local_json_file(tok, tmp_path: Path) -> None:
    dm = _hf_task(tok, tmp_path)
    splits = dm.get_examples()
    assert {s: len(v) for s, v in splits.items()} == {"train": 20, "val": 5, "test": 5}
    all_prompts = [e.prompt for v in splits.values() for e in v]
    assert sorted(all_prompts) == sorted(f"Q: What is {i} plus {i}?\nA:" for i in range(30))
    ex = splits["train"][0]
    i = int(re.search(r"What is (\d+)", ex.prompt).group(1))
    assert ex.completion == f" It is {2 * i}. #### {2 * i}" and ex.answer == str(2 * i)
    assert dm.extract_answer("It is 6. #### 6\nQ: next") == "6" and dm.extract_answer("It is 6.") == ""
    assert _hf_task(tok, tmp_path, num_train=7).get_examples()["train"] == splits["train"][:7]
    batch = next(iter(dm.val_dataloader()))
    assert batch["answers"] == [e.answer for e in splits["val"]]


def test_hf_dataset_existing_splits_and_errors(tok, tmp_path: Path) -> None:
    for split, n in (("train", 12), ("test", 4)):
        (tmp_path / f"{split}.json").write_text(json.dumps([{"x": f"{split}{i}", "y": str(i)} for i in range(n)]))
    files = {"train": str(tmp_path / "train.json"), "test": str(tmp_path / "test.json")}
    dm = HFDatasetTask(
        tok, "json", "{x} ->", " {y}", data_files=files, test_split="test", num_val=2, num_test=4,
        load_kwargs={"cache_dir": str(tmp_path / "hf")},
    )
    splits = dm.get_examples()
    assert [e.prompt for e in splits["test"]] == [f"test{i} ->" for i in range(4)]
    assert len(splits["val"]) == 2 and len(splits["train"]) == 10
    cache = {"cache_dir": str(tmp_path / "hf")}
    bad = HFDatasetTask(tok, "json", "{missing} ->", " {y}", data_files=files, num_val=2, num_test=2, load_kwargs=cache)
    with pytest.raises(ValueError, match=r"unknown column 'missing'.*\['x', 'y'\]"):
        bad.get_examples()
    too_many = HFDatasetTask(tok, "json", "{x}", " {y}", data_files=files, num_val=10, num_test=4, load_kwargs=cache)
    with pytest.raises(ValueError, match="num_val must fit in split 'train' of 12 rows"):
        too_many.get_examples()


# ---------------------------------------------------------------- resume
def _batches(loader, n: int) -> list[list[list[int]]]:
    it = iter(loader)
    return [next(it)["input_ids"].tolist() for _ in range(n)]


def test_stateful_loader_resumes_exactly(tok) -> None:
    def make():
        dm = ArithmeticTask(tok, batch_size=4, num_train=20, num_val=0, num_test=0)
        return dm.train_dataloader()  # 5 batches per epoch

    full = []
    loader = make()
    for _ in range(2):  # two epochs
        full += [b["input_ids"].tolist() for b in loader]
    assert full[:5] != full[5:]  # epochs are shuffled differently
    first = make()
    it = iter(first)
    head = [next(it)["input_ids"].tolist() for _ in range(3)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b["input_ids"].tolist() for b in resumed]
    tail += [b["input_ids"].tolist() for b in resumed]  # the next epoch too
    assert head + tail == full


class _Recorder(L.LightningModule):
    """Records the batches it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].tolist())
        return self.w * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_resume_sees_the_same_batches(tok, tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, callbacks=()) -> list:
        module = _Recorder()
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, default_root_dir=tmp_path,
        )
        trainer.fit(module, ArithmeticTask(tok, batch_size=4, num_train=24, num_val=0, num_test=0), ckpt_path=ckpt_path)
        return module.seen

    full = run(9)  # 6 batches per epoch: crosses an epoch boundary
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    head = run(4, callbacks=[saver])
    tail = run(9, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert len(head) == 4 and len(tail) == 5
    assert head + tail == full


# ---------------------------------------------------------------- registry and errors
def test_get_task_unknown_name_lists_the_closest_first() -> None:
    assert set(TASKS) == {"arithmetic", "data2text", "hf_dataset", "ner_finance", "sarcasm", "sql"}
    with pytest.raises(ValueError, match=r"got 'arithmatic'; available \(closest first\): arithmetic, ") as err:
        get_task("arithmatic", tokenizer="unused")
    assert "lightning_peft.tasks.TASKS" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"batch_size": -4}, r"batch_size must be an integer >= 1, got -4"),
        ({"batch_size": True}, r"batch_size must be an integer >= 1, got True"),
        ({"eval_batch_size": 0}, r"eval_batch_size must be"),
        ({"max_length": 2}, r"max_length must be an integer >= 4, got 2"),
        ({"num_val": -1}, r"num_val must be an integer >= 0, got -1; use 0 to skip validation"),
        ({"world_version": "v3"}, r"world_version must be 'v1' or 'v2', got 'v3'"),
        ({"truncation": "right"}, r"truncation must be one of \['left', 'error', 'drop'\], got 'right'"),
        ({"num_train": None}, r"num_train must be a number for the generated task 'sql'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, match: str, tok) -> None:
    with pytest.raises(ValueError, match=match):
        SQLTask(tok, **kwargs).get_examples()


class _TinySpace(SyntheticTask):
    task_name = "tiny_space"

    def generate(self, rng):
        i = rng.randrange(30)
        return Example(f"q{i} ->", f" a{i}", f"a{i}")


def test_a_too_small_example_space_is_reported(tok) -> None:
    with pytest.raises(ValueError, match=r"yields only \{.*\} distinct ones after \d+ draws; lower num_train"):
        _TinySpace(tok, num_train=100, num_val=5, num_test=5).get_examples()
    assert sum(map(len, _TinySpace(tok, num_train=10, num_val=2, num_test=2).get_examples().values())) == 14


def test_bad_tokenizer_type_is_rejected() -> None:
    with pytest.raises(TypeError, match="tokenizer must be a PreTrainedTokenizerBase or a zoo name"):
        ArithmeticTask(42)


def test_hf_dataset_default_splits_are_fractions_of_a_small_file(tok, tmp_path: Path) -> None:
    """The README's own-data example on a 200-row file: 10% val, 10% test (at least 16 rows each), the rest train."""
    def sizes(n: int, **kwargs) -> dict[str, int]:
        rows = [{"q": f"q{i}", "a": str(i)} for i in range(n)]
        path = tmp_path / f"data{n}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        dm = HFDatasetTask(tok, str(path), "{q} ->", " {a}", load_kwargs={"cache_dir": str(tmp_path / "hf")}, **kwargs)
        return {s: len(v) for s, v in dm.get_examples().items()}

    assert sizes(200) == {"train": 160, "val": 20, "test": 20}
    assert sizes(60) == {"train": 28, "val": 16, "test": 16}  # the floor
    assert sizes(5000) == {"train": 4600, "val": 200, "test": 200}  # the cap (the former fixed default)
    assert sizes(200, num_val=0, num_test=50) == {"train": 150, "val": 0, "test": 50}
    with pytest.raises(ValueError, match="num_val must fit in split 'train' of 30 rows"):
        sizes(30)
