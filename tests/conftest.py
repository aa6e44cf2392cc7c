"""Shared test fixtures: an isolated zoo cache, offline W&B, deterministic CPU threads."""

from __future__ import annotations

import os

import torch  # does not import triton

# Triton kernels run on CPU through the interpreter. Triton reads this when it is first
# imported (lightning/transformers import it), so it must be set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build zoo models into a fresh cache per session (set LIGHTNING_PEFT_TEST_CACHE to reuse one)."""
    cache = os.environ.get("LIGHTNING_PEFT_TEST_CACHE") or str(tmp_path_factory.mktemp("lightning_peft_cache"))
    os.environ["LIGHTNING_PEFT_CACHE"] = cache
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def micro_model_dir() -> str:
    """Local folder of the micro llama-style zoo model (v1), built once per session."""
    from lightning_peft import zoo

    return str(zoo.build("llama-micro-v1"))
