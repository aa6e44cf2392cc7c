"""The tile training op (``tile_delta_linear``, ``tile_sddmm``) against dense autograd, and SHiRA tile layers on it.

The oracle is written here apart from the library: the tile positions expanded by hand into a dense ``(out, in)``
delta, ``W + delta`` rounded once to ``W``'s dtype, plain autograd. Shapes: ``out`` prime (37), ``in`` a multiple
of the tile width (48 = 3 tiles of 16, 64 = 1 tile of 64), leading dims ``(2, 29)``. Tile sets: none, one, ~10% and
all. The Triton kernel runs in Triton's CPU interpreter (``@pytest.mark.triton``; tests/conftest.py sets
``TRITON_INTERPRET=1`` before ``triton`` is imported).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from helpers import assert_matches_oracle_under_autocast, shira_net
from lightning_peft.kernels import (
    expand_tiles,
    tile_delta_linear,
    tile_delta_linear_reference,
    tile_sddmm,
    tile_sddmm_reference,
)
from lightning_peft.kernels import tile_linear as tile_linear_module
from lightning_peft.kernels._utils import interpreter_ready
from lightning_peft.kernels.tile_linear import _tile_sddmm_kernel
from torch._dynamo.utils import counters

from lightning_peft.methods._sparse import core as core_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    not (DEVICE == "cuda" or interpreter_ready(_tile_sddmm_kernel)),
    reason="triton was imported before TRITON_INTERPRET=1 was set; set it at the top of tests/conftest.py",
)
triton_only = [pytest.mark.triton, requires_triton]

# (atol, rtol): fp32 summation order only; bf16 8 mantissa bits (one rounding of W + S, the GEMMs in bf16)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
OUT, N = 37, 29
SHAPES = {16: 48, 64: 64}  # b -> in
TILE_SETS = ["zero", "one", 0.1, "all"]


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=DEVICE)


def _tiles(which: float | str, out: int, inp: int, b: int, seed: int = 0) -> torch.Tensor:
    count = out * inp // b
    k = {"zero": 0, "one": 1, "all": count}.get(which) if isinstance(which, str) else max(1, round(which * count))
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values.to(DEVICE)  # (T,) int64


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _dense_oracle(x, weight, values, tiles, bias):  # type: ignore[no-untyped-def]
    """Autograd on ``W + delta``, the delta placed entry by entry from row and column (not from the tile view)."""
    out, inp = weight.shape
    b = values.shape[1]
    per_row = inp // b
    rows = (tiles // per_row).repeat_interleave(b)  # (T * b,)
    cols = ((tiles % per_row) * b).repeat_interleave(b) + torch.arange(b, device=tiles.device).repeat(tiles.numel())
    delta = torch.zeros(out, inp, dtype=torch.float32, device=weight.device)
    delta = delta.index_put((rows, cols), values.float().reshape(-1))  # differentiable in values
    return F.linear(x, (weight.float() + delta).to(weight.dtype), bias)


# ---------------------------------------------------------------------------- the op against dense autograd
@pytest.mark.parametrize("which", TILE_SETS)
@pytest.mark.parametrize("b", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=triton_only)])
def test_tile_delta_linear_forward_and_grads_match_dense_autograd(
    which: float | str, b: int, dtype: torch.dtype, use_triton: bool
) -> None:
    inp = SHAPES[b]
    tiles = _tiles(which, OUT, inp, b, seed=1)
    weight = _randn(OUT, inp, dtype=dtype, seed=2)
    w_bits = _bits(weight).clone()
    leaves = {
        "x": _randn(2, N, inp, dtype=dtype, seed=3),  # 3-D: (2, 29) tokens
        "values": _randn(tiles.numel(), b, seed=4) * 0.1,  # fp32 values on a (maybe bf16) base
        "bias": _randn(OUT, dtype=dtype, seed=5),
    }
    mine = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    grad_out = _randn(2, N, OUT, dtype=dtype, seed=6)

    y = tile_delta_linear(mine["x"], weight, mine["values"], tiles, mine["bias"], use_triton=use_triton)
    assert torch.equal(_bits(weight), w_bits), "W not restored bit-exactly after the forward"
    y.backward(grad_out)
    assert torch.equal(_bits(weight), w_bits), "W not restored bit-exactly after the backward"
    y_ref = _dense_oracle(ref["x"], weight, ref["values"], tiles, ref["bias"])
    y_ref.backward(grad_out)

    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    for name in leaves:
        assert mine[name].grad.dtype == leaves[name].dtype, name
        torch.testing.assert_close(mine[name].grad, ref[name].grad, atol=atol * 4, rtol=rtol, msg=name)
    copy = tile_delta_linear_reference(leaves["x"], weight, leaves["values"], tiles, leaves["bias"])
    torch.testing.assert_close(y, copy, atol=0, rtol=0)  # the same merged bits and the same GEMM


def test_tile_delta_linear_without_bias_or_input_grad() -> None:
    tiles = _tiles(0.2, OUT, 48, 16, seed=7)
    weight, x = _randn(OUT, 48, seed=8), _randn(N, 48, seed=9)  # x: no grad wanted
    values = (_randn(tiles.numel(), 16, seed=10) * 0.1).requires_grad_()
    tile_delta_linear(x, weight, values, tiles).square().sum().backward()
    ref = values.detach().clone().requires_grad_()
    _dense_oracle(x, weight, ref, tiles, None).square().sum().backward()
    torch.testing.assert_close(values.grad, ref.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tile_delta_linear_under_autocast_matches_dense_autograd(dtype: torch.dtype) -> None:
    """``bf16-mixed``/``16-mixed``: fp32 leaves, the GEMMs in the autocast dtype, gradients back in fp32."""
    tiles = _tiles(0.1, OUT, 64, 16, seed=11)
    weight = _randn(OUT, 64, seed=12)
    leaves = {"x": _randn(2, N, 64, seed=13), "values": _randn(tiles.numel(), 16, seed=14) * 0.1,
              "bias": _randn(OUT, seed=15)}
    grad_out = _randn(2, N, OUT, seed=16).to(dtype)
    assert_matches_oracle_under_autocast(lambda x, values, bias: tile_delta_linear(x, weight, values, tiles, bias),
                                         lambda x, values, bias: _dense_oracle(x, weight, values, tiles, bias),
                                         leaves, grad_out, dtype)


def test_tile_delta_linear_gradcheck_fp64() -> None:
    tiles = torch.tensor([0, 3, 4])  # (3, 32) weight, b = 16: tiles in both column blocks
    weight = _randn(3, 32, dtype=torch.float64, seed=17)
    x = _randn(2, 32, dtype=torch.float64, seed=18).requires_grad_()
    values = _randn(3, 16, dtype=torch.float64, seed=19).requires_grad_()
    bias = _randn(3, dtype=torch.float64, seed=20).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, bias: tile_delta_linear(x, weight, v, tiles, bias), (x, values, bias))


# ---------------------------------------------------------------------------- dS
def _sddmm_cases() -> list:
    cases = [("random", 37, 64, 16, 0.3), ("random", 37, 64, 32, 0.3), ("random", 11, 128, 64, 0.5)]
    return cases + [("one block", 70, 32, 16, None)]  # 70 tiles in column block 1: three programs of 32


@pytest.mark.parametrize("case", _sddmm_cases(), ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-b{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=triton_only)])
def test_tile_sddmm_equals_the_dense_gradient_at_the_tiles(case: tuple, dtype: torch.dtype, use_triton: bool) -> None:
    kind, out, inp, b, frac = case
    tiles = _tiles(frac, out, inp, b, seed=21) if kind == "random" else torch.arange(out, device=DEVICE) * 2 + 1
    grad_out, x = _randn(3, 17, out, dtype=dtype, seed=22), _randn(3, 17, inp, dtype=dtype, seed=23)  # N = 51
    dense = grad_out.reshape(-1, out).double().t() @ x.reshape(-1, inp).double()  # (out, in)
    expected = dense.view(-1, b)[tiles]
    got = tile_sddmm(grad_out, x, tiles, b, torch.float32, use_triton=use_triton)
    assert got.shape == (tiles.numel(), b) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)  # fp32 accumulation of exact products
    low = tile_sddmm(grad_out, x, tiles, b, dtype, use_triton=use_triton)  # one rounding of the fp32 sum
    assert low.dtype == dtype
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]  # relative spacing
    torch.testing.assert_close(low.double(), expected, atol=1e-4, rtol=ulp)


def test_tile_sddmm_refuses_what_does_not_fit() -> None:
    g, x = _randn(5, 7), _randn(5, 48)
    with pytest.raises(ValueError, match=r"b=32 to divide in_features=48"):
        tile_sddmm(g, x, torch.tensor([0]), 32)
    with pytest.raises(IndexError, match=r"span \[0, 21\].*has 21 tiles of 16"):
        tile_sddmm(g, x, torch.tensor([0, 21]), 16)
    with pytest.raises(ValueError, match="equal leading dims"):
        tile_sddmm_reference(g[:4], x, torch.tensor([0]), 16)


def test_tile_delta_linear_errors_name_the_fix() -> None:
    weight, x = _randn(OUT, 48), _randn(N, 48)
    tiles = torch.tensor([0, 5])
    values = _randn(2, 16)
    with pytest.raises(ValueError, match=r"values \(T, b\) and int64 tiles.*values.view\(-1, b\)"):
        tile_delta_linear(x, weight, values.view(-1), tiles)
    with pytest.raises(ValueError, match=r"int64 tiles.*torch.int32.*tiles.long\(\)"):
        tile_delta_linear(x, weight, values, tiles.int())
    with pytest.raises(ValueError, match=r"multiple of the tile width b=32.*tile=None"):
        tile_delta_linear(x, weight, _randn(2, 32), tiles)
    with pytest.raises(ValueError, match="freeze it"):
        tile_delta_linear(x, weight.clone().requires_grad_(), values, tiles)
    with pytest.raises(ValueError, match="cast x"):
        tile_delta_linear(x.bfloat16(), weight, values, tiles)
    before = weight.clone()
    with pytest.raises(IndexError, match=r"span \[0, 111\] but the weight has 111 tiles"):
        tile_delta_linear(x, weight, values, torch.tensor([0, 111]))
    assert torch.equal(weight, before)


# ---------------------------------------------------------------------------- torch.compile
def test_tile_delta_linear_compiles_fullgraph_as_one_opaque_node() -> None:
    """``fullgraph=True`` with AOTAutograd: every custom op's fake impl and the autograd formula are traced, no
    break; the compiled forward and gradients are the eager ones."""
    tiles = _tiles(0.2, OUT, 48, 16, seed=24)
    weight = _randn(OUT, 48, seed=25)
    graphs: list[str] = []

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(str(gm.graph))
        return make_boxed_func(gm)

    def fn(x, values, bias):  # type: ignore[no-untyped-def]
        return torch.nn.functional.gelu(tile_delta_linear(x, weight, values, tiles, bias)).sum()

    leaves = [_randn(2, N, 48, seed=26), _randn(tiles.numel(), 16, seed=27) * 0.1, _randn(OUT, seed=28)]
    eager = [t.clone().requires_grad_() for t in leaves]
    compiled = [t.clone().requires_grad_() for t in leaves]
    torch._dynamo.reset()
    counters.clear()
    from torch._dynamo.backends.common import aot_autograd

    loss = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=backend, bw_compiler=backend))(*compiled)
    loss.backward()
    fn(*eager).backward()
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    assert len(graphs) == 2 and "lightning_peft.tile_delta_linear.default" in graphs[0]
    assert "lightning_peft.tile_sddmm.default" in graphs[1] and "lightning_peft.tile_delta_linear_dx" in graphs[1]
    torch.testing.assert_close(loss, fn(*leaves), atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- SHiRA layers train through it
TARGETS = ["blocks.0", "blocks.2"]  # PlainNet(width=32): 32 -> 64 -> 32


def _net(tile: int | None, density: float = 0.05):  # type: ignore[no-untyped-def]
    return shira_net(1, width=32, density=density, mask="wm", tile=tile, target_modules=TARGETS)


class _Spy:
    """Counts calls of a module-level function (patched by monkeypatch), then calls it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.real, self.calls = getattr(module, name), 0
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.real(*args, **kwargs)


