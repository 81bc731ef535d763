"""Optimizer step time of the projection methods vs torch AdamW on the demo model, parameter groups as the Trainer
builds them (memopt's default targets), subspace refresh excluded (it is timed in projection_demo.py).

Each optimizer in turn gets a fresh copy of the demo model's weights and the same fixed random gradients, takes
one untimed step (state and the first subspace), then ``--rounds`` x ``--steps`` timed steps (median reported).
``update_gap`` (200) exceeds the timed steps, so no refresh happens while timing.

    python benchmarks/projection_step_time.py [--rounds 3 --steps 2] [--out benchmarks/results/projection_step_time]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import write_csv  # noqa: E402

METHODS = [  # (label, optim name, optim_args)
    ("adamw_torch", "adamw_torch", None),
    ("sgdsai", "sgdsai", None),
    ("frugal", "frugal", "density=0.25"),
    ("frugal_8bit", "frugal_8bit", "density=0.25"),
    ("frugal blocks", "frugal", "selection=blocks,density=0.25"),
    ("frugal_sgdsai", "frugal_sgdsai", "density=0.25"),
    ("memopt_galore", "memopt_galore", "rank=144,alpha=1.0"),
    ("adamsnsm", "adamsnsm", "rank=144"),
]


def build(name, optim_args, model, args):
    from memopt.integrations.transformers import _trainer_groups, optimizer_cls_and_kwargs

    if name == "adamw_torch":
        return torch.optim.AdamW(_trainer_groups(model, args), lr=1e-4, foreach=True)
    cls, kwargs = optimizer_cls_and_kwargs(name, args, model=model, optim_args=optim_args, lr=1e-4)
    params = kwargs.pop("params", None) or _trainer_groups(model, args)
    return cls(params, **kwargs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection_step_time"))
    cli = ap.parse_args()
    from memopt.demo import smollm2_checkpoint
    from transformers import AutoModelForCausalLM, TrainingArguments

    base = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, weight_decay=0.0, report_to="none")
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in base.named_parameters()}
    times, state = {}, {}
    for label, name, optim_args in METHODS:  # one at a time, so only one model copy and one state are alive
        model = copy.deepcopy(base)
        opt = build(name, optim_args, model, args)
        params = dict(model.named_parameters())
        samples = []
        for i in range(cli.rounds * cli.steps + 1):
            for n, p in params.items():
                p.grad = grads[n].clone()
            t0 = time.perf_counter()
            opt.step()
            if i:  # the first step (state, first subspace) is not timed
                samples.append((time.perf_counter() - t0) * 1e3)
        times[label] = samples
        state[label] = memopt.state_bytes(opt)
        print(f"{label:<16} {statistics.median(samples):>9.1f} ms", flush=True)
        del model, opt, params
    ref = statistics.median(times["adamw_torch"])
    rows = []
    for label, name, optim_args in METHODS:
        med = statistics.median(times[label])
        rows.append({"method": label, "optim": name, "optim_args": optim_args or "",
                     "state_bytes": state[label], "step_ms_median": round(med, 1),
                     "step_ratio_vs_adamw": round(med / ref, 3), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "machine": platform.machine(),
                     "rounds_x_steps": f"{cli.rounds}x{cli.steps}"})
        print(f"{label:<16} x{med / ref:.3f} vs AdamW", flush=True)
    print(f"wrote {write_csv(Path(cli.out), rows)}")


if __name__ == "__main__":
    main()
