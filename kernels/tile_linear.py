"""Tile-delta linear: ``y = x (W + S)^T + b`` for a tile-structured ``S``, training only the tiles' values.

The tile form of :mod:`.sparse_linear`. ``S`` is ``T`` tiles, 1 x ``b`` runs along ``W``'s contiguous (input)
dimension (:mod:`.tiles`; SMT, Sparse Matrix Tuning, ICLR 2025, trains and moves whole blocks): tile ``t``
is ``W.view(-1, b)[tiles[t]]``, row ``r_t = tiles[t] // (in / b)``, columns ``c_t b + [0, b)`` with
``c_t = tiles[t] % (in / b)``, and ``values[t]`` ``(b,)`` is its delta. Same three ``torch.library``
custom ops as the unstructured op (forward, ``dX``, ``dS``; opaque to ``torch.compile``), same autocast rule
(the GEMMs in the autocast dtype, ``dX`` back in ``x``'s dtype, ``dS`` from ``dO`` cast to ``x``'s dtype)::

    saved = W[tiles]                  # tile_add: whole-row gather ...
    W[tiles] += values                # ... and add (fp32 sum, one rounding to W's dtype), one C loop on CPU
    y = x W^T + b                     # the one dense GEMM, on W + S
    W[tiles] = saved                  # tile_restore: the original bits back, whole-row copies

``dX = dO (W + S)`` runs the same merge around its GEMM. ``dS`` is a batched gather-GEMM over tiles::

    dS[t, j] = sum_n dO[n, r_t] * X[n, c_t b + j]          (T, b), n over the N = prod(leading dims) tokens

Tiles in the same column block ``c`` read the same ``(N, b)`` block of ``X``, so grouped by ``c`` the
gradient of a group of ``m_c`` tiles is one GEMM ``dO[:, rows_c]^T (m_c, N) @ X[:, c b : (c + 1) b] (N, b)``:
``2 N T b`` FLOPs (what SDDMM does on the ``T b`` positions, RoSA, Nikdan et al. 2024, arXiv 2401.04679,
section 3), never the dense ``(out, in)`` ``dW`` (``2 N out in``), and each ``X`` block is read once per group
instead of once per position.

CPU (:func:`tile_sddmm_reference`): ``dO^T`` copied contiguous once ``(out, N)``, then per non-empty column
block a row gather ``(m_c, N)`` (``m_c <= out``: a temporary no larger than ``dO``) and one ``torch.mm`` with
``X``'s column slice. Measured on one thread of a shared 2-core machine under load (load average 3.5-4.5, so
+-30% between runs), random tiles of 16, ``dS`` in ms; the first two rows are ranges over fp32 and bf16 and 3
interleaved runs (medians of 7), the dense row fp32 / bf16 from one run, N = 2048 one run in fp32::

                                W 1536 x 576, 2.3% (1272 tiles)           W 4096 x 4096, 1% (10486 tiles)
                                N=256       N=512       N=2048            N=256     N=512     N=2048
    this                        3.4-4.3     4.8-10      32                23-39     43-85     180
    SDDMM, expanded positions   2.9-6.9     6.1-10.5    48                21-26     42-121    380
    dense dW = dO^T X + gather  12 / 55     25 / 104    -                 362 / -   502 / -   -

so per run 1.1-1.5x SDDMM's time at N = 256 (once 0.5x), 0.5-1.6x at 512, 0.5-0.7x at 2048 (the GEMM form gains
with the token count), and 0.05-0.4x the dense ``dW`` (not run in bf16 at 4096: minutes on this CPU). Dropped
after the same kind of runs: one gather of all ``dO`` columns ``(N, T)`` then ``mm`` on ``X``'s slices
(1.2-1.5x faster than this at the small shape in one run, on par at 4096, but its temporary grows as ``N T``;
chunked to bound it, 0.7-1.5x this), contiguous ``X`` blocks with chunked row gathers (0.85-1.75x this), a
padded ``bmm`` over column blocks (1.1-2x SDDMM's time: it pays for unequal blocks) and ``einsum`` on gathered
``X`` ``(N, T, b)`` (16-38x SDDMM's time). On this CPU the ``b``-column GEMMs reach only ~13-18 GFLOP/s (a dense
GEMM ~38) and the transpose and gathers cost as much as the products.

CUDA (:func:`_tile_sddmm_kernel`): one program per ``BLOCK_M`` tiles of one column block (the launch plan,
:func:`_tile_plan`, groups them without a host sync), looping over ``N`` in ``BLOCK_N`` chunks with
``tl.dot(dO^T (BLOCK_M, BLOCK_N), X (BLOCK_N, b))`` into an fp32 ``(BLOCK_M, b)`` accumulator (tensor cores in
bf16/fp16, IEEE fp32 for fp32 inputs); ``X`` is read ``ceil(m_c / BLOCK_M)`` times per block instead of once per
tile (in Triton's CPU interpreter, where the tests run it, bf16 operands are upcast to fp32 first: its ``tl.dot``
multiplies bf16 as raw bits). ``BLOCK_*`` are defaults, not a sweep: no GPU has been available
(``benchmarks/gpu_check.py`` checks and times it when one is). The merge and restore use
:func:`~.tiles.tile_add` / :func:`~.tiles.tile_restore` (PyTorch's row ops on CUDA).

Not safe if another thread/stream reads ``W`` while the op runs (``W`` holds ``W + S`` meanwhile).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning_peft.kernels._utils import (
    HAS_TRITON,
    cast_rtne,
    is_interpreted,
    register_self_check,
    should_use_triton,
    tl,
    triton,
)
from lightning_peft.kernels.sparse_linear import (
    _tri,
    check_linear_inputs,
    grad_bias_of,
    grad_x_on,
    linear_on,
    triton_flag,
)
from lightning_peft.kernels.tiles import TILE_WIDTHS, _tile_view, tile_add, tile_restore, tile_span

__all__ = ["tile_delta_linear", "tile_delta_linear_reference", "tile_sddmm", "tile_sddmm_reference"]


def tile_delta_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch reference: ``W + S`` in an ``(out, in)`` copy of ``W``, one GEMM; autograd does the rest.

    The test oracle and benchmark baseline: autograd forms the dense ``(out, in)`` weight gradient and gathers
    ``dS`` from it (and gives ``W`` a gradient if it requires one).

    Args:
        x: ``(..., in)`` in ``weight.dtype``.
        weight: ``(out, in)`` contiguous, ``b`` divides ``in``.
        values: ``(T, b)`` any float dtype; ``W[tile] + values`` is summed in fp32 (fp64 for fp64) and rounded once
            to ``weight.dtype``, as :func:`~.tiles.tile_add` does.
        tiles: ``(T,)`` int64 tile numbers, unique.
        bias: ``(out,)`` or ``None``.

    Returns:
        ``(..., out)``.
    """
    rows = _tile_view(weight, values.shape[1])  # (out * in / b, b)
    acc = torch.promote_types(torch.promote_types(weight.dtype, values.dtype), torch.float32)
    merged = rows.index_put((tiles.long(),), (rows[tiles.long()].to(acc) + values.to(acc)).to(weight.dtype))
    return F.linear(x, merged.view_as(weight), bias)  # (out, in) copy


