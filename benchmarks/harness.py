"""Shared benchmark harness: timing, peak memory, throughput, and rows for ``results.csv``.

Every script times the candidate and its baseline side by side in one process with the same
helpers, then appends ``benchmark, case, metric, value, baseline, ratio, device, versions, date``
rows (the header of ``benchmarks/results.csv``).
"""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).with_name("results.csv")
HEADER = ["benchmark", "case", "metric", "value", "baseline", "ratio", "device", "versions", "date"]
# When this process started, to the minute: every row of one run carries the same ``date``, so
# ``benchmarks/table.py`` can pick the latest run (older rows carry the day only).
RUN_STARTED = datetime.datetime.now().isoformat(timespec="minutes")

__all__ = [
    "HEADER",
    "RESULTS",
    "append_rows",
    "device_name",
    "gbps",
    "mean_std",
    "peak_memory",
    "row",
    "tflops",
    "time_fn",
    "versions",
]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], warmup: int = 3, repeats: int = 10, device: torch.device | str | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds.

    On CUDA each call is bracketed by ``torch.cuda.synchronize`` (pass ``device``, or it is
    inferred as CUDA when available), so the time covers the kernels, not just the launches.

    Args:
        fn: No-argument callable; its result is discarded.
        warmup: Untimed calls first (compilation, autotuning, allocator warm-up).
        repeats: Timed calls; the median is robust to a noisy neighbour.
    """
    if device is None and torch.cuda.is_available():
        device = "cuda"
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int | None:
    """Peak bytes of tensors allocated while ``fn()`` runs, above what was allocated before.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (exact for the caching allocator).
    CPU: replays the allocator's own alloc/free records from ``torch.profiler`` (``profile_memory``:
    one signed ``[memory]`` event per CPU allocation and free) and returns the highest running sum,
    so it is exact per tensor and independent of earlier peaks. ``None`` if the profiler records
    no memory events (then fall back to something coarser yourself, e.g. max RSS).
    """
    if device is not None and torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:  # pragma: no cover
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def tflops(flops: float, seconds: float) -> float:
    """Throughput in TFLOP/s."""
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def mean_std(values: Iterable[float]) -> str:
    """``mean ± std`` (population std) of the finite values, the mean alone for one, ``n/a`` for none."""
    import statistics

    finite = [v for v in values if v == v]  # NaN: a row that was not trained (too few examples)
    if not finite:
        return "n/a"
    return f"{statistics.fmean(finite):.3f}" + (f" ± {statistics.pstdev(finite):.3f}" if len(finite) > 1 else "")


def device_name(device: torch.device | str) -> str:
    """GPU name on CUDA, else the CPU's processor string."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def versions() -> str:
    """``torch X; triton Y; peft Z`` for the CSV's versions column."""
    parts = [f"torch {torch.__version__}"]
    for name in ("triton", "peft"):
        try:
            mod = __import__(name)
            parts.append(f"{name} {mod.__version__}")
        except Exception:  # noqa: BLE001  (a missing optional package is not an error here)
            pass
    return "; ".join(parts)


def row(
    benchmark: str, case: str, metric: str, value: float, baseline: float | None, device: torch.device | str
) -> list[Any]:
    """One CSV row; ``ratio = value / baseline`` (empty without a baseline)."""
    ratio = "" if baseline in (None, 0) or baseline != baseline else round(value / baseline, 4)
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)  # noqa: E731
    return [benchmark, case, metric, fmt(value), fmt(baseline), ratio, device_name(device), versions(), RUN_STARTED]


def append_rows(rows: Iterable[Sequence[Any]], path: Path = RESULTS) -> int:
    """Append rows to ``results.csv``; writes the header if the file is new, checks it if not.

    Raises:
        ValueError: the existing file's header differs from :data:`HEADER`, or a row has the
            wrong number of fields.
    """
    rows = [list(r) for r in rows]
    for r in rows:
        if len(r) != len(HEADER):
            raise ValueError(f"results row needs {len(HEADER)} fields {HEADER}, got {len(r)}: {r}")
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != HEADER:
            raise ValueError(f"{path} has header {header}, expected {HEADER}; fix the file or pass another path.")
        new = False
    else:
        new = True
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(HEADER)
        w.writerows(rows)
    return len(rows)
