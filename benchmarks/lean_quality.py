"""Quality of the lean full-fine-tuning settings on the demo task, against the fp32-master run and AdamW.

Same task, seed, data, steps and eval split as the demo (SmolLM2-135M, pydoc text, 20 steps, batch 4 x 128),
each run in its own process via examples/finetune.py:

- SGD-SaI, fp32 weights (the reference: fp32 master);
- SGD-SaI with the input embedding frozen (``freeze_embeddings=true``; the LM head is tied, so frozen too);
- SGD-SaI with bf16 weights and no fp32 copy, stochastic rounding of the bf16 writes (default) and, for contrast,
  round-to-nearest (``stochastic_rounding=false``);
- the leanest settings of the peak-memory benchmark: bf16 weights + 8-bit momentum + gradient release + frozen
  embedding, without and with the chunked loss (the same loss computed in chunks: it should match);
- AdamW (fp32) at its demo lr.

    python benchmarks/lean_quality.py [--steps 20] [--out benchmarks/results/lean_quality] [--only I ...]

``--only``: run those RUNS indices and replace their rows in the existing CSV (the others are kept).
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

RUNS = [  # (label, optim, optim_args, weights dtype, max_grad_norm, lr)
    ("sgdsai fp32", "sgdsai", None, "float32", 1.0, 3e-2),
    ("sgdsai fp32 + frozen emb", "sgdsai", "freeze_embeddings=true", "float32", 1.0, 3e-2),
    ("sgdsai bf16 weights, SR", "sgdsai", None, "bfloat16", 1.0, 3e-2),
    ("sgdsai bf16 weights, nearest", "sgdsai", "stochastic_rounding=false", "bfloat16", 1.0, 3e-2),
    ("bf16 sgdsai_8bit + release + frozen emb", "sgdsai_8bit", "grad_release=true,freeze_embeddings=true",
     "bfloat16", 0.0, 3e-2),
    ("bf16 sgdsai_8bit + release + frozen emb + chunked loss", "sgdsai_8bit",
     "grad_release=true,freeze_embeddings=true,chunked_loss=true", "bfloat16", 0.0, 3e-2),
    ("adamw_torch fp32", "adamw_torch", None, "float32", 1.0, 1e-4),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lean_quality"))
    ap.add_argument("--only", type=int, nargs="*", help="RUNS indices to (re)run; other rows come from the CSV")
    cli = ap.parse_args()
    from _common import merge_csv_rows, write_csv

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, optim, optim_args, dtype, max_norm, lr) in enumerate(RUNS):
            if cli.only is not None and i not in cli.only:
                continue
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, str(ROOT / "examples" / "finetune.py"), "--optim", optim, "--compare", "none",
                   "--learning_rate", str(lr), "--max_steps", str(cli.steps), "--weights_dtype", dtype,
                   "--max_grad_norm", str(max_norm), "--results_json", str(out), "--logging_steps", "10",
                   "--output_dir", str(Path(tmp) / f"run{i}")]
            if optim_args:
                cmd += ["--optim_args", optim_args]
            subprocess.run(cmd, check=True, env=dict(os.environ, MEMOPT_MEMORY_REPORT="all"))
            r = json.loads(out.read_text())
            rows.append({"setting": label, "optim": optim, "optim_args": optim_args or "", "weights_dtype": dtype,
                         "learning_rate": lr, "steps": r["steps"], "trainable_params": r["trainable_params"],
                         "eval_loss_before": round(r["eval_loss_before"], 4),
                         "eval_loss_after": round(r["eval_loss_after"], 4),
                         "optimizer_state_bytes": r["optimizer_state_bytes"]})
            print("ROW", rows[-1], flush=True)
    if cli.only is not None:  # merge into the existing rows, in RUNS order
        rows = merge_csv_rows(rows, Path(cli.out), "setting", [r[0] for r in RUNS])
    ref = rows[0]["eval_loss_after"]
    for r in rows:
        r["eval_vs_fp32_master_pct"] = round(100 * (r["eval_loss_after"] / ref - 1), 2)
    print(f"wrote {write_csv(Path(cli.out), rows)}")
    for r in rows:
        print(f"{r['setting']:<42} {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f} "
              f"({r['eval_vs_fp32_master_pct']:+.2f}% vs fp32 master)")


if __name__ == "__main__":
    main()
