"""Faults a careless or unlucky user meets: every one ends in a clear error or a documented, logged behaviour,
never in silently lost training state or a silent wrong result (docs/reliability.md)."""

from __future__ import annotations

import logging
import types

import pytest
import torch

import memopt
from tiny import PatternDataset, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from memopt.integrations.trainer_callback import MemoryReportCallback  # noqa: E402


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), optim="sgdsai", learning_rate=0.05, max_steps=6,
                per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


# --------------------------------------------------------------------------- the memory report never stops training
def test_malformed_memory_report_variable_warns_once_and_uses_the_default(tmp_path, monkeypatch):
    from memopt.integrations import trainer_callback

    monkeypatch.setenv("MEMOPT_MEMORY_REPORT", "loud please")
    monkeypatch.setattr(trainer_callback, "_warned_env", set())
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
    assert len(failures) <= 1
    if fault == "measure_raises":
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
