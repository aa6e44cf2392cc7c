"""The prepared GPU check runs end to end on CPU (``--cpu-dry-run``: the same code paths, Triton interpreted)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_checks_every_kernel_and_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--csv", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "kernels: all agree with their references" in proc.stdout
    rows = list(csv.reader(out.open()))
    checked = {r[1].split()[0] for r in rows if r[0] == "gpu_check" and r[2] == "max_abs_err_vs_reference"}
    assert checked == {"scatter_set", "scatter_set_saved", "scatter_add", "scatter_restore", "sddmm",
                       "sparse_delta_linear", "sparse_delta_linear_dx", "sparse_delta_linear_dS",
                       "tile_delta_linear", "tile_delta_linear_dx", "tile_delta_linear_dS", "tile_sddmm"}
    dtypes = {r[1].split()[1] for r in rows if r[0] == "gpu_check" and r[2] == "max_abs_err_vs_reference"}
    assert dtypes == {"float32", "bfloat16", "float16"}
    assert {r[0] for r in rows} >= {"gpu_check", "sparse_ops", "rosa_step", "serving"}
    assert "SDDMM at 1%" in proc.stdout and "DENSE_FALLBACK_DENSITY['cuda']" in proc.stdout
    assert "tile_step_ms_vs_unstructured: median" in proc.stdout
