"""SHiRA: masks (exact nnz, hand-checked selections), sparse-core training, peft round trips both ways."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import peft.tuners.shira.model as peft_shira_model
import pytest
import torch
import torch.nn.functional as F
from helpers import PlainNet, WrappedPlainLM, token_loader
from lightning_peft.kernels import SparseIndex, sparse_delta_linear_reference
from peft import PeftModel, ShiraConfig, get_peft_model
from safetensors.torch import load_file

import lightning_peft as lp
from lightning_peft.methods.shira.fusion import awom, awor, mask_overlap, orthogonality
from lightning_peft.methods.shira.layer import PEFT_SHIRA_LINEAR, ShiraLinear
from lightning_peft.methods.shira.mask import build_mask, layer_nnz, pad_index, struct_mask

MASKS = ["random", "struct", "wm", "grad", "snip"]


def _trainer(tmp_path: Path, callbacks, max_steps: int = 3) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )


def _positions(index: SparseIndex) -> set[tuple[int, int]]:
    return set(zip(index.row.tolist(), index.col.tolist()))


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, r"density must be a float in \(0, 1\].*density=0.0"),
        ({"density": 1.5}, r"density=1.5"),
        ({"mask": "magic"}, r"mask must be one of random, struct, wm, grad, snip.*'magic'"),
        ({"r": 0}, r"r must be None.*r=0"),
        ({"mask": "grad", "calibration_batches": 0}, r"needs calibration_batches >= 1, got 0"),
        ({"calibration_batches": -1}, r"calibration_batches must be an int >= 0"),
    ],
)
def test_config_errors_name_rule_value_and_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lp.SHiRA(**kwargs)


def test_registered_as_shira() -> None:
    assert lp.get_method("shira") is lp.SHiRA


# ---------------------------------------------------------------------------- masks
def test_struct_mask_hand_checked_exact_f() -> None:
    # f = 3: rows 0, 3 and columns 0, 3 (20 entries) + diagonal (1,1), (2,2), (4,4), (5,5) = 24
    index = struct_mask((6, 6), 24)
    expected = {(r, c) for r in range(6) for c in range(6) if r % 3 == 0 or c % 3 == 0 or r == c}
    assert len(expected) == 24 and _positions(index) == expected


def test_struct_mask_trims_largest_offdiagonal_positions() -> None:
    # 22 < 24: the two chosen off-diagonal entries with the largest flat index go: (5,3)=33, (5,0)=30
    index = struct_mask((6, 6), 22)
    full = {(r, c) for r in range(6) for c in range(6) if r % 3 == 0 or c % 3 == 0 or r == c}
    assert _positions(index) == full - {(5, 3), (5, 0)}


def test_struct_mask_completes_and_keeps_diagonal() -> None:
    index = struct_mask((4, 5), 3)  # fewer than the 4 diagonal entries: the first 3 diagonal ones
    assert _positions(index) == {(0, 0), (1, 1), (2, 2)}
    index = struct_mask((3, 7), 20)  # f = 1 gives all 21; f = 2 gives 2 rows*7 + 4 cols*3 - 2*4 + diag: count exact
    assert index.nnz == 20


def test_wm_grad_snip_select_by_hand() -> None:
    w = torch.tensor([[1.0, -5.0, 2.0], [0.5, 3.0, -4.0]])
    stats = torch.tensor([[9.0, 0.0, 4.0], [16.0, 1.0, 0.25]])  # mean g^2: RMS = 3, 0, 2 / 4, 1, 0.5
    assert _positions(build_mask("wm", w, 3)) == {(0, 1), (1, 2), (1, 1)}  # |W| = 5, 4, 3
    assert _positions(build_mask("grad", w, 2, stats=stats)) == {(1, 0), (0, 0)}  # RMS 4, 3
    # SNIP |W| * RMS: 3, 0, 4 / 2, 3, 2 -> top 2: (0,2)=4, then the tie 3 at (0,0) and (1,1): lower flat index
    assert _positions(build_mask("snip", w, 2, stats=stats)) == {(0, 2), (0, 0)}


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize(("shape", "density"), [((7, 13), 0.1), ((31, 17), 0.013), ((5, 3), 0.5)])
def test_every_mask_has_the_exact_budget(kind: str, shape: tuple[int, int], density: float) -> None:
    g = torch.Generator().manual_seed(0)
    w, stats = torch.randn(shape, generator=g), torch.rand(shape, generator=g)
    nnz = layer_nnz(shape[0], shape[1], density)
    assert nnz == max(1, round(density * shape[0] * shape[1]))
    index = build_mask(kind, w, nnz, stats=stats, seed=3, name="layer")
    assert index.nnz == nnz and len(_positions(index)) == nnz


def test_random_mask_is_seeded_per_layer() -> None:
    w = torch.zeros(20, 30)
    a, b = build_mask("random", w, 40, seed=1, name="x"), build_mask("random", w, 40, seed=1, name="x")
    assert torch.equal(a.row, b.row) and torch.equal(a.col, b.col)
    assert _positions(a) != _positions(build_mask("random", w, 40, seed=1, name="y"))


def test_callable_mask_bool_or_index_and_exact_count() -> None:
    w = torch.arange(12.0).reshape(3, 4)
    top_row = lambda weight, stats: weight >= 8  # noqa: E731  (bool mask: row 2)
    assert _positions(build_mask(top_row, w, 4)) == {(2, c) for c in range(4)}
    with pytest.raises(ValueError, match=r"returned 4 positions .* budget is exactly 5"):
        build_mask(top_row, w, 5)
    with pytest.raises(TypeError, match="must return a SparseIndex or a bool"):
        build_mask(lambda weight, stats: [1, 2], w, 2)


def test_pad_index_appends_first_free_positions() -> None:
    index = SparseIndex.from_flat(torch.tensor([0, 2]), (2, 3))
    assert pad_index(index, 4).tolist() == [[0, 0, 0, 1], [0, 2, 1, 0]]


# ---------------------------------------------------------------------------- training path
def test_forward_and_value_gradient_match_the_dense_reference() -> None:
    torch.manual_seed(0)
    net = PlainNet()
    lp.SHiRA(density=0.1, mask="wm").inject(net)
    layer = net.blocks[0]
    assert isinstance(layer, ShiraLinear)
    with torch.no_grad():
        layer.shira_weight["default"].normal_()
    x = torch.randn(5, 24)
    y = layer(x)
    y.square().sum().backward()
    values = layer.shira_weight["default"].detach().clone().requires_grad_(True)
    base = layer.get_base_layer()
    ref = sparse_delta_linear_reference(x, base.weight, values, layer.mask_index("default"), base.bias)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(layer.shira_weight["default"].grad, values.grad)
    assert base.weight.grad is None, "a dense weight gradient was formed"


def test_fit_trains_only_the_values_and_never_touches_w(tmp_path: Path) -> None:
    module = WrappedPlainLM(seed=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _trainer(tmp_path, [lp.SHiRA(density=0.05, mask="snip", calibration_batches=2)]).fit(module, token_loader())
    opt = module.trainer.optimizers[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(p.numel() for p in params) == sorted([round(0.05 * 24 * 48)] * 2)
    assert all(p.requires_grad for p in params)
    for n, p in module.named_parameters():
        key = n.replace(".base_layer.", ".")
        if "shira_" not in n:
            assert torch.equal(p, before[key]), n
            assert p.grad is None, n


def test_grad_calibration_matches_an_independent_dense_gradient() -> None:
    """The grad/snip masks are the top-k of the mean squared dense gradient, computed here without SHiRA."""
    batches = [b for b, _ in zip(token_loader(n=32, batch_size=8), range(3))]
    ref = WrappedPlainLM(seed=0)
    sums = {k: torch.zeros_like(ref.net.blocks[k].weight) for k in (0, 2)}
    for b in batches:
        ref.zero_grad()
        ref(b[0]).backward()  # the same loss as training_step, without Lightning
        for k in sums:
            sums[k] += ref.net.blocks[k].weight.grad.square()
    for kind in ("grad", "snip"):
        module = WrappedPlainLM(seed=0)
        cb = lp.SHiRA(density=0.05, mask=kind, calibration_batches=3)
        cb.inject(module)
        cb.calibrate(module, batches)
        for k in (0, 2):
            w = module.net.blocks[k].get_base_layer().weight
            score = (sums[k] / 3).sqrt() * (w.abs() if kind == "snip" else 1)
            nnz = round(0.05 * w.numel())
            flat = torch.sort(score.reshape(-1), descending=True, stable=True).indices[:nnz]
            got = module.net.blocks[k].mask_index("default").flat()
            assert torch.equal(got, flat.sort().values), (kind, k)
            assert not w.requires_grad and w.grad is None


class _RecordingLM(WrappedPlainLM):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].clone())
        return super().training_step(batch, batch_idx)


def test_calibration_reads_the_first_batches_and_leaves_the_loader_as_it_was(tmp_path: Path) -> None:
    module = _RecordingLM()
    _trainer(tmp_path, [lp.SHiRA(density=0.05, calibration_batches=2)], max_steps=2).fit(module, token_loader())
    first, second = (b[0] for b, _ in zip(token_loader(), range(2)))
    # calibration: batches 1 and 2; then training starts from batch 1 again (loader state restored)
    assert len(module.seen) == 4
    assert [torch.equal(a, b) for a, b in zip(module.seen, [first, second, first, second])] == [True] * 4


def test_calibration_batches_leave_the_global_rng_alone() -> None:
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from lightning_peft.methods.shira import _calibration_batches

    loader = DataLoader(list(range(20)), batch_size=4, shuffle=True)  # draws its seed from the global RNG
    before = torch.get_rng_state()
    batches = _calibration_batches(SimpleNamespace(train_dataloader=loader), 3)
    assert len(batches) == 3 and torch.equal(torch.get_rng_state(), before)


def test_merge_then_unmerge_is_bit_exact() -> None:
    torch.manual_seed(0)
    net = PlainNet()
    lp.SHiRA(density=0.1, mask="random").inject(net)
    layer = net.blocks[0]
    with torch.no_grad():
        layer.shira_weight["default"].normal_()
    x = torch.randn(4, 24)
    w0 = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)
        layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight.view(torch.int32), w0.view(torch.int32))


def test_conv1d_targets_fail_with_a_clear_error() -> None:
    from transformers.pytorch_utils import Conv1D

    net = torch.nn.Sequential(Conv1D(8, 4))
    with pytest.raises(ValueError, match=r"nn\.Linear layers only.*Conv1D.*use LoRA"):
        lp.SHiRA(mask="wm", target_modules=["0"]).inject(net)


# ---------------------------------------------------------------------------- peft round trips
@pytest.mark.parametrize("kind", MASKS)
def test_saved_folder_loads_in_peft_builtin_shira_with_identical_outputs(kind: str, tmp_path: Path, monkeypatch) -> None:
    module = WrappedPlainLM(seed=0)
    _trainer(tmp_path, [lp.SHiRA(density=0.03, mask=kind, calibration_batches=2)]).fit(module, token_loader())
    folder = lp.save_adapter(module, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["mask_type"] == kind
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    w = tensors["base_model.model.blocks.0.shira_weight"]
    assert w.shape == (config["r"] * (24 + 48),)  # peft's r * (in + out), zero-padded beyond the mask
    assert int((w != 0).sum()) <= round(0.03 * 24 * 48) < w.numel()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    assert peft_shira_model.Linear is PEFT_SHIRA_LINEAR, "training SHiRA must not replace peft's layer for everyone"
    with torch.no_grad():
        theirs_model = PeftModel.from_pretrained(WrappedPlainLM(seed=0).net, folder)
        assert type(theirs_model.base_model.model.blocks[0]) is PEFT_SHIRA_LINEAR
        theirs = theirs_model(ids)
        ours = module.net(ids)
    assert not torch.allclose(ours, WrappedPlainLM(seed=0).net(ids)), "training changed nothing"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_peft_made_adapter_loads_into_our_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ShiraConfig(r=2, target_modules=["blocks.0", "blocks.2"], random_seed=7, init_weights=False)
    peft_model = get_peft_model(PlainNet(), config)  # peft's own layers, random (nonzero) values
    assert type(peft_model.base_model.model.blocks[0]) is PEFT_SHIRA_LINEAR
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = peft_model(ids)
    torch.manual_seed(0)
    net = lp.load_adapter(PlainNet(), tmp_path / "peft")
    layer = net.blocks[0]
    assert type(layer) is ShiraLinear and layer.shira_nnz["default"] == 2 * (24 + 48)
    with torch.no_grad():
        ours = net(ids)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_load_then_save_round_trips_our_folder(tmp_path: Path) -> None:
    module = WrappedPlainLM(seed=0)
    _trainer(tmp_path, [lp.SHiRA(density=0.03, mask="wm")]).fit(module, token_loader())
    first = lp.save_adapter(module, tmp_path / "a")
    second = lp.save_adapter(lp.load_adapter(WrappedPlainLM(seed=0), first), tmp_path / "b")
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(second / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- fusion metrics
def test_awom_awor_hand_checked() -> None:
    a1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # one entry at (0, 0)
    a2 = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # shares row 0: A1^T A2 = [[0, 2], [0, 0]]
    assert awom(a1, a2) == pytest.approx(2.0) and awor(a1, a2) == pytest.approx(0.75)
    a3 = torch.tensor([[0.0, 0.0], [3.0, 0.0]])  # disjoint rows: exactly orthogonal
    assert awom(a1, a3) == 0.0 and awor(a1, a3) == 1.0
    lora = torch.ones(2, 1) @ torch.ones(1, 2)  # dense rank-1: every entry of the product nonzero
    assert awor(lora, lora) == 0.0 and awom(lora, lora) == pytest.approx(4.0)  # [[2,2],[2,2]] -> sqrt(16)
    r = orthogonality({"x": a1, "y": a1}, {"x": a2, "y": a3})
    assert r == {"awom": pytest.approx(1.0), "awor": pytest.approx(0.875), "layers": 2.0}


def test_mask_overlap_hand_checked() -> None:
    i1 = SparseIndex.from_flat(torch.tensor([0, 1, 5]), (2, 3))
    i2 = SparseIndex.from_flat(torch.tensor([1, 4]), (2, 3))
    assert mask_overlap(i1, i2) == 0.5  # one shared position of the smaller mask's two
    with pytest.raises(ValueError, match="masks of one layer"):
        mask_overlap(i1, SparseIndex.from_flat(torch.tensor([1]), (3, 2)))
    with pytest.raises(ValueError, match="two .out, in. tensors of equal shape"):
        awom(torch.zeros(2, 2), torch.zeros(2, 3))


def test_forward_equals_merged_weight_for_stacked_shira_adapters() -> None:
    torch.manual_seed(0)
    net = PlainNet()
    lp.SHiRA(density=0.2, mask="random", seed=0).inject(net)
    lp.SHiRA(density=0.2, mask="random", seed=1, adapter_name="two").inject(net)
    layer = net.blocks[0]
    assert sorted(layer.active_adapters) == ["default", "two"]
    with torch.no_grad():
        for p in layer.shira_weight.values():
            p.normal_()
    x = torch.randn(3, 24)
    base = layer.get_base_layer()
    dense = base.weight + layer.get_delta_weight("default") + layer.get_delta_weight("two")
    torch.testing.assert_close(layer(x), F.linear(x, dense, base.bias))


# ---------------------------------------------------------------------------- learning rate
class _SGDPlainLM(WrappedPlainLM):
    """Plain SGD under a halving LambdaLR: one step moves a value by exactly -lr_now * grad."""

    def configure_optimizers(self):
        opt = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lr_ratio_scales_the_values_step_and_keeps_the_schedule(tmp_path: Path) -> None:
    moved = {}
    for ratio in (1.0, 2.5):
        module = _SGDPlainLM(seed=0)
        callback = lp.SHiRA(density=0.05, mask="random", lr_ratio=ratio)
        _trainer(tmp_path, [callback], max_steps=1).fit(module, token_loader())
        opt, sched = module.trainer.optimizers[0], module.trainer.lr_scheduler_configs[0].scheduler
        values = [g for g in opt.param_groups if any(p.ndim == 1 for p in g["params"])]
        assert len(values) == 1 and values[0]["initial_lr"] == pytest.approx(0.1 * ratio)
        assert values[0]["lr"] == pytest.approx(0.1 * ratio * 0.5)  # the user's schedule (x0.5 after a step) applies
        assert sched.base_lrs == [g.get("initial_lr") for g in opt.param_groups]
        moved[ratio] = torch.cat([p.detach() for p in values[0]["params"]])
    # one SGD step from zero values moves each by -lr * ratio * grad, with the same grads for both ratios
    assert moved[1.0].abs().sum() > 0
    torch.testing.assert_close(moved[2.5], 2.5 * moved[1.0])
