"""Chunked causal-LM loss (memopt.chunked_loss): same loss and gradients as the model's own, without the logits."""

import copy
import logging

import pytest
import torch

import memopt
from memopt.loss import SUPPORTED_MODEL_TYPES, auto_chunk_tokens, chunk_tokens_of, chunked_cross_entropy
from tiny import PatternDataset, tiny_llama


def _tiny(model_type, tied=True, seed=0, vocab=97):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).train()


def _batch(vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt that does not count
    labels[2, -3:] = -100
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref_loss, ref_grads, loss, grads):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _assert_chunked_matches(ref, model, ids, **kw):
    """One forward + backward of the reference and of the chunked model on the same batch: the chunked one returns
    no logits, and the same loss and gradients."""
    a = ref(input_ids=ids, **kw)
    a.loss.backward()
    b = model(input_ids=ids, **kw)
    b.loss.backward()
    assert b.logits is None
    _assert_same(a.loss, _grads(ref), b.loss, _grads(model))


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_same_loss_and_gradients_as_the_models_own(model_type, caplog):
    ref = _tiny(model_type, tied=model_type != "phi3")
    model = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger="memopt"):
        info = memopt.chunked_loss(model, chunk_tokens=7)
    assert "7 positions at a time" in caplog.text
    assert info.chunk_tokens == 7 and info.model_type == model_type
    ids, labels = _batch()
    _assert_chunked_matches(ref, model, ids, labels=labels)


def test_num_items_in_batch_shift_labels_and_positional_calls():
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    memopt.chunked_loss(model, chunk_tokens=5)
    ids, labels = _batch(vocab=64)
    n = torch.tensor(41)
    shifted = torch.roll(labels, 1, dims=1)  # given shift_labels are used as they are
    for kw in ({"labels": labels, "num_items_in_batch": n}, {"labels": labels, "shift_labels": shifted}):
        ref.zero_grad()
        model.zero_grad()
        _assert_chunked_matches(ref, model, ids, **kw)
    b = model(ids, None, labels=labels)  # positional input_ids, attention_mask
    assert b.logits is None
    torch.testing.assert_close(b.loss, ref(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_eval_and_no_labels_run_the_models_own_forward():
    model = tiny_llama()
    memopt.chunked_loss(model)
    ids, labels = _batch(vocab=64)
    assert model(input_ids=ids).logits.shape == (3, 20, 64)
    model.eval()
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (3, 20, 64) and torch.isfinite(out.loss)
    model.train()
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is not None
    memopt.disable_chunked_loss(model)
    assert "forward" not in model.__dict__ and model(input_ids=ids, labels=labels).logits is not None


def test_chunked_cross_entropy_all_ignored_and_chunk_sizes():
    head = torch.nn.Linear(8, 11, bias=True)
    h = torch.randn(2, 9, 8)
    t = torch.randint(0, 11, (2, 9))
    want = torch.nn.functional.cross_entropy(head(h).reshape(-1, 11), t.reshape(-1))
    for c in (1, 4, 18, 100):
        torch.testing.assert_close(chunked_cross_entropy(h, head, t, chunk_tokens=c), want)
    assert torch.isnan(chunked_cross_entropy(h, head, torch.full_like(t, -100), chunk_tokens=4))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(h, head, t, chunk_tokens=0)
    with pytest.raises(ValueError, match="does not match"):
        chunked_cross_entropy(h, head, t[:, :3], chunk_tokens=4)
    assert auto_chunk_tokens(49152) == 170 and auto_chunk_tokens(10**7) == 16


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="model type 'gemma2'.*not supported"):
        memopt.chunked_loss(_tiny("gemma2"))
    with pytest.raises(ValueError, match="not supported"):
        memopt.chunked_loss(torch.nn.Linear(2, 2))
    model = tiny_llama()
    model.loss_function = lambda **kw: 0.0
    with pytest.raises(ValueError, match="custom loss_function"):
        memopt.chunked_loss(model)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            memopt.chunked_loss(tiny_llama(), chunk_tokens=bad)
    model = tiny_llama()
    model.lm_head.weight.ds_id = 7  # DeepSpeed ZeRO-3 partitioned parameter
    with pytest.raises(ValueError, match="sharded"):
        memopt.chunked_loss(model)
    model = tiny_llama()
    memopt.chunked_loss(model)
    from torch.distributed.fsdp import FSDPModule

    model.__class__ = type("FSDPLlamaForCausalLM", (FSDPModule, type(model)), {})  # what fully_shard does
    with pytest.raises(ValueError, match="sharded"):  # sharded after chunked_loss: refused at the forward
        model(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="acts on the model"):
        memopt.create_optimizer("sgdsai", tiny_llama().parameters(), optim_args="chunked_loss=true")


def test_peft_lora_model():
    import peft
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    ref = peft.get_peft_model(tiny_llama(), cfg)
    model = copy.deepcopy(ref)
    memopt.chunked_loss(model, chunk_tokens=6)
    ids, labels = _batch(vocab=64)
    _assert_chunked_matches(ref, model, ids, labels=labels)


def _trainer(tmp_path, optim_args, model=None, **kw):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(tmp_path), optim="sgdsai", learning_rate=3e-2, max_steps=4,
                per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                seed=0, disable_tqdm=True, max_grad_norm=0.0, optim_args=optim_args)
    args.update(kw)
    return Trainer(model=model or tiny_llama(), args=TrainingArguments(**args), train_dataset=PatternDataset())


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("extra", ["", ",grad_release=true", ",grad_release=true,state_bits=8,min_8bit_size=256"])
def test_trainer_optim_args_chunked_loss_trains_like_the_models_loss(tmp_path, extra):
    want = _trainer(tmp_path / "a", "momentum=0.9" + extra)
    want.train()
    got = _trainer(tmp_path / "b", "chunked_loss=5" + extra, gradient_accumulation_steps=1)
    got.train()
    assert chunk_tokens_of(got.model) == 5
    torch.testing.assert_close(_losses(got), _losses(want), rtol=1e-4, atol=1e-5)
    for w, g in zip(want.model.parameters(), got.model.parameters()):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_trainer_chunked_loss_with_gradient_accumulation(tmp_path):
    # the Trainer passes num_items_in_batch; the chunked loss divides by it as the model's loss does
    want = _trainer(tmp_path / "a", None, gradient_accumulation_steps=2, max_steps=3)
    want.train()
    got = _trainer(tmp_path / "b", "chunked_loss=true", gradient_accumulation_steps=2, max_steps=3)
    got.train()
    torch.testing.assert_close(_losses(got), _losses(want), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="chunked_loss"):
        _trainer(tmp_path / "c", "chunked_loss=lots").create_optimizer()
    with pytest.raises(ValueError, match="positive"):
        _trainer(tmp_path / "c", "chunked_loss=-2").create_optimizer()


