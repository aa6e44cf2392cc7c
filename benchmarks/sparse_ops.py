"""Sparse-delta ops vs the dense baselines a user would otherwise pick, through the layer users train.

For each weight shape ``(out, in)``, token count ``T`` and density ``d`` (random masks):

* ``sddmm``: ``dS`` by SDDMM vs the dense ``dO^T X`` GEMM (the ``dW`` HF shira forms), and vs
  ``torch.sparse.sampled_addmm`` (cuSPARSE on CUDA) where it runs. Target: <= 0.4x
  the dense GEMM at 1%, <= 0.8x at 2% (RoSA's spops kernels' range); the crossover sets ``DENSE_FALLBACK_DENSITY``.
* ``forward``: the SHiRA layer's forward (the sparse core shared with RoSA: in-place ``W[idx] += S``,
  GEMM, restore) vs ``F.linear``.
* ``scatter_add``: in-place add of the delta vs a dense ``W += delta``, with GB/s on the bytes
  actually touched (sectors holding a nonzero, read + write, plus index/values/saved copy).
* ``train_step_ms_vs_dense_fallback``: forward + backward (dX and dS) through the layer's sparse
  path vs its dense GEMM + gather fallback; the crossover sets ``DENSE_FALLBACK_DENSITY``.
* ``train_step`` (d = 1% only): forward + backward through our SHiRA layer vs peft's ``shira``
  layer at the same ``nnz = r * (out + in)``, time and peak memory (exact on CPU too: replayed
  from the allocator's records, see ``harness.peak_memory``).
* ``tile`` (random tiles of 16, SHiRA ``tile=16``): the tile op's step (forward + dX + dS,
  ``tile_delta_linear``) vs the unstructured op on the same positions (``sparse_delta_linear``) and vs
  the dense fallback (merged copy, autograd's dense ``dW``), and its ``dS`` (``tile_sddmm``) vs SDDMM on
  the expanded positions.

CPU runs the PyTorch paths (SDDMM by ``torch.sparse.sampled_addmm``, scatter by index ops; the
Triton kernels need CUDA, on CPU they would run in the interpreter) at CPU sizes in fp32; CUDA
runs Triton at LLaMA-7B sizes in bf16.

Run: python benchmarks/sparse_ops.py [--repeats 5] [--warmup 2] [--no-csv] [--only op|train|tile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from harness import append_rows, device_name, gbps, peak_memory, row, tflops, time_fn  # noqa: E402
from lightning_peft.kernels import (  # noqa: E402
    SparseIndex,
    expand_tiles,
    scatter_add,
    sddmm,
    sddmm_reference,
    sparse_delta_linear,
    tile_delta_linear,
    tile_sddmm,
)

import lightning_peft as lp  # noqa: E402
from lightning_peft.methods._sparse import DENSE_FALLBACK_DENSITY, random_mask  # noqa: E402

BENCH = "sparse_ops"
DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
CPU_SHAPES = ((1024, 1024), (2048, 1024))
CPU_TOKENS = (256, 1024)
CPU_TRAIN_EXTRA = (((4096, 4096), 512),)  # one real layer shape: dense dW temporaries become visible
GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GPU_TOKENS = (512, 2048, 8192)
# tile op: (out, in), tokens, density; a SmolLM2-135M-sized MLP weight at 2.3% and a LLaMA-7B one at 1%
CPU_TILE = (((1536, 576), 256, 0.023), ((4096, 4096), 512, 0.01))
GPU_TILE = (((4096, 4096), 2048, 0.01), ((11008, 4096), 2048, 0.01), ((4096, 11008), 2048, 0.01))


def _touched_bytes(index: SparseIndex, elem: int, weight_bytes: int, density: float) -> float:
    """Bytes a scatter_add moves: touched 32-byte sectors read + written, index, values, saved copy."""
    per_sector = max(1, 32 // elem)
    frac = 1.0 - (1.0 - density) ** per_sector  # random mask: chance a sector holds a nonzero
    return 2 * frac * weight_bytes + index.nnz * (4 + 4 + 4 + elem)  # row, col, fp32 values, saved


def _sampled_addmm(g2: torch.Tensor, x2: torch.Tensor, index: SparseIndex):
    """``torch.sparse.sampled_addmm`` closure on a CSR pattern, or ``None`` where it does not run."""
    try:
        crow = index.crow().to(g2.device)
        pattern = torch.sparse_csr_tensor(crow, index.col.long(), torch.zeros(index.nnz, dtype=g2.dtype,
                                          device=g2.device), size=index.shape)
        gt = g2.t().contiguous()  # (out, T)
        fn = lambda: torch.sparse.sampled_addmm(pattern, gt, x2, beta=0.0)  # noqa: E731
        fn()
        return fn
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _shira(out_f: int, in_f: int, r: int, dtype: torch.dtype, device: str) -> nn.Module | None:
    try:
        from peft import ShiraConfig, get_peft_model
    except ImportError:
        return None
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(device=device, dtype=dtype)
    return get_peft_model(model, ShiraConfig(r=r, target_modules=["0"], random_seed=0))


def _shira_layer(out_f: int, in_f: int, index: SparseIndex, device: str, dtype: torch.dtype, **kwargs) -> nn.Module:
    """Our SHiRA layer (``lp.SHiRA`` injected into one ``nn.Linear``) holding ``index`` with small random values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    lp.SHiRA(mask="random", target_modules=["0"], **kwargs).inject(net)
    layer = net[0]
    layer.set_mask("default", index.to("cpu"))
    with torch.no_grad():
        layer.shira_weight["default"].normal_(0, 0.01)
    return layer.to(device, dtype)


