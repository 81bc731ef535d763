"""Lean full fine-tuning: embedding freezing, gradient release, bf16 weights with stochastic rounding (no fp32
master)."""

import io
import logging

import pytest
import torch

import memopt
from tiny import PatternDataset, tiny_llama


# ------------------------------------------------------------------------------------------- freezing
def _tiny_tied(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, pad_token_id=0))


def _train_steps(model, opt, steps=3, seed=0):
    data = PatternDataset(n=8 * steps, seed=seed)
    for i in range(steps):
        batch = {k: torch.stack([data[j][k] for j in range(8 * i, 8 * i + 8)]) for k in ("input_ids", "labels")}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def test_freeze_untied_embedding_has_no_grad_and_no_state(caplog):
    model = tiny_llama()
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    with caplog.at_level(logging.WARNING, logger="memopt"):
        report = memopt.freeze_embeddings(model)
    assert report.names == ["model.embed_tokens.weight"] and report.frozen_params == emb.numel()
    assert report.tied_head == "none" and "froze the input embedding" in caplog.text
    opt = memopt.SGDSaI([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_steps(model, opt)
    assert emb.grad is None and emb not in opt.state and torch.equal(emb.detach(), before)
    assert model.lm_head.weight.requires_grad and "momentum_buffer" in opt.state[model.lm_head.weight]


def test_freeze_tied_head_is_frozen_too_and_said_so(caplog):
    model = _tiny_tied()
    with caplog.at_level(logging.WARNING, logger="memopt"):
        report = memopt.freeze_embeddings(model)
    assert report.tied_head == "frozen" and "tied to it and is frozen too" in caplog.text
    assert model.lm_head.weight is model.get_input_embeddings().weight and not model.lm_head.weight.requires_grad


def test_freeze_untie_gives_the_head_its_own_trainable_weight():
    model = _tiny_tied()
    emb = model.get_input_embeddings().weight
    report = memopt.freeze_embeddings(model, untie=True)
    head = model.lm_head.weight
    assert report.tied_head == "untied" and report.untied_params == head.numel()
    assert head is not emb and torch.equal(head.detach(), emb.detach()) and head.requires_grad
    assert model.config.tie_word_embeddings is False
    opt = memopt.SGDSaI([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_steps(model, opt)
    assert not torch.equal(head.detach(), emb.detach())  # the head trains, the embedding does not


def test_freeze_vit_patch_embedding():
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=16, patch_size=8))
    report = memopt.freeze_embeddings(model)
    assert report.names == ["embeddings.patch_embeddings.projection.weight",
                            "embeddings.patch_embeddings.projection.bias"]
    assert not model.embeddings.patch_embeddings.projection.weight.requires_grad


def test_freeze_refuses_a_model_without_a_single_embedding():
    with pytest.raises(ValueError, match="nn.Embedding"):
        memopt.freeze_embeddings(torch.nn.Linear(4, 4))


def _trainer(tmp_path, **kw):
    from transformers import Trainer, TrainingArguments

    model = kw.pop("model", None) or tiny_llama()
    base = dict(output_dir=str(tmp_path), optim="sgdsai", learning_rate=3e-2, max_steps=8,
                per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                seed=0, disable_tqdm=True, lr_scheduler_type="linear", weight_decay=0.01)
    base.update(kw)
    return model, Trainer(model=model, args=TrainingArguments(**base), train_dataset=PatternDataset())


def test_trainer_optim_args_freeze_embeddings(tmp_path):
    model, trainer = _trainer(tmp_path, optim_args="freeze_embeddings=true", max_steps=3)
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert all(p is not emb for g in opt.param_groups for p in g["params"])
    assert torch.equal(emb.detach(), before) and emb not in opt.state
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}  # the Trainer's decay rule is kept
    with pytest.raises(ValueError, match="freeze_embeddings"):
        _trainer(tmp_path, optim_args="freeze_embeddings=maybe")[1].create_optimizer()
    with pytest.raises(ValueError, match="acts on the model"):
        memopt.create_optimizer("sgdsai", tiny_llama().parameters(), optim_args="freeze_embeddings=true")
    with pytest.raises(ValueError, match=r"untie=True\) before Trainer"):  # resume would mix head and embedding
        _trainer(tmp_path, model=_tiny_tied(), optim_args="freeze_embeddings=untie")[1].create_optimizer()


# ------------------------------------------------------------------------------------ gradient release
def _opt(name, params, release):
    if name == "sgdsai":
        return memopt.SGDSaI(params, lr=3e-2, grad_release=release)
    if name == "sgdsai_m0":
        return memopt.SGDSaI(params, lr=3e-2, momentum=0.0, grad_release=release)
    if name == "sgdsai_8bit":
        return memopt.SGDSaI(params, lr=3e-2, state_bits=8, min_8bit_size=256, grad_release=release)
    if name == "gsnr_max_m0":
        return memopt.SGDSaI(params, lr=3e-2, scale="gsnr_max", momentum=0.0, grad_release=release)
    if name == "gsnr_max_8bit":
        return memopt.SGDSaI(params, lr=3e-2, scale="gsnr_max", state_bits=8, min_8bit_size=256,
                             grad_release=release)
    if name in ("gsnr", "sqrt_numel", "gsnr_max"):
        return memopt.SGDSaI(params, lr=1e-4 if name != "gsnr_max" else 3e-2, scale=name, grad_release=release)
    if name.startswith("factored"):
        return memopt.SGDSaI(params, lr=3e-3, scale="factored", grad_release=release,
                             **({"state_bits": 8, "min_8bit_size": 256} if name == "factored_8bit" else {}))
    return memopt.AdamW8bit(params, lr=3e-3, min_8bit_size=256, grad_release=release)


@pytest.mark.parametrize("name", ["sgdsai", "sgdsai_m0", "sgdsai_8bit", "gsnr", "sqrt_numel", "gsnr_max",
                                  "gsnr_max_m0", "gsnr_max_8bit", "factored", "factored_8bit", "adamw_8bit"])
def test_release_equals_the_normal_step(name):
    a, b = tiny_llama(), tiny_llama()
    oa, ob = _opt(name, list(a.parameters()), False), _opt(name, list(b.parameters()), True)
    assert ob.gradient_release and not oa.gradient_release
    data = PatternDataset(n=40)
    for i in range(5):
        batch = {k: torch.stack([data[j][k] for j in range(8 * i, 8 * i + 8)]) for k in ("input_ids", "labels")}
        for model, opt in ((a, oa), (b, ob)):
            model(**batch).loss.backward()
            if opt is ob and name == "gsnr_max_m0" and i == 0:
                # the paper mode with momentum 0 keeps its first gradients (no buffer) until step() knows every scale
                assert all(p.grad is not None for p in model.parameters())
            elif opt is ob:
                # the hooks freed every gradient during backward
                assert all(p.grad is None for p in model.parameters())
            opt.step()
            opt.zero_grad()
    # the paper mode's deferred first step with 8-bit momentum uses the stored (quantized) first gradient: equal
    # within tolerance; every other case bit for bit
    tol = dict(atol=1e-3, rtol=0) if name == "gsnr_max_8bit" else dict(atol=0, rtol=0)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, **tol, msg=n)


