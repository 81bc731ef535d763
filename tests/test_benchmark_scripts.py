"""The GPU benchmark script must not rot between GPU runs (its CPU interpreter dry run); the quality benchmark's
recheck picks the table's best rows and reports the change, and its results file only grows."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_recheck_trains_each_best_row_again_and_reports_the_change():
    q = _quality()
    rows = [dict(task="full20", label=label, optim=label, optim_args="", learning_rate=lr, eval_loss_after=loss)
            for label, lr, loss in (("sgdsai", "1e-4", "2.60"), ("sgdsai", "3e-4", "2.50"),
                                    ("adamw_torch", "3e-4", "2.40"))]
    rows.append(dict(rows[1], task="lee20", eval_loss_after="3.50"))
    plan = q.recheck_plan(rows, ["full20"], {"sgdsai", "adamw_torch", "lion"})  # lion: not in the table, left out
    assert [(r["label"], r["learning_rate"]) for r in plan] == [("adamw_torch", "3e-4"), ("sgdsai", "3e-4")]
    row = q.recheck_row(plan[1], {"eval_loss_after": 2.525, "update_path": "cpu:2", "train_runtime_s": 9.0})
    assert (row["eval_loss_table"], row["eval_loss_now"], row["relative_change"]) == (2.5, 2.525, 0.01)
    assert row["update_path"] == "cpu:2" and row["learning_rate"] == "3e-4" and set(row) == set(q.RECHECK_FIELDS)


def test_quality_recheck_refuses_a_selection_the_table_does_not_have():
    q = _quality()
    rows = [dict(task="full20", label="sgdsai", optim="sgdsai", optim_args="", learning_rate="3e-4",
                 eval_loss_after="2.5")]
    with pytest.raises(ValueError, match="no row for tasks .'lee20'."):
        q.recheck_plan(rows, ["lee20"], {"sgdsai"})


def test_quality_results_are_appended_with_one_header_and_read_back(tmp_path):
    q = _quality()
    path = tmp_path / "new" / "quality.csv"  # the folder does not exist yet
    for lr in ("1e-4", "3e-4"):  # two runs of the script: the second appends below the first
        with q._appender(path, q.RECHECK_FIELDS) as write:
            write(dict(task="full20", label="sgdsai", learning_rate=lr))
    assert path.read_text().count("task,label") == 1
    assert [(r["task"], r["learning_rate"]) for r in q.read_rows(path)] == [("full20", "1e-4"), ("full20", "3e-4")]
    with pytest.raises(ValueError, match="not in fieldnames"):  # a column the file does not have is refused
        with q._appender(path, q.RECHECK_FIELDS) as write:
            write(dict(task="full20", no_such_column=1))


def test_quality_start_loss_of_a_task_comes_from_the_run_that_measured_it():
    q = _quality()
    rows = [dict(task="full20", eval_loss_before="nan"), dict(task="full20", eval_loss_before="2.8559"),
            dict(task="lee20", eval_loss_before="3.7807"), dict(task="lee20", eval_loss_before="nan")]
    assert q.start_losses(rows) == {"full20": 2.8559, "lee20": 3.7807}
    assert q.start_losses([dict(task="lora30", eval_loss_before="nan")]) == {}  # none measured: evaluate again


def test_the_committed_quality_table_covers_each_grid_and_brackets_each_best_lr():
    """Each optimizer is compared at the best point of its lr grid: the committed results hold every grid point
    the script names for each (task, optimizer) they cover, and each best lr has a grid point on either side (a
    best at the grid's edge says the grid must grow)."""
    q = _quality()
    rows = q.read_rows(q.OUT.with_suffix(".csv"))
    lrs: dict = {}
    for r in rows:
        lrs.setdefault((r["task"], r["label"]), set()).add(float(r["learning_rate"]))
    assert len(lrs) >= 20
    grids = {label: grid for label, _, _, grid in q.OPTIMIZERS}
    for (task, label), have in lrs.items():
        assert have == set(grids[label][q.TASKS[task][2]]), (task, label)
    for (task, label), r in q.best_rows(rows).items():
        assert min(lrs[task, label]) < float(r["learning_rate"]) < max(lrs[task, label]), (task, label)
