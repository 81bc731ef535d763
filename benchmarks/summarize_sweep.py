"""Markdown tables from benchmarks/results/lr_sweep.csv (pasted into docs/sgdsai.md).

    python benchmarks/summarize_sweep.py [benchmarks/results/lr_sweep.csv]
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "lr_sweep.csv")
rows = list(csv.DictReader(path.open()))
for mode in ("lora", "full"):
    series = defaultdict(list)
    for r in rows:
        if r["mode"] == mode:
            series[(r["optim"], r["optim_args"] or "")].append((float(r["learning_rate"]), float(r["eval_loss_after"])))
    if not series:
        continue
    steps = rows[[r['mode'] for r in rows].index(mode)]['steps']
    print(f"\n{mode} (eval loss after {steps} steps; best per row in bold)\n")
    print("| optimizer | optim_args | lr: eval loss |")
    print("|---|---|---|")
    for (optim, args), pts in sorted(series.items()):
        pts.sort()
        best = min(loss for _, loss in pts)
        cells = ", ".join(f"**{lr:g}: {loss:.4f}**" if loss == best else f"{lr:g}: {loss:.4f}" for lr, loss in pts)
        print(f"| {optim} | {args} | {cells} |")
