"""The prepared GPU check: every Triton kernel against its PyTorch reference, then the GPU benchmark cases.

One command on a lent GPU (H100/H200; under 8 minutes, installs nothing beyond the project)::

    python benchmarks/gpu_check.py                 # CUDA: kernels at fp32/bf16/fp16, then the benchmarks
    python benchmarks/gpu_check.py --cpu-dry-run   # the same code paths at small shapes, Triton interpreted

1. **Kernels**: ``scatter_set``/``scatter_add``/``scatter_restore``, ``sddmm`` and ``sparse_delta_linear``
   (forward and both gradients) with ``use_triton=True`` against ``use_triton=False`` at the test shapes
   (37 x 53, T = 29; densities one entry, 1%, 100%) in fp32, bf16 and fp16: the largest error per op and
   dtype, and pass/fail against the tests' tolerances. The same for the tile op ``tile_delta_linear`` (forward,
   dX, dS) and its ``tile_sddmm`` kernel at 37 x 64, tiles of 16 (one tile, 10%, all).
2. **Benchmarks** (rows into ``benchmarks/results.csv`` with the GPU's name): the GPU cases of
   ``sparse_ops.py`` (SDDMM vs the cuBLAS dense dW, scatter GB/s, the sparse step vs its dense fallback, the
   tile step vs the unstructured step and the dense fallback, the tile dS vs SDDMM),
   of ``rosa_step.py`` (a RoSA step vs LoRA at LLaMA-7B layer shapes), and an ``AdapterBank`` switch on a
   block of LLaMA-7B shapes against a dense ``W += delta``, and ``serving.py``'s request stream (width-1024
   Llama, N = 2 and 8: AdapterBank eager/compiled vs peft hotswap eager/compiled, merge, set_adapter).
3. **Targets** (RoSA's kernels' range): SDDMM <= 0.4x the dense dW GEMM at 1% and <= 0.8x at 2%; scatter
   >= 70% of the device's measured copy bandwidth on the bytes touched; and the density where the sparse
   training step stops beating its dense fallback, the value ``DENSE_FALLBACK_DENSITY["cuda"]`` should take.

Exit status 1 if a kernel disagrees with its reference.
"""

from __future__ import annotations

import os
import sys

if "--cpu-dry-run" in sys.argv:  # before anything imports triton: its interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import rosa_step  # noqa: E402
import serving  # noqa: E402
import sparse_ops  # noqa: E402
from harness import append_rows, device_name, row, time_fn  # noqa: E402
from lightning_peft.kernels import (  # noqa: E402
    scatter_add,
    scatter_restore,
    scatter_set,
    sddmm,
    sparse_delta_linear,
    tile_delta_linear,
    tile_sddmm,
)

import lightning_peft as lp  # noqa: E402
from lightning_peft.methods._sparse import random_mask  # noqa: E402

BENCH = "gpu_check"
OUT, IN, T = 37, 53, 29  # the kernel tests' shapes
TILE_IN, TILE_B = 64, 16  # the tile op's: in a multiple of the tile width, 148 tiles of 16
TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 6e-3}  # max abs error, inputs ~N(0, 1)


