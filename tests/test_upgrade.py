"""`lightning_peft.upgrade`: the record adapters carry, the agreement check by hand, route choice, resume,
refusals, failure isolation, shards, bad input, and `lightning-peft upgrade` end to end on micro models."""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import read_wandb_offline_run

import lightning_peft as lp
from lightning_peft.budget import TimeBudget
from lightning_peft.model_loader import ModelLoader
from lightning_peft.module import CausalLMModule
from lightning_peft.resume import SettingsChangedError
from lightning_peft.tasks import get_task
from lightning_peft.upgrade import (
    ROUTES,
    AdapterRecord,
    Agreement,
    Candidate,
    Fidelity,
    RouteSkipped,
    UpgradeConfig,
    agreement,
    completion_kl,
    find_adapters,
    text_similarity,
    upgrade_fleet,
)
from lightning_peft.upgrade import fleet as fleet_mod
from lightning_peft.upgrade import routes as routes_mod
from lightning_peft.upgrade.report import COLUMNS, write_report
from lightning_peft.upgrade.routes import DirectRoute, RouteContext
from lightning_peft.upgrade.student_check import StudentCheck

MICRO = dict(max_length=64, num_train=16, num_val=0, num_test=4, batch_size=8)
# seconds-long upgrade settings on micro models
QUICK = dict(num_holdout=3, num_synthetic=4, max_new_tokens=6,
             synthesis={"generator_context": 256, "max_new_tokens": 24, "generate_batch_size": 8},
             student={"trainer_kwargs": {"max_steps": 2, "enable_progress_bar": False, "enable_model_summary": False},
                      "data_kwargs": {"batch_size": 4}})


def read_record(folder: Path) -> AdapterRecord:
    return lp.AdapterFolder(folder).record


def _train(folder: Path, method: lp.AdapterCallback, num_seeds: int = 3) -> Path:
    module = CausalLMModule("llama-micro-v1", generate_on_val=False)
    recorder = lp.UpgradeRecord(num_seeds=num_seeds)
    L.Trainer(max_steps=2, callbacks=[method, recorder], logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              limit_val_batches=0).fit(module, get_task("arithmetic", tokenizer="llama-micro-v1", **MICRO))
    return lp.save_adapter(module, folder, record=recorder.record)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    _train(root / "team-a" / "lora", lp.LoRA(r=2))
    _train(root / "team-b" / "shira", lp.SHiRA(density=0.05, mask="random"))
    return root


def _copy(fleet: Path, tmp_path: Path) -> Path:
    shutil.copytree(fleet, tmp_path / "fleet")
    return tmp_path / "fleet"


# --------------------------------------------------------------------------- the record
def test_adapters_carry_task_seeds_and_size_and_plain_peft_still_loads_them(fleet: Path) -> None:
    from peft import PeftModel

    from lightning_peft.analysis import load_base

    record = read_record(fleet / "team-a" / "lora")
    examples = get_task("arithmetic", tokenizer="llama-micro-v1", **MICRO).get_examples()["train"]
    assert record.task == "arithmetic" and record.seeds == [e.prompt for e in examples[:3]]
    assert record.train_size == 16 and record.task_kwargs == {"max_length": 64} and record.base == "llama-micro-v1"
    assert record.discriminator is None
    PeftModel.from_pretrained(load_base("llama-micro-v1"), str(fleet / "team-a" / "lora"))  # upgrade.json is ignored
    with pytest.raises(ValueError, match="num_seeds must be an integer >= 0"):
        lp.UpgradeRecord(num_seeds=-1)


