"""Run by tests/test_fsdp2.py under `torchrun --nproc_per_node 2` (arguments: OUT OPTIM [resume]): the Trainer
with examples/accelerate/fsdp2.yaml's FSDP2 settings and a memopt optimizer, on CPU.

accelerate 1.15 never turns FSDP on for CPU processes (it runs them as MULTI_CPU/DDP), so this test-only script
switches the accelerator state to FSDP when an FSDP plugin is given; everything else (accelerate's FSDP2 preparation,
which swaps the optimizer's params for DTensors, and the Trainer's sharded DCP checkpoints) is the real code path.

    fsdp2_trainer.py OUT [resume]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny.py

import accelerate.state as accel_state  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_orig_init = accel_state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _orig_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # AcceleratorState re-reads PartialState's shared state on every construction: switch both
        accel_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


accel_state.AcceleratorState.__init__ = _fsdp_on_cpu

import memopt  # noqa: E402,F401
from tiny import PatternDataset, leave_distributed_run, tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

out, optim = sys.argv[1], sys.argv[2]
resume = len(sys.argv) > 3 and sys.argv[3] == "resume"
# sgdsai_8bit: blocksize 16 so the tiny model's rows (32, 64 elements) hold whole blocks (8-bit on shards)
# frugal: the blocks selection (the one whose state keys change with the step), a new round every 2 steps
optim_args = {"sgdsai_8bit": "min_8bit_size=256,blocksize=16", "frugal": "selection=blocks,update_gap=2"}.get(optim)
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
with open(os.path.join(root, "examples", "accelerate", "fsdp2.yaml")) as f:
    cfg = yaml.safe_load(f)["fsdp_config"]
fsdp_config = {"version": cfg["fsdp_version"],
               "transformer_layer_cls_to_wrap": [cfg["fsdp_transformer_layer_cls_to_wrap"]],
               "state_dict_type": cfg["fsdp_state_dict_type"],
               "reshard_after_forward": cfg["fsdp_reshard_after_forward"]}
torch.set_num_threads(1)
args = TrainingArguments(output_dir=out, optim=optim, optim_args=optim_args, learning_rate=1e-2, max_steps=6,
                         per_device_train_batch_size=4,
                         logging_steps=1, save_strategy="steps", save_steps=3, report_to="none", use_cpu=True, seed=0,
                         disable_tqdm=True, lr_scheduler_type="linear", fsdp="full_shard", fsdp_config=fsdp_config)
trainer = Trainer(model=tiny_llama(seed=5 if resume else 0), args=args, train_dataset=PatternDataset(n=48))
trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-3") if resume else None)
opt = trainer.optimizer.optimizer
p = opt.param_groups[0]["params"][0]
if args.process_index == 0:
    with open(os.path.join(out, "resumed.json" if resume else "straight.json"), "w") as f:
        json.dump({"losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
                   "distributed_type": str(trainer.accelerator.distributed_type),
                   "param_type": type(p).__name__, "optimizer": type(opt).__name__,
                   "uint8_state": sum(v.dtype == torch.uint8 for st in opt.state.values() for v in st.values()
                                      if torch.is_tensor(v))}, f)
leave_distributed_run()
