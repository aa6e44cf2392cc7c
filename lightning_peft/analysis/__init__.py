"""Drift analysis of two versions of a base model (Trans-PEFT, arXiv 2506.06844, section 2).

Pure metrics (:mod:`~lightning_peft.analysis.metrics`), the comparison of two models on task
inputs (:func:`compare_models` -> :class:`DriftReport`), the causal attribution of an adapter's
drop to sub-blocks through hybrid bases (:func:`attribute_drop`), a report folder
(:func:`write_report`), the :class:`DriftAnalysis` callback, and the statistics of the Trans-PEFT
protocol (:mod:`~lightning_peft.analysis.evolve_stats`, ``lightning-peft evolve``).

Example:
    >>> from lightning_peft.analysis import analyse, write_report  # doctest: +SKIP
    >>> write_report(analyse("llama-v1", "llama-v2", batches), "drift/")  # doctest: +SKIP
"""

from lightning_peft.analysis.attribution import attribute_drop, sub_blocks
from lightning_peft.analysis.callback import DriftAnalysis, adapter_outcome, analyse
from lightning_peft.analysis.compare import DriftReport, compare_models, weight_drift
from lightning_peft.analysis.evaluation import evaluate_lm, load_base
from lightning_peft.analysis.metrics import cosine, js_divergence, linear_cka, relative_change, topk_overlap
from lightning_peft.analysis.report import log_report, plot_report, write_report

__all__ = [
    "DriftAnalysis",
    "DriftReport",
    "adapter_outcome",
    "analyse",
    "attribute_drop",
    "compare_models",
    "cosine",
    "evaluate_lm",
    "js_divergence",
    "linear_cka",
    "load_base",
    "log_report",
    "plot_report",
    "relative_change",
    "sub_blocks",
    "topk_overlap",
    "weight_drift",
    "write_report",
]