def test_a_discriminator_is_copied_into_the_adapter_folder(tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    model = lp.analysis.load_base("llama-micro-v1")
    lp.LoRA(r=2).inject(model)
    lp.save_adapter(model, disc)
    written = AdapterRecord(task="sql", seeds=["Q?"], discriminator=str(disc))
    folder = lp.save_adapter(model, tmp_path / "adapter", record=written)
    record = read_record(folder)
    assert record.discriminator == str(folder / "discriminator") and record.seeds == ["Q?"]
    assert (folder / "discriminator" / "adapter_model.safetensors").read_bytes() == (disc / "adapter_model.safetensors").read_bytes()
    lp.save_adapter(model, folder, record=written)  # replacing a folder that holds our record files is allowed


# --------------------------------------------------------------------------- the agreement check by hand
def test_text_similarity_by_hand() -> None:
    assert text_similarity("abcd", "abce") == pytest.approx(2 * 3 / 8)  # SequenceMatcher: 2 * matches / total
    assert text_similarity(" 7 + 5  = 12", "7 + 5 = 12") == 1.0  # whitespace is normalised
    assert text_similarity("", "x") == 0.0
    a, b = "The answer is 12", "The answer is 21"
    assert text_similarity(a, b) == pytest.approx(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio())


def test_agreement_of_a_model_with_itself_and_the_kl_by_hand() -> None:
    from lightning_peft.analysis import load_base
    from lightning_peft.zoo import load

    model, tok = load("llama-micro-v1")
    prompts = ["Question: Gur has 3 pens. How many pens does Gur have now?\nAnswer:", "Question: 2 + 2 ="]
    same = agreement(model.eval(), tok, model, tok, prompts, max_new_tokens=5)
    assert (same.agreement, same.exact, same.kl, same.inputs) == (1.0, 1.0, pytest.approx(0.0, abs=1e-7), 2)
    other = load_base("llama-micro-v2")
    completion = " 3 pens"
    kl = completion_kl(model, other, tok, [prompts[0]], [completion])
    p_ids = tok(prompts[0])["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        lp_ref = model(input_ids=ids).logits[0, len(p_ids) - 1 : -1].log_softmax(-1)
        lp_new = other(input_ids=ids).logits[0, len(p_ids) - 1 : -1].log_softmax(-1)
    expected = float((lp_ref.exp() * (lp_ref - lp_new)).sum(-1).mean())  # KL(ref || candidate) per completion token
    assert kl == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="needs inputs"):
        agreement(model, tok, model, tok, [])


# --------------------------------------------------------------------------- route choice (stubbed scorer)
class _StubRoute:
    """A route whose candidate is the old adapter on the new base; records that it was tried."""

    def __init__(self, name: str, tried: list[str]) -> None:
        self.name, self.tried = name, tried

    def propose(self, context: RouteContext) -> Candidate:
        self.tried.append(self.name)
        model, tok = context.models.load(context.cfg.new, context.folder, other_base=True)
        return Candidate(model, tok, model, context.folder)


def _stub_routes(monkeypatch) -> list[str]:
    """Both routes stubbed, the check's inputs too; returns the names of the routes tried, in order."""
    tried: list[str] = []
    for name in ("direct", "translora"):
        monkeypatch.setitem(ROUTES, name, _StubRoute(name, tried))
    monkeypatch.setattr(fleet_mod, "_check_inputs", lambda *a: (["x"], ["y"], None))
    return tried


def _fidelity(value: float | None, basis: str = "kl") -> Fidelity:
    """A stub's fidelity: ``value`` in both forms, fixed log-likelihoods."""
    note = None if value is not None else "KL(reference || new base) is 0, not positive: no measurable effect"
    return Fidelity(value, basis, value if basis == "kl" else None, value, 0.5 if basis == "kl" else None,
                    {"candidate": -1.0, "new_base": -1.5, "reference": -0.9, "old_base": -1.4}, 10, note)


@pytest.mark.parametrize(
    ("scores", "route"),
    [({"direct": 0.9, "translora": 0.95}, "direct"),  # the cheapest route that passes wins
     ({"direct": 0.5, "translora": 0.85}, "translora"),
     ({"direct": 0.5, "translora": 0.6}, "needs_data")],
)
def test_route_choice_with_a_stubbed_scorer(fleet: Path, tmp_path: Path, monkeypatch, scores: dict, route: str) -> None:
    tried = _stub_routes(monkeypatch)
    monkeypatch.setattr(fleet_mod, "agreement", lambda *a, **k: Agreement(scores[tried[-1]], 0.0, None, 1))
    monkeypatch.setattr(fleet_mod, "fidelity", lambda *a, **k: _fidelity(1.0 - scores[tried[-1]]))  # the opposite order
    cfg = UpgradeConfig(score="agreement", adapters=str(fleet / "team-a"), new="llama-micro-v2", out=str(tmp_path / "out"),
                        threshold=0.8, keep_candidates=True)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == route and tried == (["direct"] if route == "direct" else ["direct", "translora"])
    kept = sorted(p.name for p in (tmp_path / "out" / "lora" / "candidates").iterdir())
    assert kept == sorted(tried)  # every scored candidate, taken or not
    assert row["scores"] == {r: {"agreement": s, "exact": 0.0, "kl": None, "inputs": 1, **_fidelity(1.0 - s).to_dict(),
                                 "fidelity_on": "auto", "fidelity_seeds": 1.0 - s, "fidelity_all": 1.0 - s}
                             for r, s in scores.items() if r in tried}
    if route == "needs_data":
        assert row["output"] is None and "direct: agreement 0.500 < threshold 0.8" in row["reason"]
    else:
        config, _, meta = lp.adapter_io.read_adapter(row["output"])
        assert meta["upgrade"]["route"] == route and meta["upgrade"]["agreement"] == scores[route]
        new_base = lp.analysis.load_base("llama-micro-v2")
        assert meta["base"]["weights_sha256"] == lp.base_fingerprint(new_base)["weights_sha256"]  # the new base's
        assert read_record(row["output"]).seeds == read_record(fleet / "team-a" / "lora").seeds  # carried on


@pytest.mark.parametrize(("max_kl", "route"), [(0.3, "direct"), (0.1, "needs_data"), (None, "needs_data")])
def test_a_small_token_kl_takes_a_route_the_agreement_does_not(fleet: Path, tmp_path: Path, monkeypatch, max_kl,
                                                                route: str) -> None:
    monkeypatch.setattr(fleet_mod, "_check_inputs", lambda *a: (["x"], ["y"], None))
    monkeypatch.setattr(fleet_mod, "agreement", lambda *a, **k: Agreement(0.5, 0.0, 0.2, 1))  # low agreement, kl 0.2
    cfg = UpgradeConfig(score="agreement", adapters=str(fleet / "team-a"), new="llama-micro-v2", out=str(tmp_path / "out"),
                        routes=["direct"], threshold=0.8, max_kl=max_kl)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == route
    if route == "needs_data":
        kl = "" if max_kl is None else f", kl 0.200 > max_kl {max_kl}"
        assert row["reason"].endswith(f"direct: agreement 0.500 < threshold 0.8{kl}")


@pytest.mark.parametrize(
    ("score", "scores", "route", "reason"),  # scores: route -> (agreement, fidelity)
    [("fidelity", {"direct": (0.3, 0.85), "translora": (0.95, 0.9)}, "direct", None),
     ("agreement", {"direct": (0.3, 0.85), "translora": (0.95, 0.9)}, "translora", None),  # the same fleet, the default
     ("fidelity", {"direct": (0.9, 0.5), "translora": (0.3, 0.85)}, "translora", None),
     ("fidelity", {"direct": (0.9, 0.5), "translora": (0.9, None)}, "needs_data",
      "direct: fidelity 0.500 < min_fidelity 0.8; translora: fidelity undefined (KL(reference || new base) is 0")],
)
def test_route_choice_on_the_fidelity(fleet: Path, tmp_path: Path, monkeypatch, score: str, scores: dict, route: str,
                                      reason: str | None) -> None:
    tried = _stub_routes(monkeypatch)
    monkeypatch.setattr(fleet_mod, "agreement", lambda *a, **k: Agreement(scores[tried[-1]][0], 0.0, None, 1))
    monkeypatch.setattr(fleet_mod, "fidelity", lambda *a, **k: _fidelity(scores[tried[-1]][1]))
    cfg = UpgradeConfig(adapters=str(fleet / "team-a"), new="llama-micro-v2", out=str(tmp_path / "out"), score=score,
                        threshold=0.8, min_fidelity=0.8)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == route
    if route == "needs_data":
        assert reason in row["reason"] and row["output"] is None
        assert (row["agreement"], row["fidelity"]) == (0.9, 0.5)  # the best of the scored candidates, each score apart
        return
    assert (row["agreement"], row["fidelity"]) == scores[route]
    meta = lp.adapter_io.read_adapter(row["output"])[2]["upgrade"]
    assert (meta["agreement"], meta["fidelity"], meta["fidelity_basis"]) == (*scores[route], "kl")
    assert (meta["score"], meta["threshold"], meta["min_fidelity"]) == (score, 0.8, 0.8)


@pytest.mark.parametrize(("on", "basis", "route"), [("seeds", "ll", "direct"), ("all", "kl", "needs_data"),
                                                    ("auto", "kl", "direct"), ("auto", "ll", "needs_data")])
def test_the_fidelity_decides_on_the_seeds_or_on_every_input(fleet: Path, tmp_path: Path, monkeypatch, on: str,
                                                              basis: str, route: str) -> None:
    """The adapter's 3 recorded seeds come first among the check's inputs; ``fidelity_on`` picks which score decides
    (``auto``: the seeds for the KL form, one vocabulary; every input for the per-byte form, across tokenizers)."""
    _stub_routes(monkeypatch)
    monkeypatch.setattr(fleet_mod, "_check_inputs", lambda *a: (["s1", "s2", "s3", "h1"], ["a", "b", "c", "d"], None))
    monkeypatch.setattr(fleet_mod, "agreement", lambda *a, **k: Agreement(0.1, 0.0, None, 4))
    seen: list[list[str]] = []

    def scored(reference, ref_tok, model, tok, prompts, completions, **kwargs) -> Fidelity:
        seen.append(list(prompts))
        return _fidelity(0.95 if len(prompts) == 3 else 0.5, basis)

    monkeypatch.setattr(fleet_mod, "fidelity", scored)
    cfg = UpgradeConfig(adapters=str(fleet / "team-a"), new="llama-micro-v2", out=str(tmp_path / "out"),
                        routes=["direct"], score="fidelity", min_fidelity=0.9, fidelity_on=on)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert seen == [["s1", "s2", "s3"], ["s1", "s2", "s3", "h1"]]
    direct = row["scores"]["direct"]
    assert (direct["fidelity_seeds"], direct["fidelity_all"], direct["fidelity_on"]) == (0.95, 0.5, on)
    assert row["route"] == route and direct["fidelity"] == (0.95 if route == "direct" else 0.5)
    with pytest.raises(ValueError, match=r"fidelity_on must be one of \['auto', 'seeds', 'all'\], got 'synthetic'"):
        UpgradeConfig(adapters=".", new="x", fidelity_on="synthetic")


def test_the_report_keeps_the_old_scores_next_to_the_fidelity(fleet: Path, tmp_path: Path, monkeypatch) -> None:
    tried = _stub_routes(monkeypatch)
    monkeypatch.setattr(fleet_mod, "agreement", lambda *a, **k: Agreement(0.6, 0.25, 0.3, 4))
    monkeypatch.setattr(fleet_mod, "fidelity", lambda *a, **k: _fidelity(0.7))
    cfg = UpgradeConfig(adapters=str(fleet / "team-a"), new="llama-micro-v2", out=str(tmp_path / "out"),
                        score="fidelity", min_fidelity=0.9)
    rows = upgrade_fleet(cfg, progress=False)
    assert tried == ["direct", "translora"] and rows[0]["route"] == "needs_data"
    old_row = {"adapter": "from-before", "route": "direct", "agreement": 0.9, "seconds": 1.0, "output": "x"}  # no fidelity
    files = write_report([*rows, old_row], tmp_path / "report", cfg.min_fidelity, cfg.score)
    row = json.loads(files["json"].read_text())[0]
    assert {"adapter", "route", "agreement", "fidelity", "seconds", "output", "scores", "reason"} <= row.keys()
    assert row["scores"]["direct"] == {
        "agreement": 0.6, "exact": 0.25, "kl": 0.3, "inputs": 4,  # the old scores, kept
        "fidelity": 0.7, "fidelity_basis": "kl", "fidelity_kl": 0.7, "fidelity_ll": 0.7, "kl_new": 0.5,
        "ll_per_byte": {"candidate": -1.0, "new_base": -1.5, "reference": -0.9, "old_base": -1.4}, "bytes": 10,
        "fidelity_note": None, "token_acc": {}, "fidelity_acc": None, "relative_token_acc": None,
        "fidelity_on": "auto", "fidelity_seeds": 0.7, "fidelity_all": 0.7}
    assert "direct: fidelity 0.700 < min_fidelity 0.9" in row["reason"]
    header, first, second = files["csv"].read_text().splitlines()
    assert header == ",".join(COLUMNS) and header.startswith("adapter,route,agreement,fidelity,seconds,output")
    assert first.startswith("lora,needs_data,0.6,0.7,") and second.startswith("from-before,direct,0.9,,1.0,x")
    md = files["md"].read_text()
    assert "| adapter | route | agreement | fidelity | seconds |" in md
    assert "| lora | needs_data | 0.600 | 0.700 |" in md and "| from-before | direct | 0.900 |  | 1.000 |" in md
    assert files["png"].read_bytes()[:4] == b"\x89PNG"


def test_no_direct_route_across_families_and_no_check_without_seeds(fleet: Path, tmp_path: Path) -> None:
    other_family = RouteContext(fleet / "team-a" / "lora", AdapterRecord(), "llama-micro-v1", "lora",
                                UpgradeConfig(adapters=".", new="qwen2-micro-v1"), tmp_path, ModelLoader())
    with pytest.raises(RouteSkipped, match="does not fit the new base"):
        DirectRoute().propose(other_family)
    seedless = tmp_path / "fleet" / "private"
    _train(seedless, lp.LoRA(r=2), num_seeds=0)
    (row,) = upgrade_fleet(UpgradeConfig(adapters=str(tmp_path / "fleet"), new="llama-micro-v2", routes=["translora"],
                                         out=str(tmp_path / "out")), progress=False)
    assert row["route"] == "needs_data" and "carries no seed inputs" in row["reason"] and "num_seeds=5" in row["reason"]


# --------------------------------------------------------------------------- the fleet: real routes, resume, refusals
def test_fleet_resumes_refuses_changed_settings_and_survives_a_broken_adapter(fleet: Path, tmp_path: Path) -> None:
    root = _copy(fleet, tmp_path)
    broken = root / "team-c" / "broken"
    shutil.copytree(root / "team-a" / "lora", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cfg = UpgradeConfig(score="agreement", adapters=str(root), new="llama-micro-v2", out=str(tmp_path / "out"), threshold=0.0,
                        **QUICK)
    rows = upgrade_fleet(cfg, progress=False)
    by_name = {r["adapter"]: r for r in rows}
    assert list(by_name) == ["team-a__lora", "team-b__shira", "team-c__broken"]
    assert by_name["team-c__broken"]["route"] == "failed" and "corrupted" in by_name["team-c__broken"]["reason"]
    assert by_name["team-a__lora"]["route"] == by_name["team-b__shira"]["route"] == "direct"  # threshold 0: the first
    assert 0.0 <= by_name["team-a__lora"]["agreement"] <= 1.0 and by_name["team-a__lora"]["scores"]["direct"]["kl"] >= 0
    direct = by_name["team-a__lora"]["scores"]["direct"]  # one vocabulary: the KL form of the fidelity decides
    assert direct["fidelity_basis"] == "kl" and direct["fidelity"] == direct["fidelity_kl"] <= 1.0 and direct["kl_new"] > 0
    assert by_name["team-a__lora"]["fidelity"] == direct["fidelity"] and set(direct["ll_per_byte"]) == {
        "candidate", "new_base", "reference", "old_base"}
    done = tmp_path / "out" / "team-a__lora" / "upgrade_done.json"
    stamp = done.stat().st_mtime_ns
    again = upgrade_fleet(cfg, progress=False)  # resume: finished adapters are skipped, the broken one retried
    assert done.stat().st_mtime_ns == stamp and [r["route"] for r in again] == [r["route"] for r in rows]
    assert again[0]["agreement"] == rows[0]["agreement"]
    changed = UpgradeConfig(**{**cfg.__dict__, "threshold": 0.5})
    with pytest.raises(SettingsChangedError, match=r"threshold: before 0.0 vs now 0.5"):
        upgrade_fleet(changed, progress=False)
    # redo_changed redoes everything with the new settings, the cached synthetic set too (not "failed" on it)
    hotter = UpgradeConfig(**{**cfg.__dict__, "synthesis": {**cfg.synthesis, "temperature": 0.7}, "redo_changed": True})
    redone = {r["adapter"]: r for r in upgrade_fleet(hotter, progress=False)}
    assert redone["team-a__lora"]["route"] == redone["team-b__shira"]["route"] == "direct", redone
    header = lp.transfer.SyntheticSet.load(tmp_path / "out" / "team-a__lora" / "synthetic.jsonl").header
    assert header["sampling"]["temperature"] == 0.7


def test_translora_route_trains_a_student_on_the_new_base(fleet: Path, tmp_path: Path) -> None:
    cfg = UpgradeConfig(score="agreement", adapters=str(fleet / "team-a"), new="llama-micro-v2", routes=["translora"],
                        threshold=0.0,
                        out=str(tmp_path / "out"), **QUICK)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == "translora" and set(row["scores"]) == {"translora"}
    synthetic = lp.transfer.SyntheticSet.load(tmp_path / "out" / "lora" / "synthetic.jsonl")
    assert len(synthetic.accepted) == 3 + 4  # the held-out inputs, then the student's training set
    seeds = read_record(fleet / "team-a" / "lora").seeds
    assert seeds[: len(synthetic.header["seeds"])] == synthetic.header["seeds"]  # the recorded seeds (those that fit)
    config, tensors, meta = lp.adapter_io.read_adapter(row["output"])
    old = lp.adapter_io.read_adapter(fleet / "team-a" / "lora")[1]
    assert tensors.keys() == old.keys() and any(not torch.equal(tensors[k], old[k]) for k in old)  # a new adapter


def test_a_student_of_another_family_is_routed_on_its_per_byte_fidelity(fleet: Path, tmp_path: Path) -> None:
    """llama -> qwen2 (another tokenizer): no KL, the fidelity's log-likelihood form decides with score=fidelity."""
    cfg = UpgradeConfig(adapters=str(fleet / "team-a"), new="qwen2-micro-v1", score="fidelity", min_fidelity=0.0,
                        out=str(tmp_path / "out"), **QUICK)
    (row,) = upgrade_fleet(cfg, progress=False)
    student = row["scores"]["translora"]
    assert set(row["scores"]) == {"translora"}  # direct: the shapes do not fit
    assert student["kl"] is None and student["fidelity_kl"] is None and student["kl_new"] is None
    assert student["fidelity_basis"] == "ll" and student["fidelity"] == student["fidelity_ll"] == row["fidelity"]
    assert student["fidelity"] is not None and abs(student["fidelity"]) < 100, student
    assert row["route"] == ("translora" if student["fidelity"] >= 0.0 else "needs_data"), row


def test_a_generator_out_of_budget_leaves_the_check_on_the_seeds_and_no_student(fleet: Path, tmp_path: Path) -> None:
    quick = {**QUICK, "synthesis": {**QUICK["synthesis"], "max_proposed": 1}}  # gives up after one proposal
    cfg = UpgradeConfig(score="agreement", adapters=str(fleet / "team-a"), new="llama-micro-v2", threshold=0.0,
                        out=str(tmp_path / "out"),
                        **quick)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == "direct" and 0.0 <= row["agreement"] <= 1.0  # scored on the seeds (+ at most one input)
    only = UpgradeConfig(**{**cfg.__dict__, "routes": ["translora"], "out": str(tmp_path / "out2")})
    (row,) = upgrade_fleet(only, progress=False)
    assert row["route"] == "needs_data" and "too few to train a student on; raise synthesis.max_proposed" in row["reason"]


def _trainer_test_token_acc(base: str, adapter: Path, num_test: int) -> float:
    """The reference: Lightning's ``trainer.test`` of a CausalLMModule with ``adapter`` loaded onto ``base``."""
    import warnings

    module = CausalLMModule(base, max_new_tokens=2)
    module.configure_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lp.BaseModelMismatchWarning)
        lp.load_adapter(module, adapter)
    (metrics,) = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, get_task("arithmetic", tokenizer=base, max_length=64, num_train=8, num_val=0, num_test=num_test),
        verbose=False)
    return metrics["test/token_acc"]


