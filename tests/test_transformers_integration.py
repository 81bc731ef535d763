"""optim="sgdsai" inside the Hugging Face Trainer, the CLI parser, optim_args, resume, PEFT and TRL."""

import json
from pathlib import Path

import pytest
import torch

import memopt
from memopt.integrations import transformers as hf_integration
from tiny import PatternDataset, char_tokenizer, tiny_llama
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), optim="sgdsai", learning_rate=0.05, max_steps=20,
                per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, seed=0, disable_tqdm=True, weight_decay=0.01, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def test_registered_names_are_real_enum_members_and_cli_choices(tmp_path):
    assert OptimizerNames("sgdsai") is OptimizerNames.SGDSAI
    assert "sgdsai" in [m.value for m in OptimizerNames]
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "sgdsai",
                                                  "--optim_args", "momentum=0.95,scale=sqrt_numel"])
    assert args.optim == "sgdsai"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "sgdsai_typo"])


def test_register_is_idempotent():
    n_members = len(OptimizerNames)
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

    handler = _OPTIMIZER_HANDLERS["sgdsai"]
    hf_integration.register()
    hf_integration.register()
    assert len(OptimizerNames) == n_members
    assert _OPTIMIZER_HANDLERS["sgdsai"] is handler
    import transformers.trainer as trainer_module

    assert trainer_module.DEFAULT_CALLBACKS.count(hf_integration.MemoryReportCallback) == 1


def test_missing_private_hook_gives_a_clear_error():
    import types

    fake = types.ModuleType("transformers.trainer_optimizer")
    with pytest.raises(hf_integration.UnsupportedTransformersVersion, match="optimizer_cls_and_kwargs"):
        hf_integration.patch_module("transformers.trainer_optimizer", fake)


def test_trainer_trains_a_tiny_llama_with_sgdsai(tmp_path):
    model = tiny_llama()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=PatternDataset())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, memopt.SGDSaI)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]


def test_trainer_decay_groups_are_respected(tmp_path):
    model = tiny_llama()
    trainer = Trainer(model=model, args=_args(tmp_path, weight_decay=0.05), train_dataset=PatternDataset())
    opt = trainer.create_optimizer()
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert opt.param_groups[0]["lr"] == 0.05


def test_optim_args_are_parsed_and_typed(tmp_path):
    args = _args(tmp_path, optim_args="momentum=0.95, scale=sqrt_numel, foreach=false, state_dtype=bf16")
    opt = Trainer(model=tiny_llama(), args=args, train_dataset=PatternDataset()).create_optimizer()
    g = opt.param_groups[0]
    assert (g["momentum"], g["scale"], g["foreach"], g["state_dtype"]) == (0.95, "sqrt_numel", False, "bfloat16")


@pytest.mark.parametrize("optim_args,named", [
    ("momentm=0.9", "momentm"), ("momentum=abc", "momentum"), ("momentum=1.5", "momentum"),
    ("scale=adam", "scale"), ("check_finite=maybe", "check_finite"), ("lr=0.1", "lr"),
])
def test_bad_optim_args_raise_value_error_naming_the_key(tmp_path, optim_args, named):
    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path, optim_args=optim_args), train_dataset=PatternDataset())
    with pytest.raises(ValueError, match=named):
        trainer.create_optimizer()


def test_no_patch_route(tmp_path):
    args = _args(tmp_path, optim="adamw_torch", max_steps=3)
    cls_kwargs = hf_integration.optimizer_cls_and_kwargs("sgdsai", args, optim_args="momentum=0.8")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=PatternDataset(),
                      optimizer_cls_and_kwargs=cls_kwargs)
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, memopt.SGDSaI) and opt.param_groups[0]["momentum"] == 0.8
    assert len(opt.param_groups) == 2  # the Trainer still built its decay / no-decay groups


def test_memory_report_in_logs_and_table(tmp_path, capsys):
    model = tiny_llama()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, logging_steps=2), train_dataset=PatternDataset())
    trainer.train()
    opt = trainer.optimizer
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logged = [h for h in trainer.state.log_history if "memory/optimizer_state_bytes" in h]
    assert len(logged) == 2
    assert logged[-1]["memory/optimizer_state_bytes"] == memopt.state_bytes(opt) == 4 * n_trainable
    assert logged[-1]["memory/adamw_state_bytes"] == 8 * n_trainable + 4 * len(list(model.parameters()))
    assert logged[-1]["memory/grads_bytes"] == 4 * n_trainable
    assert logged[-1]["memory/cpu_peak_rss_bytes"] > 0
    out = capsys.readouterr().out
    assert "memopt memory report" in out and "SGDSaI" in out
    rows = json.loads((tmp_path / "memory_report.json").read_text())
    assert len(rows) == 1 and rows[0]["optimizer_state_bytes"] == 4 * n_trainable


