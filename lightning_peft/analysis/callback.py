"""``DriftAnalysis``: compare two base versions at the end of fit and log the report."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_peft.adapter_folder import AdapterFolder
from lightning_peft.adapter_io import save_adapter
from lightning_peft.analysis.attribution import attribute_drop
from lightning_peft.analysis.compare import DriftReport, compare_models
from lightning_peft.analysis.evaluation import evaluate_lm, load_base
from lightning_peft.analysis.report import log_report, write_report
from lightning_peft.callback import adapter_names
from lightning_peft.data import first_batches

log = logging.getLogger(__name__)


def adapter_outcome(adapter_dir: str | Path, bases: dict[str, str], batches: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """The adapter's loss/accuracy on each base (loaded with peft's own loader): one row per base."""
    from peft import PeftModel

    rows = []
    for label, name in bases.items():
        model = PeftModel.from_pretrained(load_base(name), str(adapter_dir)).eval()
        rows.append({"base": label, "model": name, **evaluate_lm(model, batches)})
    return rows


def analyse(
    old: str, new: str, batches: list[dict[str, torch.Tensor]], topk: float = 0.1,
    adapter_dirs: str | Path | Sequence[str | Path] | None = None, per_layer: bool = True,
) -> DriftReport:
    """Load ``old`` and ``new`` and build their :class:`DriftReport`.

    Args:
        old: v_o: zoo name, local folder or Hub name.
        new: v_n, same architecture.
        batches: Task batches both models run on.
        topk: Fraction of FFN neurons in the top-k overlap.
        adapter_dirs: One or more adapters trained on v_o (e.g. one per seed): adds the
            ``outcome`` table (each adapter on both bases) and the causal ``attribution`` of
            each adapter's drop (:func:`~lightning_peft.analysis.attribution.attribute_drop`).
        per_layer: Attribution rows per layer too.

    Raises:
        AdapterFormatError: an adapter folder is missing or incomplete (before any model is loaded).
    """
    dirs = [adapter_dirs] if isinstance(adapter_dirs, (str, Path)) else list(adapter_dirs or [])
    for adapter in dirs:
        AdapterFolder(adapter).check()
    report = compare_models(load_base(old), load_base(new), batches, old, new, topk=topk)
    for index, adapter in enumerate(dirs):
        report.outcome += [{"adapter": index, **r} for r in adapter_outcome(adapter, {"old": old, "new": new}, batches)]
        rows = attribute_drop(load_base(old), load_base(new), adapter, batches, per_layer, old, new)
        report.attribution += [{"adapter": index, **r} for r in rows]
    return report


class DriftAnalysis(L.Callback):
    """At the end of ``fit``, compare base ``old`` with ``new`` on the task's inputs and log it.

    Logs to every logger of the trainer (W&B: ``wandb.Table`` per table and the plots as
    ``wandb.Image``; others: the summary scalars), and writes the report folder (CSV, JSON,
    PNG) to ``out_dir`` (default ``<trainer.log_dir or default_root_dir>/drift``). When the
    trained module holds an adapter, its loss/accuracy on both bases is the ``outcome`` table and
    the causal attribution of its drop to v_o's sub-blocks (hybrid bases) the ``attribution`` table.

    Args:
        old: v_o: zoo name, local folder or Hub name.
        new: v_n, same architecture.
        num_batches: Batches of the datamodule's ``split`` loader used as task inputs.
        split: ``"val"``, ``"test"`` or ``"train"``.
        topk: Fraction of FFN neurons in the top-k overlap.
        out_dir: Report folder.
        adapter: Evaluate the trained adapter on both bases and attribute its drop.
        per_layer: Attribution rows per layer too (two extra evaluations per layer).

    Raises:
        ValueError: Bad ``split``/``num_batches``, or (at fit end) no batches to analyse.
    """

    def __init__(
        self, old: str, new: str, num_batches: int = 4, split: str = "val", topk: float = 0.1,
        out_dir: str | None = None, adapter: bool = True, per_layer: bool = True,
    ) -> None:
        if split not in ("val", "test", "train"):
            raise ValueError(f"DriftAnalysis split must be 'val', 'test' or 'train', got {split!r}")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"DriftAnalysis num_batches must be an integer >= 1, got {num_batches!r}; e.g. 4")
        if not 0 < topk <= 1:
            raise ValueError(f"DriftAnalysis topk is a fraction of FFN neurons in (0, 1], got {topk!r}; e.g. 0.1")
        self.old, self.new, self.num_batches, self.split, self.topk = old, new, num_batches, split, topk
        self.out_dir, self.adapter, self.per_layer = out_dir, adapter, per_layer
        self.report: DriftReport | None = None

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.datamodule is None:
            raise ValueError("DriftAnalysis needs the task inputs: pass a datamodule to trainer.fit(module, datamodule=...)")
        folder = Path(self.out_dir or (trainer.log_dir or trainer.default_root_dir)) / "drift"
        batches = first_batches(trainer.datamodule, self.split, self.num_batches)
        with tempfile.TemporaryDirectory() as tmp:
            adapter_dir = None
            if self.adapter and adapter_names(pl_module):
                adapter_dir = save_adapter(pl_module, Path(tmp) / "adapter")
            self.report = analyse(self.old, self.new, batches, self.topk, adapter_dir, self.per_layer)
        plots = write_report(self.report, folder)
        log_report(self.report, trainer.loggers, plots, step=trainer.global_step)
        log.info("DriftAnalysis %s -> %s: report in %s", self.old, self.new, folder)