def test_a_calibration_run_reports_real_test_accuracy_as_lightnings_test_measures_it(fleet: Path, tmp_path: Path) -> None:
    from lightning_peft.upgrade.calibration import test_accuracy

    lora = fleet / "team-a" / "lora"
    module = CausalLMModule("llama-micro-v1")
    module.configure_model()
    lp.load_adapter(module, lora)
    measured = test_accuracy(module.model, module.tokenizer, "arithmetic", 6, {"max_length": 64})
    assert measured["token_acc"] == pytest.approx(_trainer_test_token_acc("llama-micro-v1", lora, 6), abs=1e-6)
    assert module.model.training  # left as it was

    cfg = UpgradeConfig(score="agreement", adapters=str(fleet / "team-a"), new="llama-micro-v2", routes=["direct"],
                        threshold=1.0,
                        num_test=6, out=str(tmp_path / "out"), keep_candidates=True, **QUICK)
    (row,) = upgrade_fleet(cfg, progress=False)
    direct = row["scores"]["direct"]
    assert row["source_test_acc"] == pytest.approx(measured["token_acc"], abs=1e-6)  # the old adapter on the old base
    reuse = _trainer_test_token_acc("llama-micro-v2", tmp_path / "out" / "lora" / "candidates" / "direct", 6)
    assert direct["test_acc"] == pytest.approx(reuse, abs=1e-6)
    assert direct["relative_acc"] == pytest.approx(reuse / measured["token_acc"])
    assert row["route"] == "needs_data" and "test_acc" not in row and "calibration" in row["timings"]
    md = write_report([row, {**row, "adapter": "taken", "route": "direct", "test_acc": 0.5, "relative_acc": 0.8}],
                      tmp_path / "report")["md"].read_text()
    assert "| real test accuracy: route (x source) / source |" in md
    assert f"| - / {row['source_test_acc']:.3f} |" in md and f"| 0.500 (0.80x) / {row['source_test_acc']:.3f} |" in md
    assert "real test accuracy" not in write_report([{**row, "source_test_acc": None}], tmp_path / "plain")["md"].read_text()
    assert "num_test" in cfg.settings() and "num_test" not in UpgradeConfig(adapters=".", new="x").settings()


