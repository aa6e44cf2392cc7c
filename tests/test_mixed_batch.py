"""Mixed-adapter batches (``AdapterBank.mixed`` / ``generate``): each row equals that row run alone, adapter fused."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning_peft.kernels import SparseIndex, tile_linear_add
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lightning_peft as lp
from lightning_peft.deltas import SparseTerm


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=97, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _shira(base, seed: int, tile: int | None):
    src = copy.deepcopy(base)
    lp.SHiRA(r=2, mask="random", seed=seed, tile=tile).inject(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "shira_weight" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return src


def _lora(base, seed: int):
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))


@pytest.fixture(scope="module")
def bank():
    base = _llama()
    bank = lp.AdapterBank(base)
    bank.add("t16", _shira(base, 1, 16)).add("t32", _shira(base, 2, 32)).add("free", _shira(base, 3, None))
    bank.add("lora", _lora(base, 4))
    return bank


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_terms_are_what_the_test_means(bank):
    kinds = {name: {type(t).__name__ for _, t in bank.adapters[name]} for name in bank.names()}
    assert kinds == {"t16": {"TileTerm"}, "t32": {"TileTerm"}, "free": {"SparseTerm"}, "lora": {"LowRankTerm"}}


@pytest.mark.parametrize("rows", [["t16", "t32", None, "free", "lora", "t16"], ["t32"], [None, None]])
def test_mixed_forward_equals_each_row_alone(bank, rows):
    model, before = bank.model, _weights(bank.model)
    ids = torch.randint(0, 97, (len(rows), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bank.mixed(rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                alone = model(ids[i:i + 1]).logits
            else:
                with bank.applied(name):
                    alone = model(ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    after = _weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # never fused: the base untouched
    assert not any(m._forward_hooks for m in model.modules())  # hooks gone after the block


def test_mixed_differs_from_base_where_an_adapter_is_named(bank):
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = bank.model(ids).logits
        with bank.mixed(["t16", None]):
            mixed = bank.model(ids).logits
    assert not torch.allclose(mixed[0], base[0], atol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 2}])
def test_generate_equals_each_row_alone(bank, kwargs):
    rows = ["t16", "lora", None, "t32"]
    ids = torch.randint(0, 97, (4, 5), generator=torch.Generator().manual_seed(2))
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kwargs}
    mixed = bank.generate(ids, adapters=rows, **gen)
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                alone = bank.model.generate(ids[i:i + 1], **gen)
            else:
                with bank.applied(name):
                    alone = bank.model.generate(ids[i:i + 1], **gen)
        assert torch.equal(mixed[i:i + 1], alone), (name, mixed[i], alone[0])
    mapping = bank.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, adapters=rows, **gen)
    assert torch.equal(mapping, mixed)


def test_mixed_undoes_what_is_applied_first(bank):
    before = _weights(bank.model)
    bank.activate("t16")
    with torch.no_grad(), bank.mixed(["t32"]):
        pass
    assert bank.active == {} and all(torch.equal(before[n], p) for n, p in _weights(bank.model).items())


def test_mixed_errors_name_the_fix(bank):
    ids = torch.randint(0, 97, (3, 4))
    with pytest.raises(KeyError, match="holds no adapter 'nope'"), bank.mixed(["nope"]):
        pass
    with pytest.raises(ValueError, match="one adapter name"), bank.mixed([]):
        pass
    with torch.no_grad(), bank.mixed(["t16", None]), pytest.raises(ValueError, match="batch has 3 rows but 2"):
        bank.model(ids)
    with bank.mixed(["t16"]), pytest.raises(RuntimeError, match="torch.no_grad"):
        bank.model(ids[:1])


def test_mixed_refuses_conv1d_layers():
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)).eval()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    bank = lp.AdapterBank(base).add("a", lora)
    with pytest.raises(ValueError, match="Conv1D; serve this model one adapter at a time"), bank.mixed(["a"]):
        pass


# ---------------------------------------------------------------------------- the kernel
def _dense(tiles: torch.Tensor, values: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """Written apart from the library: each tile's values placed at its row and columns one by one."""
    d = torch.zeros(out, inp, dtype=torch.float64)
    b = values.shape[1]
    for t, v in zip(tiles.tolist(), values.double(), strict=True):
        r, c = divmod(t, inp // b)
        d[r, c * b:(c + 1) * b] = v
    return d


@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("native", [None, False])
@pytest.mark.parametrize("sort", [True, False])
def test_tile_linear_add_against_dense(b, native, sort):
    g = torch.Generator().manual_seed(b)
    out, inp, n_tiles = 40, 4 * b, 37
    tiles = torch.randperm(out * 4, generator=g)[:n_tiles]
    tiles = tiles.sort().values if sort else tiles
    values, x = torch.randn(n_tiles, b, generator=g), torch.randn(21, inp, generator=g)
    rows = torch.tensor([0, 3, 4, 17, 18, 19, 20])  # 7 rows: one block of 16 rows is partial
    y = torch.randn(21, out, generator=g)
    want = y.double().clone()
    want[rows] += x[rows].double() @ _dense(tiles, values, out, inp).T
    tile_linear_add(y, x, tiles, values, rows, native=native)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_tile_linear_add_bf16_and_sparse_term():
    g = torch.Generator().manual_seed(0)
    tiles, values, x = torch.tensor([3, 0, 9]), torch.randn(3, 16, generator=g), torch.randn(5, 64, generator=g)
    y = torch.zeros(5, 12, dtype=torch.bfloat16)
    tile_linear_add(y, x.bfloat16(), tiles, values.bfloat16())
    torch.testing.assert_close(y.double(), x.bfloat16().double() @ _dense(tiles, values.bfloat16(), 12, 64).T,
                               rtol=2e-2, atol=2e-2)
    flat = torch.tensor([1, 70, 200, 767])  # an unstructured delta: tiles of width 1
    term = SparseTerm(SparseIndex.from_flat(flat, (12, 64)), torch.randn(4, generator=g))
    y = torch.zeros(5, 12)
    term.linear_add(y, x, torch.arange(5), alpha=0.5)
    torch.testing.assert_close(y, 0.5 * x @ term.dense(torch.float32).T, rtol=1e-5, atol=1e-6)


def test_tile_linear_add_refuses_bad_input():
    y, x = torch.zeros(2, 8), torch.zeros(2, 32)
    with pytest.raises(IndexError, match="tile numbers span"):
        tile_linear_add(y, x, torch.tensor([16]), torch.zeros(1, 16))
    with pytest.raises(ValueError, match="b=16 dividing in"):
        tile_linear_add(y, torch.zeros(2, 24), torch.tensor([0]), torch.zeros(1, 16))
