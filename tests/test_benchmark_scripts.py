"""The GPU benchmark script must not rot between GPU runs: run its CPU interpreter dry run."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_gpu_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = tmp_path / "k"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(str(out) + "_dryrun.csv")))
    kernels = {r["kernel"] for r in rows}
    assert {"quantize_fp32", "sgdsai_8bit_bf16", "adamw_8bit_bf16", "memopt_sgdsai_8bit_triton"} <= kernels
    step = {r["kernel"]: r for r in rows if r["what"] == "step"}
    assert float(step["memopt_sgdsai_8bit_triton"]["state_bytes_per_param"]) < 1.02
