"""The prepared GPU session script runs end to end on CPU (its --dry-run): every step finishes, and each result
file has the rows the script promises, so a session that gets a GPU spends its minutes measuring."""

import csv
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    out = Path(str(out) + "_dryrun")
    log = (out / "session.log").read_text()
    assert run.returncode == 0, log + run.stdout[-2000:] + run.stderr[-2000:]
    for name in ("tests_1", "memcheck", "parity", "bench", "profile"):
        assert f"{name}: rc=0" in log, log
    parity = list(csv.DictReader(open(out / "parity.csv")))
    assert {(r["kernel"], r["dtype"], r["stochastic_rounding"]) for r in parity} == {
        (k, d, sr) for k in ("sgdsai_8bit", "adamw_8bit")
        for d, sr in (("float32", "False"), ("bfloat16", "False"), ("bfloat16", "True"))}
    assert all(r["codes_max_step"] in ("0", "1") for r in parity)
    bench = list(csv.DictReader(open(out / "kernels_gpu_dryrun.csv")))
    assert not [r for r in bench if r["error"]], [r for r in bench if r["error"]]
    kernels = {(r["kernel"], r["stochastic_rounding"]) for r in bench if r["what"] == "kernel"}
    assert {("sgdsai_8bit_bf16", "True"), ("sgdsai_8bit_bf16", "False"), ("adamw_8bit_bf16", "True"),
            ("adamw_8bit_bf16", "False"), ("quantize_fp32", ""), ("copy_fp32", "")} <= kernels
    steps = {r["kernel"] for r in bench if r["what"] == "step" and r["ms_median"]}
    assert {"memopt_sgdsai_8bit_triton", "memopt_adamw_8bit_triton", "torch_adamw_fused", "bnb_adamw8bit"} <= steps
    assert "Self CPU" in (out / "profile.txt").read_text()
