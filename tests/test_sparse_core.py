"""The sparse-delta core (``lightning_peft.methods._sparse``) through the layers users train: RoSA's and SHiRA's.

Dense oracle: ``F.linear(x, W + S_dense)`` (plus RoSA's LoRA branch) with plain autograd, the sparse
gradient read at the mask. Shapes are primes (out=37, in=53, T=29). Both dispatch paths (SDDMM, and
dense GEMM + gather above the measured crossover density) are checked, and the masks' exact counts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lightning_peft as lp
from lightning_peft.methods import _sparse
from lightning_peft.methods._sparse import DENSE_FALLBACK_DENSITY, random_mask, topk_mask

OUT, IN, T = 37, 53, 29  # primes


def _layer(method: str, density: float):
    """(the adapted Sequential, its one sparse layer) with a random mask and random values (and LoRA factors)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, OUT))
    cb = lp.RoSA(r=3, density=density, alpha=8.0, target_modules=["0"]) if method == "rosa" else lp.SHiRA(
        density=density, mask="random", target_modules=["0"])
    cb.inject(net)
    layer = net[0]
    layer.set_mask("default", random_mask((OUT, IN), density, torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net, layer


def _reference(layer, method: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain autograd on a dense merge: output and the gradients of x, the sparse values (and A, B)."""
    index = layer.sparse_index("default")
    values = layer.sparse_values("default").detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    w = layer.get_base_layer().weight
    merged = w.index_put((index.row.long(), index.col.long()), values, accumulate=True)
    leaves = {"x": x, "values": values}
    y = F.linear(x, merged, layer.get_base_layer().bias)
    if method == "rosa":
        A = layer.rosa_A["default"].detach().clone().requires_grad_()
        B = layer.rosa_B["default"].detach().clone().requires_grad_()
        y = y + F.linear(F.linear(x, A), B) * layer.scaling["default"]
        leaves |= {"A": A, "B": B}
    y.square().sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _grads(layer, method: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    values = layer.rosa_values["default"] if method == "rosa" else layer.shira_weight["default"]
    out = {"x": x.grad, "values": values.grad}
    if method == "rosa":
        out |= {"A": layer.rosa_A["default"].grad, "B": layer.rosa_B["default"].grad}
    return out


@pytest.mark.parametrize("method", ["rosa", "shira"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5])  # 0.2, 0.5: above the CPU crossover -> dense GEMM + gather
@pytest.mark.parametrize("force", [None, "sparse", "dense"])
def test_layers_match_dense_autograd_on_both_paths(method: str, density: float, force: str | None, monkeypatch) -> None:
    if force is not None:
        monkeypatch.setitem(DENSE_FALLBACK_DENSITY, "cpu", 2.0 if force == "sparse" else 0.0)
    net, layer = _layer(method, density)
    w_before = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(2, T, IN, generator=torch.Generator().manual_seed(3)).requires_grad_()
    y = net(x)
    y.square().sum().backward()
    ref_y, ref_grads = _reference(layer, method, x)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    for name, grad in _grads(layer, method, x).items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-5, msg=name)
    assert torch.equal(layer.get_base_layer().weight, w_before), "W not restored bit-exactly"
    assert layer.get_base_layer().weight.grad is None


@pytest.mark.parametrize("method", ["rosa", "shira"])
def test_the_dense_fallback_is_chosen_by_the_measured_density_threshold(method: str) -> None:
    assert DENSE_FALLBACK_DENSITY == {"cpu": 0.1, "cuda": 0.03}  # the measured CPU crossover; GPU not measured yet
    for density, dense in ((0.05, False), (0.12, True)):
        _, layer = _layer(method, density)
        index, values = layer.sparse_operands(["default"])
        assert layer.uses_dense_fallback(index, values) is dense
        with torch.no_grad():
            assert not layer.uses_dense_fallback(index, values)  # no dS needed: in-place merge + GEMM
    layer.get_base_layer().weight.requires_grad_(True)  # a user unfroze W: autograd's dense path gives it a grad
    assert layer.uses_dense_fallback(*layer.sparse_operands(["default"]))


def test_one_density_rule_and_one_nnz_formula() -> None:
    for who, make in (("RoSA", lambda: lp.RoSA(density=0.0)), ("SHiRA", lambda: lp.SHiRA(density=1.5)),
                      ("topk_mask", lambda: topk_mask(torch.rand(3, 4), 0.0))):
        with pytest.raises(ValueError, match=rf"{who}: density must be a float in \(0, 1\]"):
            make()
    from lightning_peft.methods.shira.mask import layer_nnz

    for density in (0.001, 0.013, 0.5):
        net, layer = _layer("rosa", density)
        assert layer.rosa_values["default"].numel() == layer_nnz(OUT, IN, density) == _sparse.nnz_for(density, OUT * IN)


def test_topk_mask_hand_checked_3x4_ties_by_index() -> None:
    scores = torch.tensor(
        [[0.1, 0.9, 0.5, 0.5],
         [0.5, 0.0, 0.8, 0.2],
         [0.9, 0.3, 0.5, 0.7]]
    )
    # density 0.5 -> k = 6: 0.9 @ (0,1) flat 1, 0.9 @ (2,0) flat 8, 0.8 @ (1,2) flat 6,
    # 0.7 @ (2,3) flat 11, then the 0.5 ties at flat 2, 3, 4, 10 -> lowest two: 2, 3
    idx = topk_mask(scores, 0.5)
    assert idx.nnz == 6
    assert idx.flat().tolist() == [1, 2, 3, 6, 8, 11]
    # density 1/12 -> k = 1: the tie between flats 1 and 8 goes to 1
    assert topk_mask(scores, 1 / 12).flat().tolist() == [1]
    assert topk_mask(scores, 1.0).nnz == 12


@pytest.mark.parametrize("density", [0.001, 0.01, 0.02, 0.05, 0.5, 1.0])
def test_masks_have_exact_nnz(density: float) -> None:
    k = max(1, round(density * OUT * IN))
    assert topk_mask(torch.randn(OUT, IN), density).nnz == k
    assert random_mask((OUT, IN), density, torch.Generator().manual_seed(0)).nnz == k


def test_random_mask_deterministic_in_generator() -> None:
    a = random_mask((OUT, IN), 0.05, torch.Generator().manual_seed(3))
    b = random_mask((OUT, IN), 0.05, torch.Generator().manual_seed(3))
    c = random_mask((OUT, IN), 0.05, torch.Generator().manual_seed(4))
    assert torch.equal(a.row, b.row) and torch.equal(a.col, b.col)
    assert not torch.equal(a.flat(), c.flat())
    assert bool((a.flat()[1:] > a.flat()[:-1]).all())  # sorted, unique


@pytest.mark.parametrize(("shape", "density", "code"), [((64, 64), 0.005, "flat"), ((64, 64), 0.05, "csr"),
                                                         ((512, 300), 0.01, "csr"), ((40000, 10), 0.1, "flat")])
def test_compact_index_round_trips_and_picks_the_smaller_code(shape, density, code) -> None:
    from lightning_peft.methods._sparse.storage import decode_index, encode_index

    index = random_mask(shape, density, torch.Generator().manual_seed(0))
    encoded = encode_index(index.row, index.col, shape)
    row, col = decode_index(encoded, shape)
    assert torch.equal(row, index.row.int()) and torch.equal(col, index.col.int())
    stored = sum(t.numel() * t.element_size() for t in encoded.values())
    csr, flat = 4 * (shape[0] + 1) + 2 * index.nnz, 4 * index.nnz  # bytes of each code, by hand
    assert (code == "csr") == ("csr_offsets" in encoded) and stored == min(csr, flat) < 8 * index.nnz
    unbuilt = encode_index(torch.full((5,), -1), torch.full((5,), -1), shape)  # RoSA before its mask exists
    assert [t.tolist() for t in decode_index(unbuilt, shape)] == [[-1] * 5, [-1] * 5]
