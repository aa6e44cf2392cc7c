"""`lightning_peft.upgrade.fidelity` on constructed cases: the reference scores 1, the bare new base 0, a scaled-down
adapter in between, a renumbered vocabulary exactly like its original, another family's tokenizer handled, the
formulas by hand, and the refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import lightning_peft as lp
from lightning_peft.transfer.models import greedy_completions
from lightning_peft.upgrade import fidelity
from lightning_peft.upgrade.agreement import teacher_forced

PROMPTS = ["Question: Gur has 3 pens and buys 4. How many pens does Gur have now?\nAnswer:", "Question: 2 + 5 =",
           "Question: 9 - 3 =", "SELECT name FROM people WHERE", "name[The Eagle], food[French] ->"]
TRAIN = ["Question: Ann has 6 cups and buys 2. How many cups?\nAnswer:", "Question: 4 + 4 =", "Question: 7 - 1 =",
         "SELECT age FROM cities WHERE", "name[The Mill], food[Italian] ->", "Question: 1 + 8 =", "The table lists"]


def _zoo(name: str) -> tuple[torch.nn.Module, Any]:
    """A micro zoo model (a tiny Llama / Qwen2 config, briefly trained, so its completions are text) and its tokenizer:
    llama-micro-v1 and its update v2 share a 512-token vocabulary, qwen2-micro-v1 has another of 576."""
    from lightning_peft import zoo

    model, tok = zoo.load(name)
    return model.eval(), tok


def _with_lora(base: torch.nn.Module, seed: int = 1, std: float = 1.0) -> torch.nn.Module:
    """A copy of ``base`` with a LoRA (r=4) whose B is nonzero, so the adapter has an effect."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    lp.LoRA(r=4).inject(model)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * std
    return model.eval()


