"""Which update should the default SGD-SaI be? The candidates tried on the quality tasks before the choice, as one
research optimizer (``SGDSaIVariant``) registered under the name ``sgdsai_variant`` for this script only.

Modes (``optim_args="mode=..."``), all at AdamW-like learning rates (AdamW's ``betas=(0.9, 0.999)``):

- ``fnow``: momentum (bias-corrected, from 0) of the gradient divided elementwise by its factored RMS
  ``sqrt(R_i C_j / M)`` of the current step (memopt's ``scale="factored"``; ``clamp=3`` clips the normalised
  gradient, ``renorm=true`` rescales each tensor's normalised gradient to RMS 1). State: one buffer.
- ``fema``: Adafactor with momentum: the factored second moment is an EMA (beta2) of row and column mean squares.
  State: one buffer plus (rows + columns) floats per matrix (4.01 B/param on the demo model).
- ``adam``: plain AdamW written the same way (a check of the harness: it must equal ``adamw_torch``).
- ``lion``: sign of the interpolated momentum (Chen et al. 2023, arXiv 2302.06675), momentum with beta2.

Rows: benchmarks/results/sgdsai_variants.csv (eval loss after training, the tasks of benchmarks/quality.py).

    python benchmarks/sgdsai_variants.py TASK "mode=fnow,clamp=3" LR [LR ...]
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.optim import Optimizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sgdsai_variants.csv"


def factored_rms(g: torch.Tensor, eps: float) -> torch.Tensor:
    if g.dim() < 2:
        return g.abs()
    G = g.reshape(g.shape[0], -1)
    r = torch.linalg.vector_norm(G, dim=1) / math.sqrt(G.shape[1])
    c = torch.linalg.vector_norm(G, dim=0) / math.sqrt(G.shape[0])
    s = torch.linalg.vector_norm(G) / math.sqrt(G.numel())
    return (r[:, None] * (c[None, :] / s.clamp_min(1e-30))).reshape(g.shape)


class SGDSaIVariant(Optimizer):
    def __init__(self, params, lr=3e-4, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, mode="fnow", clamp=0.0,
                 renorm=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps,
                                      mode=mode, clamp=clamp, renorm=renorm))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, b1, b2, eps = group["lr"], group["weight_decay"], group["beta1"], group["beta2"], group["eps"]
            mode = group["mode"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    if not torch.any(g != 0):
                        continue  # waits for a non-zero gradient (LoRA A behind a zero B)
                    st["m"], st["t"] = torch.zeros_like(g), 0
                    if mode == "fema" and g.dim() >= 2:
                        G = g.reshape(g.shape[0], -1)
                        st["r"], st["c"] = torch.zeros(G.shape[0]), torch.zeros(G.shape[1])
                    elif mode in ("fema", "adam"):
                        st["v"] = torch.zeros_like(g)
                st["t"] += 1
                t, m = st["t"], st["m"]
                if mode == "fnow":
                    u = g / (factored_rms(g, eps) + eps)
                    if group["renorm"] and g.dim() >= 2:
                        u = u / u.square().mean().sqrt().clamp_min(1e-12)
                    if group["clamp"]:
                        u.clamp_(-group["clamp"], group["clamp"])
                    m.lerp_(u, 1 - b1)
                    upd = m / (1 - b1 ** t)
                elif mode == "fema":
                    m.lerp_(g, 1 - b1)
                    if g.dim() >= 2:
                        G = g.reshape(g.shape[0], -1)
                        st["r"].lerp_((G * G).mean(1), 1 - b2)
                        st["c"].lerp_((G * G).mean(0), 1 - b2)
                        r, c = st["r"] / (1 - b2 ** t), st["c"] / (1 - b2 ** t)
                        v = (r[:, None] * c[None, :] / r.mean().clamp_min(1e-30)).reshape(g.shape)
                    else:
                        st["v"].lerp_(g * g, 1 - b2)
                        v = st["v"] / (1 - b2 ** t)
                    upd = (m / (1 - b1 ** t)) / (v.sqrt() + eps)
                    if group["clamp"]:
                        upd.clamp_(-group["clamp"], group["clamp"])
                elif mode == "adam":
                    m.lerp_(g, 1 - b1)
                    st["v"].lerp_(g * g, 1 - b2)
                    upd = (m / (1 - b1 ** t)) / ((st["v"] / (1 - b2 ** t)).sqrt() + eps)
                elif mode == "lion":
                    upd = torch.sign(m * b1 + g * (1 - b1))
                    m.lerp_(g, 1 - b2)
                else:
                    raise ValueError(f"unknown mode {mode!r}")
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(upd.to(p.dtype), alpha=-lr)


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    task, optim_args, lrs = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.environ.setdefault("MEMOPT_MEMORY_REPORT", "off")
    from memopt.registry import register_optimizer

    register_optimizer("sgdsai_variant", SGDSaIVariant, arg_types={
        "mode": "str", "beta1": "float", "beta2": "float", "eps": "float", "clamp": "float", "renorm": "bool"})
    from _common import load_example  # noqa: E402
    finetune = load_example("finetune")
    from quality import TASKS

    new = not OUT.exists()
    with OUT.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["task", "optim", "optim_args", "lr", "eval_after", "train_last", "secs"])
        for lr in lrs:
            t0 = time.time()
            r = finetune.run(finetune.parse_args(["--optim", "sgdsai_variant", "--optim_args", optim_args,
                                                  "--compare", "none", "--learning_rate", lr, "--no-eval_before",
                                                  "--output_dir", "/tmp/memopt_variants", *TASKS[task][0]]))
            writer.writerow([task, "sgdsai_variant", optim_args, lr, f"{r['eval_loss_after']:.4f}",
                             f"{r['train_loss_last_log']:.4f}", f"{time.time() - t0:.0f}"])
            f.flush()


if __name__ == "__main__":
    main()
