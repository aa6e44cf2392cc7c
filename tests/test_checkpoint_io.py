"""AdapterCheckpointIO: a run killed (SIGKILL) in the middle of writing a checkpoint leaves the
previous one loadable, and resuming from it works; checkpoints carry the base fingerprint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import EagerLM, save_random_llama, token_loader
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.plugins import AdapterCheckpointIO

TESTS = Path(__file__).parent

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import lightning as L, torch
    from helpers import EagerLM, token_loader
    from lightning.pytorch.callbacks import ModelCheckpoint
    import lightning_peft as lp
    from lightning_peft.plugins import AdapterCheckpointIO

    base, ckpt_dir, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] or None
    real_save = torch.save
    def dying_save(obj, f, *a, **k):  # write part of the checkpoint, then die like a preempted job
        if obj.get("global_step") == kill_at:
            f.write(b"PK half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = dying_save
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = L.Trainer(max_steps=4, callbacks=[lp.LoRA(r=2), ckpt], plugins=[AdapterCheckpointIO()],
                        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(EagerLM(base), token_loader(), ckpt_path=resume)
""")


def _run_child(base: str, ckpt_dir: Path, kill_at: int, resume: str = "") -> subprocess.CompletedProcess:
    code = CHILD.format(tests=str(TESTS))
    return subprocess.run([sys.executable, "-c", code, base, str(ckpt_dir), str(kill_at), resume],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_sigkill_mid_save_keeps_the_previous_checkpoint_and_resume_works(tmp_path: Path) -> None:
    base = save_random_llama(tmp_path / "llama", hidden=32)
    ckpt_dir = tmp_path / "ckpt"
    killed = _run_child(base, ckpt_dir, kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = ckpt_dir / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)  # the step-2 checkpoint, whole
    assert state["global_step"] == 2 and state["state_dict"] and all("lora_" in k for k in state["state_dict"])

    resumed = _run_child(base, ckpt_dir, kill_at=-1, resume=str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 4
    assert not list(ckpt_dir.glob(".*.tmp-*")), "a completed save leaves no temporary files"


def test_checkpoint_records_the_base_and_warns_on_another_base(tmp_path: Path) -> None:
    base = save_random_llama(tmp_path / "a", hidden=32, seed=0)
    other = save_random_llama(tmp_path / "b", hidden=32, seed=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=0)
    kw = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
          "default_root_dir": tmp_path}  # the resumed runs' default ModelCheckpoint writes here, not into the cwd
    L.Trainer(max_steps=2, callbacks=[lp.LoRA(r=2), ckpt], plugins=[AdapterCheckpointIO()], **kw).fit(
        EagerLM(base), token_loader())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["lightning_peft"]["base_fingerprint"] == lp.base_fingerprint(EagerLM(base).model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lp.BaseModelMismatchWarning)  # same base: silent
        L.Trainer(max_steps=3, callbacks=[lp.LoRA(r=2)], **kw).fit(EagerLM(base), token_loader(),
                                                                    ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    with pytest.warns(lp.BaseModelMismatchWarning, match="another base .*weight tensors differ"):
        L.Trainer(max_steps=3, callbacks=[lp.LoRA(r=2)], **kw).fit(EagerLM(other), token_loader(),
                                                                    ckpt_path=tmp_path / "ckpt" / "last.ckpt")