def _scaled(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    out = copy.deepcopy(model)
    for name, p in out.named_parameters():
        if "lora_B" in name:
            p.data *= scale
    return out


@pytest.fixture(scope="module")
def llama() -> dict[str, Any]:
    """Old base (v1), new base (v2, the zoo's update of it), reference = old base + a LoRA, its greedy completions."""
    old, tok = _zoo("llama-micro-v1")
    new, _ = _zoo("llama-micro-v2")
    ref = _with_lora(old)
    completions = greedy_completions(ref, tok, PROMPTS, max_new_tokens=12, progress=False)
    return {"tok": tok, "old": old, "new": new, "ref": ref, "completions": completions}


# --------------------------------------------------------------------------- one vocabulary
def test_the_reference_scores_1_and_the_bare_new_base_0(llama: dict) -> None:
    tok, ref, new, completions = llama["tok"], llama["ref"], llama["new"], llama["completions"]
    itself = fidelity(ref, tok, ref, tok, PROMPTS, completions)  # both bases derived: the reference's adapter off
    assert itself.basis == "kl" and itself.fidelity == itself.fidelity_kl == pytest.approx(1.0, abs=1e-6)
    assert itself.fidelity_ll == pytest.approx(1.0, abs=1e-6) and itself.note is None
    assert itself.ll["candidate"] == itself.ll["reference"] and itself.bytes == sum(len(c.encode()) for c in completions)
    on_new = fidelity(ref, tok, ref, tok, PROMPTS, completions, new_base=new)
    assert on_new.fidelity_kl == pytest.approx(1.0, abs=1e-6)  # the KL form is anchored on the reference alone
    bare = fidelity(ref, tok, new, tok, PROMPTS, completions, new_base=new)
    assert bare.fidelity == bare.fidelity_kl == bare.fidelity_ll == 0.0
    assert bare.kl_new > 0.05  # the adapter moves the distribution: the 0 anchor is far from the reference
    # the token-accuracy forms: the same anchors, and the accuracies by hand
    assert itself.fidelity_acc == pytest.approx(1.0) and itself.relative_token_acc == pytest.approx(1.0)
    assert bare.fidelity_acc == 0.0
    hits = tokens = 0
    for batch in teacher_forced(tok, PROMPTS, completions):
        with torch.no_grad():
            hits += int((batch.logits(new.eval()).argmax(-1) == batch.targets).sum())
        tokens += batch.targets.numel()
    assert bare.token_acc["candidate"] == bare.token_acc["new_base"] == pytest.approx(hits / tokens)
    assert bare.relative_token_acc == pytest.approx(bare.token_acc["candidate"] / bare.token_acc["reference"])


def test_a_scaled_down_adapter_scores_between_and_in_order(llama: dict) -> None:
    tok, ref, completions = llama["tok"], llama["ref"], llama["completions"]
    scores = [fidelity(ref, tok, _scaled(ref, s), tok, PROMPTS, completions) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    deciding = [f.fidelity for f in scores]
    assert deciding[0] == 0.0 and deciding[-1] == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 < f < 1.0 for f in deciding[1:-1]) and deciding == sorted(deciding), deciding
    assert 0.0 < scores[2].fidelity_ll < 1.0, scores[2]


def test_the_direct_candidate_by_hand(llama: dict) -> None:
    """The old adapter on the new base: every number against forward passes written out, one row at a time (the
    scorer pads rows into one batch)."""
    tok, old, new, ref, completions = llama["tok"], llama["old"], llama["new"], llama["ref"], llama["completions"]
    direct = _with_lora(new)  # the same LoRA (same seed) on the v2 base
    got = fidelity(ref, tok, direct, tok, PROMPTS, completions, old_base=old, new_base=new)
    models = {"reference": ref, "candidate": direct, "new_base": new, "old_base": old}
    ll, kl, tokens = dict.fromkeys(models, 0.0), dict.fromkeys(("candidate", "new_base"), 0.0), 0
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        p_ids, c_ids = tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():  # (C, V): the positions predicting the completion's C tokens
            logp = {k: m(input_ids=ids).logits[0, len(p_ids) - 1 : -1].log_softmax(-1) for k, m in models.items()}
        for k in models:
            ll[k] += float(logp[k].gather(-1, torch.tensor(c_ids)[:, None]).sum())
        for k in kl:
            kl[k] += float((logp["reference"].exp() * (logp["reference"] - logp[k])).sum())
        tokens += len(c_ids)
    n_bytes = sum(len(c.encode("utf-8")) for c in completions)
    ll = {k: v / n_bytes for k, v in ll.items()}
    kl = {k: v / tokens for k, v in kl.items()}
    assert got.bytes == n_bytes and got.ll == pytest.approx(ll, rel=1e-5) and got.kl_new == pytest.approx(kl["new_base"], rel=1e-5)
    assert got.fidelity == got.fidelity_kl == pytest.approx(1 - kl["candidate"] / kl["new_base"], rel=1e-4)
    assert got.fidelity_ll == pytest.approx((ll["candidate"] - ll["new_base"]) / (ll["reference"] - ll["old_base"]), rel=1e-4)
    derived = fidelity(ref, tok, direct, tok, PROMPTS, completions)  # the bases: the adapters switched off
    assert derived.ll == pytest.approx(got.ll, rel=1e-6) and derived.fidelity == pytest.approx(got.fidelity, rel=1e-6)


def test_models_are_left_as_they_were(llama: dict) -> None:
    tok, ref = llama["tok"], llama["ref"]
    student = _with_lora(llama["new"]).train()
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        before = ref(input_ids=ids).logits
    fidelity(ref, tok, student, tok, PROMPTS, llama["completions"])
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, before)  # its adapter is on again
    assert student.training and not ref.training


# --------------------------------------------------------------------------- other vocabularies
class Renumbered:
    """``tokenizer`` with its token ids permuted: another vocabulary, the same pieces of every text."""

    def __init__(self, tokenizer: Any, perm: torch.Tensor) -> None:
        self.tokenizer, self.perm = tokenizer, perm.tolist()
        self.pad_token_id = None if tokenizer.pad_token_id is None else self.perm[tokenizer.pad_token_id]
        self.eos_token_id = self.perm[tokenizer.eos_token_id]

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": [self.perm[i] for i in self.tokenizer(text, **kwargs)["input_ids"]]}

    def get_vocab(self) -> dict[str, int]:
        return {piece: self.perm[i] for piece, i in self.tokenizer.get_vocab().items()}


def _renumbered(model: torch.nn.Module, perm: torch.Tensor) -> torch.nn.Module:
    """``model`` whose embedding and output rows follow ``perm`` (old id ``i`` is new id ``perm[i]``)."""
    out = copy.deepcopy(model)
    inverse = torch.argsort(perm)  # new id -> old id
    with torch.no_grad():
        for weight in {id(w): w for w in (out.get_input_embeddings().weight, out.get_output_embeddings().weight)}.values():
            weight.copy_(weight[inverse])
    return out


