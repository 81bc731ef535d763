"""Which Trainer checkpoint a resume may use, and what it must contain (no transformers import here).

The Trainer writes a checkpoint directory in this order: weights, ``optimizer.pt``, ``scheduler.pt``, scaler, RNG
states, and ``trainer_state.json`` last. A process killed while writing leaves a directory without a readable
``trainer_state.json``; ``resume_from_checkpoint=True`` would still pick it (the highest step number) and fail
far from the cause, or load a truncated file. Transformers also loads the optimizer and scheduler only when both
``optimizer.pt`` and ``scheduler.pt`` exist, and otherwise continues with a fresh optimizer and schedule without
a word. docs/reliability.md states the rules memopt applies instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional

logger = logging.getLogger("memopt")

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILE = "scheduler.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def incomplete_reason(path: str) -> Optional[str]:
    """Why the checkpoint directory ``path`` is incomplete, or ``None`` when its last-written file is whole."""
    state = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"{TRAINER_STATE} is missing (the Trainer writes it last: the save was interrupted)"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE} cannot be read ({type(exc).__name__}): the save was interrupted"
    return None


def last_complete_checkpoint(folder: str) -> Optional[str]:
    """The newest ``checkpoint-N`` directory of ``folder`` that is complete; newer incomplete ones are skipped
    with a warning naming each and why. ``None`` when there is none (the Trainer then says so)."""
    steps = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps.append((int(match.group(1)), os.path.join(folder, name)))
    skipped = []
    for _, path in sorted(steps, reverse=True):
        reason = incomplete_reason(path)
        if reason is None:
            if skipped:
                logger.warning("resume_from_checkpoint=True: skipped incomplete checkpoint(s) %s; resuming from %s",
                               "; ".join(f"{p} ({r})" for p, r in skipped), path)
            return path
        skipped.append((path, reason))
    if skipped:
        logger.warning("resume_from_checkpoint=True: no complete checkpoint in %s (%s)", folder,
                       "; ".join(f"{p} ({r})" for p, r in skipped))
    return None


def missing_optimizer_files(path: str) -> list[str]:
    """What a resume of a memopt optimizer needs from ``path`` and does not find: the optimizer state (a file,
    or a sharded directory such as FSDP's ``optimizer_0``) and ``scheduler.pt``."""
    missing = []
    has_optimizer = any(os.path.isfile(os.path.join(path, f)) for f in OPTIMIZER_FILES) or any(
        "optimizer" in d and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))
    if not has_optimizer:
        missing.append(OPTIMIZER_FILES[0])
    if not os.path.isfile(os.path.join(path, SCHEDULER_FILE)):
        missing.append(SCHEDULER_FILE)
    return missing


def check_resume_files(path: Optional[str]) -> None:
    """Refuse to resume a memopt optimizer from a checkpoint that lacks its optimizer or scheduler state.

    Raises:
        FileNotFoundError: naming the missing file(s); transformers would silently restart both.
    """
    if path is None:
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from_checkpoint={path!r} is not a directory")
    missing = missing_optimizer_files(path)
    if missing:
        raise FileNotFoundError(
            f"cannot resume from {path}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. "
            "Transformers would continue with a fresh optimizer state and learning-rate schedule; memopt refuses. "
            "Resume from a complete checkpoint, or start a new run (without resume_from_checkpoint)")


DCP_OPTIMIZER_DIR = "optimizer_0"  # where accelerate saves the optimizer of an FSDP sharded checkpoint


def template_from_dcp_checkpoint(trainer, path: str) -> None:
    """Before the Trainer loads a sharded (DCP) optimizer checkpoint from ``path``: give a memopt optimizer whose
    state keys depend on the step (the projection methods, e.g. FRUGAL with ``selection="blocks"``) exactly the
    entries the checkpoint holds, so accelerate's load template matches it. Other optimizers are left alone."""
    from memopt.memory import _unwrap

    folder = os.path.join(path, DCP_OPTIMIZER_DIR)
    opt = _unwrap(trainer.optimizer)  # the optimizer inside accelerate's wrapper
    if not os.path.isfile(os.path.join(folder, ".metadata")) or not hasattr(opt, "init_state_like_checkpoint"):
        return
    opt.init_state_like_checkpoint(trainer.model, folder, key="optimizer")
    logger.info("%s: optimizer state entries taken from the checkpoint's metadata (%s)", type(opt).__name__, folder)
