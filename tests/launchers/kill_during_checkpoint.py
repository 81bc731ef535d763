"""A Trainer run killed (SIGKILL) while it writes a checkpoint, and its resume (tests/test_reliability.py).

    python kill_during_checkpoint.py OUT kill      # trains; dies half-way through writing checkpoint-6/optimizer.pt
    python kill_during_checkpoint.py OUT resume    # resume_from_checkpoint=True in OUT; losses -> OUT/resumed.json
    python kill_during_checkpoint.py OUT straight  # the same run without interruption; losses -> OUT/straight.json
"""

import io
import json
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import memopt  # noqa: E402,F401
from tiny import PatternDataset, tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

out, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
KILL_AT = os.path.join("checkpoint-6", "optimizer.pt")

if mode == "kill":
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        if isinstance(f, str) and f.endswith(KILL_AT):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with open(f, "wb") as handle:  # half the file reaches the disk, then the process is killed
                handle.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save_then_die

args = TrainingArguments(output_dir=os.path.join(out, "run"), optim="sgdsai_8bit", optim_args="min_8bit_size=256",
                         learning_rate=0.05, max_steps=8, per_device_train_batch_size=8, logging_steps=1,
                         save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0,
                         disable_tqdm=True, lr_scheduler_type="cosine")
trainer = Trainer(model=tiny_llama(seed=7 if mode == "resume" else 0), args=args, train_dataset=PatternDataset())
trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
with open(os.path.join(out, f"{mode}.json"), "w") as f:
    json.dump(losses, f)
