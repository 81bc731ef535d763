"""The per-device memory report as a Trainer callback."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
from transformers import TrainerCallback

from memopt._env import env_choice
from memopt.memory import DeviceMemory, _unwrap, format_table, gather_rows, measure, plot_rows

logger = logging.getLogger("memopt")

_MODES = ("auto", "all", "off")
_ENV = "MEMOPT_MEMORY_REPORT"


def _env_mode() -> str:
    """``MEMOPT_MEMORY_REPORT``, or ``auto`` (a malformed value is warned about once and ignored)."""
    return env_choice(_ENV, _MODES, "auto")


def is_memopt_optimizer(optimizer) -> bool:
    inner = _unwrap(optimizer) if optimizer is not None else None
    return inner is not None and type(inner).__module__.startswith("memopt.")


class GuardCallback(TrainerCallback):
    """Refuses, when training starts, Trainer settings that an optimizer built outside the ``optim=`` route
    cannot honour (the ``optim=``/``optim_args`` route checks the same when it builds the optimizer): gradient
    release with ``max_grad_norm > 0``, gradient accumulation, fp16 or several processes."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = _unwrap(optimizer) if optimizer is not None else None
        if getattr(inner, "gradient_release", False):
            from memopt.integrations.transformers import check_release_args

            check_release_args(f"{type(inner).__name__}(grad_release=True)", args)


class MemoryReportCallback(TrainerCallback):
    """Logs what each device holds: parameter bytes (trainable/frozen), gradient bytes, optimizer-state bytes,
    peak memory, and the state saving against a torch AdamW baseline for the same trainable parameters.

    Metrics go into every training log entry as ``memory/...`` (so ``state.log_history`` and the reporting
    integrations of ``report_to``, TensorBoard or W&B, record them as scalars); at the end of training every
    rank's row is gathered and the main process prints a table and writes ``<output_dir>/memory_report.json`` and,
    with matplotlib installed, ``memory_report.png``.

    Args:
        mode: ``"auto"`` (report only when the optimizer is a memopt optimizer; the default instance that
            ``import memopt`` adds to every Trainer), ``"all"`` (any optimizer), ``"off"``. ``None`` reads
            ``MEMOPT_MEMORY_REPORT`` (default ``auto``). Pass ``MemoryReportCallback("all")`` in ``callbacks=``
            to report for a non-memopt optimizer.
    """

    def __init__(self, mode: Optional[str] = None):
        if mode is None:
            mode = _env_mode()
        elif mode not in _MODES:
            raise ValueError(f"memory report mode {mode!r} is not one of {_MODES}")
        self.mode = mode
        self.active = False
        self.rows: list[DeviceMemory] = []
        self._last: Optional[DeviceMemory] = None
        self._grads_bytes = 0
        self._failed = False

    def _guard(self, what: str, fn, *args, **kwargs):
        """Run one reporting step; a failure is logged once and turns the report off: it never stops training."""
        if self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._failed = True
            self.active = False
            logger.warning("memopt memory report: %s failed (%s: %s); the report is off for the rest of this run, "
                           "training continues", what, type(exc).__name__, exc)
            return None

    def _rank(self, args) -> int:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return int(getattr(args, "process_index", 0))

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._failed = False
        self._guard("start", self._train_begin, args, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._guard("measuring after a step", self._optimizer_step, args, model, optimizer)

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        self._guard("logging", self._log, args, state, logs, model, optimizer)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._guard("the final report", self._train_end, args, state, model, optimizer)

    def _train_begin(self, args, optimizer):
        self.active = self.mode == "all" or (self.mode == "auto" and is_memopt_optimizer(optimizer))
        self._grads_bytes = 0
        self._last = None
        if self.active and torch.cuda.is_available() and args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)

    def _optimizer_step(self, args, model, optimizer):
        # After the step and before zero_grad: gradients and state both exist here.
        if not self.active or model is None:
            return
        row = measure(model, optimizer, rank=self._rank(args), device=args.device)
        self._grads_bytes = max(self._grads_bytes, row.grads_bytes)
        row.grads_bytes = self._grads_bytes
        self._last = row

    def _refresh(self, args, model, optimizer) -> Optional[DeviceMemory]:
        if self._last is None:
            return None
        row = measure(model, optimizer, rank=self._rank(args), device=args.device, grads_bytes=self._grads_bytes)
        self._last = row
        return row

    def _log(self, args, state, logs, model, optimizer):
        if not self.active or model is None or logs is None or "loss" not in logs:
            return
        row = self._refresh(args, model, optimizer)
        if row is None:
            return
        metrics = row.as_log()
        logs.update(metrics)
        # The Trainer appended a copy of `logs` to log_history before calling us: keep the two in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def _train_end(self, args, state, model, optimizer):
        if not self.active or model is None:
            return
        row = self._refresh(args, model, optimizer)
        if row is None:
            return
        self.rows = gather_rows(row)  # collective: every rank calls on_train_end
        if state.is_world_process_zero:
            table = format_table(self.rows)
            print(table, flush=True)
            logger.info("\n%s", table)
            if args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                with open(os.path.join(args.output_dir, "memory_report.json"), "w") as f:
                    json.dump([r.as_dict() for r in self.rows], f, indent=2)
                png = os.path.join(args.output_dir, "memory_report.png")
                if plot_rows(self.rows, png):
                    logger.info("memopt memory report written to %s", png)