def test_a_calibration_run_names_an_adapter_without_a_task(fleet: Path, tmp_path: Path) -> None:
    root = _copy(fleet, tmp_path)
    record = root / "team-a" / "lora" / "upgrade.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "task": None}))  # seeds but no task
    cfg = UpgradeConfig(adapters=str(root / "team-a"), new="llama-micro-v2", routes=["direct"], num_test=4,
                        out=str(tmp_path / "out"), **QUICK)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == "failed" and "records no task" in row["reason"] and "num_test=0" in row["reason"]
    with pytest.raises(ValueError, match=r"num_test .* must be an integer >= 0, got -1; e.g. num_test=128"):
        UpgradeConfig(adapters=".", new="x", num_test=-1)


def test_shards_split_the_fleet(fleet: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fleet_mod, "upgrade_adapter", lambda folder, cfg, target, bases: {"route": "direct"})
    shards = [[r["adapter"] for r in upgrade_fleet(UpgradeConfig(adapters=str(fleet), new="llama-micro-v2", shard=i,
                                                                  num_shards=2, out=str(tmp_path / str(i))),
                                                    progress=False)] for i in (0, 1)]
    assert shards == [["team-a__lora"], ["team-b__shira"]]
    with pytest.raises(ValueError, match=r"shard must be in \[0, num_shards\)"):
        UpgradeConfig(adapters=".", new="x", shard=2, num_shards=2)


