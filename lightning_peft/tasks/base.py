"""`PromptCompletionDataModule`: the LightningDataModule every task shares.

A task only says how to build its train/val/test examples (`build_splits`) and how to read
an answer out of a generation (`extract_answer`); tokenisation, label masking, padding,
exactly resumable shuffling and the evaluation batches are written once here.

Batches (dicts; ``B`` examples, ``T`` longest full sequence, ``P`` longest prompt):

* ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T): right-padded
  ``prefix + prompt + completion + eos``; labels are -100 on prefix, prompt and padding.
* val/test only: ``prompt_input_ids`` (B, P), ``prompt_attention_mask`` (B, P): the
  left-padded prompts, for ``model.generate``; ``answers``: the ``B`` reference answers.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_peft.data import resumable_loader
from lightning_peft.metrics import normalize_whitespace
from lightning_peft.tasks.data import (
    Example,
    PromptCompletionCollator,
    TokenizedDataset,
    Truncation,
    tokenize_examples,
)

SPLITS = ("train", "val", "test")


def _check_int(name: str, value: Any, minimum: int, fix: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {fix}")


def load_tokenizer(tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Return ``tokenizer`` itself, or load it from a zoo name, local folder or Hub name."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from lightning_peft import zoo  # lazy: importing the zoo pulls in its build machinery

    return AutoTokenizer.from_pretrained(zoo.resolve(tokenizer))


class PromptCompletionDataModule(L.LightningDataModule):
    """Base LightningDataModule of prompt/completion tasks.

    Subclasses implement `build_splits` (and may override `extract_answer`). Splits are a
    pure function of the task's arguments and ``data_seed``: the training seed never changes
    them. The train loader is a ``torchdata`` ``StatefulDataLoader`` whose shuffling depends
    only on ``(shuffle_seed, epoch)``, so Lightning's checkpoints resume it exactly mid-epoch.

    Args:
        tokenizer: A tokenizer, or a zoo name / local folder / Hub name to load one from
            (resolved with `lightning_peft.zoo.resolve`, loaded on first use).
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size (default: ``batch_size``).
        max_length: Most tokens of one full example (prefix, prompt, completion, eos).
        num_train: Training examples.
        num_val: Validation examples (0: no validation loader).
        num_test: Test examples (0: no test loader).
        data_seed: Seed of the examples and their split (independent of the training seed).
        shuffle_seed: Seed of the training order (epoch ``e`` uses ``shuffle_seed + e``).
        num_workers: Dataloader worker processes.
        world_version: Synthetic tasks: version of `lightning_peft.zoo.world` asked about.
        world_seed: Synthetic tasks: seed of the world (the zoo's models use 0).
        world_scale: Synthetic tasks: world scale (the zoo's models use 1).
        truncation: ``"left"``: drop the start of an over-long prompt (never the
            completion); ``"error"``: raise on an over-long example; ``"drop"``: as ``"left"``, and an example whose
            completion alone does not fit is left out (logged).

    Raises:
        ValueError: A size, seed or option is out of range (the message names the fix).
    """

    task_name: ClassVar[str] = "prompt_completion"
    # what `CausalLMModule` computes from the greedy generations of val/test prompts
    # ("exact_match" of the extracted answers; "rougeL": ROUGE-L F1 of the whole generation)
    generation_metrics: ClassVar[tuple[str, ...]] = ("exact_match",)

    def __init__(
        self,
        tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_length: int = 128,
        num_train: int | None = 2000,
        num_val: int = 200,
        num_test: int = 200,
        data_seed: int = 1234,
        shuffle_seed: int = 0,
        num_workers: int = 0,
        world_version: str = "v1",
        world_seed: int = 0,
        world_scale: int = 1,
        truncation: Truncation = "left",
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1, "use a positive batch size such as 16")
        _check_int("eval_batch_size", eval_batch_size, 1, "use a positive size or None (= batch_size)", allow_none=True)
        _check_int("max_length", max_length, 4, "use the model's context length, e.g. 128")
        _check_int("num_train", num_train, 1, "training needs at least one example", allow_none=True)
        _check_int("num_val", num_val, 0, "use 0 to skip validation")
        _check_int("num_test", num_test, 0, "use 0 to skip testing")
        _check_int("data_seed", data_seed, 0, "use a non-negative integer seed")
        _check_int("shuffle_seed", shuffle_seed, 0, "use a non-negative integer seed")
        _check_int("num_workers", num_workers, 0, "use 0 to load in the main process")
        _check_int("world_scale", world_scale, 1, "use 1, the scale the zoo's models were trained on")
        _check_int("world_seed", world_seed, 0, "use 0, the seed the zoo's models were trained on")
        if world_version not in ("v1", "v2"):
            raise ValueError(f"world_version must be 'v1' or 'v2', got {world_version!r}; pick the zoo model's version")
        if truncation not in get_args(Truncation):
            raise ValueError(f"truncation must be one of {list(get_args(Truncation))}, got {truncation!r}; 'left' drops the "
                             "prompt's start")
        # `tokenizer` stays out of hparams: Lightning merges module and datamodule hparams for
        # the loggers and refuses keys that both have with different values (CausalLMModule
        # has its own `tokenizer` argument, None by default).
        self.save_hyperparameters(ignore=["tokenizer"])
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            self._tokenizer: PreTrainedTokenizerBase | None = tokenizer
        elif isinstance(tokenizer, (str, os.PathLike)):
            self._tokenizer = None
        else:
            raise TypeError(
                f"tokenizer must be a PreTrainedTokenizerBase or a zoo name/path string, got {type(tokenizer).__name__}; "
                "pass e.g. 'llama-v1' or AutoTokenizer.from_pretrained(...)"
            )
        self.tokenizer_source = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.data_seed, self.shuffle_seed = data_seed, shuffle_seed
        self.num_workers = num_workers
        self.world_version, self.world_seed, self.world_scale = world_version, world_seed, world_scale
        self.truncation: Truncation = truncation
        self.examples: dict[str, list[Example]] | None = None
        self.datasets: dict[str, TokenizedDataset] = {}

    # ----------------------------------------------------------------- task hooks
    def build_splits(self) -> dict[str, list[Example]]:
        """Build the ``"train"``, ``"val"`` and ``"test"`` examples (disjoint, deterministic)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_splits()")

    def extract_answer(self, text: str) -> str:
        """The answer in a generated completion (default: the whitespace-normalised text)."""
        return normalize_whitespace(text)

    # ----------------------------------------------------------------- data
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (loaded from ``tokenizer_source`` on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or its eos id when it has no pad token."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def get_examples(self) -> dict[str, list[Example]]:
        """The examples of every split, built once (no tokenizer needed)."""
        if self.examples is None:
            splits = self.build_splits()
            missing = [s for s in SPLITS if s not in splits]
            if missing:
                raise RuntimeError(f"{type(self).__name__}.build_splits() returned no {missing} split(s)")
            self.examples = {s: list(splits[s]) for s in SPLITS}
        return self.examples

    def setup(self, stage: str | None = None) -> None:
        """Build and tokenise all splits (idempotent)."""
        if self.datasets:
            return
        for split, examples in self.get_examples().items():
            tokenized = tokenize_examples(examples, self.tokenizer, self.max_length, self.truncation, split)
            self.datasets[split] = TokenizedDataset(tokenized)

    @property
    def longest_example(self) -> int:
        """Tokens of the longest tokenised example over all splits (0 before `setup`)."""
        return max((len(x.input_ids) for ds in self.datasets.values() for x in ds.examples), default=0)

    def _dataset(self, split: str) -> TokenizedDataset:
        if not self.datasets:
            self.setup()
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; ``state_dict``/``load_state_dict`` resume them exactly."""
        return resumable_loader(
            self._dataset("train"),
            self.batch_size,
            seed=self.shuffle_seed,
            collate_fn=PromptCompletionCollator(self.pad_token_id, with_prompts=False),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Only seeds worker processes; a private generator keeps the global RNG untouched.
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
        dataset = self._dataset(split)
        if len(dataset) == 0:
            return []
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=PromptCompletionCollator(self.pad_token_id, with_prompts=True),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order, with generation prompts and answers."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in a fixed order, with generation prompts and answers."""
        return self._eval_loader("test")
