"""The README demo script, end to end on a tiny model saved to disk (the real-model run is the README command)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import char_tokenizer, free_port, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune.py"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_example_compares_sgdsai_with_adamw_and_prints_the_report(tiny_model_dir, tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--model_name_or_path", str(tiny_model_dir), "--max_steps", "6",
           "--seq_len", "32", "--logging_steps", "2", "--output_dir", str(tmp_path), "--learning_rate", "0.05"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "[sgdsai] step    6/6" in out and "[adamw_torch] step    6/6" in out
    assert out.count("memopt memory report") == 2
    table = out.split("Same task, seed, data and steps")[1]
    lines = {row.split()[0]: row.split() for row in table.splitlines() if row.startswith(("sgdsai", "adamw_torch"))}
    assert float(lines["sgdsai"][3]) < float(lines["sgdsai"][2])  # eval loss went down
    reports = {name: json.loads((tmp_path / name / "memory_report.json").read_text())[0]
               for name in ("sgdsai", "adamw_torch")}
    # SGD-SaI holds half of AdamW's state (AdamW also has a 4-byte step per tensor)
    assert reports["sgdsai"]["optimizer_state_bytes"] * 2 < reports["adamw_torch"]["optimizer_state_bytes"]


def test_example_rejects_an_unknown_optimizer(tiny_model_dir, tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--model_name_or_path", str(tiny_model_dir), "--optim", "sgdsia",
           "--compare", "none", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "sgdsia is not a valid OptimizerNames" in proc.stderr


@pytest.mark.slow
def test_example_under_accelerate_launch_ddp(tiny_model_dir, tmp_path):
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", str(EXAMPLE), "--model_name_or_path", str(tiny_model_dir), "--compare",
           "none", "--max_steps", "4", "--seq_len", "32", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(2 process(es))" in proc.stdout
    rows = json.loads((tmp_path / "memory_report.json").read_text())
    assert [r["rank"] for r in rows] == [0, 1]


def test_trl_sft_recipe_under_accelerate_launch_with_sgdsai(tiny_model_dir, tmp_path):
    import trl  # noqa: F401
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "examples" / "sft_trl.py"),
           "--model_name_or_path", str(tiny_model_dir), "--optim", "sgdsai", "--optim_args", "scale=factored",
           "--learning_rate", "3e-3", "--max_steps", "6", "--per_device_train_batch_size", "2", "--max_length", "48",
           "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
           "--text_chars", "120", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[sft_trl]"))
    first, last = (float(x) for x in line.split("loss ")[1].split(" -> "))
    assert "optim=sgdsai steps=6" in line and last < first
    rows = json.loads((tmp_path / "memory_report.json").read_text())
    assert [r["rank"] for r in rows] == [0, 1] and all(r["optimizer"] == "SGDSaI" for r in rows)
