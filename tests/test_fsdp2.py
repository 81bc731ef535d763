"""FSDP2 (torch.distributed.fsdp.fully_shard, 2 gloo processes on CPU): SGD-SaI computes on shards exactly what one
device computes; the other optimizers refuse clearly; a DCP checkpoint written at 2 ranks resumes at 1 and 2."""

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

import memopt  # noqa: E402
from launchers.fsdp2_train import NAN_AT, NAN_CASES, OPTIMIZERS, batches, fixed_grad_steps, train  # noqa: E402
from tiny import free_port, tiny_llama  # noqa: E402


def _torchrun(out: Path, mode: str, nproc: int = 2, *extra: str):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun is not on PATH (it comes with torch)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(HERE / "launchers" / "fsdp2_train.py"), mode, str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _single(name, steps, reseed_after=None):
    model = tiny_llama()
    opt = OPTIMIZERS[name](list(model.parameters()))
    bs = list(batches(steps))
    split = reseed_after if reseed_after is not None else steps
    train(model, opt, bs[:split])
    if reseed_after is not None:
        torch.manual_seed(123)  # as the launcher's save run does after its checkpoint
    train(model, opt, bs[split:])
    return dict(model.named_parameters())


@pytest.fixture(scope="module")
def equal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_equal")
    _torchrun(out, "equal")
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", ["sgdsai", "sgdsai_m0", "sgdsai_gsnr_max", "sgdsai_factored", "sgdsai_8bit",
                                  "sgdsai_8bit_gsnr_max", "memopt_adamw_8bit", "frugal_columns", "frugal_blocks",
                                  "frugal_sgdsai_columns", "frugal_sgdsai_blocks", "frugal_8bit_columns",
                                  "sgdsai_8bit_triton",
                                  "sgdsai_gsnr_max_triton", "memopt_adamw_8bit_triton"])
def test_on_fsdp2_shards_equals_one_device(equal_run, name):
    # 8-bit state is in row blocks: the same blocks on shards as on one device, so the results agree to rounding
    out, results = equal_run
    assert results[name]["ok"] is True
    if "8bit" in name:
        assert results[name]["uint8_state"] > 0
    if name.endswith("_triton"):  # the fused kernels on the local shards, as on one device: SGD-SaI's for every
        # tensor, AdamW's for the tensors with 8-bit state (its 32-bit tensors take torch's fused CPU AdamW)
        paths, r = results[name]["paths"], results[name]
        fused = r["params_8bit"] if name.startswith("memopt_adamw") else r["params"]
        assert 0 < fused and paths == {"triton": fused, **({"cpu": r["params"] - fused} if fused < r["params"]
                                                          else {})}, paths
    else:
        assert "triton" not in results[name]["paths"]
    r0 = torch.load(out / f"{name}_rank0.pt", weights_only=True)
    r1 = torch.load(out / f"{name}_rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # ranks agree exactly
    # the same synthetic gradients on 2 ranks and on one device: the optimizer itself. 32-bit state: equal to
    # rounding. 8-bit: cross-rank sums in another order can move a momentum value across a code midpoint, one code
    # step (1.5% of its block maximum) at most; over 4 steps at lr 1e-2 (normalised updates <= 3) that bounds the
    # weight difference by 4 * 1e-2 * 3 * 0.015 = 1.8e-3
    tol = dict(atol=1.8e-3, rtol=0) if "8bit" in name else dict(atol=1e-6, rtol=1e-5)
    fixed = torch.load(out / f"{name}_fixed_rank0.pt", weights_only=True)
    model = tiny_llama()
    fixed_grad_steps(model, OPTIMIZERS[name](list(model.parameters())))
    close = 0
    for k, p in model.named_parameters():
        torch.testing.assert_close(fixed[k], p.detach(), **tol, msg=k)
        close += int((fixed[k] - p.detach()).abs().le(1e-6).sum())
    assert close >= 0.99 * sum(p.numel() for p in model.parameters())  # a code flip is rare
    # training the model: FSDP2's gradient reduction rounds in another order than one device; Adam-type
    # normalisation amplifies that for near-zero second moments
    ref = _single(name, 4)
    train_tol = dict(atol=1e-4, rtol=1e-4) if name.startswith("frugal") and "8bit" not in name else tol
    for k, v in r0.items():
        torch.testing.assert_close(v, ref[k].detach(), **train_tol, msg=k)


@pytest.mark.parametrize("name", NAN_CASES)
def test_a_nan_in_one_shard_skips_the_tensor_on_every_rank_as_on_one_device(equal_run, name):
    """Two ranks, one of which holds a NaN in its shard of one gradient: both skip that tensor's update (its
    shards and state stay as they were), count one skip, and end where one device given the same gradients ends."""
    out, results = equal_run
    assert results[name]["nan_skips"] == [1, 1]
    sharded = torch.load(out / f"{name}_nan_rank0.pt", weights_only=True)
    model = tiny_llama()
    opt = OPTIMIZERS[name](list(model.parameters()))
    fixed_grad_steps(model, opt, nan_at=NAN_AT)
    assert opt.nonfinite_skips == 1
    clean = torch.load(out / f"{name}_fixed_rank0.pt", weights_only=True)
    tol = dict(atol=1.8e-3, rtol=0) if "8bit" in name else dict(atol=1e-6, rtol=1e-5)  # as in the test above
    nan_name = [k for k, _ in model.named_parameters()][NAN_AT[1]]
    for k, p in model.named_parameters():
        assert torch.isfinite(sharded[k]).all(), k
        torch.testing.assert_close(sharded[k], p.detach(), **tol, msg=k)
    # the skipped step shows: that tensor ends elsewhere than in the run without the NaN
    assert not torch.allclose(sharded[nan_name], clean[nan_name], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,why", [("frugal", "selection='random'"), ("memopt_galore", "selection='svd'"),
                                      ("adamsnsm", "per shard"), ("lion", "not built or tested for Lion")])
