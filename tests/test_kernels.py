"""Sparse kernels: every op against its PyTorch reference and against a dense computation.

Shapes are not powers of two (primes: out=37, in=53, T=29, plus leading dims); densities 0, a
single nonzero, 1% and 100%; fp32 and bf16 (fp16 for SDDMM) with tolerances next to the dtype.
The Triton kernels run in Triton's CPU interpreter (``@pytest.mark.triton``).

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported (``@triton.jit`` reads it
when the decorator runs, and Triton's own ``tl.zeros``/``tl.sum`` are decorated at
``import triton``): tests/conftest.py sets it at its top on machines without CUDA. If triton
was set up for the GPU, the Triton tests skip and say so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches_oracle_under_autocast
from lightning_peft.kernels import (
    SparseIndex,
    scatter_add,
    scatter_add_reference,
    scatter_restore,
    scatter_set,
    sddmm,
    sddmm_reference,
    sddmm_sampled_addmm,
    sparse_delta_linear,
    sparse_delta_linear_reference,
)
from lightning_peft.kernels._utils import interpreter_ready
from lightning_peft.kernels.scatter import _scatter_kernel
from lightning_peft.kernels.sddmm import _sddmm_kernel
from lightning_peft.kernels.tile_linear import _tile_sddmm_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_RUN_TRITON = DEVICE == "cuda" or (interpreter_ready(_sddmm_kernel) and interpreter_ready(_scatter_kernel))
requires_triton = pytest.mark.skipif(
    not CAN_RUN_TRITON,
    reason="triton was imported before TRITON_INTERPRET=1 was set; set it at the top of tests/conftest.py",
)
triton_only = [pytest.mark.triton, requires_triton]

# Tolerances per dtype (atol, rtol). fp32: summation order only. bf16: 8 mantissa bits, one
# rounding of a sum of T=29 products (and of the dense reference's bf16 GEMM). fp16: 11 bits.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

OUT, IN, T = 37, 53, 29  # primes
DENSITIES = ["zero", "one", 0.01, 1.0]


def _index(density: float | str, out: int = OUT, inp: int = IN, seed: int = 0) -> SparseIndex:
    g = torch.Generator().manual_seed(seed)
    if density == "zero":
        mask = torch.zeros(out, inp, dtype=torch.bool)
    elif density == "one":
        mask = torch.zeros(out, inp, dtype=torch.bool)
        mask[out // 2, inp // 3] = True
    else:
        # exactly round(d * numel) nonzeros, like RoSA's per-layer top-k (at least one)
        k = max(1, round(float(density) * out * inp))
        flat = torch.randperm(out * inp, generator=g)[:k]
        return SparseIndex.from_flat(flat, (out, inp)).to(DEVICE)
    return SparseIndex.from_mask(mask).to(DEVICE)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ------------------------------------------------------------------------------ index format
def test_index_from_mask_and_flat_agree_sorted_row_major() -> None:
    mask = torch.rand(OUT, IN, generator=torch.Generator().manual_seed(1)) < 0.1
    a = SparseIndex.from_mask(mask)
    flat = mask.flatten().nonzero().flatten()
    b = SparseIndex.from_flat(flat[torch.randperm(flat.numel())], (OUT, IN))  # any order in
    assert a.row.dtype == a.col.dtype == torch.int32
    assert torch.equal(a.row, b.row) and torch.equal(a.col, b.col)
    assert torch.equal(a.flat(), flat) and bool((a.flat()[1:] > a.flat()[:-1]).all())
    assert torch.equal(a.to_mask(), mask)
    crow = a.crow()
    assert crow.shape == (OUT + 1,) and int(crow[-1]) == a.nnz
    assert torch.equal(crow[1:] - crow[:-1], mask.sum(1))


def test_offsets_address_the_entries_for_either_layout_and_are_computed_once() -> None:
    w = torch.randn(7, 5)
    index = SparseIndex.from_flat(torch.tensor([0, 3, 9, 34]), (7, 5))
    for weight in (w, w.t().contiguous().t()):  # row-major W and a transposed-contiguous W (fan_in_fan_out)
        off = index.offsets(weight.stride(0), weight.stride(1))
        flat = weight.as_strided((weight.numel(),), (1,))
        assert torch.equal(flat[off], weight[index.row.long(), index.col.long()])
        assert index.offsets(*weight.stride()) is off  # cached: switching reuses them
    assert index.nbytes == 4 * 4 + 4 * 4 + 2 * 4 * 8  # int32 row and col, two cached int64 offset arrays


def test_index_empty_and_errors() -> None:
    empty = SparseIndex.from_mask(torch.zeros(OUT, IN, dtype=torch.bool))
    assert empty.nnz == 0 and empty.crow().tolist() == [0] * (OUT + 1)
    assert SparseIndex.from_flat(torch.empty(0, dtype=torch.long), (OUT, IN)).nnz == 0
    with pytest.raises(ValueError, match="duplicates"):
        SparseIndex.from_flat(torch.tensor([3, 3]), (OUT, IN))
    with pytest.raises(ValueError, match="must lie in"):
        SparseIndex.from_flat(torch.tensor([OUT * IN]), (OUT, IN))
    with pytest.raises(ValueError, match="bool mask"):
        SparseIndex.from_mask(torch.zeros(OUT, IN))
    with pytest.raises(ValueError, match="int32"):
        SparseIndex(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), (OUT, IN))


# ------------------------------------------------------------------------------ SDDMM
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_reference_equals_dense_gradient_at_mask(density: float | str, dtype: torch.dtype) -> None:
    index = _index(density)
    g, x = _randn(3, T, OUT, dtype=dtype, seed=1), _randn(3, T, IN, dtype=dtype, seed=2)  # T = 87
    got = sddmm_reference(g, x, index)
    dense = g.reshape(-1, OUT).double().T @ x.reshape(-1, IN).double()  # (out, in), test only
    want = dense[index.row.long(), index.col.long()].float()
    assert got.shape == (index.nnz,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)  # fp32 accumulation either way


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, None])
@pytest.mark.triton
@requires_triton
def test_sddmm_triton_matches_reference(
    density: float | str, dtype: torch.dtype, out_dtype: torch.dtype | None
) -> None:
    out_dtype = out_dtype or dtype
    index = _index(density, seed=3)
    g, x = _randn(T, OUT, dtype=dtype, seed=4), _randn(T, IN, dtype=dtype, seed=5)
    want = sddmm_reference(g, x, index, out_dtype)
    got = sddmm(g, x, index, out_dtype, use_triton=True)
    assert got.dtype == out_dtype and got.shape == (index.nnz,)
    atol, rtol = TOL[out_dtype]
    torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sddmm_sampled_addmm_matches_reference(density: float | str, dtype: torch.dtype) -> None:
    """The CPU path (torch.sparse.sampled_addmm on a CSR view) against the gather reference."""
    index = _index(density, seed=9)
    g, x = _randn(2, T, OUT, dtype=dtype, seed=10), _randn(2, T, IN, dtype=dtype, seed=11)  # leading dims
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = sddmm_sampled_addmm(g, x, index, out_dtype)
    assert got.shape == (index.nnz,) and got.dtype == out_dtype
    torch.testing.assert_close(got, sddmm_reference(g, x, index, out_dtype), atol=1e-5, rtol=1e-5)
    assert torch.equal(sddmm(g, x, index, out_dtype, use_triton=False), got)  # it is the non-Triton dispatch
    empty = sddmm_sampled_addmm(g[:, :0], x[:, :0], index)  # T = 0 tokens: zero gradient
    assert torch.equal(empty, torch.zeros(index.nnz))


def test_sddmm_noncontiguous_and_shape_errors() -> None:
    index = _index(0.2, seed=6)
    g = _randn(OUT, T, seed=7).T  # (T, out), non-contiguous
    x = _randn(IN, T, seed=8).T
    torch.testing.assert_close(sddmm(g, x, index), sddmm_reference(g.contiguous(), x.contiguous(), index))
    with pytest.raises(ValueError, match="equal leading dims"):
        sddmm(g, x[:-1], index)


# ------------------------------------------------------------------------------ scatter
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=triton_only)])
def test_scatter_set_add_restore_bit_exact(
    density: float | str, dtype: torch.dtype, use_triton: bool
) -> None:
    index = _index(density, seed=9)
    w0 = _randn(OUT, IN, dtype=dtype, seed=10)
    w = w0.clone()
    values = _randn(index.nnz, seed=11)  # fp32 values into a bf16 weight: one rounding
    rc = (index.row.long(), index.col.long())

    saved = scatter_set(w, index, values, use_triton=use_triton)
    assert torch.equal(_bits(saved), _bits(w0[rc]))
    assert torch.equal(w[rc], values.to(dtype))
    assert torch.equal(_bits(w[~index.to_mask()]), _bits(w0[~index.to_mask()]))  # untouched elsewhere
    scatter_restore(w, index, saved, use_triton=use_triton)
    assert torch.equal(_bits(w), _bits(w0))

    saved = scatter_add(w, index, values, -0.37, use_triton=use_triton)
    want = w0.clone()
    scatter_add_reference(want, index, values, -0.37)
    assert torch.equal(_bits(w), _bits(want))  # fp32 sum + RNE rounding, bit-identical to torch
    scatter_restore(w, index, saved, use_triton=use_triton)
    assert torch.equal(_bits(w), _bits(w0))


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=triton_only)])
def test_scatter_many_switches_restore_bit_exact_with_special_values(use_triton: bool) -> None:
    """SHiRA switching: set adapter A, restore, set B, ... 50 times; W ends bit-identical."""
    dtype = torch.bfloat16
    w0 = _randn(OUT, IN, dtype=dtype, seed=12)
    w0[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-40]).to(dtype)  # -0, NaN, inf, subnormal
    w = w0.clone()
    indices = [_index(0.05, seed=s) for s in range(3)] + [_index(1.0)]
    indices.append(SparseIndex.from_flat(torch.arange(4), (OUT, IN)).to(DEVICE))  # hits the specials
    for step in range(50):
        index = indices[step % len(indices)]
        values = _randn(index.nnz, dtype=dtype, seed=100 + step)
        if step % 2:
            saved = scatter_add(w, index, values, 0.5, use_triton=use_triton)
        else:
            saved = scatter_set(w, index, values, use_triton=use_triton)
        scatter_restore(w, index, saved, use_triton=use_triton)
        assert torch.equal(_bits(w), _bits(w0)), f"not restored at step {step}"


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=triton_only)])
@pytest.mark.parametrize("layout", ["transposed", "column_slice"])
def test_scatter_on_noncontiguous_weight(use_triton: bool, layout: str) -> None:
    index = _index(0.1, seed=13)
    if layout == "transposed":  # one dense block, strides (1, out): the flat CPU path
        base = _randn(IN, OUT, seed=14)
        w = base.T
    else:  # every other column of a wider matrix: not one block, the 2-D CPU path
        base = _randn(OUT, 2 * IN, seed=14)
        w = base[:, ::2]
    original = base.clone()
    values = _randn(index.nnz, seed=15)
    want = w.contiguous()
    scatter_add_reference(want, index, values, 2.0)
    saved = scatter_add(w, index, values, 2.0, use_triton=use_triton)
    assert torch.equal(w, want)
    if layout == "column_slice":
        assert torch.equal(base[:, 1::2], original[:, 1::2]), "wrote outside the view"
    scatter_restore(w, index, saved, use_triton=use_triton)
    assert torch.equal(_bits(base), _bits(original))


def test_scatter_errors() -> None:
    index = _index(0.1)
    w = _randn(OUT, IN)
    with pytest.raises(ValueError, match="rebuild the index"):
        scatter_set(_randn(OUT, IN + 1), index, _randn(index.nnz))
    with pytest.raises(ValueError, match="shape"):
        scatter_set(w, index, _randn(index.nnz + 1))
    with pytest.raises(ValueError, match="dtype"):
        scatter_restore(w, index, _randn(index.nnz, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------ sparse-delta linear
def _dense_oracle(x, weight, values, index, bias):  # type: ignore[no-untyped-def]
    """Plain autograd on W + scatter(S): dense delta, only ``values`` trainable."""
    delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    delta = delta.index_put((index.row.long(), index.col.long()), values.float())  # (out, in), differentiable
    merged = (weight.float() + delta).to(weight.dtype)  # one rounding, like the kernels
    return F.linear(x, merged, bias)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=triton_only)])
def test_sparse_delta_linear_forward_and_grads_match_dense(
    density: float | str, dtype: torch.dtype, use_triton: bool
) -> None:
    index = _index(density, seed=16)
    weight = _randn(OUT, IN, dtype=dtype, seed=17)
    w_bits = _bits(weight).clone()
    leaves = {
        "x": _randn(2, T, IN, dtype=dtype, seed=18),  # leading dims (2, 29) -> T = 58
        "values": _randn(index.nnz, seed=19) * 0.1,  # fp32 values on a (maybe bf16) base
        "bias": _randn(OUT, dtype=dtype, seed=20),
    }
    mine = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    grad_out = _randn(2, T, OUT, dtype=dtype, seed=21)

    y = sparse_delta_linear(mine["x"], weight, mine["values"], index, mine["bias"], use_triton=use_triton)
    y.backward(grad_out)
    y_ref = _dense_oracle(ref["x"], weight, ref["values"], index, ref["bias"])
    y_ref.backward(grad_out)

    assert torch.equal(_bits(weight), w_bits), "W not restored bit-exactly"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    for name in leaves:
        assert mine[name].grad.dtype == leaves[name].dtype, name
        torch.testing.assert_close(mine[name].grad, ref[name].grad, atol=atol * 4, rtol=rtol, msg=name)
    # the copy-based reference path agrees too
    y_copy = sparse_delta_linear_reference(leaves["x"], weight, leaves["values"], index, leaves["bias"])
    torch.testing.assert_close(y, y_copy, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_delta_linear_under_autocast_matches_dense_autograd(dtype: torch.dtype) -> None:
    """``bf16-mixed``/``16-mixed``: fp32 weight, x and values, the GEMMs in the autocast dtype; plain autograd on
    the dense merge under the same autocast is the oracle (gradients in the leaves' fp32)."""
    index = _index(0.05, seed=40)
    weight = _randn(OUT, IN, seed=41)
    leaves = {"x": _randn(T, IN, seed=42), "values": _randn(index.nnz, seed=43) * 0.1, "bias": _randn(OUT, seed=44)}
    grad_out = _randn(T, OUT, seed=45).to(dtype)
    assert_matches_oracle_under_autocast(lambda x, values, bias: sparse_delta_linear(x, weight, values, index, bias),
                                         lambda x, values, bias: _dense_oracle(x, weight, values, index, bias),
                                         leaves, grad_out, dtype)


def test_sparse_delta_linear_without_bias_or_input_grad() -> None:
    index = _index(0.01, seed=22)
    weight = _randn(OUT, IN, seed=23)
    x = _randn(T, IN, seed=24)  # no grad wanted
    values = (_randn(index.nnz, seed=25) * 0.1).requires_grad_()
    y = sparse_delta_linear(x, weight, values, index)
    y.square().sum().backward()
    values_ref = values.detach().clone().requires_grad_()
    _dense_oracle(x, weight, values_ref, index, None).square().sum().backward()
    torch.testing.assert_close(values.grad, values_ref.grad, atol=1e-4, rtol=1e-5)


def test_sparse_delta_linear_gradcheck_fp64_reference_path() -> None:
    out, inp, t = 5, 7, 3
    index = _index(0.3, out, inp, seed=26)
    weight = _randn(out, inp, dtype=torch.float64, seed=27)
    x = _randn(t, inp, dtype=torch.float64, seed=28).requires_grad_()
    values = _randn(index.nnz, dtype=torch.float64, seed=29).requires_grad_()
    bias = _randn(out, dtype=torch.float64, seed=30).requires_grad_()

    def fn(x, values, bias):  # type: ignore[no-untyped-def]
        return sparse_delta_linear(x, weight, values, index, bias, use_triton=False)

    assert torch.autograd.gradcheck(fn, (x, values, bias))
    assert torch.autograd.gradcheck(
        lambda x, v, b: sparse_delta_linear_reference(x, weight, v, index, b), (x, values, bias)
    )
    assert torch.autograd.gradcheck(
        lambda g, xx: sddmm_reference(g, xx, index, torch.float64),
        (
            _randn(t, out, dtype=torch.float64, seed=31).requires_grad_(),
            _randn(t, inp, dtype=torch.float64, seed=32).requires_grad_(),
        ),
    )


def test_sparse_delta_linear_errors() -> None:
    index = _index(0.01)
    weight = _randn(OUT, IN)
    values = _randn(index.nnz)
    with pytest.raises(ValueError, match="freeze it"):
        sparse_delta_linear(_randn(T, IN), weight.clone().requires_grad_(), values, index)
    with pytest.raises(ValueError, match="cast x"):
        sparse_delta_linear(_randn(T, IN, dtype=torch.bfloat16), weight, values, index)


# ---------------------------------------------------------------------------- safe fallback
@pytest.fixture
def fresh_checks(monkeypatch):
    """Forget earlier self-check results; let ``auto`` consider Triton for CPU tensors (as it does for CUDA)."""
    from lightning_peft.kernels import _utils

    monkeypatch.setattr(_utils, "_VERIFIED", {})
    monkeypatch.setattr(_utils, "_auto_eligible", lambda tensors: True)
    monkeypatch.delenv("LIGHTNING_PEFT_KERNELS", raising=False)
    return _utils


@pytest.mark.parametrize("name", ["scatter", "sddmm", "tile_sddmm"])
@pytest.mark.triton
@requires_triton
def test_every_kernel_passes_its_self_check_in_the_interpreter(name: str, fresh_checks) -> None:
    kernel = {"scatter": _scatter_kernel, "sddmm": _sddmm_kernel, "tile_sddmm": _tile_sddmm_kernel}[name]
    assert fresh_checks.kernel_verified(kernel, torch.device("cpu"))


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_a_failing_kernel_warns_once_and_the_op_takes_the_pytorch_path(failure: str, fresh_checks, monkeypatch) -> None:
    from lightning_peft.kernels import scatter
    from lightning_peft.kernels._utils import KernelFallbackWarning

    def broken(weight, index, values, mode, save, alpha=1.0):
        if failure == "raises":
            raise RuntimeError("PTX compilation failed (injected)")
        weight.add_(1.0)  # a miscompiled kernel: runs, writes the wrong bits
        return weight.new_zeros(index.nnz) if save else None

    monkeypatch.setattr(scatter, "_scatter_launch", broken)
    index = _index(0.05, seed=50)
    weight, values = _randn(OUT, IN, seed=51), _randn(index.nnz, seed=52)
    expected = weight.clone()
    scatter_add_reference(expected, index, values, 1.0)
    with pytest.warns(KernelFallbackWarning, match=r"scatter .* failed its self-check on cpu \(triton [\d.]+\)") as rec:
        scatter_add(weight, index, values)
    assert len(rec) == 1 and ("injected" in str(rec[0].message)) == (failure == "raises")
    assert torch.equal(weight, expected)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)  # cached: no second warning
        scatter_add(weight, index, values)


def test_the_environment_forces_either_path(fresh_checks, monkeypatch) -> None:
    from lightning_peft.kernels import scatter

    calls = []
    real = scatter._scatter_launch
    monkeypatch.setattr(scatter, "_scatter_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    index = _index(0.05, seed=53)
    weight, values = _randn(OUT, IN, seed=54), _randn(index.nnz, seed=55)
    monkeypatch.setenv("LIGHTNING_PEFT_KERNELS", "torch")
    scatter_add(weight, index, values)
    assert calls == []
    monkeypatch.setenv("LIGHTNING_PEFT_KERNELS", "nope")
    with pytest.raises(ValueError, match="LIGHTNING_PEFT_KERNELS must be auto, torch or triton, got 'nope'"):
        scatter_add(weight, index, values)
    if interpreter_ready(_scatter_kernel):  # triton: the kernel, no self-check (on CPU: the interpreter)
        monkeypatch.setenv("LIGHTNING_PEFT_KERNELS", "triton")
        scatter_add(weight, index, values)
        assert calls == [1]