@contextmanager
def _merged_tiles(weight: torch.Tensor, tiles: torch.Tensor, values: torch.Tensor) -> Iterator[torch.Tensor]:
    """``W + S`` in place inside the block (writes through ``weight.data``: ``W``'s autograd version is not bumped),
    ``W`` bit-exactly restored after, even if the block raises."""
    w, span = weight.data, tile_span(tiles)  # the bounds check's span, once for add and restore
    saved = tile_add(w, tiles, values.detach(), span=span)  # (T, b) W dtype: the overwritten tiles
    try:
        yield w
    finally:
        tile_restore(w, tiles, saved, span=span)


# ---------------------------------------------------------------------------- dS: CPU
def _flatten(grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"tile_sddmm needs grad_out (..., out) and x (..., in) with equal leading dims, got "
                         f"{tuple(grad_out.shape)} and {tuple(x.shape)}; pass the op's output gradient and its input")
    return grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)


def tile_sddmm_reference(
    grad_out: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, b: int, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``dS`` per tile by one GEMM per column block (the CPU path; the numbers are in the module docstring).

    Accumulates in fp32 (fp64 for fp64 inputs). Temporaries: ``dO^T`` ``(out, N)``, one block's gathered rows
    ``(m_c, N)`` (``m_c <= out``) and the ``(T, b)`` result: never ``(out, in)``.

    Args:
        grad_out: ``(..., out)``.
        x: ``(..., in)``, same leading dims; ``b`` divides ``in``.
        tiles: ``(T,)`` int64 tile numbers in ``[0, out * in / b)``.
        b: Tile width.
        out_dtype: dtype of the result.

    Returns:
        ``(T, b)``: ``dS[t, j] = sum_n dO[n, r_t] * X[n, c_t b + j]``.
    """
    g2, x2 = _flatten(grad_out, x)  # (N, out), (N, in)
    acc = torch.promote_types(torch.promote_types(g2.dtype, x2.dtype), torch.float32)
    blocks = x2.shape[1] // b
    tiles = tiles.long()
    column = tiles % blocks  # (T,) column block of each tile
    order = torch.argsort(column, stable=True)  # (T,) tiles grouped by column block, row order within a block
    counts = torch.bincount(column, minlength=blocks)  # (C,)
    rows = (tiles // blocks)[order]  # (T,)
    gt = torch.empty(g2.shape[1], g2.shape[0], dtype=acc, device=g2.device).copy_(g2.t())  # (out, N): one pass
    xa = x2.to(acc)  # (N, in)
    grouped = torch.empty(tiles.numel(), b, dtype=acc, device=g2.device)  # (T, b) in `order`
    start = 0
    for c, m in zip(counts.nonzero().view(-1).tolist(), counts[counts > 0].tolist(), strict=True):
        # (m, N) @ (N, b): every tile of column block c against the one X block they share
        torch.mm(gt.index_select(0, rows[start : start + m]), xa[:, c * b : (c + 1) * b], out=grouped[start : start + m])
        start += m
    return torch.empty(tiles.numel(), b, dtype=out_dtype, device=g2.device).index_copy_(0, order, grouped.to(out_dtype))


# ---------------------------------------------------------------------------- dS: CUDA
if HAS_TRITON:

    @triton.jit
    def _tile_sddmm_kernel(
        g_ptr,  # (out, N) dO^T
        x_ptr,  # (N, in) input
        order_ptr,  # (T,) int64 tile slots grouped by column block (_tile_plan)
        tiles_ptr,  # (T,) int64 tile numbers
        start_ptr,  # (P,) int64 per program: its first position in order
        count_ptr,  # (P,) int64 per program: its tiles, <= BLOCK_M (0: nothing to do)
        block_ptr,  # (P,) int64 per program: its column block
        out_ptr,  # (T, B) result
        N,
        blocks,
        stride_go,
        stride_gn,
        stride_xn,
        stride_xi,
        B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        count = tl.load(count_ptr + pid)
        if count > 0:
            start = tl.load(start_ptr + pid)
            column = tl.load(block_ptr + pid)
            m = tl.arange(0, BLOCK_M)
            mmask = m < count
            slot = tl.load(order_ptr + start + m, mask=mmask, other=0)  # (BLOCK_M,) rows of out
            row = tl.load(tiles_ptr + slot, mask=mmask, other=0) // blocks  # (BLOCK_M,) rows of W
            j = tl.arange(0, B)
            col = column * B + j  # (B,) the block's columns of X
            acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
                nmask = n < N
                g = tl.load(g_ptr + row[:, None] * stride_go + n[None, :] * stride_gn,
                            mask=mmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
                xv = tl.load(x_ptr + n[:, None] * stride_xn + col[None, :] * stride_xi,
                             mask=nmask[:, None], other=0.0)  # (BLOCK_N, B)
                if UPCAST:  # interpreter only: Triton 3.9's interpreted tl.dot multiplies bf16 as raw uint16 bits
                    acc = tl.dot(g.to(tl.float32), xv.to(tl.float32), acc, input_precision="ieee")
                elif IEEE:  # fp32 inputs: no TF32 rounding (the reference's accuracy)
                    acc = tl.dot(g, xv, acc, input_precision="ieee")
                else:
                    acc = tl.dot(g, xv, acc)
            tl.store(out_ptr + slot[:, None] * B + j[None, :], cast_rtne(acc, out_ptr.dtype.element_ty),
                     mask=mmask[:, None])

else:  # pragma: no cover
    _tile_sddmm_kernel = None

_BLOCK_M = 32  # tiles per program (a tl.dot side: >= 16)
_BLOCK_N = 64  # tokens per step


def _tile_plan(tiles: torch.Tensor, blocks: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The launch plan: tiles grouped by column block, one program per ``block_m`` of a block, built by tensor ops
    (no host sync: the grid is the bound ``ceil(T / block_m) + min(C, T)``, programs past the last get count 0).

    Returns:
        ``order`` ``(T,)`` tile slots grouped by column block; per program ``start``, ``count``, ``column`` ``(P,)``.
    """
    column = tiles % blocks  # (T,)
    order = torch.argsort(column, stable=True)  # (T,)
    counts = torch.zeros(blocks, dtype=torch.int64, device=tiles.device).index_add_(0, column, torch.ones_like(column))
    first = torch.cumsum(counts, 0) - counts  # (C,) first position of each block in order
    programs = (counts + block_m - 1) // block_m  # (C,)
    ends = torch.cumsum(programs, 0)  # (C,)
    pid = torch.arange(triton.cdiv(tiles.numel(), block_m) + min(blocks, tiles.numel()), device=tiles.device)  # (P,)
    block = torch.searchsorted(ends, pid, right=True).clamp_(max=blocks - 1)  # (P,) past the end: the last block
    k = pid - (ends[block] - programs[block])  # (P,) chunk of its block
    return order, first[block] + k * block_m, (counts[block] - k * block_m).clamp(0, block_m), block


def _tile_sddmm_launch(g2: torch.Tensor, x2: torch.Tensor, tiles: torch.Tensor, b: int,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """Host launcher: ``dO^T`` made contiguous ``(out, N)`` (the kernel reads ``BLOCK_N`` tokens of a row at once),
    the plan, a 1-D grid."""
    out = torch.empty(tiles.numel(), b, dtype=out_dtype, device=g2.device)
    if tiles.numel() == 0:
        return out
    if g2.shape[0] == 0:
        return out.zero_()
    gt = g2.t().contiguous()  # (out, N)
    blocks = x2.shape[1] // b
    tiles = tiles.long()
    order, start, count, block = _tile_plan(tiles, blocks, _BLOCK_M)
    _tile_sddmm_kernel[(count.numel(),)](
        gt, x2, order, tiles, start, count, block, out, g2.shape[0], blocks,
        gt.stride(0), gt.stride(1), x2.stride(0), x2.stride(1),
        B=b, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, IEEE=g2.dtype == torch.float32,
        UPCAST=g2.dtype == torch.bfloat16 and is_interpreted(_tile_sddmm_kernel),
    )
    return out


def _self_check(device: torch.device) -> bool:
    """The launcher against the reference on a (9, 5) x (9, 32) fp32 problem, 4 tiles of 16 in both blocks: close?"""
    g = torch.Generator().manual_seed(0)
    grad_out, x = torch.randn(9, 5, generator=g).to(device), torch.randn(9, 32, generator=g).to(device)
    tiles = torch.tensor([0, 3, 4, 9], device=device)
    return torch.allclose(_tile_sddmm_launch(grad_out, x, tiles, 16, torch.float32),
                          tile_sddmm_reference(grad_out, x, tiles, 16), rtol=1e-4, atol=1e-5)


register_self_check(_tile_sddmm_kernel, "tile_sddmm (lightning_peft.kernels.tile_linear)", _self_check)


def _tile_sddmm(grad_out: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, b: int, out_dtype: torch.dtype,
                use_triton: bool | None) -> torch.Tensor:
    g2, x2 = _flatten(grad_out, x)
    fp64 = torch.float64 in (g2.dtype, x2.dtype)  # the kernel accumulates in fp32: fp64 stays off Triton
    if not fp64 and b in TILE_WIDTHS and should_use_triton(_tile_sddmm_kernel, g2, x2, tiles, use_triton=use_triton):
        return _tile_sddmm_launch(g2, x2, tiles, b, out_dtype)
    if use_triton and not fp64 and b not in TILE_WIDTHS:
        raise RuntimeError(f"use_triton=True but the tile kernel takes widths {TILE_WIDTHS}, got b={b}; "
                           "pass use_triton=None for the PyTorch path")
    return tile_sddmm_reference(g2, x2, tiles, b, out_dtype)


def tile_sddmm(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    tiles: torch.Tensor,
    b: int,
    out_dtype: torch.dtype = torch.float32,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """The gradient of a tile delta, ``dS = (dO^T X)`` sampled at whole tiles, without the dense ``(out, in)`` product.

    Args:
        grad_out: ``(..., out)`` fp32, bf16 or fp16 (fp64: the PyTorch path, fp64 accumulation, for ``gradcheck``).
        x: ``(..., in)``, same leading dims (flattened to ``N``), same dtype as ``grad_out``; ``b`` divides ``in``.
        tiles: ``(T,)`` int64 tile numbers of the ``(out, in)`` weight, unique (``T = 0`` gives ``(0, b)``).
        b: Tile width (the Triton kernel: 16, 32 or 64).
        out_dtype: dtype of the result (accumulation is fp32 regardless).
        use_triton: ``None`` auto (CUDA -> Triton), ``True`` force Triton, ``False`` :func:`tile_sddmm_reference`.

    Returns:
        ``(T, b)``: ``dS[t, j] = sum_n dO[n, r_t] * X[n, c_t b + j]``, ``r_t, c_t = divmod(tiles[t], in / b)``.

    Raises:
        ValueError: shapes that do not fit (``b`` not dividing ``in``, leading dims that differ).
        IndexError: a tile number outside the weight.
    """
    if x.shape[-1] % b:
        raise ValueError(f"tile_sddmm needs the tile width b={b} to divide in_features={x.shape[-1]}; "
                         "pass the b the tiles were made with")
    rows = grad_out.shape[-1] * (x.shape[-1] // b)
    span = tile_span(tiles)
    if span is not None and (span[0] < 0 or span[1] >= rows):
        raise IndexError(f"tile numbers span [{span[0]}, {span[1]}] but a {grad_out.shape[-1]}x{x.shape[-1]} weight "
                         f"has {rows} tiles of {b}; pass tiles of this weight")
    return _tile_sddmm(grad_out, x, tiles, b, out_dtype, use_triton)


# ---------------------------------------------------------------------------- the op
@torch.library.custom_op("lightning_peft::tile_delta_linear", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor | None,
    compute_dtype: torch.dtype, use_triton: int,
) -> torch.Tensor:
    """``x (W + S)^T + b`` with the GEMM in ``compute_dtype``; ``W``'s tiles merged in place and restored, so the op
    is functional from the outside (one opaque node for ``torch.compile``)."""
    with _merged_tiles(weight, tiles, values) as w:
        return linear_on(w, x, bias, compute_dtype)


@_forward_op.register_fake
def _(x, weight, values, tiles, bias, compute_dtype, use_triton):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=compute_dtype)


@torch.library.custom_op("lightning_peft::tile_delta_linear_dx", mutates_args=())
def _grad_x_op(
    grad_out: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, tiles: torch.Tensor, x_dtype: torch.dtype,
) -> torch.Tensor:
    """``dX = dO (W + S)`` with the same in-place merge, in ``dO``'s dtype, returned in ``x_dtype``."""
    with _merged_tiles(weight, tiles, values) as w:
        return grad_x_on(w, grad_out, x_dtype)


@_grad_x_op.register_fake
def _(grad_out, weight, values, tiles, x_dtype):  # noqa: ANN001, ANN202
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]), dtype=x_dtype)