def _step(net) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(5))
    net.zero_grad()
    loss = net(ids).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def test_tiled_shira_values_are_tile_by_tile_and_train_through_the_tile_op(monkeypatch) -> None:
    net = _net(16)
    for path in TARGETS:
        layer = net.get_submodule(path)
        tiles, b = layer.sparse_tiles(["default"], layer.sparse_index("default"))
        assert b == 16 and tiles.dtype == torch.int64
        assert torch.equal(layer.sparse_index("default").flat(), expand_tiles(tiles, b))  # sorted = tile by tile
        delta = layer.get_delta_weight("default")  # (out, in), placed from (row, col): values.view(T, b) are tiles
        assert torch.equal(delta.view(-1, b)[tiles], layer.shira_weight["default"].detach().view(-1, b))

    op = _Spy(monkeypatch, tile_linear_module, "_forward_op")
    unstructured = _Spy(monkeypatch, core_module, "sparse_delta_linear")
    loss, grads = _step(net)
    assert op.calls == 2 and unstructured.calls == 0
    assert all(bool(g.abs().sum() > 0) for g in grads.values())

    monkeypatch.setattr(core_module.SparseDeltaCore, "sparse_tiles", lambda self, adapters, index: None)
    loss_u, grads_u = _step(net)  # the same positions through the unstructured op
    assert unstructured.calls == 2 and op.calls == 2
    assert torch.equal(loss, loss_u)  # the same merged bits, the same GEMM
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_u[name], atol=1e-6, rtol=1e-5, msg=name)


