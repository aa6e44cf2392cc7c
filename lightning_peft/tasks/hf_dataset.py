"""`HFDatasetTask`: any Hugging Face ``datasets`` dataset as a prompt/completion task.

Rows are turned into text with Python format strings over the columns, e.g. for GSM8K
(Cobbe et al., 2021) ``prompt_template="Question: {question}\\nAnswer:"``,
``completion_template=" {answer}"`` and ``answer_regex=r"####\\s*(\\S+)"``. Local files work
without any network (``path="data.jsonl"`` or ``path="json", data_files=...``); Hub names
work where the Hub is reachable.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_peft.tasks.base import PromptCompletionDataModule, normalize_whitespace
from lightning_peft.tasks.data import Example

# File extension -> `datasets` packaged builder, for `path="file.ext"`.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def _render(template: str, row: Mapping[str, Any], what: str) -> str:
    try:
        return template.format(**row)
    except KeyError as err:
        raise ValueError(
            f"{what} must only name columns of the dataset, got {template!r} with unknown column {err.args[0]!r}; "
            f"available columns: {sorted(row)}"
        ) from None
    except (IndexError, ValueError) as err:
        raise ValueError(
            f"{what} must be a Python format string over column names like '{{question}}', got {template!r} ({err}); "
            "escape literal braces as '{{' and '}}'"
        ) from None


EVAL_FRACTION = 0.1  # of the rows, for each of val and test when their sizes are not given
EVAL_FLOOR = 16  # fewest rows a default val/test split gets (fewer cannot tell runs apart)
EVAL_CAP = 200  # most rows a default val/test split gets


class HFDatasetTask(PromptCompletionDataModule):
    """A task over a Hugging Face ``datasets`` dataset (local files or the Hub).

    Without ``val_split``/``test_split`` the rows of ``split`` are shuffled with
    ``data_seed`` and carved into test (first ``num_test``), val (next ``num_val``) and train
    (the rest, at most ``num_train``). With them, the first ``num_val``/``num_test`` rows of
    those splits are used as they are. ``num_val``/``num_test`` left at ``None`` take
    :data:`EVAL_FRACTION` of the rows each, at least :data:`EVAL_FLOOR` and at most
    :data:`EVAL_CAP` (a 200-row file: 20 / 20 / 160 rows; a large one: 200 / 200 / the rest).

    Args:
        tokenizer: See `PromptCompletionDataModule`.
        path: ``datasets.load_dataset`` path: a builder (``"json"``, ``"csv"``), a Hub name,
            or a local data file (``.json``, ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``,
            ``.txt``; the builder is picked from the extension).
        prompt_template: Format string over the columns giving the prompt.
        completion_template: Format string giving the completion (start it with a space
            when the prompt ends with a word or a colon).
        name: Dataset configuration name.
        data_files: Data files for a builder path.
        split: The split to read (and carve when the others are not given).
        val_split: An existing validation split to use instead of carving one.
        test_split: An existing test split to use instead of carving one.
        answer_template: Format string giving the reference answer (default: the
            completion).
        answer_regex: Regex whose group 1 (or whole match) is the answer, applied to the
            reference and to generations (e.g. ``r"####\\s*(\\S+)"``).
        load_kwargs: Extra ``load_dataset`` arguments (e.g. ``cache_dir``).
        num_train: Most training rows (None: all).
        num_val: Validation rows (None: a fraction of the rows, see above; 0: none).
        num_test: Test rows (None: a fraction of the rows, see above; 0: none).
        **kwargs: The other `PromptCompletionDataModule` arguments.

    Raises:
        ValueError: A template names a missing column, the regex is invalid or does not
            match a reference, or the split is too small for the requested sizes.
    """

    task_name = "hf_dataset"

    def __init__(
        self,
        tokenizer: Any,
        path: str,
        prompt_template: str,
        completion_template: str,
        *,
        name: str | None = None,
        data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
        split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        answer_template: str | None = None,
        answer_regex: str | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        **kwargs: Any,
    ) -> None:
        # sizes left at None are set from the file's length in build_splits; 1 only passes the base's check
        super().__init__(tokenizer, num_train=num_train, num_val=1 if num_val is None else num_val,
                         num_test=1 if num_test is None else num_test, **kwargs)
        self._requested = {"val": num_val, "test": num_test}  # None: a fraction of the rows, set in build_splits
        for what, value in (("prompt_template", prompt_template), ("completion_template", completion_template)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what} must be a non-empty format string, got {value!r}; e.g. 'Q: {{question}}\\nA:'")
        try:
            self._answer_re = re.compile(answer_regex) if answer_regex else None
        except re.error as err:
            raise ValueError(f"answer_regex must be a valid regular expression, got {answer_regex!r} ({err})") from None
        self.path, self.name, self.data_files = path, name, data_files
        self.split, self.val_split, self.test_split = split, val_split, test_split
        self.prompt_template, self.completion_template = prompt_template, completion_template
        self.answer_template = answer_template
        self.load_kwargs = dict(load_kwargs or {})

    def _load(self, split: str):
        import datasets  # lazy: a heavy import only this task needs

        path, data_files = self.path, self.data_files
        suffix = next((s for s in _BUILDERS if path.lower().endswith(s)), None)
        if suffix is not None and data_files is None:
            path, data_files = _BUILDERS[suffix], path
        return datasets.load_dataset(path, self.name, data_files=data_files, split=split, **self.load_kwargs)

    def _example(self, row: Mapping[str, Any]) -> Example:
        prompt = _render(self.prompt_template, row, "prompt_template")
        completion = _render(self.completion_template, row, "completion_template")
        reference = _render(self.answer_template, row, "answer_template") if self.answer_template else completion
        if self._answer_re is not None and not self._answer_re.search(reference):
            raise ValueError(
                f"answer_regex must match every reference answer, got {self._answer_re.pattern!r} which does not match "
                f"{reference[:80]!r}; fix the regex or set answer_template"
            )
        return Example(prompt, completion, self.extract_answer(reference))

    def build_splits(self) -> dict[str, list[Example]]:
        """Load the split(s) and carve or take the train/val/test rows."""
        main = self._load(self.split)
        rows = list(range(len(main)))
        random.Random(self.data_seed).shuffle(rows)
        default_size = min(EVAL_CAP, max(EVAL_FLOOR, round(EVAL_FRACTION * len(main))))
        out: dict[str, list[Example]] = {}
        for split, source in (("test", self.test_split), ("val", self.val_split)):
            size = self._requested[split]
            if source is not None:
                ds = self._load(source)
                size = min(EVAL_CAP, len(ds)) if size is None else size
                if len(ds) < size:
                    raise ValueError(
                        f"num_{split} must be <= the {len(ds)} rows of split {source!r}, got {size}; lower num_{split}"
                    )
                out[split] = [self._example(r) for r in ds.select(range(size))]
            else:
                size = default_size if size is None else size
                take, rows = rows[:size], rows[size:]
                if len(take) < size:
                    raise ValueError(
                        f"num_{split} must fit in split {self.split!r} of {len(main)} rows after the other carved "
                        f"splits, got {size}; lower num_val/num_test or pass val_split/test_split"
                    )
                out[split] = [self._example(r) for r in main.select(take)]
            setattr(self, f"num_{split}", size)
        if self.num_train is not None:
            rows = rows[: self.num_train]
        if not rows:
            raise ValueError(
                f"split {self.split!r} has {len(main)} rows, none left for training after val/test; "
                "lower num_val/num_test or pass val_split/test_split"
            )
        out["train"] = [self._example(r) for r in main.select(rows)]
        return out

    def extract_answer(self, text: str) -> str:
        """``answer_regex``'s group 1 (or match) if set (``""`` if none), whitespace-normalised."""
        if self._answer_re is not None:
            match = self._answer_re.search(text)
            if match is None:
                return ""
            text = match.group(1) if match.groups() else match.group(0)
        return normalize_whitespace(text)
