"""Run by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny.py

import torch  # noqa: E402

import memopt  # noqa: E402,F401
from memopt.loss import chunk_tokens_of  # noqa: E402
from tiny import PatternDataset, leave_distributed_run, tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

out = sys.argv[1]
optim_args = sys.argv[2] if len(sys.argv) > 2 else None
model = tiny_llama()
args = TrainingArguments(output_dir=out, optim="sgdsai", optim_args=optim_args, learning_rate=0.05, max_steps=6,
                         max_grad_norm=0.0 if optim_args and "grad_release" in optim_args else 1.0,
                         per_device_train_batch_size=4, logging_steps=2, save_strategy="no", report_to="none",
                         use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="constant")
trainer = Trainer(model=model, args=args, train_dataset=PatternDataset(n=96))
trainer.train()
rank = args.process_index
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out, f"params_rank{rank}.pt"))
with open(os.path.join(out, f"info_rank{rank}.json"), "w") as f:
    json.dump({"world_size": args.world_size, "rank": rank,
               "distributed": torch.distributed.is_initialized(),
               "optimizer": type(trainer.optimizer.optimizer).__name__,
               "chunk_tokens": chunk_tokens_of(model)}, f)
leave_distributed_run()
