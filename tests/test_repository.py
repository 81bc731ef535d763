"""The repository explains itself: no pointer to files outside it, to issue numbers or to how it was built."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = re.compile(r"\.(py|md|toml|ya?ml|txt|cfg|sh|ini)$")
FORBIDDEN = re.compile(
    r"shared/specs|\.\./shared|\bspec(s)? ?§|§ ?\d+ of the spec|\blent\b|\b(this|previous|earlier|next) session\b"
    r"|\bissues? ?#?\d{1,3}\b", re.IGNORECASE)


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the VCS and caches
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(ROOT).parts)]
    return [n for n in names if (TEXT.search(n) or n == ".ci/run") and not n.startswith("tests/")]


def test_no_file_points_outside_the_repository():
    files = _tracked_files()
    assert "README.md" in files and "memopt/__init__.py" in files
    hits = []
    for name in files:
        for i, line in enumerate((ROOT / name).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not hits, "write the facts into docs/ instead:\n" + "\n".join(hits)


def test_the_check_catches_what_it_is_for():
    for text in ("see shared/specs/algorithms.md §2", "fixed in issue 12", "no GPU was lent", "this session measured"):
        assert FORBIDDEN.search(text), text
    for text in ("see docs/sgdsai.md", "GitHub issues of bitsandbytes", "a session of training"):
        assert not FORBIDDEN.search(text), text


def test_docs_optimizer_table_is_the_registry():
    from memopt.registry import optimizer_table

    text = (ROOT / "docs" / "optimizers.md").read_text()
    start = text.index("-->\n", text.index("<!-- optimizer-table")) + 4
    end = text.index("\n<!-- /optimizer-table -->")
    assert text[start:end] == optimizer_table(), "regenerate with python -c 'import memopt.registry as r; " \
                                                "print(r.optimizer_table())'"
