"""Does each optimizer train as well as AdamW? Eval loss on several fine-tuning tasks, each optimizer at the best
point of its learning-rate grid, AdamW (``adamw_torch``) in the same table.

Tasks (SmolLM2-135M-Instruct, batch 4 x 128 tokens, seed 42, cosine schedule without warm-up, weight decay 0,
max_grad_norm 1.0, eval on the held-out last 10% of the text; each run in this process through
``examples/finetune.py``):

- ``full20``: full fine-tuning, 20 steps, pydoc text (the demo);
- ``lora30``: LoRA r=8 on q_proj/v_proj, 30 steps, pydoc text;
- ``full100``: full fine-tuning, 100 steps, pydoc text (the longer run);
- ``lee20``: full fine-tuning, 20 steps, the Lee news corpus (another text: ``pip install --no-deps gensim``);
- ``leelora30``: LoRA as ``lora30`` on the Lee corpus.

Every (task, optimizer, lr) row is appended to the CSV as soon as it finishes, so an interrupted sweep resumes
where it stopped (rows already in the CSV are not rerun). ``--plot`` writes the table (best lr per optimizer and
task, ratio to AdamW) and a PNG from the CSV without training.

``--recheck`` trains the best row of each (task, optimizer) of the CSV again with the code as it is now and writes
the table's eval loss beside the new one, with the update path the run took, to ``quality_recheck.csv``: whether
the table still describes the code (its rows were trained as the code was then).

    python benchmarks/quality.py [--tasks full20 lora30 ...] [--optims sgdsai adamw_torch ...]
    python benchmarks/quality.py --plot
    python benchmarks/quality.py --recheck [--tasks ...] [--optims ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"

TASKS = {  # name: (finetune.py arguments, description, lr grid kind)
    "full20": (["--max_steps", "20", "--no-lora"], "full FT, 20 steps, pydoc", "full"),
    "lora30": (["--max_steps", "30", "--lora"], "LoRA r=8, 30 steps, pydoc", "lora"),
    "full100": (["--max_steps", "100", "--no-lora"], "full FT, 100 steps, pydoc", "long"),
    "lee20": (["--max_steps", "20", "--no-lora", "--corpus", "lee"], "full FT, 20 steps, Lee news", "full"),
    "leelora30": (["--max_steps", "30", "--lora", "--corpus", "lee"], "LoRA r=8, 30 steps, Lee news", "lora"),
}
ADAM = {"full": (3e-5, 1e-4, 3e-4, 1e-3), "long": (3e-5, 1e-4, 3e-4, 1e-3), "lora": (1e-3, 3e-3, 1e-2, 3e-2)}
# (label, optim, optim_args, {grid kind: learning rates}). AdamW-like optimizers share AdamW's grid (the claim is
# that its learning rates carry over); the paper's SGD-SaI gets the grid of its own sweep (docs/sgdsai.md).
OPTIMIZERS = [
    ("adamw_torch", "adamw_torch", None, ADAM),
    ("sgdsai", "sgdsai", None, ADAM),
    ("sgdsai_8bit", "sgdsai_8bit", None, ADAM),
    ("memopt_adamw_8bit", "memopt_adamw_8bit", None, {"full": ADAM["full"]}),
    ("sgdsai scale=gsnr_max (paper)", "sgdsai", "scale=gsnr_max",
     {"full": (1e-2, 3e-2, 1e-1, 3e-1, 1.0), "long": (3e-2, 1e-1), "lora": (0.3, 1.0, 3.0, 10.0)}),
    # Lion's paper: an lr 3-10x smaller than AdamW's (1e-3 added: on full20 the best was at 3e-4, the edge)
    ("lion", "lion", None, {"full": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), "long": (1e-5, 3e-5, 1e-4),
                            "lora": (3e-4, 1e-3, 3e-3, 1e-2)}),
    ("memopt_lion_8bit", "memopt_lion_8bit", None, {"full": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), "long": (1e-5, 3e-5, 1e-4),
                                                    "lora": (3e-4, 1e-3, 3e-3, 1e-2)}),
    # FRUGAL's two ways of choosing the state-full part, named explicitly so the rows keep their meaning
    ("frugal selection=random", "frugal", "selection=random", ADAM),
    ("frugal selection=blocks", "frugal", "selection=blocks", ADAM),
    ("frugal_8bit selection=blocks", "frugal_8bit", "selection=blocks", {"full": (1e-4, 3e-4, 1e-3)}),
    # SGD-SaI inside FRUGAL keeps the paper's scale (g-SNR): its lrs are SGD-SaI's paper lrs
    ("frugal_sgdsai selection=random", "frugal_sgdsai", "selection=random", {"full": (3e-3, 1e-2, 3e-2)}),
    ("frugal_sgdsai selection=blocks", "frugal_sgdsai", "selection=blocks", {"full": (3e-3, 1e-2, 3e-2, 1e-1)}),
]
FIELDS = ["task", "label", "optim", "optim_args", "learning_rate", "steps", "eval_loss_before", "eval_loss_after",
          "train_loss_last_log", "trainable_params", "optimizer_state_bytes", "state_bytes_per_param",
          "train_runtime_s", "threads", "torch", "machine"]


def _key(row) -> tuple:
    return (row["task"], row["label"], float(row["learning_rate"]))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def train(finetune, task: str, optim: str, optim_args: str, lr, eval_before: bool) -> dict:
    """One run of ``task`` through ``examples/finetune.py`` (loaded as ``finetune``); returns its summary."""
    argv = ["--optim", optim, "--compare", "none", "--learning_rate", str(lr), "--output_dir",
            "/tmp/memopt_quality", "--logging_steps", "5", *TASKS[task][0],
            "--eval_before" if eval_before else "--no-eval_before"]
    if optim_args:
        argv += ["--optim_args", optim_args]
    return finetune.run(finetune.parse_args(argv))


def _finetune():
    os.environ.setdefault("MEMOPT_MEMORY_REPORT", "all")  # the report's state bytes and update path go into the CSV
    from _common import load_example  # noqa: E402

    return load_example("finetune")


@contextlib.contextmanager
def _appender(path: Path, fields: list):
    """A function that appends one row to the CSV ``path`` and flushes it (a run stopped half-way keeps its rows);
    the header is written when the file is new."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()

        def write(row: dict) -> None:
            writer.writerow(row)
            f.flush()

        yield write