def test_release_state_dict_resumes_exactly():
    def batches():
        data = PatternDataset(n=48)
        return [{k: torch.stack([data[j][k] for j in range(8 * i, 8 * i + 8)]) for k in ("input_ids", "labels")}
                for i in range(6)]

    def run(model, opt, bs):
        for batch in bs:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

    a = tiny_llama()
    run(a, memopt.SGDSaI(list(a.parameters()), lr=3e-2, grad_release=True), batches())
    b = tiny_llama()
    ob = memopt.SGDSaI(list(b.parameters()), lr=3e-2, grad_release=True)
    run(b, ob, batches()[:3])
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    c = tiny_llama(seed=5)
    c.load_state_dict(b.state_dict())
    oc = memopt.SGDSaI(list(c.parameters()), lr=3e-2, grad_release=True)
    oc.load_state_dict(torch.load(buf, weights_only=True))
    run(c, oc, batches()[3:])
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_release_is_refused_where_it_cannot_be_right(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm must be 0"):
        _trainer(tmp_path, optim_args="grad_release=true")[1].create_optimizer()
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        _trainer(tmp_path, optim_args="grad_release=true", max_grad_norm=0.0,
                 gradient_accumulation_steps=2)[1].create_optimizer()
    with pytest.raises(ValueError, match="not accepted"):
        _trainer(tmp_path, optim="frugal", optim_args="grad_release=true", max_grad_norm=0.0)[1].create_optimizer()
    with pytest.raises(ValueError, match="fp16"):
        _trainer(tmp_path, optim_args="grad_release=true", max_grad_norm=0.0, fp16=True)[1].create_optimizer()
    with pytest.raises(ValueError, match="grad_release"):
        memopt.SGDSaI(tiny_llama().parameters(), grad_release="yes")
    with pytest.raises(NotImplementedError, match="FRUGAL does not support gradient release"):
        memopt.FRUGAL(tiny_llama().parameters()).enable_gradient_release()
    # inside accelerate, a backward that is not the last of an accumulation cycle is refused at run time
    from accelerate.state import GradientState

    model = tiny_llama()
    opt = memopt.SGDSaI(list(model.parameters()), grad_release=True)  # noqa: F841  (hooks hold it weakly)
    state = GradientState()
    state._set_sync_gradients(False)
    try:
        batch = PatternDataset(n=2)[0]
        with pytest.raises(RuntimeError, match="gradient_accumulation_steps=1"):
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    finally:
        state._set_sync_gradients(True)


def test_trainer_release_matches_the_normal_run_and_resumes(tmp_path):
    kw = dict(max_grad_norm=0.0, max_steps=8)
    _, normal = _trainer(tmp_path / "n", **kw)
    normal.train()
    want = {h["step"]: h["loss"] for h in normal.state.log_history if "loss" in h}
    _, rel = _trainer(tmp_path / "r", optim_args="grad_release=true", save_strategy="steps", save_steps=4, **kw)
    rel.train()
    assert rel.optimizer.optimizer.gradient_release
    got = {h["step"]: h["loss"] for h in rel.state.log_history if "loss" in h}
    assert got == want  # same losses at every step, the lr schedule included
    _, resumed = _trainer(tmp_path / "r", optim_args="grad_release=true", model=tiny_llama(seed=3), **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-4"))
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 4}
    assert again and all(again[s] == want[s] for s in again)


# -------------------------------------------------------------------------- bf16 weights, no fp32 master
def test_stochastic_rounding_is_on_by_default_for_bf16_params():
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = memopt.SGDSaI([p], lr=1e-4, weight_decay=0.0, momentum=0.0)
    assert opt.param_groups[0]["stochastic_rounding"] is True
    for _ in range(20):  # each update is ~1/80 of a bf16 ulp at 1.0: round-to-nearest would never move it
        p.grad = torch.full_like(p, 1.0) + 0.01 * torch.randn(4096).to(torch.bfloat16)
        opt.step()
    assert (p.float() < 1.0).float().mean() > 0.0
    q = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = memopt.SGDSaI([q], lr=1e-4, weight_decay=0.0, momentum=0.0, stochastic_rounding=False)
    for _ in range(20):
        q.grad = torch.full_like(q, 1.0) + 0.01 * torch.randn(4096).to(torch.bfloat16)
        opt.step()
    assert torch.equal(q.float(), torch.ones(4096))


def test_memory_report_counts_one_gradient_at_a_time_under_release():
    from memopt.memory import measure

    model = tiny_llama()
    opt = memopt.SGDSaI(list(model.parameters()), lr=1e-2, grad_release=True)
    batch = PatternDataset(n=8)[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    opt.step()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert measure(model, opt).grads_bytes == opt.max_released_grad_bytes == largest


def _backward(model, seed=0):
    batch = PatternDataset(n=8, seed=seed)[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()


def test_release_hooks_belong_to_one_live_optimizer():
    import gc

    model = tiny_llama()
    first = memopt.AdamW8bit(list(model.parameters()), lr=1e-3, grad_release=True)
    with pytest.raises(RuntimeError, match="another live AdamW8bit"):
        memopt.AdamW8bit(list(model.parameters()), lr=0.0, grad_release=True)
    del first
    gc.collect()
    second = memopt.AdamW8bit(list(model.parameters()), lr=0.0, weight_decay=0.0, grad_release=True)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    second.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # lr 0: the dropped one is inert
    assert len(second.state) == len(before)  # and the new one did the updates
    second.disable_gradient_release()
    third = memopt.SGDSaI(list(model.parameters()), grad_release=True)
    assert third.gradient_release


def test_release_needs_a_step_after_each_backward():
    model = tiny_llama()
    # gsnr_max defers a tensor's first update to step() (it needs every scale of the step); factored does not
    opt = memopt.SGDSaI(list(model.parameters()), lr=1e-2, scale="gsnr_max", grad_release=True)
    _backward(model)
    with pytest.raises(RuntimeError, match="call step\\(\\) after each backward"):
        _backward(model, seed=1)
    opt.step()
