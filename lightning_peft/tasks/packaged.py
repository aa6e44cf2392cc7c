"""Real tasks from data sets carried by a PyPI wheel: OpenAI's ``evals`` registry.

The ``evals==3.0.1.post1`` wheel holds its evaluation data under ``evals/registry/data/``
(MIT licence, per the package's metadata). The files are read out of the wheel (the package
is never installed nor imported, see :mod:`lightning_peft.wheels`), checked against the
sha256 pinned here, and cached in ``$LIGHTNING_PEFT_CACHE/data/``; later runs read the cache.

Two tasks:

* ``sarcasm``: is a news headline sarcastic? 28,614 headlines (28,498 distinct) labelled
  ``1`` (sarcastic) or ``0`` (52.4% are ``0``), apparently the News Headlines Dataset for
  Sarcasm Detection (Misra and Arora, 2019: The Onion vs HuffPost). Scored by the accuracy of
  the generated label (``exact_match``): a 2,000-example test split resolves about 2 points
  (binomial standard error 1.1 points at 50%).
* ``ner_finance``: list the named entities of a sentence from a financial agreement as
  ``[NAME - TYPE, ...]`` (PERSON, ORGANIZATION, LOCATION) or ``No entities found`` (56% of
  the 1,164 sentences). Scored by token accuracy over the answer (teacher-forced, about 13
  tokens per answer, so about 4,000 tokens in the 300-example test split) and ROUGE-L of the
  greedy generation.

Splits are a pure function of ``data_seed``: distinct inputs are shuffled, then cut into test,
val and train (disjoint by input text, duplicates with conflicting labels dropped).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, ClassVar

from filelock import FileLock

from lightning_peft.atomic import atomic_write_text
from lightning_peft.tasks.base import PromptCompletionDataModule, normalize_whitespace
from lightning_peft.tasks.data import Example
from lightning_peft.wheels import read_member, wheel_file
from lightning_peft.zoo.cache import cache_root

EVALS_PACKAGE, EVALS_VERSION = "evals", "3.0.1.post1"
# sha256 of each samples.jsonl inside evals==3.0.1.post1 (another content is refused).
EVALS_SHA256 = {
    "sarcasm": "4cb34ff4d2718da62368440ffe8dece7ece39a46b0fe4d172fdd8a76bc420f46",
    "ner_finance": "7ffffeec797366ad631b7b57f404c73e437a15e38351895b3f71d1b030f69430",
}


def evals_samples(dataset: str) -> list[dict[str, Any]]:
    """The rows of ``evals/registry/data/<dataset>/samples.jsonl`` (fetched once, then cached).

    Raises:
        ValueError: ``dataset`` is not pinned here, or the file's sha256 is not the pinned one.
        lightning_peft.wheels.PackageFetchError: The wheel cannot be downloaded (offline).
    """
    if dataset not in EVALS_SHA256:
        raise ValueError(f"dataset must be one of {sorted(EVALS_SHA256)}, got {dataset!r}; pin its sha256 to add one")
    path = cache_root() / "data" / f"{EVALS_PACKAGE}-{EVALS_VERSION}" / f"{dataset}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            with wheel_file(EVALS_PACKAGE, EVALS_VERSION) as whl:
                raw = read_member(whl, f"evals/registry/data/{dataset}/samples.jsonl")
            digest = hashlib.sha256(raw).hexdigest()
            if digest != EVALS_SHA256[dataset]:
                raise ValueError(
                    f"{dataset}/samples.jsonl from {EVALS_PACKAGE}=={EVALS_VERSION} has sha256 {digest}, but "
                    f"{EVALS_SHA256[dataset]} is pinned; refusing it (nothing cached). Retry; report it if it persists"
                )
            atomic_write_text(path, raw.decode("utf-8"))
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _user_text(row: dict[str, Any]) -> str:
    return next(m["content"] for m in row["input"] if m["role"] == "user")


class EvalsTask(PromptCompletionDataModule):
    """A task over one ``evals`` data set: distinct inputs shuffled by ``data_seed``, cut test / val / train.

    Subclasses set ``dataset``, ``prompt_template`` (over ``{text}``) and may override
    ``completion`` and ``extract_answer``.

    Raises:
        ValueError: The sizes do not fit the data set (the message gives its size).
    """

    dataset: ClassVar[str] = ""
    prompt_template: ClassVar[str] = "{text}\nAnswer:"

    def completion(self, ideal: str) -> str:
        """The completion the model is trained to write for a reference answer."""
        return " " + ideal

    def build_splits(self) -> dict[str, list[Example]]:
        """Distinct inputs (conflicting duplicates dropped), shuffled by ``data_seed``, cut test / val / train."""
        labels: dict[str, set[str]] = {}
        for row in evals_samples(self.dataset):
            labels.setdefault(normalize_whitespace(_user_text(row)), set()).add(str(row["ideal"]).strip())
        items = sorted((text, next(iter(ideal))) for text, ideal in labels.items() if len(ideal) == 1)
        random.Random(self.data_seed).shuffle(items)
        n_train = len(items) - self.num_test - self.num_val if self.num_train is None else self.num_train
        if n_train < 1 or self.num_test + self.num_val + n_train > len(items):
            raise ValueError(
                f"{self.task_name}: num_train + num_val + num_test must be <= its {len(items)} distinct examples, got "
                f"{self.num_train} + {self.num_val} + {self.num_test}; lower them"
            )
        cuts = {"test": (0, self.num_test), "val": (self.num_test, self.num_test + self.num_val)}
        cuts["train"] = (cuts["val"][1], cuts["val"][1] + n_train)
        return {
            split: [
                Example(self.prompt_template.format(text=text), self.completion(ideal), self.extract_answer(ideal))
                for text, ideal in items[a:b]
            ]
            for split, (a, b) in cuts.items()
        }


class SarcasmTask(EvalsTask):
    """Sarcasm of news headlines (``evals`` ``sarcasm``): the model writes ``1`` or ``0``.

    Args:
        tokenizer: See `PromptCompletionDataModule`.
        num_train: Training headlines (default 4,000).
        num_val: Validation headlines (default 200).
        num_test: Test headlines (default 2,000: about +-1.1 points of accuracy).
        **kwargs: The other `PromptCompletionDataModule` arguments.
    """

    task_name = "sarcasm"
    dataset = "sarcasm"
    prompt_template = "Is this news headline sarcastic? Answer 1 for yes, 0 for no.\nHeadline: {text}\nAnswer:"

    def __init__(self, tokenizer: Any, num_train: int | None = 4000, num_val: int = 200, num_test: int = 2000,
                 **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 96)
        super().__init__(tokenizer, num_train=num_train, num_val=num_val, num_test=num_test, **kwargs)

    def extract_answer(self, text: str) -> str:
        """The first ``0`` or ``1`` of the generation (``""`` when there is none)."""
        return next((c for c in text if c in "01"), "")


class NERFinanceTask(EvalsTask):
    """Named entities of financial-agreement sentences (``evals`` ``ner_finance``), as a list.

    Args:
        tokenizer: See `PromptCompletionDataModule`.
        num_train: Training sentences (default: all that remain, 800 of 1,164 distinct).
        num_val: Validation sentences (default 64).
        num_test: Test sentences (default 300).
        **kwargs: The other `PromptCompletionDataModule` arguments.
    """

    task_name = "ner_finance"
    dataset = "ner_finance"
    generation_metrics = ("exact_match", "rougeL")
    prompt_template = (
        "List the named entities of the sentence in the order they appear, as [NAME - TYPE, ...] with TYPE one of "
        "PERSON, ORGANIZATION, LOCATION, or write No entities found.\nSentence: {text}\nEntities:"
    )

    def __init__(self, tokenizer: Any, num_train: int | None = None, num_val: int = 64, num_test: int = 300,
                 **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 256)
        super().__init__(tokenizer, num_train=num_train, num_val=num_val, num_test=num_test, **kwargs)