def _where() -> dict:
    """The columns that say where a row was trained: thread count, torch version, machine."""
    import torch

    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}


def start_losses(rows: list[dict]) -> dict:
    """{task: its eval loss before training}, from the rows that measured it (a task's first run does; the model
    and the eval split are the same for every run of a task)."""
    out: dict = {}
    for r in rows:
        value = float(r["eval_loss_before"])
        if math.isfinite(value):
            out.setdefault(r["task"], value)
    return out


def sweep(tasks, labels, path: Path) -> None:
    finetune = _finetune()

    existing = read_rows(path)
    done = {_key(r) for r in existing}
    before_of = start_losses(existing)
    with _appender(path, FIELDS) as write:
        for task in tasks:
            for label, optim, optim_args, grids in OPTIMIZERS:
                if label not in labels:
                    continue
                for lr in grids.get(TASKS[task][2], ()):  # a row may cover some kinds of task only
                    if (task, label, float(lr)) in done:
                        continue
                    before = before_of.get(task)  # the same for every run of a task: evaluated once
                    t0 = time.time()
                    r = train(finetune, task, optim, optim_args, lr, eval_before=before is None)
                    if before is None:
                        before_of[task] = before = r["eval_loss_before"]
                    r["eval_loss_before"] = before  # runs after the first do not evaluate before training
                    row = {k: r.get(k) for k in FIELDS if k in r}
                    row.update(task=task, label=label, optim=optim, optim_args=optim_args or "", learning_rate=lr,
                               state_bytes_per_param=round(r["optimizer_state_bytes"] / r["trainable_params"], 4),
                               **_where())
                    for k in ("eval_loss_before", "eval_loss_after", "train_loss_last_log"):
                        row[k] = round(row[k], 4)
                    write(row)
                    print(f"QUALITY {task} {label} lr={lr:g}: eval {row['eval_loss_after']:.4f} "
                          f"({time.time() - t0:.0f} s)", flush=True)


RECHECK_FIELDS = ["task", "label", "optim", "optim_args", "learning_rate", "eval_loss_table", "eval_loss_now",
                  "relative_change", "update_path", "train_runtime_s", "threads", "torch", "machine"]


def recheck_plan(rows: list[dict], tasks, labels) -> list[dict]:
    """The table's best row of each (task, label) asked for that the table has, in the order of ``TASKS`` and
    ``OPTIMIZERS``; ValueError when it has none of them."""
    best = best_rows(rows)
    plan = [best[(t, lab)] for t in TASKS if t in tasks for lab, *_ in OPTIMIZERS
            if lab in labels and (t, lab) in best]
    if not plan:
        raise ValueError(f"the table has no row for tasks {sorted(tasks)} and optimizers {sorted(labels)}")
    return plan


