"""accelerate DDP (two gloo processes on CPU) with optim="sgdsai": identical ranks, one report row per rank."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny import free_port  # noqa: E402


def _launch(tmp_path: Path, script: Path, *args, timeout=600, expect_ok=True, config=None):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("accelerate is not installed: pip install -e '.[test]'")
    env = dict(os.environ, OMP_NUM_THREADS="1", MEMOPT_MEMORY_REPORT="auto", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if config is not None:  # one of the shipped accelerate configs
        cmd = [accelerate, "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
               str(script), *args]
    else:
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()),
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("config", [None, HERE.parent / "examples" / "accelerate" / "ddp.yaml"],
                         ids=["flags", "ddp_yaml"])
def test_ddp_ranks_end_identical_and_report_has_one_row_per_rank(tmp_path, config):
    proc = _launch(tmp_path, HERE / "launchers" / "ddp_train.py", str(tmp_path), config=config)
    infos = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["world_size"] == 2 and i["distributed"] and i["optimizer"] == "SGDSaI" for i in infos)
    p0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    sys.path.insert(0, str(HERE))
    from tiny import tiny_llama

    init = dict(tiny_llama().named_parameters())
    assert not all(torch.equal(init[k].detach(), p0[k]) for k in p0)  # the ranks did train
    rows = json.loads((tmp_path / "memory_report.json").read_text())
    assert [r["rank"] for r in rows] == [0, 1]
    assert rows[0]["optimizer_state_bytes"] == rows[1]["optimizer_state_bytes"] > 0
    assert proc.stdout.count("memopt memory report") == 1  # printed once, by the main process


def test_gradient_release_under_ddp_is_refused_clearly(tmp_path):
    proc = _launch(tmp_path, HERE / "launchers" / "ddp_train.py", str(tmp_path), "grad_release=true", expect_ok=False)
    assert "grad_release=true: distributed training (DDP/FSDP/DeepSpeed) is not supported" in proc.stderr


def test_chunked_loss_under_ddp_trains_like_the_models_loss(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _launch(tmp_path / "a", HERE / "launchers" / "ddp_train.py", str(tmp_path / "a"))
    _launch(tmp_path / "b", HERE / "launchers" / "ddp_train.py", str(tmp_path / "b"), "chunked_loss=4")
    want = torch.load(tmp_path / "a" / "params_rank0.pt", weights_only=True)
    got = [torch.load(tmp_path / "b" / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    infos = [json.loads((tmp_path / "b" / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["chunk_tokens"] for i in infos] == [4, 4]  # the chunked forward was installed on every rank
    assert all(torch.equal(got[0][k], got[1][k]) for k in want)  # the ranks stay in sync
    for k in want:
        torch.testing.assert_close(got[0][k], want[k], rtol=1e-4, atol=1e-5, msg=k)