def test_other_optimizers_refuse_fsdp2_clearly(equal_run, name, why):
    _, results = equal_run
    msg = results[name]["refused"]
    assert "does not support FSDP2 / DTensor-sharded parameters" in msg and why in msg


def test_gradient_release_is_refused_under_fsdp2(equal_run):
    _, results = equal_run
    assert "gradient release is not supported with more than one process" in results["grad_release"]["refused"]


def _tol(name):
    """Weights after training steps: 32-bit state to rounding; 8-bit state within one code step per element per
    step; FRUGAL's Adam to the rounding of the gradient reduction (see test_on_fsdp2_shards_equals_one_device)."""
    if "8bit" in name:
        return dict(atol=1.8e-3, rtol=0)
    return dict(atol=1e-4, rtol=1e-4) if name.startswith("frugal") else dict(atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgdsai", "sgdsai_gsnr_max", "sgdsai_8bit", "memopt_adamw_8bit", "frugal_columns",
                                  "frugal_blocks", "frugal_8bit_columns"])
def test_dcp_checkpoint_from_2_ranks_resumes_at_1_and_2(tmp_path, name):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    _torchrun(tmp_path, "save", 2, name)
    straight = torch.load(tmp_path / "uninterrupted.pt", weights_only=True)
    ref = _single(name, 6, reseed_after=3)
    for k, v in straight.items():  # the sharded run equals one device over 6 steps
        torch.testing.assert_close(v, ref[k].detach(), **_tol(name))
    _torchrun(tmp_path, "resume", 2, name)  # 2 -> 2
    resumed2 = torch.load(tmp_path / "resumed_world2.pt", weights_only=True)
    # 2 -> 1: a plain (unsharded) model and optimizer in this process, no process group
    model = tiny_llama(seed=7)
    opt = OPTIMIZERS[name](list(model.parameters()))
    if hasattr(opt, "init_state_like_checkpoint"):  # FRUGAL: the keys the checkpoint holds (blocks: step-dependent)
        opt.init_state_like_checkpoint(model, tmp_path / "ckpt")
    elif hasattr(opt, "init_state"):
        opt.init_state()  # DCP fills only the keys its template holds
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(model, msd)
    set_optimizer_state_dict(model, opt, osd)
    assert len(opt.state) == len(list(model.parameters()))  # the checks below are over every parameter's state
    if name == "sgdsai_gsnr_max":
        assert all(isinstance(st["gsnr"], float) and st["gsnr"] > 0 for st in opt.state.values())
    elif name == "frugal_blocks":  # the active tensors' inner state and every tensor's round came back
        assert sum("exp_avg" in st and st["step"] > 0 for st in opt.state.values()) > 0
        assert all(st["block_round"] == 1 for st in opt.state.values() if "block_round" in st)
    elif name.startswith("frugal"):  # the subspace (same columns on every rank) and the inner step count came back
        assert any("proj_indices" in st and st["iteration"] == 3 for st in opt.state.values())
    else:  # each tensor's step count came back
        assert all(st["step"] == 3 for st in opt.state.values())
    if "8bit" in name:  # the 8-bit state came back as 8-bit codes in row blocks
        assert any(v.dtype == torch.uint8 for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    torch.manual_seed(123)  # the RNG state the launcher's runs continue from
    train(model, opt, list(batches(6))[3:])
    for k, v in straight.items():
        torch.testing.assert_close(resumed2[k], v, atol=1e-6, rtol=1e-5)  # 2 -> 2: the same computation
        torch.testing.assert_close(dict(model.named_parameters())[k].detach(), v, **_tol(name))


@pytest.mark.parametrize("name", ["sgdsai", "sgdsai_8bit", "memopt_adamw_8bit"])
def test_dcp_checkpoint_from_1_process_resumes_at_2_ranks(tmp_path, name):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = tiny_llama()
    opt = OPTIMIZERS[name](list(model.parameters()))
    bs = list(batches(6))
    train(model, opt, bs[:3])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path / "ckpt"))
    torch.manual_seed(123)
    train(model, opt, bs[3:])  # the uninterrupted single-device run
    _torchrun(tmp_path, "resume", 2, name)  # the same checkpoint, resharded onto 2 ranks
    resumed = torch.load(tmp_path / "resumed_world2.pt", weights_only=True)
    for k, p in model.named_parameters():
        torch.testing.assert_close(resumed[k], p.detach(), **_tol(name), msg=k)


