"""Helpers shared by the benchmark scripts."""

import csv
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Write rows (the union of their keys, first-seen order) to ``path`` with a .csv suffix; returns the path."""
    path = Path(path).with_suffix(".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path