def test_a_renumbered_vocabulary_scores_like_its_original(llama: dict) -> None:
    """The reference behind another vocabulary (the same model, its token ids renumbered) keeps all of the
    adapter's effect: 1; its bare base 0; a scaled-down adapter exactly what it scores in the original vocabulary."""
    tok, old, ref, completions = llama["tok"], llama["old"], llama["ref"], llama["completions"]
    perm = torch.randperm(len(tok), generator=torch.Generator().manual_seed(3))
    other = Renumbered(tok, perm)
    assert other.get_vocab() != tok.get_vocab()
    bare = _renumbered(old, perm)
    itself = fidelity(ref, tok, _renumbered(ref, perm), other, PROMPTS, completions, new_base=bare)
    assert itself.basis == "ll" and itself.fidelity_kl is None and itself.kl_new is None
    assert itself.fidelity == pytest.approx(1.0, abs=1e-5)
    assert fidelity(ref, tok, bare, other, PROMPTS, completions, new_base=bare).fidelity == 0.0
    half = _scaled(ref, 0.5)
    same = fidelity(ref, tok, half, tok, PROMPTS, completions)
    across = fidelity(ref, tok, _renumbered(half, perm), other, PROMPTS, completions, new_base=bare)
    assert across.fidelity == pytest.approx(same.fidelity_ll, abs=1e-5)


def _train(model: torch.nn.Module, tok: Any, prompts: list[str], completions: list[str], steps: int) -> torch.nn.Module:
    """A Trans-LoRA-like student: the LoRA of ``model`` trained on the reference's completions for ``steps`` steps."""
    params = [p.requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    model.train()
    (batch,) = teacher_forced(tok, prompts, completions)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(batch.logits(model), batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_another_family_is_scored_per_byte_under_its_own_tokenizer(llama: dict) -> None:
    """qwen2 under its own tokenizer (other pieces, not only other ids): its bare base 0, the same with a LoRA of
    B = 0, and a student trained on the reference's completions of *other* inputs (Trans-LoRA's setting: the
    scored inputs are held out) rising through (0, 1) as it trains."""
    tok, ref, completions = llama["tok"], llama["ref"], llama["completions"]
    qwen, qtok = _zoo("qwen2-micro-v1")
    assert qtok.get_vocab() != tok.get_vocab()
    assert qtok.tokenize(completions[1]) != tok.tokenize(completions[1])
    bare = fidelity(ref, tok, qwen, qtok, PROMPTS, completions, new_base=qwen)
    assert bare.basis == "ll" and bare.fidelity == 0.0 and bare.note is None and bare.fidelity_kl is None
    student = _with_lora(qwen, std=0.0)  # B = 0: exactly its base
    assert fidelity(ref, tok, student, qtok, PROMPTS, completions).fidelity == pytest.approx(0.0, abs=1e-6)
    labels = greedy_completions(ref, tok, TRAIN, max_new_tokens=12, progress=False)
    scores = [fidelity(ref, tok, _train(student, qtok, TRAIN, labels, steps), qtok, PROMPTS, completions)
              for steps in (5, 15)]  # the same student after 5 and after 20 steps
    assert all(s.fidelity is not None and s.fidelity == s.fidelity_ll for s in scores)
    assert 0.0 < scores[0].fidelity < scores[1].fidelity < 1.0, [s.fidelity for s in scores]
    assert scores[0].ll["reference"] == bare.ll["reference"] and scores[0].ll["new_base"] == pytest.approx(bare.ll["new_base"])


# --------------------------------------------------------------------------- undefined scores and refusals
def test_an_adapter_without_effect_has_no_fidelity_and_bad_input_is_refused(llama: dict) -> None:
    tok, old, new = llama["tok"], llama["old"], llama["new"]
    inert = _with_lora(old, std=0.0)  # B = 0: the reference is its bare base
    completions = greedy_completions(inert, tok, PROMPTS, max_new_tokens=6, progress=False)
    none = fidelity(inert, tok, _with_lora(new), tok, PROMPTS, completions, new_base=new)
    assert none.fidelity_ll is None and "no measurable effect" in none.note
    assert none.fidelity_kl is not None  # KL(reference || new base) > 0 still: the bases differ
    empty = fidelity(inert, tok, inert, tok, ["a"], [""])
    assert empty.fidelity is None and "empty" in empty.note
    with pytest.raises(ValueError, match="one reference completion per prompt, got 2 prompts and 1 completions"):
        fidelity(inert, tok, inert, tok, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match=r"new model has no adapter layers .* pass new_base="):
        fidelity(inert, tok, new, tok, ["a"], ["x"])
