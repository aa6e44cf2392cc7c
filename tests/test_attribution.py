"""Causal drift attribution: sub-block grouping, hybrid bases, and attributions with known answers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import save_random_llama
from transformers import LlamaForCausalLM

import lightning_peft as lp
from lightning_peft.analysis import attribute_drop, evaluate_lm
from lightning_peft.analysis.attribution import base_parameters, hybrid, sub_block, sub_blocks


@pytest.mark.parametrize(
    ("name", "modules", "expected"),
    [
        ("model.layers.2.mlp.up_proj.weight", None, ("ffn", 2)),
        ("model.layers.2.post_attention_layernorm.weight", None, ("ffn", 2)),
        ("model.layers.0.input_layernorm.weight", None, ("attention", 0)),
        ("model.layers.1.self_attn.q_norm.weight", None, ("attention", 1)),  # Qwen3
        ("model.layers.1.self_attn.q_proj.bias", None, ("attention", 1)),  # Qwen2
        ("transformer.h.3.ln_2.weight", None, ("ffn", 3)),  # GPT-2
        ("transformer.h.3.attn.c_proj.weight", None, ("attention", 3)),
        ("transformer.h.3.mlp.c_proj.weight", None, ("ffn", 3)),
        ("model.decoder.layers.0.final_layer_norm.weight", None, ("ffn", 0)),  # OPT: the norm in front of fc1
        ("model.decoder.layers.0.fc2.weight", None, ("ffn", 0)),
        ("model.embed_tokens.weight", None, ("outside", None)),
        ("lm_head.weight", None, ("outside", None)),
        # Gemma 2/3: post_attention_layernorm normalises the attention output; pre_feedforward_layernorm leads the FFN
        ("model.layers.0.post_attention_layernorm.weight",
         {"model.layers.0.post_attention_layernorm", "model.layers.0.pre_feedforward_layernorm"}, ("attention", 0)),
        ("model.layers.0.pre_feedforward_layernorm.weight", None, ("ffn", 0)),
    ],
)
def test_sub_block_of_a_parameter(name: str, modules: set[str] | None, expected: tuple[str, int | None]) -> None:
    assert sub_block(name, modules) == expected


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[LlamaForCausalLM, Path, list[dict[str, torch.Tensor]]]:
    """A random 2-layer Llama, a LoRA adapter on q/v with non-zero B (so it matters), and labelled batches."""
    root = tmp_path_factory.mktemp("attribution")
    model = LlamaForCausalLM.from_pretrained(save_random_llama(root / "base", hidden=32, layers=2)).eval()
    adapted = copy.deepcopy(model)
    lp.LoRA(r=4, target_modules=["q_proj", "v_proj", "down_proj"]).inject(adapted)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    adapter = lp.save_adapter(adapted, root / "adapter")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt positions are ignored
    return model, adapter, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def test_groups_partition_the_parameters(setup) -> None:
    model, _, _ = setup
    names = list(dict(model.named_parameters()))
    groups = sub_blocks(names)
    assert list(groups) == ["ffn", "attention", "outside", "attention@0", "ffn@0", "attention@1", "ffn@1"]
    top = groups["ffn"] + groups["attention"] + groups["outside"]
    assert sorted(top) == sorted(names) and len(top) == len(set(top))  # a partition
    assert sorted(groups["ffn@0"] + groups["ffn@1"]) == sorted(groups["ffn"])
    assert groups["ffn@1"] == [f"model.layers.1.{n}.weight" for n in
                               ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm")]


def test_base_parameters_of_an_adapted_model_are_the_base_weights(setup) -> None:
    from peft import PeftModel

    model, adapter, _ = setup
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
    params = base_parameters(peft_model)
    plain = dict(model.named_parameters())
    assert params.keys() == plain.keys()  # no lora_A/lora_B, no base_layer in the names
    assert all(torch.equal(params[k], plain[k]) for k in plain)


def test_hybrid_swaps_in_place_and_restores_bit_for_bit(setup) -> None:
    model, _, _ = setup
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    donor = {k: torch.randn_like(v) for k, v in params.items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    names = sub_blocks(list(params))["attention@1"]
    with hybrid(params, donor, names):
        assert all(torch.equal(params[n], donor[n]) for n in names)
        assert all(torch.equal(params[k], before[k]) for k in params if k not in names)
    assert all(torch.equal(params[k], before[k]) for k in params)
    with pytest.raises(ValueError, match="two versions of one architecture"), hybrid(
        params, {**donor, names[0]: torch.zeros(3)}, names
    ):
        pass
    assert all(torch.equal(params[k], before[k]) for k in params)  # a refused swap changed nothing


def test_a_model_against_itself_has_nothing_to_attribute(setup) -> None:
    model, adapter, batches = setup
    rows = attribute_drop(copy.deepcopy(model), copy.deepcopy(model), adapter, batches)
    base = rows[0]["loss"]
    assert all(r["loss"] == base for r in rows)  # every hybrid of a model with itself is the model
    assert all(r["explained_loss"] is None for r in rows)  # no drop: nothing to explain


def test_all_blocks_put_back_is_v_o_and_a_single_changed_block_explains_everything(setup) -> None:
    """v_n = v_o with layer 1's FFN rewritten: that block must explain all of the drop, the rest none."""
    from peft import PeftModel

    model, adapter, batches = setup
    new = copy.deepcopy(model)
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(new.model.layers[1].mlp, proj).weight
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) * w.std())
    expected_old = evaluate_lm(PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval(), batches)
    expected_new = evaluate_lm(PeftModel.from_pretrained(copy.deepcopy(new), str(adapter)).eval(), batches)
    assert expected_new["loss"] != expected_old["loss"]
    new_weights = {k: v.detach().clone() for k, v in new.named_parameters()}
    rows = {(r["direction"], r["group"]): r for r in attribute_drop(model, new, adapter, batches, old_name="o", new_name="n")}
    assert rows["base", "o"]["loss"] == expected_old["loss"] and rows["base", "n"]["loss"] == expected_new["loss"]
    for direction in ("put back", "only"):
        for group in ("ffn", "ffn@1"):
            assert rows[direction, group]["explained_loss"] == pytest.approx(1.0, abs=1e-12)
            assert rows[direction, group]["explained_token_acc"] in (None, pytest.approx(1.0))
        for group in ("attention", "outside", "attention@0", "ffn@0", "attention@1"):
            assert rows[direction, group]["explained_loss"] == pytest.approx(0.0, abs=1e-12)
    assert rows["put back", "ffn@1"]["params"] == sum(p.numel() for p in model.model.layers[1].mlp.parameters()) + 32
    # v_n's base weights are its own again afterwards (the swaps were undone)
    assert all(torch.equal(p, new_weights[k]) for k, p in base_parameters(new).items())


