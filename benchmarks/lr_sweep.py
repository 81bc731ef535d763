"""Learning-rate / scale-mode sweep of SGD-SaI vs AdamW on the demo task (evidence for the defaults).

Every point: SmolLM2-135M-Instruct, pydoc text, batch 4 x 128 tokens, seed 42, cosine schedule, same eval split.
LoRA (r=8, q_proj/v_proj) runs 30 steps, full fine-tuning 20 steps. Rows are appended to the CSV as they finish.

    python benchmarks/lr_sweep.py [--only lora|full] [--out benchmarks/results/lr_sweep.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEMOPT_MEMORY_REPORT", "off")

import torch  # noqa: E402

from _common import load_example  # noqa: E402
finetune = load_example("finetune")

GRID = {
    "lora": [("sgdsai", "scale=gsnr_max", lr) for lr in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)]
    + [("sgdsai", "scale=sqrt_numel", lr) for lr in (3e-3, 1e-2, 3e-2, 0.1, 0.3)]
    + [("adamw_torch", None, lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)],
    "full": [("sgdsai", "scale=gsnr_max", lr) for lr in (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)]
    + [("sgdsai", "scale=sqrt_numel", lr) for lr in (1e-5, 3e-5, 1e-4, 3e-4)]
    + [("adamw_torch", None, lr) for lr in (3e-5, 1e-4, 3e-4, 1e-3)],
}
STEPS = {"lora": 30, "full": 20}
FIELDS = ["mode", "optim", "optim_args", "learning_rate", "steps", "train_loss_first_log", "train_loss_last_log",
          "eval_loss_before", "eval_loss_after", "train_runtime_s", "torch", "machine"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["lora", "full"], default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lr_sweep.csv"))
    cli = ap.parse_args()
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    done = set()
    if not new:  # resume: skip points already in the CSV
        with out.open() as f:
            done = {(r["mode"], r["optim"], r["optim_args"] or None, float(r["learning_rate"]))
                    for r in csv.DictReader(f)}
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for mode in ([cli.only] if cli.only else ["lora", "full"]):
            for optim, optim_args, lr in GRID[mode]:
                if (mode, optim, optim_args, float(lr)) in done:
                    continue
                argv = ["--optim", optim, "--compare", "none", "--learning_rate", str(lr), "--max_steps",
                        str(STEPS[mode]), "--output_dir", "/tmp/memopt_sweep", "--no-eval_before",
                        "--logging_steps", "10", "--lora" if mode == "lora" else "--no-lora"]
                if optim_args:
                    argv += ["--optim_args", optim_args]
                t0 = time.time()
                r = finetune.run(finetune.parse_args(argv))
                row = {k: r.get(k) for k in FIELDS if k in r}
                row.update(mode=mode, torch=torch.__version__, machine=platform.machine())
                writer.writerow(row)
                f.flush()
                print(f"SWEEP {mode} {optim} {optim_args} lr={lr:g}: eval {r['eval_loss_after']:.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