def test_an_upgrade_written_inside_the_fleet_folder_is_not_part_of_the_fleet(fleet: Path, tmp_path: Path) -> None:
    root = _copy(fleet, tmp_path)
    shutil.copytree(root / "team-a" / "lora", root / "upgraded" / "team-a__lora" / "adapter")  # an earlier run's output
    names = lambda found: [p.relative_to(root).as_posix() for p in found]  # noqa: E731
    assert names(find_adapters(root, exclude=root / "upgraded")) == ["team-a/lora", "team-b/shira"]
    assert "upgraded/team-a__lora/adapter" in names(find_adapters(root))


# --------------------------------------------------------------------------- decide before spending
class _Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_counts_phases_and_names_the_one_it_ran_out_in() -> None:
    clock = _Clock()
    budget = TimeBudget(10.0, clock=clock)
    with budget.phase("synthesis"):
        clock.now = 4.0
        assert not budget.expired() and budget.left() == 6.0
    with budget.phase("student"):
        with budget.phase("scoring"):
            clock.now = 7.0
        clock.now = 12.0
        assert budget.expired() and budget.left() == 0.0
    with budget.phase("synthesis"):
        clock.now = 13.0
        assert budget.expired()
    assert budget.seconds == {"synthesis": 5.0, "scoring": 3.0, "student": 8.0} and budget.ran_out == "student"
    assert TimeBudget(None).left() is None and not TimeBudget(None).expired()
    with pytest.raises(ValueError, match=r"seconds > 0 or None \(no limit\), got 0"):
        TimeBudget(0)


