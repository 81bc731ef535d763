"""Projection methods on the demo task: state bytes, eval loss, step time vs AdamW, and subspace-refresh cost.

Every run: full fine-tuning of SmolLM2-135M on the pydoc text, 20 steps, batch 4 x 128, seed 42, cosine schedule,
same eval split, each method with memopt's default targets (attention/MLP linears; SN-SM: all linears, the LM
head is tied here so it stays with the embedding in plain Adam). Each method runs at every learning rate of its
small grid (a factor 3 apart, around its scale: Adam-type 1e-4..1e-3, AdamSNSM 3e-4..1e-2 because its Subset-Norm
sums a whole row, SGD-SaI-type 1e-2..3e-2); rows ``what=sweep`` hold every run, rows ``what=train`` the best
learning rate of each method (selected on the eval split: the demo has no separate test split). Refresh cost: one
subspace selection per distinct matrix shape of the model, timed separately, and amortised over the default gap
(200 steps).

    python benchmarks/projection_demo.py [--steps 20] [--out benchmarks/results/projection_demo]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEMOPT_MEMORY_REPORT", "all")

import torch  # noqa: E402

from _common import load_example  # noqa: E402
finetune = load_example("finetune")
from _common import write_csv  # noqa: E402
from memopt.functional import projection as proj  # noqa: E402

ADAM_LRS = (1e-4, 3e-4)  # AdamW diverges at 1e-3 here (benchmarks/results/lr_sweep.csv)
RUNS = [  # (optim, optim_args, learning rates)
    ("adamw_torch", None, ADAM_LRS),
    ("sgdsai", None, (3e-2,)),  # its sweep: docs/sgdsai.md
    ("frugal", "density=0.25", ADAM_LRS),
    ("frugal_8bit", "density=0.25", ADAM_LRS),
    ("frugal", "selection=blocks,density=0.25", ADAM_LRS),
    ("frugal_sgdsai", "density=0.25", (1e-2, 3e-2)),
    ("memopt_galore", "rank=144,alpha=1.0", (1e-4, 3e-4, 1e-3)),  # r = 0.25 * 576; a projected step is smaller
    ("adamsnsm", "rank=144", (3e-4, 1e-3, 3e-3, 1e-2)),
]


def refresh_costs(model, gap: int = 200) -> list[dict]:
    shapes = sorted({tuple(m.weight.shape) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1].endswith("proj")})
    counts = {s: 0 for s in shapes}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and tuple(m.weight.shape) in counts and n.rsplit(".", 1)[-1].endswith("proj"):
            counts[tuple(m.weight.shape)] += 1
    rows = []
    for selection in ("svd", "randomized_svd", "random", "columns"):
        total = 0.0
        for shape in shapes:
            g = torch.randn(shape)
            cfg = proj.ProjectionConfig(selection=selection, density=0.25)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                proj.refresh({}, g, 0, cfg)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            total += ms * counts[shape]
            rows.append({"what": "refresh", "selection": selection, "shape": f"{shape[0]}x{shape[1]}",
                         "matrices": counts[shape], "ms_per_matrix": round(ms, 3)})
        rows.append({"what": "refresh_model", "selection": selection, "ms_per_refresh": round(total, 1),
                     "ms_per_step_amortised_gap200": round(total / gap, 3)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection_demo"))
    ap.add_argument("--reuse-log", help="a previous run's log: its 'RUN {...}' rows are kept, not rerun")
    cli = ap.parse_args()
    done = {}
    if cli.reuse_log:
        import ast

        for line in Path(cli.reuse_log).read_text().splitlines():
            if line.startswith("RUN "):
                r = ast.literal_eval(line[4:])
                done[(r["optim"], r["optim_args"], r["learning_rate"])] = r
    rows = []
    for optim, optim_args, lrs in RUNS:
        for lr in lrs:
            if (optim, optim_args or "", lr) in done:
                rows.append(done[(optim, optim_args or "", lr)])
                print("RUN", rows[-1], flush=True)
                continue
            argv = ["--optim", optim, "--compare", "none", "--learning_rate", str(lr), "--max_steps",
                    str(cli.steps), "--output_dir", "/tmp/memopt_projection_demo", "--no-eval_before",
                    "--logging_steps", "10"]
            if optim_args:
                argv += ["--optim_args", optim_args]
            r = finetune.run(finetune.parse_args(argv))
            rows.append({"what": "sweep", "optim": optim, "optim_args": optim_args or "", "learning_rate": lr,
                         "steps": r["steps"], "eval_loss_after": round(r["eval_loss_after"], 4),
                         "optimizer_state_bytes": r["optimizer_state_bytes"],
                         "state_bytes_per_param": round(r["optimizer_state_bytes"] / r["trainable_params"], 4),
                         "train_s_per_step": round(r["train_runtime_s"] / r["steps"], 3)})
            print("RUN", rows[-1], flush=True)
    best = {}
    for r in rows:
        key = (r["optim"], r["optim_args"])
        if key not in best or r["eval_loss_after"] < best[key]["eval_loss_after"]:
            best[key] = r
    rows = [dict(r, what="train") for r in best.values()] + rows
    adamw = rows[0]["train_s_per_step"]
    for r in rows:
        r["step_time_ratio_vs_adamw"] = round(r["train_s_per_step"] / adamw, 3)
    from memopt.demo import smollm2_checkpoint
    from transformers import AutoModelForCausalLM

    rows += refresh_costs(AutoModelForCausalLM.from_pretrained(smollm2_checkpoint()))
    for r in rows:
        r.update(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine())
    path = write_csv(Path(cli.out), rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["what"] == "train"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    names = [f"{r['optim']} {r['optim_args']}".strip() + f" @{r['learning_rate']:g}" for r in train]
    a1.barh(names, [r["state_bytes_per_param"] for r in train], color="tab:blue")
    a1.set_xlabel("optimizer state, bytes per trainable parameter")
    a2.barh(names, [r["eval_loss_after"] for r in train], color="tab:green")
    a2.set_xlim(min(r["eval_loss_after"] for r in train) - 0.1, 2.9)
    a2.axvline(2.8559, color="grey", ls="--", lw=1)
    a2.set_xlabel(f"eval loss after {cli.steps} steps (dashed: before training)")
    a2.set_yticklabels([])
    fig.suptitle("SmolLM2-135M full fine-tuning on pydoc text (CPU)")
    fig.tight_layout()
    fig.savefig(Path(cli.out).with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {Path(cli.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
