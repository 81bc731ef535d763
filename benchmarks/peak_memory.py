"""Peak memory and step time of full fine-tuning per optimizer setting: same model, batch and steps, one fresh
process each.

Every configuration fine-tunes all weights of SmolLM2-135M through the Trainer (the demo task: pydoc text,
batch 4 x 128 tokens, seed 42) for a few steps, in its own process, and records:

- CPU (this machine): ``peak RSS - baseline RSS``. Baseline = VmRSS after the imports (torch, memopt,
  transformers and the modules it loads lazily for the Trainer and the Llama model: ~360 MiB of library code
  and data that is not training memory) and before the model is loaded. Peak = VmHWM (the kernel's high-water
  mark of resident memory) after the last step, restarted (``/proc/self/clear_refs`` = 5, after
  ``malloc_trim``) once the model is loaded, so the one-time copy made while loading the checkpoint is not
  counted. Each child runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB: tensors of 1 MiB and more
  get their own mapping and leave RSS when freed, so RSS follows the live tensors (what CUDA's
  ``max_memory_allocated`` counts) instead of also holding freed blocks glibc keeps in its heap
  (``--glibc-default`` measures without it). The number is what training holds on top of the imports:
  weights, gradients, optimizer state, activations, temporaries. The ratio is taken against ``adamw_torch``
  (fp32 weights) in the same run.
- CPU, second number (a second, profiled process per setting; ``--no-live-tensors`` skips it): the peak of live
  tensor bytes = the model's parameters and buffers + the peak of allocations minus frees over the run, from the
  torch profiler's CPU allocator events (``profile_memory=True``) in time order. This is what
  ``max_memory_allocated`` counts on a GPU, independent of the allocator and of library code.
- CUDA (when run on a GPU): ``torch.cuda.max_memory_allocated()`` over the run.
- Step time: the median train step after the first (Trainer callback, wall clock), and its ratio to AdamW's.

Also written: the exact weights + grads + state the process held at its last step, counted from the tensors
(the memory report's numbers). The planner's prediction of that part is validated by plan_validation.py.

    python benchmarks/peak_memory.py --gradient-checkpointing [--steps 5] [--out benchmarks/results/peak_memory_ckpt]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from _common import MMAP_THRESHOLD, malloc_trim, merge_csv_rows, status_kib, write_csv  # noqa: E402

# (label, optim, optim_args, weights dtype, max_grad_norm, lr)
CONFIGS = [
    ("adamw_torch", "adamw_torch", None, "float32", 1.0, 1e-4),
    ("bnb adamw_8bit", "adamw_bnb_8bit", None, "float32", 1.0, 1e-4),
    ("sgdsai", "sgdsai", None, "float32", 1.0, 1e-4),
    ("sgdsai_8bit", "sgdsai_8bit", None, "float32", 1.0, 1e-4),
    ("sgdsai_8bit + release", "sgdsai_8bit", "grad_release=true", "float32", 0.0, 1e-4),
    ("sgdsai_8bit + release + frozen emb", "sgdsai_8bit", "grad_release=true,freeze_embeddings=true", "float32",
     0.0, 1e-4),
    ("bf16 adamw_torch", "adamw_torch", None, "bfloat16", 1.0, 1e-4),
    ("bf16 sgdsai_8bit + release + frozen emb", "sgdsai_8bit", "grad_release=true,freeze_embeddings=true",
     "bfloat16", 0.0, 1e-4),
    ("bf16 sgdsai_8bit + release + frozen emb + chunked loss", "sgdsai_8bit",
     "grad_release=true,freeze_embeddings=true,chunked_loss=true", "bfloat16", 0.0, 1e-4),
]


def child(cfg_index: int, steps: int, out: str, ckpt: bool = False, live: bool = False) -> None:
    """One configuration in this (fresh) process. ``live``: measure the peak of live tensor bytes with the torch
    profiler instead (its event buffers would distort RSS and step time, hence a separate process)."""
    import torch

    from _common import load_example  # noqa: E402
    finetune = load_example("finetune")
    import memopt  # noqa: F401
    import transformers  # noqa: F401
    # transformers imports lazily: the Trainer module alone pulls in datasets, pyarrow, pandas, torchao, scipy
    # (~360 MiB of code and module data here). Import what the run will use before taking the baseline, so
    # library code is not counted as training memory.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import Trainer, TrainingArguments  # noqa: F401

    label, optim, optim_args, dtype, max_norm, lr = CONFIGS[cfg_index]
    baseline = status_kib("VmRSS") * 1024
    build = finetune.build_model

    profiler = {}

    def build_then_reset_peak(args):
        # Loading converts/copies the checkpoint once (a transient that is not training memory): release what
        # the allocator kept, then restart the kernel's high-water mark at the current resident size.
        model, tokenizer = build(args)
        malloc_trim()
        Path("/proc/self/clear_refs").write_text("5")
        if live:  # what a GPU would hold before training: the model's parameters and buffers
            profiler["model_bytes"] = sum(t.numel() * t.element_size()
                                          for t in [*model.parameters(), *model.buffers()])
            profiler["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                      profile_memory=True)
            profiler["prof"].__enter__()
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
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    r = finetune.run(finetune.parse_args(argv), callbacks=[timer])
    if live:
        Path(out).write_text(json.dumps({"live_tensor_peak_bytes": _live_peak(profiler)}))
        return
    later = sorted(timer.times[1:]) or timer.times  # the first step also warms up (and computes SGD-SaI's g-SNR)
    peak = status_kib("VmHWM") * 1024
    row = {"config": label, "optim": optim, "optim_args": optim_args or "", "weights_dtype": dtype,
           "max_grad_norm": max_norm, "steps": r["steps"], "trainable_params": r["trainable_params"],
           "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "training_bytes": peak - baseline,
           "train_loss_last_log": r["train_loss_last_log"],
           "step_time_s": later[len(later) // 2], "first_step_time_s": timer.times[0],
           "optimizer_state_bytes": r["optimizer_state_bytes"],
           "weights_grads_state_bytes": r.get("weights_grads_state_bytes"),
           "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "device": "cuda" if cuda else "cpu", "torch": torch.__version__, "gradient_checkpointing": ckpt}
    Path(out).write_text(json.dumps(row))


def _live_peak(profiler: dict) -> int:
    """Model bytes + the peak of (CPU allocations - frees) over the profiled run, from the profiler's allocator
    events in time order: the bytes of live tensors at their peak, what ``torch.cuda.max_memory_allocated``
    counts on a GPU (no allocator caching or fragmentation, no library code)."""
    import torch

    prof = profiler["prof"]
    prof.__exit__(None, None, None)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return profiler["model_bytes"] + peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peak_memory"))
    ap.add_argument("--only", type=int, nargs="*", help="config indices to run (default: all)")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace those settings' rows in the existing CSV at --out, keep the others")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing in every run")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's dynamic mmap threshold on (RSS then also holds freed, cached memory)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-live-tensors", action="store_true",
                    help="skip the second (profiled) run per setting that measures the peak of live tensor bytes")
    cli = ap.parse_args()
    if cli.child is not None:
        child(cli.child, cli.steps, cli.child_out, cli.gradient_checkpointing, cli.live)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in (cli.only if cli.only else range(len(CONFIGS))):
            out = Path(tmp) / f"{i}.json"
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            if not cli.glibc_default:
                env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
            cmd = [sys.executable, __file__, "--child", str(i), "--child-out", str(out), "--steps", str(cli.steps)]
            cmd += ["--gradient-checkpointing"] if cli.gradient_checkpointing else []
            subprocess.run(cmd, check=True, env=env)
            rows.append(json.loads(out.read_text()))
            if not cli.no_live_tensors and rows[-1]["device"] == "cpu":
                subprocess.run(cmd + ["--live"], check=True, env=env)
                rows[-1].update(json.loads(out.read_text()))
            print("ROW", rows[-1], flush=True)
    if cli.merge:
        rows = merge_csv_rows(rows, Path(cli.out), "config", [c[0] for c in CONFIGS])
    finish(rows, Path(cli.out))


@functools.lru_cache(maxsize=None)
def _smollm2_summary():
    """The planner's summary of the benchmark's model, built once on the meta device."""
    from memopt.demo import smollm2_checkpoint

    from memopt import plan

    return plan.summarize_model(plan.build_meta_model(plan.load_config(str(smollm2_checkpoint()))))


def _planned(row: dict) -> dict:
    """memopt.plan's prediction for the row's setting: exact weights + grads + state, and the peak with its
    activation estimate (activation checkpointing as in the run; activations in the weights' dtype, as on CPU
    here, where the Trainer runs without autocast)."""
    from memopt import plan

    setup = plan.Setup(row["config"], row["optim"], row["optim_args"] or "")
    summary = _smollm2_summary()
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[row["weights_dtype"]]
    exact = plan.exact_parts(summary, setup, dtype)
    act = plan.estimate_activations(summary, 4, 128, checkpointing=bool(row.get("gradient_checkpointing")),
                                    bytes_per_activation=2 if dtype == "bf16" else 4)
    return {"planned_weights_grads_state_bytes": exact.total, "planned_peak_bytes": exact.total + act.total_for(setup)}


def finish(rows: list, out: Path) -> None:
    """Ratios against adamw_torch, CSV, PNG and the printed table."""
    base = next((r for r in rows if r["config"] == "adamw_torch"), rows[0])
    key = "cuda_max_allocated_bytes" if base["device"] == "cuda" else "training_bytes"
    for r in rows:
        r.update(_planned(r))
        r["planned_wgs_error"] = round(r["planned_weights_grads_state_bytes"] / r["weights_grads_state_bytes"] - 1, 4)
        if r.get("live_tensor_peak_bytes"):
            r["planned_peak_vs_live_tensors"] = round(r["planned_peak_bytes"] / r["live_tensor_peak_bytes"] - 1, 4)
        r["ratio_vs_adamw_torch"] = round(r[key] / base[key], 3)
        r["step_time_vs_adamw_torch"] = round(r["step_time_s"] / base["step_time_s"], 3)
        if base.get("live_tensor_peak_bytes") and r.get("live_tensor_peak_bytes"):
            r["live_ratio_vs_adamw_torch"] = round(r["live_tensor_peak_bytes"] / base["live_tensor_peak_bytes"], 3)
    path = write_csv(out, rows)
    _plot(rows, key, out.with_suffix(".png"))
    w = max(len(r["config"]) for r in rows)
    print(f"\n{'config':<{w}} {'training memory':>16} {'vs AdamW':>9} {'live tensors':>13} {'vs AdamW':>9} "
          f"{'step s':>7} {'vs AdamW':>9}")
    for r in rows:
        live = r.get("live_tensor_peak_bytes")
        live_cells = (f"{live / 2**20:>9.0f} MiB {r['live_ratio_vs_adamw_torch']:>9.3f}" if live
                      and "live_ratio_vs_adamw_torch" in r else f"{'-':>13} {'-':>9}")
        print(f"{r['config']:<{w}} {r[key] / 2**20:>12.0f} MiB {r['ratio_vs_adamw_torch']:>9.3f} {live_cells} "
              f"{r['step_time_s']:>7.2f} {r['step_time_vs_adamw_torch']:>9.3f}")
    print(f"wrote {path}")


def _plot(rows, key, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 5), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    names = [r["config"] for r in rows][::-1]
    colors = ["tab:green" if "release" in n else "tab:blue" for n in names]
    vals = [r[key] / 2**20 for r in rows][::-1]
    live = [r.get("live_tensor_peak_bytes") for r in rows][::-1]
    has_live = all(live) and all("live_ratio_vs_adamw_torch" in r for r in rows)
    ys = range(len(names))
    height = 0.4 if has_live else 0.8
    off = height / 2 if has_live else 0.0
    what = "CUDA max allocated" if key.startswith("cuda") else "peak RSS - RSS after imports"
    ax.barh([y + off for y in ys], vals, height=height, color=colors, label=what)
    for y, (v, r) in enumerate(zip(vals, rows[::-1])):
        ax.text(v, y + off, f" {r['ratio_vs_adamw_torch']:.2f}x", va="center", fontsize=7)
    if has_live:
        lv = [b / 2**20 for b in live]
        ax.barh([y - off for y in ys], lv, height=height, color=colors, alpha=0.45, hatch="//",
                label="peak live tensor bytes (torch profiler)")
        for y, (v, r) in enumerate(zip(lv, rows[::-1])):
            ax.text(v, y - off, f" {r['live_ratio_vs_adamw_torch']:.2f}x", va="center", fontsize=7)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(ys), names)
    ax.set_xlabel("training memory, MiB" + ("" if key.startswith("cuda") else " (CPU)"))
    ax.set_xlim(0, max(vals) * 1.15)
    times = [r["step_time_s"] for r in rows][::-1]
    ax_t.barh(names, times, color=colors)
    for y, (v, r) in enumerate(zip(times, rows[::-1])):
        ax_t.text(v, y, f" {r['step_time_vs_adamw_torch']:.2f}x", va="center", fontsize=8)
    ax_t.set_xlabel("train step, s (median after the first)")
    ax_t.set_xlim(0, max(times) * 1.2)
    ckpt = ", activation checkpointing" if rows[0].get("gradient_checkpointing") else ""
    fig.suptitle(f"SmolLM2-135M full fine-tuning, batch 4 x 128{ckpt}: peak memory and step time per setting",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