def test_unstructured_masks_and_the_dense_fallback_keep_their_paths(monkeypatch) -> None:
    op = _Spy(monkeypatch, tile_linear_module, "_forward_op")
    unstructured = _Spy(monkeypatch, core_module, "sparse_delta_linear")
    _step(_net(None))
    assert (op.calls, unstructured.calls) == (0, 2)
    _step(_net(16, density=0.5))  # training above DENSE_FALLBACK_DENSITY["cpu"]: dense GEMM + gather
    assert (op.calls, unstructured.calls) == (0, 2)


def test_tiles_are_found_once_per_adapter_and_again_after_the_mask_changes(monkeypatch) -> None:
    found = _Spy(monkeypatch, core_module, "find_tiles")
    net = _net(16)
    layer = net.get_submodule("blocks.0")
    assert found.calls == 2  # one per layer, when the adapter was added (eagerly: a compiled forward finds them)
    _step(net)
    _step(net)
    assert found.calls == 2
    index = layer.sparse_index("default")
    shifted = type(index).from_flat((index.flat() + 1) % (64 * 32), (64, 32))  # no longer whole tiles
    layer.set_mask("default", shifted)
    assert found.calls == 3 and layer.sparse_tiles(["default"], shifted) is None
    op = _Spy(monkeypatch, tile_linear_module, "_forward_op")
    _step(net)
    assert op.calls == 1  # blocks.2 only
    layer.load_state_dict(layer.state_dict())  # a load finds them again once the positions are in place
    assert found.calls == 4


def test_compiled_tiled_shira_trains_through_the_tile_op_without_graph_breaks() -> None:
    net = _net(16)
    eager_loss, eager_grads = _step(net)
    torch._dynamo.reset()
    counters.clear()
    graphs: list[str] = []

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(str(gm.graph))
        return make_boxed_func(gm)

    from torch._dynamo.backends.common import aot_autograd

    compiled = torch.compile(net, fullgraph=True, backend=aot_autograd(fw_compiler=backend, bw_compiler=backend))
    loss, grads = _step(compiled)
    assert not counters["graph_break"]
    assert graphs[0].count("lightning_peft.tile_delta_linear.default") == 2
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[f"_orig_mod.{name}"] if f"_orig_mod.{name}" in grads else grads[name], g,
                                   atol=1e-6, rtol=1e-5, msg=name)
