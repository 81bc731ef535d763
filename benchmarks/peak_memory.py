"""Peak memory of full fine-tuning per optimizer setting: same model, batch and steps, one fresh process each.

Every configuration fine-tunes all weights of SmolLM2-135M through the Trainer (the demo task: pydoc text,
batch 4 x 128 tokens, seed 42) for a few steps, in its own process, and records:

- CPU (this machine): ``peak RSS - baseline RSS``. Baseline = VmRSS after the imports (torch, transformers,
  memopt) and before the model is loaded; peak = VmHWM (the kernel's high-water mark of resident memory) after
  the last step, restarted (``/proc/self/clear_refs`` = 5, after ``malloc_trim``) once the model is loaded, so
  the one-time copy made while loading the checkpoint is not counted. The number is what training holds on top
  of the imports: weights, gradients, optimizer state, activations, temporaries, allocator slack. The ratio is
  taken against ``adamw_torch`` (fp32 weights) in the same run.
- CUDA (when run on a GPU): ``torch.cuda.max_memory_allocated()`` over the run.

Also written: the exact weights + grads + state the process held at its last step, counted from the tensors
(the memory report's numbers), and the planner's prediction of that part (``memopt.plan``), with the error.

    python benchmarks/peak_memory.py [--steps 3] [--out benchmarks/results/peak_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, optim, optim_args, weights dtype, max_grad_norm, lr)
CONFIGS = [
    ("adamw_torch", "adamw_torch", None, "float32", 1.0, 1e-4),
    ("bnb adamw_8bit", "adamw_bnb_8bit", None, "float32", 1.0, 1e-4),
    ("sgdsai", "sgdsai", None, "float32", 1.0, 3e-2),
    ("sgdsai_8bit", "sgdsai_8bit", None, "float32", 1.0, 3e-2),
    ("sgdsai_8bit + release", "sgdsai_8bit", "grad_release=true", "float32", 0.0, 3e-2),
    ("sgdsai_8bit + release + frozen emb", "sgdsai_8bit", "grad_release=true,freeze_embeddings=true", "float32",
     0.0, 3e-2),
    ("bf16 adamw_torch", "adamw_torch", None, "bfloat16", 1.0, 1e-4),
    ("bf16 sgdsai_8bit + release + frozen emb", "sgdsai_8bit", "grad_release=true,freeze_embeddings=true",
     "bfloat16", 0.0, 3e-2),
]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def child(cfg_index: int, steps: int, out: str, ckpt: bool = False) -> None:
    """One configuration in this (fresh) process."""
    sys.path.insert(0, str(ROOT / "examples"))
    import torch

    import finetune
    import memopt  # noqa: F401
    import transformers  # noqa: F401

    label, optim, optim_args, dtype, max_norm, lr = CONFIGS[cfg_index]
    baseline = _status_kib("VmRSS") * 1024
    build = finetune.build_model

    def build_then_reset_peak(args):
        # Loading converts/copies the checkpoint once (a transient that is not training memory): release what
        # the allocator kept, then restart the kernel's high-water mark at the current resident size.
        model, tokenizer = build(args)
        _trim()
        Path("/proc/self/clear_refs").write_text("5")
        return model, tokenizer

    finetune.build_model = build_then_reset_peak
    cuda = torch.cuda.is_available()
    argv = ["--optim", optim, "--compare", "none", "--max_steps", str(steps), "--learning_rate", str(lr),
            "--weights_dtype", dtype, "--max_grad_norm", str(max_norm), "--no-eval_before", "--no-do_eval",
            "--logging_steps", "1", "--output_dir", tempfile.mkdtemp(),
            "--gradient_checkpointing" if ckpt else "--no-gradient_checkpointing"]
    if optim_args:
        argv += ["--optim_args", optim_args]
    os.environ["MEMOPT_MEMORY_REPORT"] = "all"
    r = finetune.run(finetune.parse_args(argv))
    peak = _status_kib("VmHWM") * 1024
    row = {"config": label, "optim": optim, "optim_args": optim_args or "", "weights_dtype": dtype,
           "max_grad_norm": max_norm, "steps": r["steps"], "trainable_params": r["trainable_params"],
           "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "training_bytes": peak - baseline,
           "train_loss_last_log": r["train_loss_last_log"], "optimizer_state_bytes": r["optimizer_state_bytes"],
           "weights_grads_state_bytes": r.get("weights_grads_state_bytes"),
           "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "device": "cuda" if cuda else "cpu", "torch": torch.__version__, "gradient_checkpointing": ckpt}
    Path(out).write_text(json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peak_memory"))
    ap.add_argument("--only", type=int, nargs="*", help="config indices to run (default: all)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing in every run")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    cli = ap.parse_args()
    if cli.child is not None:
        child(cli.child, cli.steps, cli.child_out, cli.gradient_checkpointing)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import write_csv

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in (cli.only if cli.only else range(len(CONFIGS))):
            out = Path(tmp) / f"{i}.json"
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            subprocess.run([sys.executable, __file__, "--child", str(i), "--child-out", str(out), "--steps",
                            str(cli.steps)] + (["--gradient-checkpointing"] if cli.gradient_checkpointing else []),
                           check=True, env=env)
            rows.append(json.loads(out.read_text()))
            print("ROW", rows[-1], flush=True)
    base = next((r for r in rows if r["config"] == "adamw_torch"), rows[0])
    key = "cuda_max_allocated_bytes" if base["device"] == "cuda" else "training_bytes"
    for r in rows:
        r["ratio_vs_adamw_torch"] = round(r[key] / base[key], 3)
    path = write_csv(Path(cli.out), rows)
    _plot(rows, key, Path(cli.out).with_suffix(".png"))
    print(f"\n{'config':<42} {'training memory':>16} {'vs AdamW':>9}")
    for r in rows:
        print(f"{r['config']:<42} {r[key] / 2**20:>12.0f} MiB {r['ratio_vs_adamw_torch']:>9.3f}")
    print(f"wrote {path}")


def _plot(rows, key, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["config"] for r in rows][::-1]
    vals = [r[key] / 2**20 for r in rows][::-1]
    ax.barh(names, vals, color=["tab:green" if "release" in n else "tab:blue" for n in names])
    for y, (v, r) in enumerate(zip(vals, rows[::-1])):
        ax.text(v, y, f" {r['ratio_vs_adamw_torch']:.2f}x", va="center", fontsize=8)
    what = "CUDA max allocated" if key.startswith("cuda") else "peak RSS - RSS after imports (CPU)"
    ax.set_xlabel(f"training memory, MiB ({what})")
    ckpt = ", activation checkpointing" if rows[0].get("gradient_checkpointing") else ""
    ax.set_title(f"SmolLM2-135M full fine-tuning, batch 4 x 128{ckpt}: peak memory per setting", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