def _inputs(density: float, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    index = random_mask((OUT, IN), density, g).to(device)
    w = torch.randn(OUT, IN, generator=g).to(device, dtype)
    v = (torch.randn(index.nnz, generator=g) * 0.1).to(device)
    x = torch.randn(T, IN, generator=g).to(device, dtype)
    dy = torch.randn(T, OUT, generator=g).to(device, dtype)
    return index, w, v, x, dy


def _kernel_errors(density: float, dtype: torch.dtype, device: str) -> dict[str, float]:
    """Largest |Triton - reference| per op at one density and dtype."""
    index, w, v, x, dy = _inputs(density, dtype, device)
    errs: dict[str, float] = {}
    outs = {}
    for tri in (True, False):
        ws, wa = w.clone(), w.clone()
        saved_set = scatter_set(ws, index, v, use_triton=tri)
        saved_add = scatter_add(wa, index, v, 0.5, use_triton=tri)
        restored = wa.clone()
        scatter_restore(restored, index, saved_add, use_triton=tri)
        xs, vs = x.clone().requires_grad_(), v.clone().requires_grad_()
        y = sparse_delta_linear(xs, w, vs, index, use_triton=tri)
        y.backward(dy)
        outs[tri] = {"scatter_set": ws, "scatter_set_saved": saved_set, "scatter_add": wa,
                     "scatter_restore": restored - w, "sddmm": sddmm(dy, x, index, torch.float32, use_triton=tri),
                     "sparse_delta_linear": y, "sparse_delta_linear_dx": xs.grad, "sparse_delta_linear_dS": vs.grad}
    for name, mine in outs[True].items():
        errs[name] = float((mine.float() - outs[False][name].float()).abs().max()) if mine.numel() else 0.0
    return errs


def _tile_errors(fraction: float, dtype: torch.dtype, device: str) -> dict[str, float]:
    """Largest |Triton - PyTorch path| of the tile op's forward, dX, dS and of ``tile_sddmm`` (at least one tile)."""
    g = torch.Generator().manual_seed(1)
    count = OUT * TILE_IN // TILE_B
    tiles = torch.randperm(count, generator=g)[: max(1, round(fraction * count))].sort().values.to(device)
    w = torch.randn(OUT, TILE_IN, generator=g).to(device, dtype)
    v = (torch.randn(tiles.numel(), TILE_B, generator=g) * 0.1).to(device)
    x = torch.randn(T, TILE_IN, generator=g).to(device, dtype)
    dy = torch.randn(T, OUT, generator=g).to(device, dtype)
    outs = {}
    for tri in (True, False):
        xs, vs = x.clone().requires_grad_(), v.clone().requires_grad_()
        y = tile_delta_linear(xs, w, vs, tiles, use_triton=tri)
        y.backward(dy)
        outs[tri] = {"tile_delta_linear": y, "tile_delta_linear_dx": xs.grad, "tile_delta_linear_dS": vs.grad,
                     "tile_sddmm": tile_sddmm(dy, x, tiles, TILE_B, torch.float32, use_triton=tri)}
    return {name: float((mine.float() - outs[False][name].float()).abs().max()) for name, mine in outs[True].items()}


def check_kernels(device: str) -> tuple[list[list], bool]:
    rows, ok = [], True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        worst: dict[str, float] = {}
        for density in (1 / (OUT * IN), 0.01, 1.0):
            for name, err in _kernel_errors(density, dtype, device).items():
                worst[name] = max(worst.get(name, 0.0), err)
        for fraction in (0.0, 0.1, 1.0):
            for name, err in _tile_errors(fraction, dtype, device).items():
                worst[name] = max(worst.get(name, 0.0), err)
        for name, err in worst.items():
            passed = err <= TOL[dtype]
            ok &= passed
            shape = f"{OUT}x{TILE_IN} b={TILE_B}" if name.startswith("tile") else f"{OUT}x{IN}"
            rows.append(row(BENCH, f"{name} {str(dtype).removeprefix('torch.')} {shape} T={T}",
                            "max_abs_err_vs_reference", err, TOL[dtype], device))
            print(f"{'ok  ' if passed else 'FAIL'} {name:28s} {str(dtype):15s} max |err| {err:.3g} (tol {TOL[dtype]})")
    return rows, ok


def copy_bandwidth(device: str, mib: int) -> float:
    """GB/s of a large device-to-device copy (read + write): the achievable bandwidth the scatter is judged by."""
    a = torch.empty(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), 2, 5, device)
    return 2 * a.numel() * 4 / t / 1e9


def bench_bank_switch(hidden: int, inter: int, device: str, dtype: torch.dtype, repeats: int) -> list[list]:
    """``AdapterBank.activate`` alternating two SHiRA adapters (1%) vs a dense ``W += delta`` of every layer."""
    from switching import Stack, _randomize

    torch.manual_seed(0)
    base = Stack(hidden, inter).to(device, dtype)
    bank = lp.AdapterBank(base)
    for name, seed in (("a", 1), ("b", 2)):
        src = Stack(hidden, inter).to(device, dtype)
        src.load_state_dict(base.state_dict())
        lp.SHiRA(density=0.01, mask="random", seed=seed).inject(src)
        _randomize(src, seed)
        bank.add(name, src)
    names = iter(["a", "b"] * 10_000)
    t_bank = time_fn(lambda: bank.activate(next(names)), 2, repeats, device)
    weights = [m.weight.data for m in base.modules() if isinstance(m, torch.nn.Linear)]
    deltas = [torch.randn_like(w) * 1e-3 for w in weights]
    t_dense = time_fn(lambda: [w.add_(d) for w, d in zip(weights, deltas, strict=True)], 2, repeats, device)
    case = f"stack {hidden}/{inter} shira d=0.01 {str(dtype).removeprefix('torch.')}"
    return [row(BENCH, case, "bank_switch_ms_vs_dense_add", t_bank * 1e3, t_dense * 1e3, device)]


