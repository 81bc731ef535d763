"""Where the time of one ``sgdsai`` step goes on CPU, beside torch's SGD-momentum steps.

Question: of `sgdsai`'s step on the demo model's parameter set (``scale="factored"``, fp32 state), how much is the
fused C pass over gradient, momentum and parameter, how much the read of the gradient for its row and column
statistics that must finish before that pass writes anything, and how much the optimizer's own Python and its
vectors; and how does each compare with torch's SGD momentum, foreach (three passes over memory) and fused (one
pass with the least traffic, the same bytes as `sgdsai`'s pass)?

Rows, all on one set of parameters and fixed random gradients (as ``benchmarks/step_time.py``), interleaved
round-robin in one process, medians of ``--rounds`` samples of ``--steps`` steps each:

- ``torch_sgd_momentum_foreach``, ``torch_sgd_momentum_fused``: torch's ``SGD(momentum=0.9, dampening=0.9)``;
- ``sgdsai``: ``step()`` of the registered optimizer (all 272 tensors);
- ``sgdsai_c_calls``: the fused C calls alone on the 211 matrices (statistics, then the pass), one per tensor;
- ``sgdsai_c_pass``: the pass alone, with the factors given (no statistics);
- ``sgdsai_c_statistics``: the statistics alone (``memopt.kernels.cpu.square_sums``).

    python benchmarks/sgdsai_step_parts.py [--rounds 15 --steps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import memopt
from _common import write_csv
from memopt.functional.sgdsai import factored_scales
from memopt.kernels import cpu
from step_time import REFERENCE_SGD, demo_model, factories

ROOT = Path(__file__).resolve().parents[1]
FUSED_SGD = "torch_sgd_momentum_fused"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sgdsai_step_parts"))
    cli = ap.parse_args()
    if cpu.library() is None:
        raise SystemExit("the fused CPU updates are unavailable here (no C compiler?): nothing to measure")

    model = demo_model()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    made = factories()
    opts = {name: made[name](model) for name in (REFERENCE_SGD, FUSED_SGD, "sgdsai")}
    matrices = [p for p in params if p.dim() == 2]
    buffers = [[torch.zeros_like(p)] for p in matrices]
    factors = [factored_scales(p.grad) for p in matrices]
    kw = dict(lr=1e-3, scale=1.0, momentum=0.9, weight_decay=0.0, eps=1e-8, clip=3.0)

    def c_calls():
        for p, buf in zip(matrices, buffers):
            cpu.factored_sgdsai_(p.data, p.grad, buf, **kw)

    def c_pass():
        for p, buf, (r, c) in zip(matrices, buffers, factors):
            cpu.factored_sgdsai_(p.data, p.grad, buf, r=r, c=c, **kw)

    def c_statistics():
        for p in matrices:
            cpu.square_sums(p.grad)

    runs = {name: opt.step for name, opt in opts.items()}
    runs.update(sgdsai_c_calls=c_calls, sgdsai_c_pass=c_pass, sgdsai_c_statistics=c_statistics)
    for run in runs.values():  # state, scales and the C library are created here: not timed
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(cli.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(cli.steps):
                run()
            times[name].append((time.perf_counter() - t0) / cli.steps * 1e3)

    ref, fused = statistics.median(times[REFERENCE_SGD]), statistics.median(times[FUSED_SGD])
    tensors = {REFERENCE_SGD: len(params), FUSED_SGD: len(params), "sgdsai": len(params)}
    rows = [{
        "row": name, "tensors": tensors.get(name, len(matrices)),
        "step_ms_median": round(statistics.median(ts), 1), "step_ms_min": round(min(ts), 1),
        "ratio_vs_torch_sgd_momentum_foreach": round(statistics.median(ts) / ref, 3),
        "ratio_vs_torch_sgd_momentum_fused": round(statistics.median(ts) / fused, 3),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "memopt": memopt.__version__,
        "machine": platform.machine(), "rounds_x_steps": f"{cli.rounds}x{cli.steps}",
    } for name, ts in times.items()]
    for r in rows:
        print(f"{r['row']:<28} {r['step_ms_median']:>7.1f} ms (min {r['step_ms_min']:>6.1f})  "
              f"{r['ratio_vs_torch_sgd_momentum_foreach']:.2f}x foreach  "
              f"{r['ratio_vs_torch_sgd_momentum_fused']:.2f}x fused")
    print("wrote", write_csv(Path(cli.out).with_suffix(".csv"), rows))


if __name__ == "__main__":
    main()