def bench_case(out_f: int, in_f: int, t: int, d: float, device: str, dtype: torch.dtype, warmup: int,
               repeats: int) -> list[list]:
    g = torch.Generator().manual_seed(0)
    case = f"W {out_f}x{in_f} T={t} d={d:g} {str(dtype).removeprefix('torch.')}"
    tm = lambda fn: time_fn(fn, warmup, repeats, device)  # noqa: E731
    rows: list[list] = []
    index = random_mask((out_f, in_f), d, g).to(device)
    x = torch.randn(t, in_f, generator=g).to(device, dtype)  # (T, in)
    dout = torch.randn(t, out_f, generator=g).to(device, dtype)  # (T, out)

    # dS: SDDMM vs dense dO^T X (2 T out in FLOPs) vs cuSPARSE/torch sampled_addmm
    t_dense = tm(lambda: dout.t() @ x)  # (out, in)
    t_sddmm = tm(lambda: sddmm(dout, x, index, torch.float32))
    rows.append(row(BENCH, case, "sddmm_ms_vs_dense_dW", t_sddmm * 1e3, t_dense * 1e3, device))
    rows.append(row(BENCH, case, "sddmm_TFLOPs", tflops(2 * t * index.nnz, t_sddmm), tflops(2 * t * out_f * in_f,
                    t_dense), device))
    if torch.device(device).type == "cuda":  # on CPU sddmm *is* sampled_addmm: compare with the gather reference
        sa = _sampled_addmm(dout, x, index)
        if sa is not None:
            rows.append(row(BENCH, case, "sddmm_ms_vs_sampled_addmm", t_sddmm * 1e3, tm(sa) * 1e3, device))
    else:
        t_ref = tm(lambda: sddmm_reference(dout, x, index, torch.float32))
        rows.append(row(BENCH, case, "sddmm_ms_vs_reference", t_sddmm * 1e3, t_ref * 1e3, device))

    # forward: in-place merge + GEMM + restore vs plain F.linear
    layer = _shira_layer(out_f, in_f, index, device, dtype, density=d)
    values = layer.shira_weight["default"]
    with torch.no_grad():
        w = layer.get_base_layer().weight
        t_fwd = tm(lambda: layer(x))
        t_lin = tm(lambda: F.linear(x, w))
    rows.append(row(BENCH, case, "forward_ms_vs_F.linear", t_fwd * 1e3, t_lin * 1e3, device))

    # training step, sparse path (in-place merge + SDDMM) vs the dense GEMM + gather fallback:
    # the crossover density is DENSE_FALLBACK_DENSITY for this device
    dy = torch.randn(t, out_f, generator=g).to(device, dtype)
    xg = x.detach().requires_grad_()  # dX as well: a layer inside a network

    kind = torch.device(device).type

    def step(fallback: float) -> None:
        saved, DENSE_FALLBACK_DENSITY[kind] = DENSE_FALLBACK_DENSITY.get(kind), fallback
        try:
            layer(xg).backward(dy)
        finally:
            DENSE_FALLBACK_DENSITY[kind] = saved
        values.grad = xg.grad = None

    t_sparse = tm(lambda: step(1.0))
    t_fallback = tm(lambda: step(0.0))
    rows.append(row(BENCH, case, "train_step_ms_vs_dense_fallback", t_sparse * 1e3, t_fallback * 1e3, device))

    # scatter_add into a copy of W vs a dense W += delta
    w2 = w.detach().clone()
    vals = values.detach()
    delta = layer.get_delta_weight("default").detach().to(dtype)
    t_sc = tm(lambda: scatter_add(w2, index, vals, 1e-6))
    t_dm = tm(lambda: w2.add_(delta, alpha=1e-6))
    rows.append(row(BENCH, case, "scatter_add_ms_vs_dense_add", t_sc * 1e3, t_dm * 1e3, device))
    wbytes = w.numel() * w.element_size()
    rows.append(row(BENCH, case, "scatter_add_GBps_touched",
                    gbps(_touched_bytes(index, w.element_size(), wbytes, d), t_sc),
                    gbps(2 * wbytes + delta.numel() * delta.element_size(), t_dm), device))
    return rows