def summarize(rows: list[list], bandwidth: float) -> None:
    """Print the targets: SDDMM ratios at 1% / 2%, scatter bandwidth share, the fallback crossover."""
    def ratios(metric: str, d: float) -> list[float]:
        return [float(r[5]) for r in rows if r[2] == metric and f" d={d:g} " in f"{r[1]} " and r[5] not in (None, "")]

    for d, target in ((0.01, 0.4), (0.02, 0.8)):
        vals = ratios("sddmm_ms_vs_dense_dW", d)
        if vals:
            print(f"SDDMM at {d:.0%}: {statistics.median(vals):.2f}x the dense dW GEMM (median of {len(vals)}; "
                  f"target <= {target}x): {'met' if statistics.median(vals) <= target else 'missed'}")
    touched = [float(r[3]) for r in rows if r[2] == "scatter_add_GBps_touched"]
    if touched:
        share = statistics.median(touched) / bandwidth
        print(f"scatter: {statistics.median(touched):.1f} GB/s on the bytes touched = {share:.0%} of the measured "
              f"copy bandwidth {bandwidth:.1f} GB/s (target >= 70%): {'met' if share >= 0.7 else 'missed'}")
    for metric in ("tile_step_ms_vs_unstructured", "tile_step_ms_vs_dense_fallback", "tile_dS_ms_vs_sddmm"):
        vals = [float(r[5]) for r in rows if r[2] == metric and r[5] not in (None, "")]
        if vals:
            print(f"{metric}: median {statistics.median(vals):.2f}x over {len(vals)} shapes (< 1: the tile op is faster)")
    crossing = sorted({d for d in sparse_ops.DENSITIES if any(v >= 1.0 for v in ratios("train_step_ms_vs_dense_fallback", d))})
    print("sparse step vs dense fallback: the sparse path loses from density "
          f"{crossing[0] if crossing else '> ' + str(max(sparse_ops.DENSITIES))}: set DENSE_FALLBACK_DENSITY['cuda'] there")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU, small shapes, Triton in its interpreter")
    ap.add_argument("--csv", type=Path, default=None, help="rows go here (default: benchmarks/results.csv on CUDA, none in a dry run)")
    args = ap.parse_args()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run on the GPU machine, or pass --cpu-dry-run")
    device = "cpu" if dry else "cuda"
    print(f"device: {device_name(device)}; torch {torch.__version__}", flush=True)
    rows, ok = check_kernels(device)
    dtype = torch.float32 if dry else torch.bfloat16
    shapes, tokens = (((96, 64),), (32,)) if dry else (sparse_ops.GPU_SHAPES, sparse_ops.GPU_TOKENS)
    repeats, warmup = (2, 1) if dry else (10, 3)
    for o, i in shapes:
        for t in tokens:
            for d in ((0.01, 0.1) if dry else sparse_ops.DENSITIES):
                rows += sparse_ops.bench_case(o, i, t, d, device, dtype, warmup, repeats)
            rows += sparse_ops.bench_train_step(o, i, t, device, dtype, warmup, repeats)
    for (o, i), t, d in (((96, 64), 32, 0.1),) if dry else sparse_ops.GPU_TILE:
        rows += sparse_ops.bench_tile_step(o, i, t, d, device, dtype, warmup, repeats)
    for (o, i), t in ((((96, 64), 32),) if dry else rosa_step.GPU_LAYERS):
        case, res = rosa_step.bench_layer(o, i, t, device, dtype, warmup, repeats)
        (t_l, _, _), (t_r, _, _) = res["lora"], res["rosa"]
        rows.append(row("rosa_step", case, "train_step_ms_vs_lora", t_r * 1e3, t_l * 1e3, device))
    rows += bench_bank_switch(*((64, 96) if dry else (4096, 11008)), device, dtype, repeats)
    # serving: AdapterBank vs peft hotswap / merge / set_adapter on a request stream (compiled rows on the GPU only)
    rows += serving.run_model(*(("llama-v1", [2], 16, 2, 4, ["base", "bank", "hotswap"]) if dry else
                               ("llama-w1024", [2, 8], 16, 8, 32, list(serving.ROWS))), device)[0]
    if dry:
        print("dry run: CPU timings below only show the code paths run; they say nothing about a GPU")
    summarize(rows, copy_bandwidth(device, 8 if dry else 1024))
    if args.csv or not dry:
        n = append_rows(rows, args.csv) if args.csv else append_rows(rows)
        print(f"wrote {n} rows to {args.csv or 'benchmarks/results.csv'}")
    print("kernels: all agree with their references" if ok else "kernels: SOME DISAGREE (see FAIL lines)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