def recheck_row(table_row: dict, result: dict) -> dict:
    """One line of the recheck: the table's eval loss beside the one trained now with the same settings."""
    then, now = float(table_row["eval_loss_after"]), round(result["eval_loss_after"], 4)
    return {**{k: table_row[k] for k in ("task", "label", "optim", "optim_args", "learning_rate")},
            "eval_loss_table": then, "eval_loss_now": now, "relative_change": round(now / then - 1.0, 5),
            "update_path": result.get("update_path") or "", "train_runtime_s": result.get("train_runtime_s"),
            **_where()}


def recheck(tasks, labels, table: Path, out: Path) -> None:
    """Train the best (task, label, lr) of every row of ``table`` again with the code as it is now, and write the two
    eval losses side by side to ``out`` (rows already there are not rerun)."""
    todo = recheck_plan(read_rows(table), tasks, labels)
    done = {_key(r) for r in read_rows(out)}
    finetune = _finetune()
    with _appender(out, RECHECK_FIELDS) as write:
        for r in todo:
            if _key(r) in done:
                continue
            row = recheck_row(r, train(finetune, r["task"], r["optim"], r["optim_args"], r["learning_rate"],
                                       eval_before=False))
            write(row)
            print(f"RECHECK {row['task']} {row['label']} lr={row['learning_rate']}: {row['eval_loss_table']:.4f} -> "
                  f"{row['eval_loss_now']:.4f} ({row['relative_change']:+.2%}; {row['update_path']})", flush=True)


def best_rows(rows: list[dict]) -> dict:
    """{(task, label): the row with the lowest eval loss over the lr grid}."""
    best: dict = {}
    for r in rows:
        key = (r["task"], r["label"])
        if key not in best or float(r["eval_loss_after"]) < float(best[key]["eval_loss_after"]):
            best[key] = r
    return best


def table(rows: list[dict]) -> str:
    """Markdown: per task, each optimizer's best eval loss, its lr, the ratio to AdamW's best, state B/param."""
    best = best_rows(rows)
    tasks = [t for t in TASKS if any(k[0] == t for k in best)]
    labels = [o[0] for o in OPTIMIZERS if any(k[1] == o[0] for k in best)]
    head = "| optimizer | state B/param | " + " | ".join(f"{t}: {TASKS[t][1]}" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for label in labels:
        cells, bpp = [], ""
        for t in tasks:
            r, ref = best.get((t, label)), best.get((t, "adamw_torch"))
            if r is None:
                cells.append("-")
                continue
            ratio = f" (×{float(r['eval_loss_after']) / float(ref['eval_loss_after']):.3f})" if ref else ""
            cells.append(f"{float(r['eval_loss_after']):.4f} @ {float(r['learning_rate']):g}{ratio}")
            if TASKS[t][2] != "lora":
                bpp = f"{float(r['state_bytes_per_param']):.3f}"
        lines.append(f"| {label} | {bpp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, *_ in OPTIMIZERS:
            pts = sorted((float(r["learning_rate"]), float(r["eval_loss_after"])) for r in rows
                         if r["task"] == task and r["label"] == label)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        before = start_losses(rows)[task]
        ax.axhline(before, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(min(float(r["eval_loss_after"]) for r in rows if r["task"] == task) - 0.05, before + 0.3)
        ax.set_title(TASKS[task][1], fontsize=10)
        ax.set_xlabel("learning rate")
    axes[0][0].set_ylabel("eval loss (dashed: before training)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--optims", nargs="*", default=[o[0] for o in OPTIMIZERS], help="labels of OPTIMIZERS")
    ap.add_argument("--out", default=str(OUT), help="CSV/PNG path without suffix")
    ap.add_argument("--plot", action="store_true", help="only write the table and PNG from the CSV")
    ap.add_argument("--recheck", action="store_true",
                    help="train each best row of the CSV again (--tasks, --optims) and write both eval losses to "
                         "OUT_recheck.csv")
    cli = ap.parse_args()
    path = Path(cli.out).with_suffix(".csv")
    unknown = set(cli.optims) - {o[0] for o in OPTIMIZERS}
    if unknown:
        ap.error(f"unknown optimizer labels {sorted(unknown)}")
    if cli.recheck:
        try:
            recheck(cli.tasks, set(cli.optims), path, path.with_name(path.stem + "_recheck.csv"))
        except ValueError as e:
            ap.error(str(e))
        return
    if not cli.plot:
        sweep(cli.tasks, set(cli.optims), path)
    rows = read_rows(path)
    print(table(rows))
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