def bench_train_step(out_f: int, in_f: int, t: int, device: str, dtype: torch.dtype, warmup: int,
                     repeats: int) -> list[list]:
    """Forward + backward, our SHiRA layer vs peft's shira layer, at shira's nnz = r * (out + in) ~ 1%."""
    r = max(1, round(0.01 * out_f * in_f / (out_f + in_f)))
    nnz = r * (out_f + in_f)
    d = nnz / (out_f * in_f)
    case = f"W {out_f}x{in_f} T={t} nnz={nnz} (d={d:.4f}) {str(dtype).removeprefix('torch.')}"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, in_f, generator=g).to(device, dtype).requires_grad_()  # dX too, as inside a network
    dy = torch.randn(t, out_f, generator=g).to(device, dtype)
    torch.manual_seed(0)
    flat = torch.randperm(out_f * in_f, generator=g)[:nnz]
    ours = _shira_layer(out_f, in_f, SparseIndex.from_flat(flat.sort().values, (out_f, in_f)), device, dtype, r=r)
    shira = _shira(out_f, in_f, r, dtype, device)
    rows: list[list] = []

    def step(model: nn.Module) -> None:
        model(x).backward(dy)
        x.grad = None
        for p in model.parameters():
            p.grad = None

    t_ours = time_fn(lambda: step(ours), warmup, repeats, device)
    if shira is None:
        rows.append(row(BENCH, case, "train_step_ms_vs_peft_shira", t_ours * 1e3, None, device))
        return rows
    assert sum(p.numel() for p in shira.parameters() if p.requires_grad) == nnz
    t_shira = time_fn(lambda: step(shira), warmup, repeats, device)
    rows.append(row(BENCH, case, "train_step_ms_vs_peft_shira", t_ours * 1e3, t_shira * 1e3, device))
    rows.append(row(BENCH, case, "train_step_peak_MiB_vs_peft_shira", peak_memory(lambda: step(ours), device)
                    / 2**20, peak_memory(lambda: step(shira), device) / 2**20, device))
    return rows