class _Student(L.LightningModule):
    """Enough of a CausalLMModule for the check: ``model``, ``tokenizer``, a training step."""

    def __init__(self) -> None:
        super().__init__()
        self.model, self.tokenizer = torch.nn.Linear(2, 1), None

    def training_step(self, batch, batch_idx):
        return self.model(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4)


@pytest.mark.parametrize(
    ("curve", "lines", "stops_at"),  # curve: the agreement at checks 1, 2, 3 (steps 2, 4, 6 of 8)
    [([0.1, 0.2, 0.3], [("agreement", 0.8, 1)], 4),  # 0.2 + 0.05/step * 4 steps = 0.4 < 0.8: stopped at the 2nd check
     ([0.3, 0.6, 0.75], [("agreement", 0.8, 1)], None),  # 0.6 + 0.15 * 4 = 1.2: trained on; 0.75 + 0.075 * 2 = 0.9
     ([0.3, 0.6, 0.62], [("agreement", 0.8, 1)], 6),  # 1.2 at the 2nd check; 0.62 + 0.01 * 2 = 0.64 < 0.8 at the 3rd
     ([0.1, 0.2, 0.3], [("agreement", 0.8, 1), ("kl", 0.3, -1)], None)],  # kl 1 - 2a: 0.6 - 0.1 * 4 = 0.2 <= 0.3
)
def test_student_check_stops_a_student_whose_projected_score_misses_every_line(curve, lines, stops_at) -> None:
    seen: list[bool] = []

    def score(model, tokenizer) -> dict:
        seen.append(model.training)
        a = curve[len(seen) - 1]
        return {"agreement": a, "kl": 1.0 - 2 * a}

    check = StudentCheck(score, lines, checks=3)
    trainer = L.Trainer(max_steps=8, callbacks=[check], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Student())
    assert [s for s, _ in check.history] == [2, 4, 6][: len(seen)] and seen == [False] * len(seen)  # scored in eval
    assert trainer.global_step == (stops_at or 8)
    if stops_at is None:
        assert check.stopped is None
    else:
        assert check.stopped.startswith(f"stopped at step {stops_at} of 8: agreement {curve[stops_at // 2 - 1]:.3f} now")