@torch.library.custom_op("lightning_peft::tile_sddmm", mutates_args=())
def _grad_values_op(
    grad_out: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, b: int, values_dtype: torch.dtype, use_triton: int,
) -> torch.Tensor:
    """``dS`` ``(T, b)`` per tile, ``dO`` cast to ``x``'s dtype, returned in ``values_dtype``."""
    return _tile_sddmm(grad_out.to(x.dtype), x, tiles, b, values_dtype, _tri(use_triton))


@_grad_values_op.register_fake
def _(grad_out, x, tiles, b, values_dtype, use_triton):  # noqa: ANN001, ANN202
    return tiles.new_empty((tiles.shape[0], b), dtype=values_dtype)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, values, tiles, bias, compute_dtype, use_triton = inputs
    ctx.save_for_backward(x, weight, values, tiles)
    ctx.has_bias, ctx.bias_dtype, ctx.use_triton = bias is not None, None if bias is None else bias.dtype, use_triton


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, values, tiles = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[2]:  # dS before dX, as in sparse_linear: their temporaries never coexist
        grad_values = _grad_values_op(grad_out, x, tiles, values.shape[1], values.dtype, ctx.use_triton)
    if ctx.needs_input_grad[0]:
        grad_x = _grad_x_op(grad_out, weight, values, tiles, x.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_bias_of(grad_out, ctx.bias_dtype)
    return grad_x, None, grad_values, None, grad_bias, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def tile_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    values: torch.Tensor,
    tiles: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``y = x (W + S)^T + b`` with ``S`` given as whole tiles ``(values, tiles)``; trains ``values`` only.

    Args:
        x: ``(..., in)`` in ``weight.dtype``.
        weight: ``(out, in)`` contiguous frozen base weight, ``b`` divides ``in``; its tiles are modified in place
            and restored bit-exactly (forward and backward).
        values: ``(T, b)`` trainable tile values, any float dtype (their gradient comes back in the same dtype,
            accumulated in fp32).
        tiles: ``(T,)`` int64 tile numbers ``W.view(-1, b)`` rows, unique.
        bias: ``(out,)`` or ``None``.
        use_triton: For the ``dS`` kernel: ``None`` auto (CUDA -> Triton), ``True`` force, ``False`` the PyTorch
            path. The GEMMs are always ``torch``'s, the merge :func:`~.tiles.tile_add`'s.

    Returns:
        ``(..., out)`` in ``weight.dtype`` (the autocast dtype under autocast).

    Raises:
        ValueError: shapes or dtypes that do not fit (the message names the fix), or a ``weight`` that requires grad.
        IndexError: a tile number outside ``weight`` (nothing written).
    """
    if values.ndim != 2 or tiles.ndim != 1 or tiles.shape[0] != values.shape[0] or tiles.dtype != torch.int64:
        raise ValueError(
            f"tile_delta_linear needs values (T, b) and int64 tiles (T,), got values {tuple(values.shape)} and tiles "
            f"{tuple(tiles.shape)} {tiles.dtype}; reshape flat values with values.view(-1, b), pass tiles.long()"
        )
    _tile_view(weight, values.shape[1])  # contiguous, b divides in (raises naming the fix)
    compute_dtype = check_linear_inputs("tile_delta_linear", x, weight)
    return _forward_op(x, weight, values, tiles, bias, compute_dtype, triton_flag(use_triton))
