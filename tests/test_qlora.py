"""QLoRA (LoRA adapters on a bitsandbytes 4-bit NF4 base) with memopt optimizers: the recipe of
examples/finetune.py --qlora on a tiny model, the report counting 4-bit weights as stored, and the planner."""

from pathlib import Path

import bitsandbytes  # noqa: F401  (the test extra installs it and peft: a missing one fails, never skips)
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import memopt  # noqa: F401
from memopt import plan as planner
from memopt.demo import qlora_config
from tiny import PatternDataset, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def _qlora_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=qlora_config(torch.float32))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("optim,optim_args", [("sgdsai", "scale=factored"),
                                              ("sgdsai_8bit", "scale=factored,min_8bit_size=64")])
def test_qlora_trains_every_adapter_and_the_report_counts_4bit_weights_as_stored(tiny_dir, tmp_path, optim,
                                                                                  optim_args):
    model = _qlora_model(tiny_dir)
    four_bit = [p for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    assert four_bit and all(p.dtype == torch.uint8 for p in four_bit)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args=optim_args, learning_rate=1e-2,
                             max_steps=6, per_device_train_batch_size=8, logging_steps=2, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=PatternDataset())
    trainer.train()
    after = dict(model.named_parameters())
    still = [n for n, p in before.items() if torch.equal(after[n].detach(), p)]
    assert not still, f"adapters that never moved: {still}"
    assert len(before) == 8  # A and B of q_proj and v_proj in 2 layers
    if optim == "sgdsai_8bit":
        assert any(t.dtype == torch.uint8 for st in trainer.optimizer.optimizer.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))
    report = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "MemoryReportCallback")
    row = report.rows[0]
    # stored bytes, counted from bitsandbytes' own objects: packed codes + every tensor of the quantisation state
    def stored(p):
        qs = p.quant_state
        parts = [p, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
        return sum(t.numel() * t.element_size() for t in parts)

    frozen = sum(stored(p) if getattr(p, "quant_state", None) is not None else p.numel() * p.element_size()
                 for p in model.parameters() if not p.requires_grad)
    assert row.params_frozen_bytes == frozen
    assert row.params_trainable_bytes == sum(p.numel() * 4 for p in before.values())
    # the planner predicts the same weights (+ the rotary buffer, which the report does not count)
    summary = planner.summarize_model(planner.build_meta_model(tiny_llama().config))
    setup = planner.Setup("qlora", "sgdsai", lora=True, qlora=True)
    exact = planner.exact_parts(summary, setup, "fp32", lora_rank=8)
    assert exact.weights_bytes - summary.buffer_numel * 4 == row.params_frozen_bytes + row.params_trainable_bytes
    assert exact.grads_bytes == row.grads_bytes


def test_nf4_bytes_rule_matches_bitsandbytes(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32,
                                                 quantization_config=qlora_config(torch.float32))
    from memopt.memory import tensor_bytes

    quantized = [(name, p) for name, p in model.named_parameters() if getattr(p, "quant_state", None) is not None]
    assert len(quantized) == 7 * tiny_llama().config.num_hidden_layers  # q, k, v, o, gate, up, down of each layer
    for name, p in quantized:
        assert tensor_bytes(p) == planner.nf4_bytes(p.quant_state.shape.numel()), name


def test_plan_has_qlora_rows_for_llama_7b(capsys):
    from memopt.cli import main

    main(["plan", str(Path(__file__).resolve().parents[1] / "examples" / "configs" / "llama-2-7b"), "--json"])
    import json

    rows = {r["setup"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    qlora = [k for k in rows if k.startswith("QLoRA")]
    assert len(qlora) == 3
    lora = rows["LoRA r=8 + SGD-SaI"]
    for k in qlora:  # 4-bit linears: weights about 0.29x of bf16 LoRA's (embedding and head stay bf16)
        assert 0.25 < rows[k]["weights_bytes"] / lora["weights_bytes"] < 0.32
        assert rows[k]["trainable_params"] == lora["trainable_params"]