def test_no_synthesis_is_started_that_the_held_out_rate_says_cannot_finish(fleet: Path, tmp_path: Path) -> None:
    clock = _Clock()
    cfg = UpgradeConfig(adapters=str(fleet), new="llama-micro-v2", out=str(tmp_path), time_budget=100.0)
    context = RouteContext(fleet / "team-a" / "lora", read_record(fleet / "team-a" / "lora"), "llama-micro-v1", "lora",
                           cfg, tmp_path, ModelLoader(), budget=TimeBudget(100.0, clock=clock))
    held_out = lp.transfer.SyntheticSet({"stats": {"acceptance_rate": 0.5}})
    held_out.records = [{"input": f"x{i}", "output": "y", "accepted": True} for i in range(4)]
    context.budget.seconds = {"synthesis": 6.0, "labelling": 2.0}  # 2 s per held-out input
    clock.now = 20.0  # 80 s left: 40 inputs fit, 41 do not
    routes_mod._decide_synthesis(context, held_out, 40)
    with pytest.raises(RouteSkipped, match=r"writing the student's 41 synthetic inputs would take about 82 s \(2.00 s "
                                           r"each.*more than the 80 s left of time_budget=100; raise time_budget"):
        routes_mod._decide_synthesis(context, held_out, 41)
    context.cfg = UpgradeConfig(**{**cfg.__dict__, "synthesis": {"max_proposed": 60}})
    with pytest.raises(RouteSkipped, match=r"accepted 0.500 of the held-out proposals, so 31 more inputs need about 62 "
                                           r"proposals, more than max_proposed=60"):
        routes_mod._decide_synthesis(context, held_out, 31)


def test_a_flat_student_is_stopped_and_every_phase_is_timed(fleet: Path, tmp_path: Path, monkeypatch) -> None:
    """A real Trans-LoRA student under a check that stays at 0.5: stopped at its 2nd check, reported, nothing saved."""
    monkeypatch.setattr(fleet_mod, "agreement", lambda *a, **k: Agreement(0.5, 0.0, None, 1))
    given: list[dict] = []
    real_train = routes_mod.train_student
    monkeypatch.setattr(routes_mod, "train_student", lambda *a, **k: given.append(a[2].trainer_kwargs) or real_train(*a, **k))
    quick = {**QUICK, "synthesis": {**QUICK["synthesis"], "warm_steps": 8}}  # the student starts from the old adapter
    cfg = UpgradeConfig(score="agreement", adapters=str(fleet / "team-a"), new="llama-micro-v2", routes=["translora"],
                        threshold=0.8, out=str(tmp_path / "out"), **quick)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == "needs_data" and row["output"] is None
    assert ("translora: the student cannot pass the check: stopped at step 4 of 8: agreement 0.500 now, 0.500 "
            "projected at the end < 0.8") in row["reason"]
    assert set(row["timings"]) == {"synthesis", "labelling", "scoring", "student"} and row["budget_ran_out"] is None
    assert all(v >= 0 for v in row["timings"].values()) and row["timings"]["student"] > 0
    assert 0 < given[0]["max_time"]["seconds"] <= 3600  # the budget reaches the student's trainer
    assert row["retrain_seconds"] == read_record(fleet / "team-a" / "lora").train_seconds > 0
    md = (tmp_path / "out").glob("*.md")
    assert not list(md)  # upgrade_fleet itself writes no report (the command does)
    files = write_report([row], tmp_path / "report")
    assert f"| {row['retrain_seconds']:.3f} | synthesis " in files["md"].read_text()


def test_a_spent_budget_tries_no_route_and_says_where_it_ran_out(fleet: Path, tmp_path: Path) -> None:
    cfg = UpgradeConfig(adapters=str(fleet / "team-a"), new="llama-micro-v2", out=str(tmp_path / "out"), time_budget=1e-6,
                        **QUICK)
    (row,) = upgrade_fleet(cfg, progress=False)
    assert row["route"] == "needs_data" and row["budget_ran_out"] == "synthesis" and row["scores"] == {}
    assert row["reason"] == ("retrain with real data: direct: not tried, the time budget of 1e-06 s ran out during "
                             "synthesis; translora: not tried, the time budget of 1e-06 s ran out during synthesis")


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_named_with_the_fix(fleet: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"adapters='.*nowhere' is not a folder"):
        find_adapters(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no adapter folder .*lightning-peft train writes"):
        find_adapters(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown zoo model 'llama-v9'"):
        upgrade_fleet(UpgradeConfig(adapters=str(fleet), new="llama-v9", out=str(tmp_path / "out")), progress=False)
    with pytest.raises(ValueError, match=r"routes must be a non-empty list of \['direct', 'translora'\]"):
        UpgradeConfig(adapters=".", new="x", routes=["retrain"])
    with pytest.raises(ValueError, match=r"threshold is an agreement in \[0, 1\]"):
        UpgradeConfig(adapters=".", new="x", threshold=2)
    with pytest.raises(ValueError, match=r"max_kl is a KL in nats per token, >= 0 or null, got -1; e.g. max_kl=0.3"):
        UpgradeConfig(adapters=".", new="x", max_kl=-1)
    with pytest.raises(ValueError, match=r"score must be one of \['agreement', 'fidelity'\], got 'kl'; e.g. score=fidelity"):
        UpgradeConfig(adapters=".", new="x", score="kl")
    with pytest.raises(ValueError, match=r"min_fidelity is a fidelity in \[0, 1\] .*got 1.5; e.g. min_fidelity=0.8"):
        UpgradeConfig(adapters=".", new="x", min_fidelity=1.5)
    with pytest.raises(ValueError, match=r"time_budget \(per adapter\): .*got -5; set time_budget=3600 or time_budget=null"):
        UpgradeConfig(adapters=".", new="x", time_budget=-5)
    with pytest.raises(ValueError, match=r"student_checks must be an integer >= 0 \(0: no checks\), got 1.5"):
        UpgradeConfig(adapters=".", new="x", student_checks=1.5)


def test_conf_upgrade_yaml_mirrors_upgrade_config() -> None:
    """Every UpgradeConfig field is a key of conf/upgrade.yaml, with the same default (the deciding score included)."""
    import dataclasses

    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "upgrade.yaml"))
    set_there = {"adapters", "new", "out", "synthesis", "student"}  # required (???), the run folder, blocks of their own
    for f in dataclasses.fields(UpgradeConfig):
        assert f.name in conf, f"conf/upgrade.yaml lacks {f.name}"
        if f.name not in set_there:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert conf[f.name] == default, f"conf/upgrade.yaml {f.name}: {conf[f.name]!r} vs {default!r}"
    assert (conf["score"], conf["min_fidelity"], conf["fidelity_on"]) == ("fidelity", 0.96, "auto")


