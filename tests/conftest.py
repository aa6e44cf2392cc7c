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


@pytest.fixture(scope="session", autouse=True)
def _fake_registry_packages(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The default run downloads nothing: the `evals` wheel is a small fake with its own pinned sha256s.

    ``LIGHTNING_PEFT_WHEELS`` points at a folder holding ``evals-3.0.1.post1`` with fake ``sarcasm``
    and ``ner_finance`` samples, whose sha256s replace the pinned ones for the session. The real
    files are read only by the ``slow`` tests (which undo this).
    """
    import hashlib

    from packaged_fakes import REAL_EVALS_SHA256, fake_evals_rows, jsonl, write_wheel

    from lightning_peft.tasks import packaged

    folder = tmp_path_factory.mktemp("wheels")
    files = {"sarcasm": jsonl(fake_evals_rows("sarcasm", 6400)), "ner_finance": jsonl(fake_evals_rows("ner_finance", 500))}
    write_wheel(folder, packaged.EVALS_PACKAGE, packaged.EVALS_VERSION,
                {f"evals/registry/data/{k}/samples.jsonl": v for k, v in files.items()})
    REAL_EVALS_SHA256.update(packaged.EVALS_SHA256)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_PEFT_WHEELS", str(folder))
        mp.setattr(packaged, "EVALS_SHA256", {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
        yield


@pytest.fixture
def real_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """For ``slow`` tests: undo the session's fakes (real wheels, their pinned sha256s) and use a real cache.

    The cache is ``$LIGHTNING_PEFT_REAL_CACHE`` or the user's default one, so the real SmolLM2 and
    data are fetched once and reused across runs.
    """
    from packaged_fakes import REAL_EVALS_SHA256

    from lightning_peft.tasks import packaged

    monkeypatch.delenv("LIGHTNING_PEFT_WHEELS", raising=False)
    monkeypatch.setattr(packaged, "EVALS_SHA256", dict(REAL_EVALS_SHA256))
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", os.environ.get("LIGHTNING_PEFT_REAL_CACHE", "~/.cache/lightning_peft"))