def test_memory_report_is_off_for_other_optimizers_unless_asked(tmp_path):
    from memopt.integrations.trainer_callback import MemoryReportCallback

    t = Trainer(model=tiny_llama(), args=_args(tmp_path, optim="adamw_torch", max_steps=2),
                train_dataset=PatternDataset())
    t.train()
    assert not any("memory/optimizer_state_bytes" in h for h in t.state.log_history)
    model = tiny_llama()
    t = Trainer(model=model, args=_args(tmp_path, optim="adamw_torch", max_steps=2), train_dataset=PatternDataset(),
                callbacks=[MemoryReportCallback("all")])
    t.train()
    logged = [h for h in t.state.log_history if "memory/optimizer_state_bytes" in h]
    # the AdamW baseline formula equals what a real torch AdamW holds
    assert logged[-1]["memory/optimizer_state_bytes"] == logged[-1]["memory/adamw_state_bytes"]
    assert memopt.state_bytes(t.optimizer) == memopt.adamw_state_bytes(model.parameters())
    with pytest.raises(ValueError, match="mode"):
        MemoryReportCallback("sometimes")


@pytest.mark.parametrize("optim,optim_args", [("sgdsai", None), ("sgdsai_8bit", "min_8bit_size=256"),
                                              ("memopt_adamw_8bit", "min_8bit_size=256")])
def test_resume_from_checkpoint_continues_the_exact_loss_trajectory(tmp_path, optim, optim_args):
    n = 6
    kw = dict(optim=optim, optim_args=optim_args, learning_rate=0.05 if "sgdsai" in optim else 3e-3)
    straight = Trainer(model=tiny_llama(), args=_args(tmp_path / "a", max_steps=2 * n, save_strategy="steps",
                                                      save_steps=n, **kw), train_dataset=PatternDataset())
    straight.train()
    want = {h["step"]: h["loss"] for h in straight.state.log_history if "loss" in h}
    resumed = Trainer(model=tiny_llama(seed=123), args=_args(tmp_path / "a", max_steps=2 * n, **kw),
                      train_dataset=PatternDataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{n}"))
    got = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > n}
    assert sorted(got) == list(range(n + 1, 2 * n + 1))
    assert all(got[s] == want[s] for s in got), (got, want)
    if optim != "sgdsai":
        assert any(t.dtype == torch.uint8 for st in resumed.optimizer.optimizer.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))


def test_peft_lora_every_adapter_matrix_trains(tmp_path):
    import peft
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in before) and all(not p.any() for n, p in before.items() if "lora_B" in n)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=5, learning_rate=1.0),
                      train_dataset=PatternDataset())
    trainer.train()
    after = dict(model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(after[n].detach(), p)]
    assert not unchanged, f"LoRA matrices that never moved: {unchanged}"


def test_trl_sft_trainer_with_sgdsai(tmp_path):
    import trl
    import datasets
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    text = ["the quick brown fox jumps over the lazy dog. " * 2] * 32
    ds = datasets.Dataset.from_dict({"text": text})
    cfg = trl.SFTConfig(output_dir=str(tmp_path), optim="sgdsai", learning_rate=0.05, max_steps=8,
                        per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True,
                        save_strategy="no", max_length=48, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, memopt.SGDSaI)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_trainer_default_lr_trains_the_default_mode_and_paper_modes_get_a_hint(tmp_path, caplog):
    import logging

    args = _args(tmp_path, learning_rate=5e-5, optim_args="scale=gsnr_max")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=PatternDataset())
    with caplog.at_level(logging.WARNING, logger="memopt"):
        trainer.create_optimizer()
    assert "default learning_rate" in caplog.text and "LoRA" in caplog.text
    caplog.clear()
    # scale=factored takes AdamW's learning rates: the Trainer's default trains, without a warning
    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path, learning_rate=5e-5, optim_args="scale=factored"),
                      train_dataset=PatternDataset())
    with caplog.at_level(logging.WARNING, logger="memopt"):
        trainer.train()
    assert "default learning_rate" not in caplog.text
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adamw = Trainer(model=tiny_llama(), args=_args(tmp_path, learning_rate=5e-5, optim="adamw_torch"),
                    train_dataset=PatternDataset())
    adamw.train()
    adam_losses = [h["loss"] for h in adamw.state.log_history if "loss" in h]
    assert losses[0] - losses[-1] > 0.5 * (adam_losses[0] - adam_losses[-1]) > 0  # it trains as AdamW does


