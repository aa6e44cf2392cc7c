"""SparseDelta (RoSA/SHiRA core): forward, gradients, masks, merge, state_dict, errors.

Dense oracle: ``F.linear(x, W + S_dense)`` where ``S_dense`` is an ``(out, in)`` leaf whose
gradient is read at the mask only. Shapes are primes (out=37, in=53, T=29); densities 0, one
nonzero, 1% and 100%. Both dispatch paths (sparse SDDMM and dense GEMM + gather) are checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning_peft.kernels import SparseIndex

from lightning_peft.sparse_delta import (
    DENSE_FALLBACK_DENSITY,
    MaskBuilder,
    RandomMaskBuilder,
    SparseDelta,
    TopKMaskBuilder,
    random_mask,
    topk_mask,
)

OUT, IN, T = 37, 53, 29  # primes
DENSITIES = ["zero", "one", 0.01, 1.0]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}  # fp32: summation order only


def _index(density: float | str, seed: int = 0) -> SparseIndex:
    if density == "zero":
        return SparseIndex.from_mask(torch.zeros(OUT, IN, dtype=torch.bool))
    if density == "one":
        mask = torch.zeros(OUT, IN, dtype=torch.bool)
        mask[OUT // 2, IN // 3] = True
        return SparseIndex.from_mask(mask)
    return random_mask((OUT, IN), float(density), torch.Generator().manual_seed(seed))


def _layer(r: int = 0, seed: int = 0, bias: bool = True, **kw) -> SparseDelta:
    torch.manual_seed(seed)
    return SparseDelta(nn.Linear(IN, OUT, bias=bias), r=r, alpha=8.0, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32) if t.dtype == torch.float32 else t.detach().view(torch.int16)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("r", [0, 3])
@pytest.mark.parametrize("dense_fallback", [False, True])
def test_forward_and_grads_match_dense_reference(density: float | str, r: int, dense_fallback: bool) -> None:
    layer = _layer(r=r, dense_fallback_density=0.0 if dense_fallback else 2.0)
    index = _index(density)
    layer.set_mask(index)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.values.copy_(torch.randn(index.nnz, generator=g))
        if r:
            layer.lora_B.copy_(torch.randn(OUT, r, generator=g))  # B=0 at init would hide dA
    w_bits = _bits(layer.base_layer.weight).clone()
    x = torch.randn(2, T, IN, generator=g)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    assert layer.uses_dense_fallback() == (dense_fallback and index.nnz > 0)

    y = layer(x)
    # dense oracle: only the masked entries of S matter; W is a constant
    s_dense = layer.delta_weight().requires_grad_(True)
    w = layer.base_layer.weight.detach()
    y_ref = F.linear(x_ref, w + s_dense, layer.base_layer.bias.detach())
    if r:
        a = layer.lora_A.detach().clone().requires_grad_(True)
        b = layer.lora_B.detach().clone().requires_grad_(True)
        y_ref = y_ref + F.linear(F.linear(x_ref, a), b) * layer.scaling
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])

    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    y_ref.backward(dy)
    rc = (index.row.long(), index.col.long())
    torch.testing.assert_close(layer.values.grad, s_dense.grad[rc], **TOL[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float32])
    if r:
        torch.testing.assert_close(layer.lora_A.grad, a.grad, **TOL[torch.float32])
        torch.testing.assert_close(layer.lora_B.grad, b.grad, **TOL[torch.float32])
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert torch.equal(_bits(layer.base_layer.weight), w_bits)


def test_training_steps_leave_base_weight_bit_identical_and_update_values() -> None:
    layer = _layer(r=2)
    layer.set_mask(_index(0.01))
    w_bits = _bits(layer.base_layer.weight).clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(layer.values), id(layer.lora_A), id(layer.lora_B)}
    for step in range(3):
        x = torch.randn(T, IN, generator=torch.Generator().manual_seed(step))
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert layer.values.abs().sum() > 0
    assert torch.equal(_bits(layer.base_layer.weight), w_bits)


def test_bf16_base_fp32_values_forward_close() -> None:
    layer = _layer()
    layer.base_layer.to(torch.bfloat16)
    layer.set_mask(_index(0.01))
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(T, IN)
    y = layer(x)
    merged = (layer.base_layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    ref = F.linear(x.to(torch.bfloat16), merged, layer.base_layer.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=3e-2, rtol=2e-2)  # bf16: 8 mantissa bits, one GEMM


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


def test_mask_builders_follow_protocol() -> None:
    w = torch.randn(OUT, IN)
    for builder in (TopKMaskBuilder(0.02), TopKMaskBuilder(0.02, "weight_magnitude"), RandomMaskBuilder(0.02)):
        assert isinstance(builder, MaskBuilder)
        idx = builder(w, torch.rand(OUT, IN))
        assert idx.nnz == round(0.02 * OUT * IN) and idx.shape == (OUT, IN)
    assert torch.equal(TopKMaskBuilder(0.02, "weight_magnitude")(w, None).flat(), topk_mask(w.abs(), 0.02).flat())
    with pytest.raises(ValueError, match="needs per-layer stats"):
        TopKMaskBuilder(0.02)(w, None)


@pytest.mark.parametrize("r", [0, 2])
def test_merge_unmerge_bit_exact_over_many_repeats(r: int) -> None:
    layer = _layer(r=r)
    layer.set_mask(_index(0.05))
    with torch.no_grad():
        layer.values.normal_()
        if r:
            layer.lora_B.normal_()
    w0 = _bits(layer.base_layer.weight).clone()
    x = torch.randn(T, IN)
    with torch.no_grad():
        y_unmerged = layer(x)
    for _ in range(50):
        layer.merge()
        assert layer.merged
        with torch.no_grad():
            torch.testing.assert_close(layer(x), y_unmerged, **TOL[torch.float32])
        layer.unmerge()
        assert torch.equal(_bits(layer.base_layer.weight), w0)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="unmerge\\(\\) first"):
        layer.set_mask(_index(0.01))
    with pytest.raises(ValueError, match="twice"):
        layer.merge()
    layer.unmerge()


def test_state_dict_round_trip_into_fresh_module() -> None:
    src = _layer(r=2, seed=0)
    src.set_mask(_index(0.02, seed=5))
    with torch.no_grad():
        src.values.normal_()
        src.lora_B.normal_()
    sd = src.state_dict()
    assert sd["row"].dtype == torch.int32 and sd["col"].dtype == torch.int32
    assert {"values", "row", "col", "lora_A", "lora_B", "base_layer.weight"} <= set(sd)
    dst = _layer(r=2, seed=1)  # empty mask, different init
    dst.load_state_dict(sd)
    assert torch.equal(dst.values, src.values) and torch.equal(dst.row, src.row) and torch.equal(dst.col, src.col)
    assert dst.values.requires_grad
    x = torch.randn(T, IN)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    # adapter-only (strict=False, base from the fresh module) also works
    base = {k for k in sd if k.startswith("base_layer.")}
    dst2 = _layer(r=2, seed=0)
    dst2.load_state_dict({k: v for k, v in sd.items() if k not in base}, strict=False)
    torch.testing.assert_close(dst2(x), src(x), atol=0, rtol=0)


def test_errors_name_value_and_fix() -> None:
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"density must be a float in \(0, 1\].*e\.g\. pass 0\.01"):
            topk_mask(torch.randn(3, 4), bad)
        with pytest.raises(ValueError, match=repr(bad) if bad == bad else "nan"):
            random_mask((3, 4), bad)
    with pytest.raises(ValueError, match="2-D float score"):
        topk_mask(torch.randn(12), 0.5)
    with pytest.raises(ValueError, match="NaN scores"):
        topk_mask(torch.tensor([[float("nan"), 1.0]]), 0.5)
    layer = _layer()
    with pytest.raises(ValueError, match=r"\(5, 7\).*rebuild the index"):
        layer.set_mask(random_mask((5, 7), 0.5))
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        SparseDelta(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        SparseDelta(nn.Linear(3, 3), r=-1)
    layer.set_mask(_index(0.01))
    with pytest.raises(ValueError, match=f"x \\(\\.\\.\\., {IN}\\)"):
        layer(torch.randn(T, IN + 1))


def test_dense_fallback_threshold_default_and_inference_uses_sparse_path() -> None:
    assert DENSE_FALLBACK_DENSITY == {"cpu": 0.1, "cuda": 0.03}  # the measured CPU crossover, methods.md on GPU
    layer = _layer()
    layer.set_mask(_index(0.12))
    assert layer.uses_dense_fallback()
    layer.set_mask(_index(0.05))
    assert not layer.uses_dense_fallback()  # CPU threshold 0.1
    layer.dense_fallback_density = 0.03  # a fixed threshold overrides the per-device default
    assert layer.uses_dense_fallback()
    with torch.no_grad():
        assert not layer.uses_dense_fallback()  # no dS needed: in-place merge + GEMM is cheaper
    layer.set_mask(_index(0.01))
    assert not layer.uses_dense_fallback()