def bench_tile_step(out_f: int, in_f: int, t: int, d: float, device: str, dtype: torch.dtype, warmup: int,
                    repeats: int, b: int = 16) -> list[list]:
    """Forward + backward (dX and dS) of the tile op vs the unstructured op on the same positions vs the dense
    fallback, and the tile ``dS`` vs SDDMM on the expanded positions; random tiles, ``round(d * out * in / b)``."""
    g = torch.Generator().manual_seed(2)
    n_tiles = max(1, round(d * out_f * in_f / b))
    tiles = torch.randperm(out_f * in_f // b, generator=g)[:n_tiles].sort().values.to(device)  # (T,) int64
    index = SparseIndex.from_flat(expand_tiles(tiles, b), (out_f, in_f)).to(device)  # the same T * b positions
    rc = (index.row.long(), index.col.long())
    w = torch.randn(out_f, in_f, generator=g).to(device, dtype)
    values = (torch.randn(n_tiles, b, generator=g) * 0.01).to(device).requires_grad_()  # fp32, as SHiRA's
    x = torch.randn(t, in_f, generator=g).to(device, dtype).requires_grad_()  # dX too, as inside a network
    dy = torch.randn(t, out_f, generator=g).to(device, dtype)
    case = f"W {out_f}x{in_f} T={t} tiles of {b} d={d:g} {str(dtype).removeprefix('torch.')}"
    tm = lambda fn: time_fn(fn, warmup, repeats, device)  # noqa: E731

    def step(forward) -> None:  # noqa: ANN001
        forward().backward(dy)
        values.grad = x.grad = None

    t_tile = tm(lambda: step(lambda: tile_delta_linear(x, w, values, tiles)))
    t_sparse = tm(lambda: step(lambda: sparse_delta_linear(x, w, values.view(-1), index)))
    t_dense = tm(lambda: step(lambda: F.linear(x, w.index_put(rc, values.view(-1).to(dtype), accumulate=True))))
    xd, dyd = x.detach(), dy
    t_tile_ds = tm(lambda: tile_sddmm(dyd, xd, tiles, b, torch.float32))
    t_sddmm = tm(lambda: sddmm(dyd, xd, index, torch.float32))
    return [row(BENCH, case, "tile_step_ms_vs_unstructured", t_tile * 1e3, t_sparse * 1e3, device),
            row(BENCH, case, "tile_step_ms_vs_dense_fallback", t_tile * 1e3, t_dense * 1e3, device),
            row(BENCH, case, "tile_dS_ms_vs_sddmm", t_tile_ds * 1e3, t_sddmm * 1e3, device)]


def print_table(rows: list[list]) -> None:
    w = max(len(r[1]) for r in rows)
    m = max(len(r[2]) for r in rows)
    print(f"{'case':<{w}}  {'metric':<{m}}  {'value':>10}  {'baseline':>10}  {'ratio':>7}")
    for r in rows:
        print(f"{r[1]:<{w}}  {r[2]:<{m}}  {r[3]:>10}  {r[4]:>10}  {r[5]!s:>7}")
    print(f"device: {rows[0][6]}; versions: {rows[0][7]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to results.csv")
    p.add_argument("--only", choices=("op", "train", "tile"), default=None, help="run one kind of case")
    args = p.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    shapes, tokens = (GPU_SHAPES, GPU_TOKENS) if cuda else (CPU_SHAPES, CPU_TOKENS)
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"sparse_ops on {device_name(args.device)} ({dtype}); "
          f"{'Triton kernels' if cuda else 'PyTorch reference ops (CPU)'}", file=sys.stderr)
    jobs = [("op", s, t, d) for s in shapes for t in tokens for d in DENSITIES]
    jobs += [("train", s, t, 0.01) for s in shapes for t in tokens]
    jobs += [] if cuda else [("train", s, t, 0.01) for s, t in CPU_TRAIN_EXTRA]
    jobs += [("tile", s, t, d) for s, t, d in (GPU_TILE if cuda else CPU_TILE)]
    jobs = [j for j in jobs if args.only in (None, j[0])]
    rows: list[list] = []
    for kind, (o, i), t, d in tqdm(jobs, desc="sparse_ops", file=sys.stderr):
        if kind == "op":
            rows += bench_case(o, i, t, d, args.device, dtype, args.warmup, args.repeats)
        elif kind == "tile":  # CPU: bf16 too at the small shape (AVX2 bf16 GEMMs: a 4096^2 step takes minutes)
            for dt in (dtype,) if cuda or o * i > 1 << 21 else (torch.float32, torch.bfloat16):
                rows += bench_tile_step(o, i, t, d, args.device, dt, args.warmup, args.repeats)
        else:
            rows += bench_train_step(o, i, t, args.device, dtype, args.warmup, args.repeats)
    print_table(rows)
    if not args.no_csv:
        n = append_rows(rows)
        print(f"appended {n} rows to results.csv", file=sys.stderr)


if __name__ == "__main__":
    main()