def test_two_families_are_refused(setup, tmp_path: Path) -> None:
    model, adapter, batches = setup
    other = LlamaForCausalLM.from_pretrained(save_random_llama(tmp_path / "wide", hidden=32, layers=3)).eval()
    with pytest.raises(ValueError, match="two versions of one architecture"):
        attribute_drop(model, other, adapter, batches)


def test_drift_command_attributes_an_adapters_drop(tmp_path: Path) -> None:
    """`lightning-peft drift old=... new=... adapter=DIR` as a user types it: the attribution table, plot and summary."""
    import json
    import subprocess
    import sys

    from lightning_peft.analysis import load_base

    model = load_base("llama-micro-v1")
    lp.LoRA(r=2, target_modules=["q_proj", "v_proj"]).inject(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    adapter = lp.save_adapter(model, tmp_path / "adapter")
    cmd = ["drift", "old=llama-micro-v1", "new=llama-micro-v2", f"adapter={adapter}", "task.max_length=64",
           "task.num_train=16", "task.num_val=8", "num_batches=1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from lightning_peft.cli import main; sys.exit(main())", *cmd],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "run" / "drift"
    header = (folder / "attribution.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["adapter", "direction", "group"] and "explained_token_acc" in header
    summary = json.loads((folder / "summary.json").read_text())
    assert {"drift/explained_loss/ffn", "drift/explained_loss/attention", "drift/explained_loss/outside"} <= set(summary)
    assert (folder / "attribution.png").read_bytes()[:4] == b"\x89PNG" and "explained_loss/ffn" in proc.stdout