def test_deepspeed_partitions_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.ds_id = 0  # what ZeRO-3 puts on its partitioned parameters
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO"):
        memopt.SGDSaI([p])
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = memopt.SGDSaI([w])
    flat = torch.nn.Parameter(torch.randn(16))  # ZeRO-1/2 swap the group's params for a flat partition
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn(16)
    with pytest.raises(NotImplementedError, match="flat 1-D partitions"):
        opt.step()


@pytest.mark.parametrize("name", ["sgdsai", "sgdsai_gsnr_max"])
def test_init_state_before_the_first_step_changes_nothing(name):
    a, b = tiny_llama(), tiny_llama()
    oa, ob = OPTIMIZERS[name](list(a.parameters())), OPTIMIZERS[name](list(b.parameters()))
    ob.init_state()
    assert len(ob.state) == len(list(b.parameters()))  # a state for every parameter
    if name == "sgdsai":
        assert all(st["step"] == 0 for st in ob.state.values())
    else:
        assert all(st["started"] is False and st["gsnr"] == 0.0 for st in ob.state.values())
    train(a, oa, batches(4))
    train(b, ob, batches(4))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def _torchrun_script(script: str, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEMOPT_MEMORY_REPORT="auto")
    cmd = [shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "launchers" / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("optim", ["sgdsai", "sgdsai_8bit"])
def test_trainer_with_the_fsdp2_config_trains_reports_shards_and_resumes(tmp_path, optim):
    from transformers import TrainingArguments

    from memopt.integrations.transformers import optimizer_cls_and_kwargs

    _torchrun_script("fsdp2_trainer.py", tmp_path, optim)
    straight = json.loads((tmp_path / "straight.json").read_text())
    assert straight["distributed_type"].endswith("FSDP") and straight["param_type"] == "DTensor"
    assert straight["optimizer"] == "SGDSaI"
    assert (straight["uint8_state"] > 0) == (optim == "sgdsai_8bit")
    # the same optimizer on one device, built as the Trainer builds it, after one step
    model = tiny_llama()
    optim_args = "min_8bit_size=256,blocksize=16" if optim == "sgdsai_8bit" else None
    args = TrainingArguments(output_dir=str(tmp_path / "single"), optim=optim, optim_args=optim_args, use_cpu=True,
                             report_to="none")
    cls, kwargs = optimizer_cls_and_kwargs(optim, args, model=model)
    opt = cls(kwargs.pop("params"), **kwargs)
    train(model, opt, batches(1))
    single = memopt.state_bytes(opt)
    rows = json.loads((tmp_path / "memory_report.json").read_text())
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:  # each rank holds about half of the single-device state, uneven shards allowed
        assert 0.35 * single <= r["optimizer_state_bytes"] <= 0.65 * single, (r, single)
    assert sum(r["optimizer_state_bytes"] for r in rows) == single  # row blocks: no padding between ranks
    # `memopt plan --gpus 2` predicts each rank's weights, gradients and state exactly (buffers are not parameters)
    from memopt import plan as planner

    summary = planner.summarize_model(planner.build_meta_model(model.config), source="tiny")
    predicted = planner.exact_parts_per_rank(summary, planner.Setup("t", optim, optim_args or ""), "fp32", gpus=2)
    for r, parts in zip(rows, predicted):
        assert parts.weights_bytes - 4 * summary.buffer_numel == r["params_trainable_bytes"] + r["params_frozen_bytes"]
        assert parts.grads_bytes == r["grads_bytes"], (parts, r)
        assert parts.state_bytes == r["optimizer_state_bytes"], (parts, r)
    _torchrun_script("fsdp2_trainer.py", tmp_path, optim, "resume")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    want = straight["losses"]
    got = {s: v for s, v in resumed["losses"].items() if int(s) > 3}
    assert got and all(abs(got[s] - want[s]) < 1e-6 for s in got), (got, want)


def test_trainer_with_the_fsdp2_config_resumes_frugal_blocks_exactly(tmp_path):
    """Which tensors hold FRUGAL's inner state changes every 2 steps with selection='blocks': the checkpoint at step 3
    has other keys than a fresh optimizer's first step; the resume takes its template from the checkpoint."""
    _torchrun_script("fsdp2_trainer.py", tmp_path, "frugal")
    straight = json.loads((tmp_path / "straight.json").read_text())
    assert straight["optimizer"] == "FRUGAL" and straight["param_type"] == "DTensor"
    _torchrun_script("fsdp2_trainer.py", tmp_path, "frugal", "resume")
    want = straight["losses"]
    got = {s: v for s, v in json.loads((tmp_path / "resumed.json").read_text())["losses"].items() if int(s) > 3}
    assert got and all(abs(got[s] - want[s]) < 1e-6 for s in got), (got, want)


def test_template_from_checkpoint_refuses_a_wrong_key_or_another_model(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = tiny_llama()
    opt = OPTIMIZERS["frugal_blocks"](list(model.parameters()))
    train(model, opt, list(batches(3)))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "ckpt"))
    fresh = OPTIMIZERS["frugal_blocks"](list(tiny_llama().parameters()))
    with pytest.raises(ValueError, match="no optimizer state under 'optimizer'"):
        fresh.init_state_like_checkpoint(model, tmp_path / "ckpt", key="optimizer")
    other = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="parameters this model does not have"):
        memopt.FRUGAL(list(other.parameters()), selection="blocks").init_state_like_checkpoint(other, tmp_path / "ckpt")
    fresh_model = tiny_llama(seed=7)
    fresh = OPTIMIZERS["frugal_blocks"](list(fresh_model.parameters()))
    fresh.init_state_like_checkpoint(fresh_model, tmp_path / "ckpt")  # the same keys and shapes as the optimizer's
    names = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    saved = {names[n]: opt.state[p] for n, p in model.named_parameters() if p in opt.state}
    made = {names[n]: fresh.state[p] for n, p in fresh_model.named_parameters() if p in fresh.state}
    assert saved.keys() == made.keys()
    for i, a in saved.items():
        b = made[i]
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a if torch.is_tensor(a[k]))
