"""Optimizer-state bytes/param and step time of SGD-SaI vs torch SGD-momentum and torch AdamW.

Question: on the demo model's real parameter set (SmolLM2-135M, 134.5M params in 272 tensors, fp32), what does
each optimizer hold and how long does one ``step()`` take? All optimizers run in one process on the same
parameters and fixed random gradients, interleaved round-robin so drift affects all equally; medians of
``--rounds`` x ``--steps``. Weight decay 0 for all (torch SGD's decay is coupled, SGD-SaI's decoupled).

    python benchmarks/step_time.py [--rounds 5 --steps 3] [--out benchmarks/results/step_time]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import write_csv  # noqa: E402

BASELINES = {
    "torch_sgd_momentum_foreach": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, dampening=0.9, foreach=True),
    "sgdsai_foreach": lambda ps: memopt.SGDSaI(ps, lr=1e-3, weight_decay=0.0, foreach=True),
    "sgdsai_foreach_no_finite_check": lambda ps: memopt.SGDSaI(ps, lr=1e-3, weight_decay=0.0, foreach=True,
                                                               check_finite=False),
    "sgdsai_per_tensor": lambda ps: memopt.SGDSaI(ps, lr=1e-3, weight_decay=0.0, foreach=False),
    "torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, foreach=True),
}


def demo_parameters() -> list[torch.nn.Parameter]:
    """The demo model's parameter set (shapes and dtypes of SmolLM2-135M-Instruct), weights loaded."""
    from memopt.demo import smollm2_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    cli = ap.parse_args()
    device = torch.device(cli.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    params = [torch.nn.Parameter(p.detach().to(device)) for p in demo_parameters()]
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opts = {name: make(params) for name, make in BASELINES.items()}
    for opt in opts.values():  # first step creates state (and SGD-SaI's g-SNR); not timed
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(cli.rounds):
        for name, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(cli.steps):
                opt.step()
            sync()
            times[name].append((time.perf_counter() - t0) / cli.steps * 1e3)

    ref_sgd = statistics.median(times["torch_sgd_momentum_foreach"])
    ref_adamw = statistics.median(times["torch_adamw_foreach"])
    rows = []
    for name, opt in opts.items():
        med = statistics.median(times[name])
        sb = memopt.state_bytes(opt)
        rows.append({
            "optimizer": name, "params": n_params, "tensors": len(params), "state_bytes": sb,
            "state_bytes_per_param": round(sb / n_params, 4), "step_ms_median": round(med, 2),
            "step_ms_min": round(min(times[name]), 2), "ratio_vs_torch_sgd_momentum": round(med / ref_sgd, 3),
            "ratio_vs_torch_adamw": round(med / ref_adamw, 3), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor()}",
            "rounds_x_steps": f"{cli.rounds}x{cli.steps}",
        })
    out = Path(cli.out)
    write_csv(out, rows)
    for r in rows:
        print(f"{r['optimizer']:<32} {r['state_bytes_per_param']:>6.3f} B/param {r['step_ms_median']:>9.1f} ms "
              f"x{r['ratio_vs_torch_sgd_momentum']:.3f} vs SGD  x{r['ratio_vs_torch_adamw']:.3f} vs AdamW")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["optimizer"] for r in rows]
    a1.barh(names, [r["state_bytes_per_param"] for r in rows], color="tab:blue")
    a1.set_xlabel("optimizer state, bytes per parameter")
    a2.barh(names, [r["step_ms_median"] for r in rows], color="tab:orange")
    where = rows[0]["device"] if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    a2.set_xlabel(f"step time, ms (median, {where})")
    a2.set_yticklabels([])
    fig.suptitle(f"SmolLM2-135M parameter set ({n_params / 1e6:.1f}M params, {len(params)} tensors, fp32)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
