"""Faults a careless or unlucky user meets: every one ends in a clear error or a documented, logged behaviour,
never in silently lost training state or a silent wrong result (docs/reliability.md)."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from transformers import Trainer, TrainingArguments  # in the test extra: missing fails, never skips

import memopt
from memopt.integrations.trainer_callback import MemoryReportCallback
from tiny import PatternDataset, tiny_llama


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), optim="sgdsai", learning_rate=0.05, max_steps=6,
                per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


# --------------------------------------------------------------------------- the memory report never stops training
def test_malformed_memory_report_variable_warns_once_and_uses_the_default(tmp_path, monkeypatch):
    from memopt import _env

    monkeypatch.setenv("MEMOPT_MEMORY_REPORT", "loud please")
    monkeypatch.setattr(_env, "_warned", set())
    with pytest.warns(RuntimeWarning, match="MEMOPT_MEMORY_REPORT='loud please'"):
        first = Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=PatternDataset())
    report = next(c for c in first.callback_handler.callbacks if isinstance(c, MemoryReportCallback))
    assert report.mode == "auto"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second Trainer does not warn again
        second = Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=PatternDataset())
    second.train()
    assert report.mode == "auto"
    with pytest.raises(ValueError, match="not one of"):  # an explicit bad mode is still an error
        MemoryReportCallback("loud")


@pytest.mark.parametrize("name", ["MEMOPT_AUTO_REGISTER", "MEMOPT_CPU_KERNELS"])
def test_a_yes_no_variable_with_another_value_warns_once_and_keeps_the_default(monkeypatch, name):
    from memopt import _env

    monkeypatch.setattr(_env, "_warned", set())
    for value, expected in (("OFF", False), (" 0 ", False), ("no", False), ("Yes", True), ("1", True), ("", True)):
        monkeypatch.setenv(name, value)
        assert _env.env_flag(name, True) is expected, value
    monkeypatch.setenv(name, "disabled")
    with pytest.warns(RuntimeWarning, match=f"{name}='disabled' is not one of"):
        assert _env.env_flag(name, True) is True
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per value
        assert _env.env_flag(name, True) is True


def test_the_fused_cpu_updates_follow_their_variable(monkeypatch):
    from memopt.kernels import cpu

    for value, on in (("off", False), ("1", True)):
        monkeypatch.setenv("MEMOPT_CPU_KERNELS", value)
        monkeypatch.setattr(cpu, "_LIB", {})
        assert (cpu.library() is not None) is on, value


@pytest.mark.parametrize("fault", ["measure_raises", "sparse_state", "no_model_at_end"])
def test_a_failing_memory_report_is_logged_once_and_training_continues(tmp_path, monkeypatch, caplog, fault):
    from memopt.integrations import trainer_callback

    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=PatternDataset(),
                      callbacks=[MemoryReportCallback("all")])
    trainer.remove_callback(next(c for c in trainer.callback_handler.callbacks
                                 if type(c) is MemoryReportCallback and c.mode == "auto"))
    if fault == "measure_raises":
        def broken(*a, **k):
            raise RuntimeError("device query failed")

        monkeypatch.setattr(trainer_callback, "measure", broken)
    elif fault == "sparse_state":
        opt = trainer.create_optimizer()
        p = next(iter(trainer.model.parameters()))
        orig_step = opt.step

        def step_with_sparse_state(*a, **k):
            out = orig_step(*a, **k)
            opt.state[p]["extra"] = torch.zeros(4, 4).to_sparse()
            return out

        opt.step = step_with_sparse_state
    elif fault == "no_model_at_end":
        orig_end = MemoryReportCallback.on_train_end

        def end_without_model(self, args, state, control, model=None, **kw):
            return orig_end(self, args, state, control, model=None, **kw)

        monkeypatch.setattr(MemoryReportCallback, "on_train_end", end_without_model)
    with caplog.at_level(logging.WARNING, logger="memopt"):
        trainer.train()
    assert trainer.state.global_step == 6
    failures = [r for r in caplog.records if "memory report" in r.getMessage() and "failed" in r.getMessage()]
    if fault == "no_model_at_end":  # nothing failed: the steps' rows were logged, the final report is left out
        assert not failures
        assert any(k.startswith("memory/") for row in trainer.state.log_history for k in row)
    else:  # the first failing measurement switched the report off
        assert len(failures) == 1 and "training continues" in failures[0].getMessage()


def test_memory_report_with_an_optimizer_that_has_no_state_attribute(caplog):
    class Bare:  # duck-typed optimizer (no .state), as some wrappers are
        param_groups = [{"params": [], "lr": 0.1}]

        def step(self):
            pass

    model = torch.nn.Linear(4, 4)
    report = MemoryReportCallback("all")
    args = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, output_dir=None)
    state = types.SimpleNamespace(log_history=[], global_step=1, is_world_process_zero=True)
    with caplog.at_level(logging.WARNING, logger="memopt"):
        report.on_train_begin(args, state, None, optimizer=Bare())
        for _ in range(3):
            report.on_optimizer_step(args, state, None, model=model, optimizer=Bare())
            report.on_log(args, state, None, logs={"loss": 1.0}, model=model, optimizer=Bare())
        report.on_train_end(args, state, None, model=model, optimizer=Bare())
    failures = [r for r in caplog.records if "memory report" in r.getMessage()]
    assert len(failures) == 1 and "training continues" in failures[0].getMessage()


# --------------------------------------------------------------------------- load_state_dict is an input boundary
NAMES = memopt.list_optimizers()


def _trained(name, shapes=((16, 8), (16,), (4, 16)), steps=3, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = memopt.create_optimizer(name, params, lr=1e-2, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _fresh(name, like, **kw):
    return memopt.create_optimizer(name, [torch.nn.Parameter(p.detach().clone()) for p in like], lr=1e-2, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses_invalid_group_values(name):
    params, opt = _trained(name)
    bad_values = [("lr", float("nan")), ("weight_decay", -1.0)]
    group = opt.state_dict()["param_groups"][0]
    if "momentum" in group:
        bad_values.append(("momentum", 2.0))
    if "betas" in group:
        bad_values.append(("betas", (0.9, 2.0)))
    if "scale" in group and isinstance(group["scale"], str):
        bad_values.append(("scale", "bogus"))
    for key, value in bad_values:
        sd = opt.state_dict()
        sd["param_groups"][0][key] = value
        target = _fresh(name, params)
        with pytest.raises(ValueError, match=f"invalid: {key}"):
            target.load_state_dict(sd)
        assert not target.state  # nothing was loaded


@pytest.mark.parametrize("source", NAMES)
def test_state_of_another_algorithm_is_refused_naming_both(source):
    params, opt = _trained(source)
    sd = opt.state_dict()
    for target_name in NAMES:
        if target_name == source:
            continue
        target = _fresh(target_name, params)
        with pytest.raises(ValueError, match="not written by") as info:
            target.load_state_dict(sd)
        text = str(info.value)
        assert type(target).__name__ in text and type(opt).__name__ in text
        assert not target.state


@pytest.mark.parametrize("name", NAMES)
def test_state_for_other_shapes_is_refused_at_load(name):
    params, opt = _trained(name, shapes=((16, 8), (16,), (4, 16)))
    other = [torch.nn.Parameter(torch.zeros(s)) for s in ((8, 16), (16,), (16, 4))]
    target = memopt.create_optimizer(name, other, lr=1e-2)
    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(opt.state_dict())
    assert not target.state


def _corruptions(sd):
    """(description, corrupted copy) for every number in a state dict that could reach the weights, and for every
    state tensor left out."""
    import copy

    def changed(pid, key, value):
        out = copy.deepcopy(sd)
        out["state"][pid][key] = value
        return out

    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and len(st) > 1:  # an empty state is a parameter yet to step
                out = copy.deepcopy(sd)
                del out["state"][pid][key]
                yield f"without {key}", out
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                for bad in (float("nan"), float("inf")):
                    out = copy.deepcopy(sd)
                    out["state"][pid][key].view(-1)[0] = bad
                    yield f"{key}={bad}", out
                if key.endswith("_absmax") or key in ("exp_avg_sq", "sn"):  # no step writes a negative one
                    out = copy.deepcopy(sd)
                    out["state"][pid][key].view(-1)[0] = -1.0
                    yield f"{key}<0", out
            elif key.endswith("_codes") and isinstance(value, torch.Tensor):
                yield f"{key} as float", changed(pid, key, value.float().fill_(float("nan")))
            elif key == "proj_indices":
                for bad in (value.max() + 1000, value[0]):  # out of range; repeated
                    idx = value.clone()
                    idx[-1] = bad
                    yield f"{key} holding {int(bad)}", changed(pid, key, idx)
            elif key == "gsnr":
                for bad in (float("nan"), -5.0, 1e30, "2.5"):  # 0.0 is "not measured yet"
                    yield f"{key}={bad!r}", changed(pid, key, bad)
            elif isinstance(value, int) and not isinstance(value, bool):  # step counts, refresh steps, seeds
                for bad in (-1, float(value), str(value)):
                    yield f"{key}={bad!r}", changed(pid, key, bad)


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_numbers_in_a_checkpoint_never_reach_the_weights(name):
    params, opt = _trained(name, shapes=((64, 80), (16,)), min_8bit_size=256) if name in (
        "sgdsai_8bit", "memopt_adamw_8bit") else _trained(name, shapes=((64, 80), (16,)))
    cases = list(_corruptions(opt.state_dict()))
    assert cases
    for what, sd in cases:
        if name == "frugal_sgdsai" and what == "without momentum_buffer":
            continue  # FRUGAL's SGD-SaI inner step restarts a missing momentum at m = g, as on entering the active set
        target_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        kw = {"min_8bit_size": 256} if name in ("sgdsai_8bit", "memopt_adamw_8bit") else {}
        target = memopt.create_optimizer(name, target_params, lr=1e-2, **kw)
        with pytest.raises(ValueError, match="corrupt|uint8|incomplete"):
            target.load_state_dict(sd)
        for p in target_params:
            p.grad = torch.ones_like(p)
        target.step()  # the refused checkpoint left the optimizer usable and the weights finite
        assert all(torch.isfinite(p).all() for p in target_params), what


def test_projection_indices_from_a_checkpoint_must_be_distinct_rows_or_columns_in_range():
    for selection, size in (("columns", 80), ("rows", 64)):
        params, opt = _trained("frugal", shapes=((64, 80),), selection=selection, density=0.25)
        sd = opt.state_dict()
        assert sd["state"][0]["proj_indices"].numel() == round(0.25 * size)
        for bad in (size, -1, int(sd["state"][0]["proj_indices"][0])):  # past the end, negative, repeated
            corrupt = {**sd, "state": {0: {**sd["state"][0], "proj_indices": sd["state"][0]["proj_indices"].clone()}}}
            corrupt["state"][0]["proj_indices"][-1] = bad
            target = _fresh("frugal", params, selection=selection, density=0.25)
            with pytest.raises(ValueError, match=f"not a set of distinct {selection}"):
                target.load_state_dict(corrupt)
            assert not target.state
        _fresh("frugal", params, selection=selection, density=0.25).load_state_dict(sd)  # the intact one loads


@pytest.mark.parametrize("scale", ["factored", "gsnr_max", "sqrt_numel"])
def test_sgdsai_momentum_switched_on_or_off_at_resume_is_refused_naming_both(scale):
    for saved, wanted in ((0.0, 0.9), (0.9, 0.0)):
        params, opt = _trained("sgdsai", scale=scale, momentum=saved)
        target = _fresh("sgdsai", params, scale=scale, momentum=wanted)
        with pytest.raises(ValueError, match=f"momentum={saved}.*momentum={wanted}"):
            target.load_state_dict(opt.state_dict())
        assert not target.state


def test_requested_hyper_parameters_win_over_the_checkpoint_and_are_logged(caplog):
    params, opt = _trained("sgdsai", momentum=0.9)
    target = _fresh("sgdsai", params, momentum=0.5, weight_decay=0.1)
    target.param_groups[0]["lr"] = 0.3
    with caplog.at_level(logging.WARNING, logger="memopt"):
        target.load_state_dict(opt.state_dict())
    group = target.param_groups[0]
    assert group["momentum"] == 0.5 and group["weight_decay"] == 0.1
    assert group["lr"] == 1e-2  # the schedule's value comes from the checkpoint (torch's convention)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "momentum: 0.9 -> 0.5" in text and "weight_decay: 0.01 -> 0.1" in text
    caplog.clear()
    same = _fresh("sgdsai", params, momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="memopt"):
        same.load_state_dict(opt.state_dict())
    assert not [r for r in caplog.records if "replace the checkpoint" in r.getMessage()]


def test_fp16_state_never_overflows_into_the_weights():
    with pytest.raises(ValueError, match="float16"):
        memopt.SGDSaI([torch.nn.Parameter(torch.zeros(4))], state_dtype="float16")
    # fp16 parameters: Adam's second moment (g^2 overflows fp16 above |g| = 256) is held in fp32
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.float16))
    opt = memopt.AdamW8bit([p], state_bits=32, lr=1e-3)
    p.grad = torch.full_like(p, 3000.0)
    opt.step()
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    assert torch.isfinite(p).all() and not torch.equal(p, torch.ones_like(p))
    q = torch.nn.Parameter(torch.ones(64, dtype=torch.float16))  # SGD-SaI: fp16 momentum of fp16 grads is bounded
    sgd = memopt.SGDSaI([q], lr=1e-3)
    for _ in range(3):
        q.grad = torch.full_like(q, 60000.0)
        sgd.step()
    assert torch.isfinite(q).all() and torch.isfinite(sgd.state[q]["momentum_buffer"]).all()


@pytest.mark.parametrize("name", ["sgdsai_8bit", "memopt_adamw_8bit"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_corrupt_8bit_state_in_memory_raises_before_the_weights_are_written(name, bad):
    # every uint8 code is a valid code: the block maxima are what can be corrupt (a NaN or Inf one)
    params, opt = _trained(name, shapes=((64, 80),), min_8bit_size=256, use_triton=False)
    p = params[0]
    st = opt.state[p]
    absmax = next(k for k in st if k.endswith("_absmax"))
    st[absmax][1] = bad
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    assert torch.equal(p.detach(), before)


# -------------------------------------------------------------------- Trainer: settings an optimizer cannot honour
def test_gradient_release_built_in_python_refuses_gradient_clipping_in_the_trainer(tmp_path):
    model = tiny_llama()
    opt = memopt.SGDSaI(model.parameters(), lr=0.05, grad_release=True)
    trainer = Trainer(model=model, args=_args(tmp_path, max_grad_norm=1.0), train_dataset=PatternDataset(),
                      optimizers=(opt, None))
    with pytest.raises(ValueError, match="SGDSaI\\(grad_release=True\\): max_grad_norm must be 0"):
        trainer.train()
    ok = Trainer(model=model, args=_args(tmp_path, max_grad_norm=0.0), train_dataset=PatternDataset(),
                 optimizers=(opt, None))
    ok.train()
    assert ok.state.global_step == 6


# --------------------------------------------------------------------------- resume never silently drops state
def _checkpointed_run(tmp_path, optim="sgdsai", **kw):
    args = _args(tmp_path, optim=optim, max_steps=4, save_strategy="steps", save_steps=2, **kw)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=PatternDataset())
    trainer.train()
    return tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_resume_refuses_a_checkpoint_without_optimizer_or_scheduler_state(tmp_path, missing):
    _, last = _checkpointed_run(tmp_path)
    (last / missing).unlink()
    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path, max_steps=6), train_dataset=PatternDataset())
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
        trainer.train(resume_from_checkpoint=str(last))


def test_resume_true_skips_an_incomplete_newest_checkpoint_and_continues_exactly(tmp_path, caplog):
    straight = Trainer(model=tiny_llama(), args=_args(tmp_path / "a", max_steps=6), train_dataset=PatternDataset())
    straight.train()
    want = {h["step"]: h["loss"] for h in straight.state.log_history if "loss" in h}
    first, last = _checkpointed_run(tmp_path / "b")
    (last / "trainer_state.json").write_text('{"global_step": 4, "log_hist')  # a kill while writing it
    resumed = Trainer(model=tiny_llama(seed=5), args=_args(tmp_path / "b", max_steps=6), train_dataset=PatternDataset())
    with caplog.at_level(logging.WARNING, logger="memopt"):
        resumed.train(resume_from_checkpoint=True)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped incomplete checkpoint" in text and str(last) in text and f"resuming from {first}" in text
    got = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 2}
    assert sorted(got) == [3, 4, 5, 6] and all(got[s] == want[s] for s in got), (got, want)


def test_resume_true_with_no_complete_checkpoint_fails_clearly(tmp_path):
    _, last = _checkpointed_run(tmp_path)
    for ck in tmp_path.glob("checkpoint-*"):
        (ck / "trainer_state.json").unlink()
    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path, max_steps=6), train_dataset=PatternDataset())
    with pytest.raises(ValueError, match="No valid checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_sigkill_while_writing_a_checkpoint_then_resume_continues_exactly(tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "launchers", "kill_during_checkpoint.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", MEMOPT_MEMORY_REPORT="off")

    def launch(mode):
        return subprocess.run([sys.executable, script, str(tmp_path), mode], env=env, capture_output=True, text=True,
                              timeout=300)

    killed = launch("kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    broken = tmp_path / "run" / "checkpoint-6"
    assert (broken / "optimizer.pt").exists() and not (broken / "trainer_state.json").exists()
    resumed = launch("resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped incomplete checkpoint" in resumed.stderr and "checkpoint-4" in resumed.stderr
    straight = launch("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    got = {s: v for s, v in json.loads((tmp_path / "resume.json").read_text()).items() if int(s) > 4}
    want = json.loads((tmp_path / "straight.json").read_text())
    assert sorted(int(s) for s in got) == [5, 6, 7, 8]
    assert all(got[s] == want[s] for s in got), (got, want)