def test_no_patch_route_with_model_keeps_embeddings_32bit(tmp_path):
    model = tiny_llama()
    args = _args(tmp_path, optim="adamw_torch", max_steps=2)
    cls_kwargs = hf_integration.optimizer_cls_and_kwargs("sgdsai_8bit", args, optim_args="min_8bit_size=256",
                                                         model=model)
    trainer = Trainer(model=model, args=args, train_dataset=PatternDataset(), optimizer_cls_and_kwargs=cls_kwargs)
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert "momentum_buffer" in opt.state[model.get_input_embeddings().weight]
    assert "momentum_codes" in opt.state[model.model.layers[0].mlp.up_proj.weight]


def test_no_patch_route_as_documented_with_auto_registration_off(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import memopt
        assert "transformers" not in sys.modules  # import memopt stays transformers-free
        from transformers import Trainer, TrainingArguments
        from transformers.training_args import OptimizerNames
        from tiny import PatternDataset, tiny_llama
        assert "sgdsai" not in OptimizerNames._value2member_map_  # nothing was patched
        args = TrainingArguments(output_dir={str(tmp_path)!r}, learning_rate=1e-3, max_steps=3,
                                 per_device_train_batch_size=8, save_strategy="no", report_to="none", use_cpu=True)
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=PatternDataset(),
                          optimizer_cls_and_kwargs=memopt.integrations.transformers.optimizer_cls_and_kwargs(
                              "sgdsai", args))
        trainer.train()
        assert type(trainer.optimizer.optimizer).__name__ == "SGDSaI"
        print("ok")
    """)
    env = dict(os.environ, MEMOPT_AUTO_REGISTER="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_optimizer_cls_and_kwargs_leaves_the_model_alone_and_prepare_model_applies_model_options(tmp_path):
    model = tiny_llama()
    before = {n: (p.requires_grad, dict(vars(p))) for n, p in model.named_parameters()}
    args = _args(tmp_path, optim="adamw_torch", optim_args="freeze_embeddings=true,min_8bit_size=256")
    with pytest.raises(ValueError, match="prepare_model"):
        hf_integration.optimizer_cls_and_kwargs("sgdsai_8bit", args, model=model)
    cls, kwargs = hf_integration.optimizer_cls_and_kwargs("sgdsai_8bit", args, optim_args="min_8bit_size=256",
                                                          model=model)
    assert {n: (p.requires_grad, dict(vars(p))) for n, p in model.named_parameters()} == before  # untouched
    emb = model.get_input_embeddings().weight
    assert [g.get("state_bits") for g in kwargs["params"] if any(p is emb for p in g["params"])] == [32]
    applied = hf_integration.prepare_model(model, "sgdsai_8bit", args)
    assert applied == {"freeze_embeddings": "true", "chunked_loss": None} and not emb.requires_grad
    assert hf_integration.prepare_model(model, "sgdsai_8bit", args) == applied  # idempotent
    cls, kwargs = hf_integration.optimizer_cls_and_kwargs("sgdsai_8bit", args, model=model)
    assert all(p is not emb for g in kwargs["params"] for p in g["params"])


@pytest.mark.parametrize("name", memopt.list_optimizers())
def test_every_registered_name_trains_and_resumes_exactly_in_the_trainer(tmp_path, name):
    # no per-name settings: a newly registered optimizer is covered as it is registered
    spec = memopt.get_optimizer_spec(name)
    optim_args = "min_8bit_size=256" if "min_8bit_size" in spec.arg_types else None
    n = 4
    kw = dict(optim=name, optim_args=optim_args, learning_rate=1e-3)
    straight = Trainer(model=tiny_llama(), args=_args(tmp_path / "a", max_steps=2 * n, save_strategy="steps",
                                                      save_steps=n, **kw), train_dataset=PatternDataset())
    straight.train()
    want = {h["step"]: h["loss"] for h in straight.state.log_history if "loss" in h}
    assert want[2 * n] < want[1]  # it trains
    resumed = Trainer(model=tiny_llama(seed=123), args=_args(tmp_path / "a", max_steps=2 * n, **kw),
                      train_dataset=PatternDataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{n}"))
    got = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > n}
    assert sorted(got) == list(range(n + 1, 2 * n + 1))
    assert all(got[s] == want[s] for s in got), (got, want)
