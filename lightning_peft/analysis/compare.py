"""Compare two bases v_o, v_n of one family on task inputs: the tables of a :class:`DriftReport`.

What is measured (after Trans-PEFT, Gu et al., ACL 2025, arXiv 2506.06844, section 2):

1. ``weights``: per parameter, ||W_n - W_o||_F / ||W_o||_F and cosine, with its layer,
   module type (q, k, v, o, gate, up, down, embedding, norm, ...) and group (attention/ffn/...).
2. ``ffn_activation``: per layer, overlap of the top-k neurons by mean |h| (h: the FFN
   intermediate, input of the output projection, over valid tokens) and the cosine of mean |h|.
3. ``ffn_contribution``: per layer, mean over tokens of ||FFN_l(LN(a_l))|| / ||a_l|| under
   each version, with a_l = x_{l+1} - FFN_l(...) the post-attention residual.
4. ``attention_js``: per layer and head, Jensen-Shannon divergence of the attention
   probabilities, averaged over valid queries.
5. ``cka``: per layer, linear CKA of the decoder-layer outputs over valid tokens.

With an adapter trained on v_o, two more tables: ``outcome`` (its loss and token accuracy on
each base) and ``attribution`` (the causal attribution of its drop to sub-blocks, from hybrid
bases: :mod:`lightning_peft.analysis.attribution`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_peft.analysis.metrics import (
    cosine,
    js_divergence,
    layer_index,
    linear_cka,
    module_type,
    relative_change,
    topk_overlap,
)
from lightning_peft.ffn_sites import find_ffn_sites

Row = dict[str, Any]


@dataclass
class DriftReport:
    """Long-form tables (lists of row dicts) of one v_o -> v_n comparison, plus labels."""

    old: str
    new: str
    weights: list[Row] = field(default_factory=list)
    ffn_activation: list[Row] = field(default_factory=list)
    ffn_contribution: list[Row] = field(default_factory=list)
    attention_js: list[Row] = field(default_factory=list)
    cka: list[Row] = field(default_factory=list)
    outcome: list[Row] = field(default_factory=list)
    attribution: list[Row] = field(default_factory=list)

    TABLES = ("weights", "ffn_activation", "ffn_contribution", "attention_js", "cka", "outcome", "attribution")

    def tables(self) -> dict[str, list[Row]]:
        """Non-empty tables by name."""
        return {name: getattr(self, name) for name in self.TABLES if getattr(self, name)}

    def summary(self) -> dict[str, float]:
        """Scalars for loggers: mean relative weight change per group, mean JS, CKA, overlap."""
        out: dict[str, float] = {}
        for group in ("attention", "ffn", "embedding", "norm"):
            rows = [r["rel_change"] for r in self.weights if r["group"] == group]
            if rows:
                out[f"drift/weight_rel_change/{group}"] = sum(rows) / len(rows)
        for table, key, name in (
            (self.attention_js, "js", "drift/attention_js"), (self.cka, "cka", "drift/cka"),
            (self.ffn_activation, "topk_overlap", "drift/ffn_topk_overlap"),
        ):
            if table:
                out[name] = sum(r[key] for r in table) / len(table)
        for base in dict.fromkeys(r["base"] for r in self.outcome):
            for key in ("loss", "token_acc"):
                values = [r[key] for r in self.outcome if r["base"] == base and key in r]
                if values:
                    out[f"drift/adapter_{key}/{base}"] = sum(values) / len(values)
        out.update({f"drift/{k}": v for k, v in self.attribution_summary().items()})
        return out

    def attribution_summary(self) -> dict[str, float]:
        """Share of the adapter's drop explained by putting each of v_o's sub-block groups back.

        Keys ``explained_{loss,token_acc}/{ffn,attention,outside}``, averaged over the adapters
        analysed (one per seed in the evolve protocol); empty without an ``attribution`` table.
        """
        out: dict[str, float] = {}
        for metric in ("loss", "token_acc"):
            for group in ("ffn", "attention", "outside"):
                values = [
                    r[f"explained_{metric}"] for r in self.attribution
                    if r["direction"] == "put back" and r["group"] == group and r[f"explained_{metric}"] is not None
                ]
                if values:
                    out[f"explained_{metric}/{group}"] = sum(values) / len(values)
        return out


def weight_drift(old: nn.Module, new: nn.Module) -> list[Row]:
    """Per-parameter drift rows of two models with the same parameter names.

    Raises:
        ValueError: the parameter names or shapes differ (not two versions of one model).
    """
    a, b = dict(old.named_parameters()), dict(new.named_parameters())
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        diff = sorted(set(a) ^ set(b))[:3] or [k for k in a if a[k].shape != b[k].shape][:3]
        raise ValueError(
            f"weight drift needs two versions of one architecture (same parameter names and shapes); they differ at "
            f"{diff}. Compare e.g. llama-v1 with llama-v2, not two families"
        )
    rows = []
    for name in a:
        kind, group = module_type(name)
        rows.append({
            "param": name, "layer": layer_index(name), "type": kind, "group": group,
            "rel_change": relative_change(a[name], b[name]), "cosine": cosine(a[name], b[name]),
        })
    return rows


@dataclass
class _Capture:
    """What one forward records per layer (valid tokens only)."""

    ffn_abs: list[torch.Tensor] = field(default_factory=list)  # per layer: (d_ff,) sum of |h|
    ratio: list[list[torch.Tensor]] = field(default_factory=list)  # per layer: (N,) ||FFN|| / ||a||
    hidden: list[list[torch.Tensor]] = field(default_factory=list)  # per layer: (N, d) layer outputs
    attn: list[list[torch.Tensor]] = field(default_factory=list)  # per layer: (B, H, T, T)
    tokens: int = 0


def _first_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else next(t for t in x if isinstance(t, torch.Tensor))


@torch.no_grad()
def capture(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> _Capture:
    """Run ``model`` (eval mode, attention probabilities returned) on ``batches`` and record.

    Args:
        model: An HF causal LM loaded with ``attn_implementation="eager"``.
        batches: Dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T).
    """
    sites = find_ffn_sites(model)
    layers = [dict(model.named_modules())[s.name.rsplit(".", 1)[0]] if s.kind != "opt" else
              dict(model.named_modules())[s.name] for s in sites]
    cap = _Capture(ffn_abs=[0] * len(sites), ratio=[[] for _ in sites], hidden=[[] for _ in sites],
                   attn=[[] for _ in sites])
    state: dict[str, Any] = {}
    handles = []
    for i, (site, layer) in enumerate(zip(sites, layers, strict=True)):
        def on_h(mod, args, i=i):  # (B, T, d_ff) FFN intermediate
            h = args[0].abs()[state["valid"]]  # (N, d_ff)
            cap.ffn_abs[i] = cap.ffn_abs[i] + h.double().sum(0)

        def on_ffn_out(mod, args, out, i=i):  # (B, T, d) FFN output (OPT: fc2 output)
            state[f"ffn{i}"] = _first_tensor(out)

        def on_layer_out(mod, args, out, i=i):  # (B, T, d) x_{l+1}
            x_next, f = _first_tensor(out), state.pop(f"ffn{i}")
            a = x_next - f  # post-attention residual a_l
            valid = state["valid"]
            cap.ratio[i].append(f[valid].norm(dim=-1) / a[valid].norm(dim=-1).clamp_min(1e-12))
            cap.hidden[i].append(x_next[valid].double())

        handles.append(site.project.register_forward_pre_hook(on_h))
        ffn_module = site.skip[-1]  # the MLP, or fc2 for OPT layers
        handles.append(ffn_module.register_forward_hook(on_ffn_out))
        handles.append(layer.register_forward_hook(on_layer_out))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            state["valid"] = mask.bool()  # (B, T)
            cap.tokens += int(mask.sum())
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            if not out.attentions or out.attentions[0] is None:
                raise ValueError(
                    "the model returned no attention probabilities; load it with attn_implementation='eager' "
                    "(sdpa/flash kernels do not expose them)"
                )
            for i, probs in enumerate(out.attentions[: len(sites)]):
                cap.attn[i].append((probs.double(), mask.bool()))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return cap


def compare_models(
    old: nn.Module, new: nn.Module, batches: list[dict[str, torch.Tensor]], old_name: str = "v_o",
    new_name: str = "v_n", topk: float = 0.1,
) -> DriftReport:
    """All drift tables of ``old`` vs ``new`` on the same ``batches``.

    Args:
        old: v_o (an HF causal LM with eager attention).
        new: v_n, same architecture.
        batches: Task inputs (``input_ids``, ``attention_mask``), identical for both models.
        old_name: Label of v_o in the report.
        new_name: Label of v_n.
        topk: Fraction of FFN neurons in the top-k overlap (k = max(1, round(topk * d_ff))).
    """
    report = DriftReport(old_name, new_name, weights=weight_drift(old, new))
    a, b = capture(old, batches), capture(new, batches)
    for layer in range(len(a.ffn_abs)):
        mean_a, mean_b = a.ffn_abs[layer] / max(a.tokens, 1), b.ffn_abs[layer] / max(b.tokens, 1)  # (d_ff,)
        k = max(1, round(topk * mean_a.numel()))
        report.ffn_activation.append({
            "layer": layer, "k": k, "topk_overlap": topk_overlap(mean_a, mean_b, k), "cosine": cosine(mean_a, mean_b),
        })
        report.ffn_contribution.append({
            "layer": layer, "old": float(torch.cat(a.ratio[layer]).mean()), "new": float(torch.cat(b.ratio[layer]).mean()),
        })
        report.cka.append({"layer": layer, "cka": linear_cka(torch.cat(a.hidden[layer]), torch.cat(b.hidden[layer]))})
        js_sum, count = None, 0
        for (pa, mask), (pb, _) in zip(a.attn[layer], b.attn[layer], strict=True):
            js = js_divergence(pa, pb)  # (B, H, T)
            q_valid = mask[:, None, :].expand_as(js)  # valid queries
            js_sum = (js * q_valid).sum((0, 2)) + (0 if js_sum is None else js_sum)  # (H,)
            count += int(mask.sum())
        for head, value in enumerate((js_sum / max(count, 1)).tolist()):
            report.attention_js.append({"layer": layer, "head": head, "js": value})
    return report
