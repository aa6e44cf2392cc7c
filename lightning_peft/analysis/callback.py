"""``DriftAnalysis``: compare two base versions at the end of fit and log the report."""

from __future__ import annotations

import itertools
import logging
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_peft.analysis.compare import DriftReport, compare_models
from lightning_peft.analysis.report import log_report, write_report

log = logging.getLogger(__name__)


def load_base(name: str) -> nn.Module:
    """A zoo name / local folder / Hub name as an eval-mode causal LM with eager attention."""
    from transformers import AutoModelForCausalLM

    from lightning_peft import zoo

    return AutoModelForCausalLM.from_pretrained(zoo.resolve(name), attn_implementation="eager").eval()


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean completion loss and next-token accuracy over ``batches`` (``labels`` -100 = ignored)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        logits, target = logits[:, :-1].float(), batch["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
        valid = target != -100
        total_loss += float(torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="sum"))
        correct += int((logits.argmax(-1) == target)[valid].sum())
        count += int(valid.sum())
    return {"loss": total_loss / max(count, 1), "token_acc": correct / max(count, 1)}


def adapter_outcome(adapter_dir: str | Path, bases: dict[str, str], batches: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """The adapter's loss/accuracy on each base (loaded with peft's own loader): one row per base."""
    from peft import PeftModel

    rows = []
    for label, name in bases.items():
        model = PeftModel.from_pretrained(load_base(name), str(adapter_dir)).eval()
        rows.append({"base": label, "model": name, **evaluate_lm(model, batches)})
    return rows


def analyse(
    old: str, new: str, batches: list[dict[str, torch.Tensor]], topk: float = 0.1, adapter_dir: str | Path | None = None
) -> DriftReport:
    """Load ``old`` and ``new`` and build their :class:`DriftReport` (plus the adapter outcome)."""
    report = compare_models(load_base(old), load_base(new), batches, old, new, topk=topk)
    if adapter_dir is not None:
        report.outcome = adapter_outcome(adapter_dir, {"old": old, "new": new}, batches)
    return report


class DriftAnalysis(L.Callback):
    """At the end of ``fit``, compare base ``old`` with ``new`` on the task's inputs and log it.

    Logs to every logger of the trainer (W&B: ``wandb.Table`` per table and the plots as
    ``wandb.Image``; others: the summary scalars), and writes the report folder (CSV, JSON,
    PNG) to ``out_dir`` (default ``<trainer.log_dir or default_root_dir>/drift``). When the
    trained module holds an adapter, its loss/accuracy on both bases is the ``outcome`` table.

    Args:
        old: v_o: zoo name, local folder or Hub name.
        new: v_n, same architecture.
        num_batches: Batches of the datamodule's ``split`` loader used as task inputs.
        split: ``"val"``, ``"test"`` or ``"train"``.
        topk: Fraction of FFN neurons in the top-k overlap.
        out_dir: Report folder.
        adapter: Evaluate the trained adapter on both bases.

    Raises:
        ValueError: Bad ``split``/``num_batches``, or (at fit end) no batches to analyse.
    """

    def __init__(
        self, old: str, new: str, num_batches: int = 4, split: str = "val", topk: float = 0.1,
        out_dir: str | None = None, adapter: bool = True,
    ) -> None:
        if split not in ("val", "test", "train"):
            raise ValueError(f"DriftAnalysis split must be 'val', 'test' or 'train', got {split!r}")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"DriftAnalysis num_batches must be an integer >= 1, got {num_batches!r}; e.g. 4")
        if not 0 < topk <= 1:
            raise ValueError(f"DriftAnalysis topk is a fraction of FFN neurons in (0, 1], got {topk!r}; e.g. 0.1")
        self.old, self.new, self.num_batches, self.split, self.topk = old, new, num_batches, split, topk
        self.out_dir, self.adapter = out_dir, adapter
        self.report: DriftReport | None = None

    def _batches(self, trainer: L.Trainer) -> list[dict[str, torch.Tensor]]:
        dm = trainer.datamodule
        loader = getattr(dm, f"{self.split}_dataloader", None) if dm is not None else None
        batches = list(itertools.islice(loader() if loader else [], self.num_batches))
        if not batches:
            raise ValueError(
                f"DriftAnalysis found no {self.split} batches: pass a datamodule with a {self.split} split, or set "
                "split='train'"
            )
        return [{k: v.cpu() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches]

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_peft.adapter_io import save_adapter
        from lightning_peft.callback import adapter_names

        folder = Path(self.out_dir or (trainer.log_dir or trainer.default_root_dir)) / "drift"
        batches = self._batches(trainer)
        with tempfile.TemporaryDirectory() as tmp:
            adapter_dir = None
            if self.adapter and adapter_names(pl_module):
                adapter_dir = save_adapter(pl_module, Path(tmp) / "adapter")
            self.report = analyse(self.old, self.new, batches, self.topk, adapter_dir)
        plots = write_report(self.report, folder)
        log_report(self.report, trainer.loggers, plots, step=trainer.global_step)
        log.info("DriftAnalysis %s -> %s: report in %s", self.old, self.new, folder)
