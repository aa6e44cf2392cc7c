"""Tile-structured masks (``tile=b``) of SHiRA and RoSA: mask selection, budget, compact storage, peft round trip,
tile switching."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import PlainNet, WrappedPlainLM, plain_base, shira_net, token_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_peft.kernels import SparseIndex, tile_add, tile_restore
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader
from transformers.pytorch_utils import Conv1D

import lightning_peft as lp
from lightning_peft.deltas import LowRankTerm, SparseTerm, TileTerm
from lightning_peft.methods._sparse import nnz_for
from lightning_peft.methods._sparse.storage import decode_index, encode_index
from lightning_peft.methods.shira.mask import build_mask, layer_nnz

TARGETS = ("blocks.0", "blocks.2")  # PlainNet(width=32): 32 -> 64 -> 32, in_features 32 and 64


def _reference_tiles(scores: torch.Tensor, nnz: int, b: int) -> set[tuple[int, int]]:
    """Written apart from the library: pool per tile with reshape + sum, keep the top nnz // b by torch.topk."""
    rows, cols = scores.shape
    pooled = scores.reshape(rows, cols // b, b).sum(-1)  # (rows, cols / b)
    top = torch.topk(pooled.reshape(-1), nnz // b).indices
    return {(int(t) // (cols // b), (int(t) % (cols // b)) * b + j) for t in top for j in range(b)}


def _positions(index: SparseIndex) -> set[tuple[int, int]]:
    return set(zip(index.row.tolist(), index.col.tolist(), strict=True))


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def _tile_net(seed: int, tile: int = 16, density: float = 0.1, mask: str = "wm") -> PlainNet:
    """PlainNet(width=32), base seed 0, one tile SHiRA adapter with random values (seed ``seed``)."""
    return shira_net(seed, width=32, density=density, mask=mask, tile=tile, target_modules=list(TARGETS))


def _base() -> PlainNet:
    return plain_base(width=32)


# ---------------------------------------------------------------------------- masks and budget
@pytest.mark.parametrize("kind", ["wm", "grad", "snip"])
@pytest.mark.parametrize(("shape", "b"), [((7, 48), 16), ((13, 64), 32), ((5, 128), 64)])
def test_tile_mask_equals_an_independent_pooling(kind: str, shape: tuple[int, int], b: int) -> None:
    g = torch.Generator().manual_seed(sum(shape) + b)
    w, stats = torch.randn(shape, generator=g), torch.rand(shape, generator=g)
    nnz = layer_nnz(*shape, density=0.2, tile=b)
    index = build_mask(kind, w, nnz, stats=stats, tile=b)
    scores = {"wm": w.abs(), "grad": stats.sqrt(), "snip": stats.sqrt() * w.abs()}[kind]
    assert index.nnz == nnz and _positions(index) == _reference_tiles(scores, nnz, b)


def test_random_tiles_are_whole_seeded_per_layer_and_spread() -> None:
    w = torch.zeros(40, 64)
    a, a2, other = (build_mask("random", w, 160, seed=s, name=n, tile=16) for s, n in ((1, "x"), (1, "x"), (1, "y")))
    assert _positions(a) == _positions(a2) and _positions(a) != _positions(other)
    flat = a.flat().view(-1, 16)
    assert bool((flat[:, 0] % 16 == 0).all()) and bool((flat - flat[:, :1] == torch.arange(16)).all())
    assert len(set(a.row.tolist())) > 3  # uniform tiles, not the first rows


def test_budget_is_whole_tiles_rounded_down() -> None:
    assert layer_nnz(64, 32, density=0.1, tile=16) == (round(0.1 * 64 * 32) // 16) * 16 == 192
    assert layer_nnz(64, 96, density=0.0, r=3, tile=32) == (3 * 160 // 32) * 32 <= 3 * 160
    assert layer_nnz(4, 16, density=0.01, tile=16) == 16  # at least one tile


def test_tile_errors_name_the_rule_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"tile must be None.*16, 32, 64.*got tile=24.*tile=16"):
        lp.SHiRAConfig(tile=24)
    with pytest.raises(ValueError, match=r"struct.*cannot be tiled.*tile=None"):
        lp.SHiRAConfig(mask="struct", tile=16)
    with pytest.raises(ValueError, match=r"tile=64 needs every target's in_features to be a multiple of 64, got layer "
                                         r"'blocks.0' \(64x32, in_features=32\).*\(16, 32\).*exclude_modules=.*tile=None"):
        lp.SHiRA(mask="wm", tile=64, target_modules=list(TARGETS)).inject(PlainNet(width=32))

    def not_tiles(weight, stats):
        return SparseIndex.from_flat(torch.arange(0, 32 * 2, 2), tuple(weight.shape))  # 32 scattered entries

    with pytest.raises(ValueError, match=r"not whole 1 x 16 tiles.*tile_mask.*tile=None"):
        build_mask(not_tiles, torch.zeros(8, 32), 32, tile=16)


def test_calibrated_grad_tiles_train_and_stay_tiles(tmp_path: Path) -> None:
    module = WrappedPlainLM(seed=0)  # blocks.2 is 48 -> 24: in_features 48 = 3 tiles of 16 per row
    method = lp.SHiRA(density=0.1, mask="grad", tile=16, calibration_batches=2, target_modules=["blocks.2"])
    L.Trainer(max_steps=3, callbacks=[method], accelerator="cpu", enable_progress_bar=False, logger=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path).fit(module, token_loader())
    layer = module.net.blocks[2]
    index = layer.sparse_index("default")
    assert index.nnz == layer_nnz(24, 48, 0.1, tile=16) and bool(layer.shira_weight["default"].abs().sum() > 0)
    (term,) = lp.AdapterBank(WrappedPlainLM(seed=0).net).add("a", module).adapters["a"][0][1:]
    assert isinstance(term, TileTerm) and term.width == 16 and term.tiles.numel() * 16 == index.nnz


# ---------------------------------------------------------------------------- RoSA
class TileRegression(L.LightningModule):
    """``Linear(32 -> 12) -> tanh -> Linear(12 -> 5)``, MSE: ``net.0`` (in 32) takes tiles of 16 or 32, ``net.2`` (in 12)
    none. Fixed batches, no shuffling, so the Fisher statistic is recomputed here with plain autograd."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 12), nn.Tanh(), nn.Linear(12, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _regression_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, generator=g), torch.randn(4, 3, 5, generator=g)) for _ in range(4)]


def _fit(module: L.LightningModule, callbacks: list, max_steps: int, tmp_path: Path, data=None,
         ckpt_path: str | None = None) -> None:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    L.Trainer(max_steps=max_steps, callbacks=callbacks, accelerator="cpu", enable_progress_bar=False, logger=False,
              enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=checkpointing).fit(
        module, data if data is not None else DataLoader(_regression_batches(), batch_size=None), ckpt_path=ckpt_path)


@pytest.mark.parametrize(("criterion", "b"), [("fisher", 16), ("fisher", 32), ("mean", 16), ("weight_magnitude", 16)])
def test_rosa_tile_mask_is_the_best_tiles_of_the_pooled_statistic(criterion: str, b: int, tmp_path: Path) -> None:
    # sparse-only (r=0): nothing moves before the mask, so the statistic is that of the base net on 2 batches
    module = TileRegression()
    _fit(module, [lp.RoSA(r=0, density=0.2, tile=b, mask_criterion=criterion, mask_steps=2, target_modules=["net.0"])],
         max_steps=2, tmp_path=tmp_path)
    net = TileRegression().net
    grads = [torch.autograd.grad(F.mse_loss(net(x), y), net[0].weight)[0] for x, y in _regression_batches()[:2]]
    scores = {"fisher": sum(g**2 for g in grads) / 2, "mean": (sum(grads) / 2).abs(),
              "weight_magnitude": net[0].weight.detach().abs()}[criterion]
    nnz = nnz_for(0.2, 12 * 32) // b * b  # round(76.8) = 77 -> 64: the same budget in whole tiles
    layer = module.net[0]
    assert nnz == 64 and layer.rosa_values["default"].numel() == layer.index("default").nnz == nnz
    assert _positions(layer.index("default")) == _reference_tiles(scores, nnz, b)


def test_rosa_random_tiles_are_whole_seeded_and_spread(tmp_path: Path) -> None:
    def flat(seed: int) -> torch.Tensor:
        module = TileRegression()
        method = lp.RoSA(r=2, density=0.3, tile=16, mask_criterion="random", warmup_steps=0, seed=seed,
                         target_modules=["net.0"])
        _fit(module, [method], max_steps=1, tmp_path=tmp_path)
        return module.net[0].index("default").flat()

    a, a2, other = flat(0), flat(0), flat(1)
    runs = a.view(-1, 16)
    assert a.numel() == nnz_for(0.3, 12 * 32) // 16 * 16 == 112 and torch.equal(a, a2) and not torch.equal(a, other)
    assert bool((runs[:, 0] % 16 == 0).all()) and bool((runs - runs[:, :1] == torch.arange(16)).all())


def test_rosa_tiles_train_resume_save_reload_and_bank_as_tiles(tmp_path: Path) -> None:
    kwargs = {"r": 2, "density": 0.1, "tile": 16, "warmup_steps": 1, "mask_steps": 1, "target_modules": ["blocks.2"]}

    steps: list[int] = []

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
            steps.append(trainer.global_step)

    def run(name: str, ckpt_path: str | None = None) -> WrappedPlainLM:
        torch.manual_seed(0)
        module = WrappedPlainLM(seed=0)  # blocks.2 is 48 -> 24: 3 tiles of 16 per row
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1)
        steps.clear()
        _fit(module, [lp.RoSA(**kwargs), ckpt, Steps()], 5, tmp_path, token_loader(n=48), ckpt_path=ckpt_path)
        return module

    full = run("full")  # warm-up: step 0, Fisher: step 1, joint (tiles): steps 2-4
    layer = full.net.blocks[2]
    index = layer.index("default")
    assert index.nnz == nnz_for(0.1, 24 * 48) // 16 * 16 == 112 and bool(layer.rosa_values["default"].abs().sum() > 0)
    ckpt = next((tmp_path / "full").glob("*step=3.ckpt"))
    codes = {k.rsplit(":", 1)[1] for k in torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
             if "rosa_row" in k}
    assert codes == {"tiles", "tile_width"}  # one int32 per tile in the checkpoint
    resumed = run("resumed", ckpt_path=str(ckpt))
    assert steps == [3, 4]  # resumed in the joint phase: the tiled mask came from the checkpoint
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())

    folder = lp.save_adapter(full, tmp_path / "rosa_tile")
    reloaded = lp.load_adapter(WrappedPlainLM(seed=0), folder)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    bank = lp.AdapterBank(plain_base()).add("folder", folder).add("module", full.net)
    with torch.no_grad():
        ours, theirs = full.net(ids), reloaded.net(ids)
        bank.activate("folder")
        switched = bank.model(ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    torch.testing.assert_close(switched, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, plain_base()(ids))
    for name in ("folder", "module"):
        (_, tiles), (_, low) = bank.adapters[name]
        assert isinstance(tiles, TileTerm) and tiles.width == 16 and tiles.tiles.numel() * 16 == index.nnz
        assert isinstance(low, LowRankTerm)


def test_rosa_tile_errors_name_the_rule_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"RoSA tile must be None.*16, 32, 64.*got tile=24.*tile=16"):
        lp.RoSA(tile=24)
    with pytest.raises(ValueError, match=r"RosaPeftConfig tile must be None.*got tile=True"):
        lp.RosaPeftConfig(tile=True)
    with pytest.raises(ValueError, match=r"RoSA tile=16 needs every target's in_features to be a multiple of 16, got "
                                         r"layer 'net.2' \(5x12, in_features=12\); pick a tile that divides it \(none "
                                         r"of 16/32/64 does\), exclude the layer with exclude_modules=, or use tile=None"):
        lp.RoSA(tile=16, target_modules=["net.0", "net.2"]).inject(TileRegression())
    with pytest.raises(ValueError, match=r"RoSA tile=16 .*'0' is a transformers Conv1D.*tile=None.*exclude_modules="):
        lp.RoSA(tile=16, target_modules=["0"]).inject(nn.Sequential(Conv1D(16, 32)))


# ---------------------------------------------------------------------------- storage
def test_checkpoint_index_is_one_int32_per_tile_and_decodes_back() -> None:
    index = build_mask("wm", torch.randn(24, 96, generator=torch.Generator().manual_seed(0)), 384, tile=32)
    parts = encode_index(index.row, index.col, (24, 96))
    assert set(parts) == {"tiles", "tile_width"} and parts["tiles"].dtype == torch.int32
    assert sum(t.numel() * t.element_size() for t in parts.values()) == 4 * 384 // 32 + 4
    row, col = decode_index(parts, (24, 96))
    assert torch.equal(row, index.row.int()) and torch.equal(col, index.col.int())
    scattered = SparseIndex.from_flat(torch.arange(0, 768, 2), (24, 96))
    assert "tiles" not in encode_index(scattered.row, scattered.col, (24, 96))


def test_layer_checkpoint_round_trip_keeps_tiles_and_values() -> None:
    net = _tile_net(1)
    layer = net.blocks[0]
    state = {f"blocks.0.{k}": v.clone() for k, v in layer.state_dict().items()}
    layer.encode_index_state(state, "blocks.0.")
    assert "blocks.0.shira_indices.default:tiles" in state
    fresh = _tile_net(5, mask="random")  # another mask and other values, same budget
    fresh.blocks[0].load_state_dict({k[len("blocks.0."):]: v for k, v in state.items()})
    assert _positions(fresh.blocks[0].sparse_index("default")) == _positions(layer.sparse_index("default"))
    assert torch.equal(fresh.blocks[0].shira_weight["default"], layer.shira_weight["default"])


@pytest.mark.parametrize("b", [16, 32])
def test_held_bytes_per_adapter_within_1_2x_of_lora_at_the_same_count(b: int) -> None:
    r = 4
    torch.manual_seed(0)
    src = PlainNet(width=64)
    targets = ["blocks.0", "blocks.2"]
    lp.SHiRA(r=r, mask="wm", tile=b, target_modules=targets).inject(src)
    lora = PlainNet(width=64)
    inject_adapter_in_model(LoraConfig(r=r, target_modules=targets, init_lora_weights=False), lora)
    bank = lp.AdapterBank(PlainNet(width=64)).add("tile", src).add("lora", lora)
    unstructured = lp.SHiRA(r=r, mask="wm", target_modules=targets).inject(PlainNet(width=64))
    with torch.no_grad():
        for m in (src, unstructured):
            for name in targets:
                m.get_submodule(name).shira_weight["default"].normal_()
    bank.add("tile2", src).add("flat", unstructured)
    count = sum(r * (m.in_features + m.out_features) for m in (src.blocks[0], src.blocks[2]))
    assert bank.held_bytes("lora") == 4 * count  # fp32 A and B
    assert isinstance(bank.adapters["tile2"][0][1], TileTerm)
    assert bank.held_bytes("tile2") == 4 * count + 8 * count // b <= 1.2 * bank.held_bytes("lora")
    assert isinstance(bank.adapters["flat"][0][1], SparseTerm) and bank.held_bytes("flat") > 2 * bank.held_bytes("lora")


# ---------------------------------------------------------------------------- peft round trip
def test_tile_folder_loads_in_plain_peft_and_switches_as_tiles(tmp_path: Path) -> None:
    net = _tile_net(1, tile=32)
    folder = lp.save_adapter(net, tmp_path / "tile")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_base(), folder)(ids)
        ours = net(ids)
        bank = lp.AdapterBank(_base()).add("folder", folder).add("module", net)
        terms = [t for _, t in bank.adapters["folder"]]
        assert all(isinstance(t, TileTerm) and t.width == 32 for t in terms)
        for (_, a), (_, m) in zip(bank.adapters["folder"], bank.adapters["module"], strict=True):
            assert torch.equal(a.dense(torch.float32), m.dense(torch.float32))
        bank.activate("folder")
        switched = bank.model(ids)
    assert not torch.allclose(ours, _base()(ids))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(switched, ours, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- switching
def test_tile_add_then_restore_is_bit_exact_in_bf16_and_rounds_once() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g).bfloat16()
    before = w.clone()
    tiles, values = torch.tensor([1, 7, 10]), torch.randn(3, 16, generator=g)
    saved = tile_add(w, tiles, values, 0.5)
    expected = before.view(-1, 16).clone()
    expected[tiles.long()] = (before.view(-1, 16)[tiles.long()].float() + 0.5 * values).bfloat16()
    assert torch.equal(w.view(-1, 16), expected)
    tile_restore(w, tiles, saved)
    assert _bits(w) == _bits(before)


def test_random_switches_and_fusions_restore_the_base_bit_exactly() -> None:
    base = _base()
    sources = {n: _tile_net(i, tile=16 if i else 32) for i, n in enumerate("abc")}
    bank = lp.AdapterBank(base)
    for n, src in sources.items():
        bank.add(n, src)
    assert all(isinstance(t, TileTerm) for ts in bank.adapters.values() for _, t in ts)
    original = {k: _bits(v) for k, v in base.state_dict().items()}
    rng = random.Random(0)
    for _ in range(30):
        if rng.random() < 0.3:
            bank.fuse({n: rng.uniform(-1, 1) for n in rng.sample("abc", 2)})
        else:
            name = rng.choice("abc")
            bank.activate(name)
            for path in TARGETS:  # W + S computed densely from the source layer
                layer = sources[name].get_submodule(path)
                expected = layer.get_base_layer().weight + layer.get_delta_weight("default")
                assert torch.equal(base.get_submodule(path).weight, expected)
    bank.deactivate()
    assert {k: _bits(v) for k, v in base.state_dict().items()} == original


def test_compiled_model_switches_tile_adapters_without_recompiling() -> None:
    base = _base().eval()
    bank = lp.AdapterBank(base)
    for i, n in enumerate("ab"):
        bank.add(n, _tile_net(i + 1))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    plan = [None, "a", "b", {"a": 1.0, "b": 0.5}, "a", None]

    def run(model) -> list[torch.Tensor]:
        out = []
        for step in plan:
            bank.fuse({step: 1.0} if isinstance(step, str) else step) if step else bank.deactivate()
            out.append(model(ids).clone())
        bank.deactivate()
        return out

    with torch.no_grad():
        expected = run(base)
        torch._dynamo.reset()
        counters.clear()
        got = run(torch.compile(base))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
    assert not counters["recompiles"]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[1], got[0]) and not torch.allclose(got[2], got[1])


@pytest.mark.parametrize(("wdtype", "vdtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("b", [16, 32, 64])
def test_native_tile_loop_gives_the_row_ops_bits(wdtype: torch.dtype, vdtype: torch.dtype, b: int) -> None:
    from lightning_peft.kernels import _tiles_native

    if _tiles_native.library() is None:
        pytest.skip("no C compiler: the row ops are the only path")
    g = torch.Generator().manual_seed(b)
    w = (torch.randn(40, 128, generator=g) * 3).to(wdtype)
    w.view(-1)[::97], w.view(-1)[5::101] = float("nan"), float("inf")  # special values keep their bits too
    tiles = torch.randperm(40 * 128 // b, generator=g)[:50].sort().values
    values = (torch.randn(50, b, generator=g) * torch.logspace(-8, 2, b)).to(vdtype)  # sums that round
    ref, ours = w.clone(), w.clone()
    saved_ref, saved = tile_add(ref, tiles, values, native=False), tile_add(ours, tiles, values)
    assert _bits(ours) == _bits(ref) and _bits(saved) == _bits(saved_ref)
    version = ours._version
    tile_restore(ours, tiles, saved)
    assert _bits(ours) == _bits(w) and ours._version > version  # the raw write counts as an in-place op


@pytest.mark.parametrize("native", [None, False])
def test_tile_numbers_outside_the_weight_are_refused_before_any_write(native: bool | None) -> None:
    w = torch.randn(8, 64)
    before = w.clone()
    values = torch.ones(2, 16)
    for bad in ([0, 32], [-1, 3]):  # 8 * 64 / 16 = 32 tiles: 32 and -1 lie outside
        with pytest.raises(IndexError, match="tile numbers span"):
            tile_add(w, torch.tensor(bad), values, native=native)
        with pytest.raises(IndexError, match="tile numbers span"):
            tile_restore(w, torch.tensor(bad), values, native=native)
        assert _bits(w) == _bits(before)


@pytest.mark.parametrize("native", [None, False])
def test_tile_add_into_out_gives_the_same_bits_and_refuses_a_wrong_buffer(native: bool | None) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    tiles, values = torch.tensor([1, 5, 9, 40]), torch.randn(4, 16, generator=g)
    ref, ours = w.clone(), w.clone()
    saved_ref = tile_add(ref, tiles, values, native=native)
    out = torch.full((4, 16), float("nan"))
    assert tile_add(ours, tiles, values, native=native, out=out) is out
    assert _bits(ours) == _bits(ref) and _bits(out) == _bits(saved_ref)
    tile_restore(ours, tiles, out, native=native)
    assert _bits(ours) == _bits(w)
    for bad in (torch.empty(3, 16), torch.empty(4, 16, dtype=torch.float64), torch.empty(16, 4).T):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            tile_add(ours, tiles, values, native=native, out=bad)
    assert _bits(ours) == _bits(w)


def _terms(seed: int, shape: tuple[int, int] = (16, 64), b: int = 16, count: int = 12) -> TileTerm:
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randperm(shape[0] * shape[1] // b, generator=g)[:count].sort().values
    return TileTerm(tiles, torch.randn(count, b, generator=g) * 10 ** (seed % 5 - 2), shape)


def test_merge_stack_replace_gives_pop_all_then_push_bits_and_reuses_the_buffers() -> None:
    """Several terms per weight (a fusion; masks overlap), a weight changed by two kinds of term, a shared weight:
    replace gives the same weights and saved bits as pop_all + pushes, and recycles the restored tile buffers."""
    from lightning_peft.deltas import LowRankTerm, MergeStack

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(16, 64, generator=g) for _ in range(2)]
    clean = [_bits(w) for w in ws]
    low = LowRankTerm(torch.randn(2, 64, generator=g), torch.randn(16, 2, generator=g), 0.5)
    first = [(_terms(1), ws[0], 1.0), (_terms(2), ws[0], 1.0), (low, ws[1], 1.0), (_terms(3), ws[1], 1.0)]
    second = [(_terms(4), ws[1], 1.0), (_terms(5), ws[0], 1.0), (_terms(6), ws[0], 1.0), (low, ws[0], 1.0)]
    for steps in ([first, second, first], [second, [], first], [first, first]):
        ref_ws = [w.clone() for w in ws]
        ref, ours = MergeStack(), MergeStack()
        ref_map = {id(w): r for w, r in zip(ws, ref_ws, strict=True)}
        for changes in steps:
            ref.pop_all()
            for term, w, alpha in changes:
                ref.push(term, ref_map[id(w)], alpha)
            kept = {e[2].data_ptr() for e in ours.entries if isinstance(e[0], TileTerm)}
            ours.replace(changes)
            assert [_bits(w) for w in ws] == [_bits(w) for w in ref_ws]
            got = [e[2] for e in ours.entries if isinstance(e[0], TileTerm)]
            want = [e[2] for e in ref.entries if isinstance(e[0], TileTerm)]
            assert sorted(_bits(s) for s in got) == sorted(_bits(s) for s in want)
            reused = sum(s.data_ptr() in kept for s in got)
            assert reused == min(len(kept), len(got))  # every tile term here saves a (12, 16) fp32 buffer
        ours.pop_all()
        assert [_bits(w) for w in ws] == clean


def test_merge_stack_replace_that_fails_still_restores_the_base() -> None:
    from lightning_peft.deltas import MergeStack

    ws = [torch.randn(16, 64), torch.randn(16, 64)]
    clean = [_bits(w) for w in ws]
    stack = MergeStack()
    stack.replace([(_terms(1), ws[0], 1.0), (_terms(2), ws[1], 1.0)])
    bad = TileTerm(torch.tensor([0, 64]), torch.ones(2, 16), (16, 64))  # tile 64 lies outside a 16 x 64 weight
    with pytest.raises(IndexError):
        stack.replace([(_terms(3), ws[0], 1.0), (bad, ws[0], 1.0), (_terms(4), ws[1], 1.0)])
    stack.pop_all()
    assert [_bits(w) for w in ws] == clean


def test_bank_fuse_that_fails_leaves_the_base_and_nothing_active() -> None:
    base = _base()
    clean = {k: _bits(v) for k, v in base.state_dict().items()}
    bank = lp.AdapterBank(base).add("a", _tile_net(1)).add("b", _tile_net(2))
    bank.activate("a")
    path, term = bank.adapters["b"][-1]
    bank.adapters["b"][-1] = (path, TileTerm(term.tiles + 10**6, term.values, term.shape))  # tiles outside W
    with pytest.raises(IndexError):
        bank.activate("b")
    assert bank.active == {} and {k: _bits(v) for k, v in base.state_dict().items()} == clean
