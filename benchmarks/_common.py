"""Helpers shared by the benchmark scripts."""

import csv
from pathlib import Path

# glibc serves allocations >= this many bytes with their own mmap, returned to the OS when freed (1 MiB; the
# default threshold grows up to 32 MiB once such blocks are freed, after which freed tensors stay in the heap
# and in RSS). Fixed through MALLOC_MMAP_THRESHOLD_, RSS follows the live tensors as CUDA's max_memory_allocated
# does. Used by peak_memory.py and peak_breakdown.py.
MMAP_THRESHOLD = 1 << 20


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


class RowWriter:
    """Rows appended to a CSV as they come (flushed each time), so a crash or a timeout keeps every finished row.
    The columns are fixed up front; a row lacking one leaves it empty."""

    def __init__(self, path: Path, fields: list[str]):
        self.path = Path(path).with_suffix(".csv")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields = fields
        with open(self.path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="", extrasaction="raise").writerow(row)


def _typed(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"": None, "True": True, "False": False}.get(value, value)


def merge_csv_rows(new_rows: list[dict], path: Path, key: str, order: list[str]) -> list[dict]:
    """The rows of the CSV at ``path`` (numbers parsed back) with ``new_rows`` replacing those with the same
    ``key`` value, in ``order`` (the script's settings); for re-running a few settings of a benchmark."""
    with open(Path(path).with_suffix(".csv")) as f:
        old = {r[key]: {k: _typed(v) for k, v in r.items()} for r in csv.DictReader(f)}
    done = {r[key]: r for r in new_rows}
    return [done.get(label) or old[label] for label in order if label in done or label in old]


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def malloc_trim() -> None:
    """Hand glibc's free heap memory back to the OS (no-op on other C libraries)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def load_example(name: str):
    """The module of ``examples/<name>.py``, loaded from its path (the examples are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"memopt_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