# --------------------------------------------------------------------------- the command, as a user types it
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=900)


def test_upgrade_command_writes_the_report_and_the_wandb_table_and_merges_shards(fleet: Path, tmp_path: Path) -> None:
    quick = ["num_holdout=3", "num_synthetic=4", "max_new_tokens=6", "synthesis.generator_context=256",
             "synthesis.max_new_tokens=24", "synthesis.generate_batch_size=8", "student.trainer_kwargs.max_steps=2",
             "student.data_kwargs.batch_size=4"]
    proc = _cli("upgrade", f"adapters={fleet}", "new=llama-micro-v2", "score=agreement", "threshold=0.0", *quick,
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run" / "upgraded"
    rows = json.loads((out / "upgrade_report.json").read_text())
    assert [(r["adapter"], r["route"]) for r in rows] == [("team-a__lora", "direct"), ("team-b__shira", "direct")]
    assert all({"adapter", "route", "agreement", "fidelity", "seconds", "output"} <= r.keys() for r in rows)
    assert (out / "upgrade_report.csv").read_text().splitlines()[0].startswith("adapter,route,agreement,fidelity,seconds,output")
    assert "| team-a__lora | direct |" in (out / "upgrade_report.md").read_text()
    assert (out / "upgrade_report.png").read_bytes()[:4] == b"\x89PNG" and "fleet upgrade" in proc.stdout
    (run_file,) = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_offline_run(run_file)
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    logged = {key(i): json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item}
    assert logged["upgrade/report/_type"] == "table-file" and logged["upgrade/route/direct"] == 2
    table = json.loads((run_file.parent / "files" / logged["upgrade/report/path"]).read_text())
    assert [row[:2] for row in table["data"]] == [["team-a__lora", "direct"], ["team-b__shira", "direct"]]

    # a sharded sweep (Hydra multirun, two parallel jobs under the joblib launcher plugin), then the merged report
    sweep = tmp_path / "sweep"
    proc = _cli("upgrade", "-m", f"adapters={fleet}", "new=llama-micro-v2", "routes=[direct]", "score=agreement", "threshold=0.0",
                "shard=0,1", "num_shards=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *quick, "logger=none",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["adapter"] for r in json.loads((sweep / "1" / "upgraded" / "upgrade_report.json").read_text())] == ["team-b__shira"]
    proc = _cli("upgrade-report", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((sweep / "upgrade_report.json").read_text())
    assert [r["adapter"] for r in merged] == ["team-a__lora", "team-b__shira"]
    assert _cli("upgrade-report", str(tmp_path / "nothing"), cwd=tmp_path).returncode == 2


def test_readme_fleet_upgrade_as_typed_with_progress_bars(tmp_path: Path) -> None:
    """The README's fleet commands as typed (default trainers, progress bars on, the README's own arguments), only
    micro models and short steps appended: two `lightning-peft train` runs into a fleet folder, then the upgrade."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "lightning-peft upgrade" in b]
    *trains, upgrade = [shlex.split(line, comments=True) for line in block.strip().splitlines()]
    assert trains and all(c[:2] == ["lightning-peft", "train"] for c in trains) and upgrade[:2] == ["lightning-peft", "upgrade"]
    short = ["model.name_or_path=llama-micro-v1", "trainer.max_steps=2", "module.max_new_tokens=4", "task.max_length=64",
             "task.num_train=16", "task.num_val=0", "task.num_test=4", "logger=csv"]
    for cmd in trains:
        proc = _cli(*cmd[1:], *short, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    quick = ["num_holdout=3", "num_synthetic=4", "max_new_tokens=6", "synthesis.generator_context=256",
             "synthesis.max_new_tokens=24", "synthesis.generate_batch_size=8", "student.trainer_kwargs.max_steps=2",
             "synthesis.warm_steps=2", "student.data_kwargs.batch_size=4", "logger=csv"]
    args = [a for a in upgrade[2:] if not a.startswith("new=")]
    proc = _cli("upgrade", *args, "new=llama-micro-v2", *quick, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "run" / "upgraded" / "upgrade_report.json").read_text())
    assert len(rows) == len(trains) and all(r["route"] in ("direct", "translora", "needs_data") for r in rows)
    for r in rows:  # every routed adapter is a peft folder on the new base
        if r["output"]:
            assert (Path(r["output"]) / "adapter_config.json").is_file()
