"""Drift metrics against hand-computed cases, the report folder, and DriftAnalysis -> W&B."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import read_wandb_offline_run, save_random_llama
from scipy.spatial.distance import jensenshannon
from transformers import LlamaForCausalLM

import lightning_peft as lp
from lightning_peft.analysis import (
    DriftAnalysis,
    compare_models,
    cosine,
    js_divergence,
    linear_cka,
    relative_change,
    topk_overlap,
    write_report,
)
from lightning_peft.analysis.metrics import layer_index, module_type


def test_weight_metrics_by_hand() -> None:
    assert relative_change(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])) == pytest.approx(1.0)  # |(3,4)| / 5
    assert cosine(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])) == pytest.approx(1.0)
    assert relative_change(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(math.sqrt(2))
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0)
    w = torch.randn(5, 7)
    assert relative_change(w, w) == 0.0 and cosine(w, w) == pytest.approx(1.0)


def test_js_divergence_by_hand_and_against_scipy() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.2, 0.8]])
    js = js_divergence(p, q)
    assert js[0] == pytest.approx(math.log(2))  # disjoint supports: the maximum
    assert js[1] == pytest.approx(0.75 * math.log(4 / 3))  # 0.5 KL(p||m) + 0.5 KL(q||m), m = (0.75, 0.25)
    assert js[2] == 0.0
    a, b = torch.softmax(torch.randn(4, 9), -1), torch.softmax(torch.randn(4, 9), -1)
    expected = [jensenshannon(x, y) ** 2 for x, y in zip(a.numpy(), b.numpy(), strict=True)]  # scipy: sqrt of JS
    torch.testing.assert_close(js_divergence(a, b), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def _cka_by_gram_matrices(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. 2019 eq. 3 with kernels K = X X^T, L = Y Y^T and H = I - 11^T / n."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h  # noqa: E741
    return float((k * l).sum() / ((k * k).sum() * (l * l).sum()).sqrt())


def test_linear_cka_invariances_and_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(60, 8, generator=g), torch.randn(60, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))  # orthogonal
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0)  # rotation, isotropic scale, shift
    assert linear_cka(x, z) == pytest.approx(_cka_by_gram_matrices(x, z))
    assert linear_cka(x, z) < 0.5
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(x, z[:10])


def test_topk_overlap_by_hand() -> None:
    a, b = torch.tensor([5.0, 4, 3, 2, 1]), torch.tensor([1.0, 2, 3, 4, 5])
    assert topk_overlap(a, a, 2) == 1.0
    assert topk_overlap(a, b, 2) == 0.0
    assert topk_overlap(a, b, 3) == pytest.approx(1 / 3)  # only neuron 2 is in both top-3
    with pytest.raises(ValueError, match="k=6"):
        topk_overlap(a, b, 6)


@pytest.mark.parametrize(
    ("name", "kind", "layer"),
    [
        ("model.layers.3.self_attn.q_proj.weight", ("q", "attention"), 3),
        ("model.layers.0.mlp.down_proj.weight", ("down", "ffn"), 0),
        ("transformer.h.1.attn.c_proj.weight", ("o", "attention"), 1),
        ("transformer.h.1.mlp.c_proj.weight", ("down", "ffn"), 1),
        ("model.decoder.layers.2.fc1.weight", ("up", "ffn"), 2),
        ("model.embed_tokens.weight", ("embedding", "embedding"), None),
        ("model.layers.1.post_attention_layernorm.weight", ("norm", "norm"), 1),
    ],
)
def test_module_types(name: str, kind: tuple[str, str], layer: int | None) -> None:
    assert module_type(name) == kind and layer_index(name) == layer


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[LlamaForCausalLM, list[dict[str, torch.Tensor]]]:
    path = save_random_llama(tmp_path_factory.mktemp("drift") / "llama", hidden=32, layers=2)
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding must be ignored
    return model, [{"input_ids": torch.randint(0, 100, (3, 10), generator=g), "attention_mask": mask}]


def test_identical_models_show_no_drift(pair) -> None:
    model, batches = pair
    report = compare_models(model, copy.deepcopy(model), batches)
    assert all(r["rel_change"] == 0 and r["cosine"] == pytest.approx(1.0) for r in report.weights)
    assert all(r["cka"] == pytest.approx(1.0) for r in report.cka)
    assert all(r["js"] == 0 for r in report.attention_js) and len(report.attention_js) == 2 * 4  # layers x heads
    assert all(r["topk_overlap"] == 1.0 for r in report.ffn_activation)
    assert all(r["old"] == r["new"] > 0 for r in report.ffn_contribution)


def test_a_scaled_down_projection_drifts_exactly_where_expected(pair) -> None:
    model, batches = pair
    new = copy.deepcopy(model)
    with torch.no_grad():
        new.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # W_n = 1.5 W_o: rel. change 0.5, cosine 1
    report = compare_models(model, new, batches)
    changed = [r for r in report.weights if r["rel_change"] > 0]
    assert [r["param"] for r in changed] == ["model.layers.1.mlp.down_proj.weight"]
    assert changed[0]["rel_change"] == pytest.approx(0.5) and changed[0]["cosine"] == pytest.approx(1.0)
    assert changed[0]["type"] == "down" and changed[0]["group"] == "ffn" and changed[0]["layer"] == 1
    # layer 1's attention and everything in layer 0 run before the change: untouched
    assert all(r["js"] == 0 for r in report.attention_js)
    assert report.cka[0]["cka"] == pytest.approx(1.0)
    c0, c1 = report.ffn_contribution
    assert c0["new"] == c0["old"] and c1["new"] == pytest.approx(1.5 * c1["old"], rel=1e-5)  # same a_l, 1.5x FFN
    assert report.ffn_activation[1]["topk_overlap"] == 1.0  # the intermediate h itself is unchanged


def test_report_folder(pair, tmp_path: Path) -> None:
    model, batches = pair
    report = compare_models(model, copy.deepcopy(model), batches, "a", "b")
    plots = write_report(report, tmp_path)
    assert set(plots) == {"weights_heatmap", "weights_by_depth", "attention_js", "cka", "ffn_contribution", "ffn_activation"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["old"] == "a" and summary["drift/cka"] == pytest.approx(1.0)
    rows = (tmp_path / "attention_js.csv").read_text().splitlines()
    assert rows[0] == "layer,head,js" and len(rows) == 1 + 8
    assert json.loads((tmp_path / "report.json").read_text())["weights"][0]["param"] == "model.embed_tokens.weight"


def test_drift_callback_logs_tables_and_images_to_wandb(tmp_path: Path) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from lightning_peft.module import CausalLMModule
    from lightning_peft.tasks import get_task

    logger = WandbLogger(project="lp-test", save_dir=str(tmp_path), mode="offline")
    drift = DriftAnalysis(old="llama-micro-v1", new="llama-micro-v2", num_batches=1)
    dm = get_task("arithmetic", tokenizer="llama-micro-v1", max_length=64, num_train=16, num_val=8, num_test=8, batch_size=8)
    trainer = L.Trainer(max_steps=2, callbacks=[lp.LoRA(r=2), drift], logger=logger, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    try:
        trainer.fit(CausalLMModule("llama-micro-v1", generate_on_val=False), datamodule=dm)
    finally:
        wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_offline_run(run_file)
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    logged = {key(i): json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item}
    # media arrive flattened: "drift/cka/_type": "table-file", "drift/cka/path": "media/table/..."
    tables = {k.removesuffix("/_type") for k, v in logged.items() if k.endswith("/_type") and v == "table-file"}
    images = {k.removesuffix("/_type") for k, v in logged.items() if k.endswith("/_type") and v == "image-file"}
    assert tables == {f"drift/{t}" for t in ("weights", "ffn_activation", "ffn_contribution", "attention_js", "cka", "outcome",
                                             "attribution")}
    assert {"drift/plot/weights_heatmap", "drift/plot/attention_js", "drift/plot/cka", "drift/plot/attribution"} <= images
    assert 0 < logged["drift/cka"] <= 1 and logged["drift/weight_rel_change/ffn"] > 0
    outcome_file = tmp_path / "wandb" / run_file.parent.name / "files" / logged["drift/outcome/path"]
    outcome = json.loads(outcome_file.read_text())
    assert outcome["columns"][:3] == ["adapter", "base", "model"] and [r[1] for r in outcome["data"]] == ["old", "new"]
    attribution = json.loads((outcome_file.parent / Path(logged["drift/attribution/path"]).name).read_text())
    groups = [row[attribution["columns"].index("group")] for row in attribution["data"]]
    assert groups[:2] == ["llama-micro-v1", "llama-micro-v2"] and {"ffn", "attention", "outside", "ffn@1"} <= set(groups)
    assert "drift/explained_loss/ffn" in logged
    assert (Path(trainer.log_dir or tmp_path) / "drift" / "weights_heatmap.png").exists()


def test_drift_cli_on_two_zoo_versions(tmp_path: Path) -> None:
    # a multirun: v1 against itself (zero drift, independent expectation) and against v2
    cmd = ["drift", "-m", "old=llama-micro-v1", "new=llama-micro-v1,llama-micro-v2", "task.max_length=64",
           "task.num_train=16", "task.num_val=8", "num_batches=1", "logger=csv", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", *cmd],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same = json.loads((tmp_path / "0" / "drift" / "summary.json").read_text())
    drift = json.loads((tmp_path / "1" / "drift" / "summary.json").read_text())
    assert same["drift/weight_rel_change/ffn"] == 0 and same["drift/cka"] == pytest.approx(1.0)
    assert same["drift/attention_js"] == 0 and same["drift/ffn_topk_overlap"] == 1.0
    assert drift["new"] == "llama-micro-v2" and drift["drift/weight_rel_change/ffn"] > 0.01
    assert 0 < drift["drift/cka"] < 1 and drift["drift/attention_js"] > 0
    assert (tmp_path / "1" / "drift" / "weights_heatmap.png").exists() and "drift llama-micro-v1 -> llama-micro-v2" in proc.stdout
    metrics = (tmp_path / "1" / "csv").rglob("metrics.csv")
    assert any("drift/cka" in m.read_text().splitlines()[0] for m in metrics)  # the csv logger got the scalars