def test_deep_copies_and_pickles_compute_with_their_own_weights():
    import pickle

    model = tiny_llama()
    memopt.chunked_loss(model, chunk_tokens=5)
    ids, labels = _batch(vocab=64)
    copy_ = copy.deepcopy(model)  # e.g. a reference model or an EMA copy
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(torch.randn_like(p))
    assert chunk_tokens_of(copy_) == 5
    ref = copy.deepcopy(copy_)
    memopt.disable_chunked_loss(ref)
    got = copy_(input_ids=ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, ref(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    assert all(p.grad is not None for p in copy_.parameters()) and all(
        p.grad is None for p in model.parameters())
    again = pickle.loads(pickle.dumps(model))
    assert chunk_tokens_of(again) == 5
    torch.testing.assert_close(again(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)


def test_a_head_replaced_later_is_the_one_used():
    import peft
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False)
    ref = peft.get_peft_model(tiny_llama(), cfg)
    base = tiny_llama()
    memopt.chunked_loss(base, chunk_tokens=6)  # before PEFT replaces lm_head with a LoRA layer
    model = peft.get_peft_model(base, copy.deepcopy(cfg))
    model.load_state_dict(ref.state_dict())
    ids, labels = _batch(vocab=64)
    _assert_chunked_matches(ref, model, ids, labels=labels)
    resized = tiny_llama()
    memopt.chunked_loss(resized)
    resized.resize_token_embeddings(80)  # a bigger vocabulary after enabling
    wide = torch.randint(64, 80, (2, 10))
    torch.testing.assert_close(resized(input_ids=wide, labels=wide).loss,
                               _own_loss(resized, wide))


def _own_loss(model, ids):
    forward = model.__dict__["forward"]
    return forward.original()(input_ids=ids, labels=ids).loss


def test_nothing_counted_still_backpropagates_and_return_dict_false():
    ref, model = tiny_llama(), tiny_llama()
    memopt.chunked_loss(model, chunk_tokens=4)
    ids = torch.randint(3, 64, (2, 8))
    none = torch.full_like(ids, -100)  # e.g. a micro-batch that is all prompt
    for kw in ({"num_items_in_batch": 5}, {}):
        a, b = ref(input_ids=ids, labels=none, **kw).loss, model(input_ids=ids, labels=none, **kw).loss
        torch.testing.assert_close(b, a, equal_nan=True)
        if kw:
            a.backward()
            b.backward()
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    ids, labels = _batch(vocab=64)
    out = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_a_training_forward_without_labels_is_logged(caplog, tmp_path):
    model = tiny_llama()
    memopt.chunked_loss(model)
    with caplog.at_level(logging.WARNING, logger="memopt"):
        out = model(input_ids=torch.randint(3, 64, (1, 6)))
        model(input_ids=torch.randint(3, 64, (1, 6)))
    assert out.logits.shape == (1, 6, 64)
    assert caplog.text.count("came without labels") == 1
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        _trainer(tmp_path, "chunked_loss=true", label_smoothing_factor=0.1).create_optimizer()
