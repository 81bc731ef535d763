"""Triton kernels (optional): blockwise quantize/dequantize and fused optimizer updates.

Every kernel has a plain-PyTorch twin in ``memopt.functional`` with the same signature. ``import memopt``
never imports triton; this module decides, in one place, whether the Triton path can run for a tensor.
Kernel modules (``memopt.kernels.quantize``, ``.sgdsai``, ``.adamw``) import triton and are loaded on demand.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings

import torch

logger = logging.getLogger("memopt")
_STATUS: dict[tuple[str, bool], tuple[bool, str]] = {}
_SELF_CHECKED: dict[tuple[str, str], tuple[bool, str]] = {}


def triton_status(device: torch.device, *, allow_interpreter: bool = False) -> tuple[bool, str]:
    """``(usable, reason)`` for running the Triton kernels on tensors of ``device``.

    CUDA tensors use the compiled kernels. CPU tensors only run under ``TRITON_INTERPRET=1`` and only when
    asked for explicitly (``allow_interpreter``): the interpreter is for parity tests, not for speed.
    """
    key = (torch.device(device).type, allow_interpreter)
    if key not in _STATUS:
        if importlib.util.find_spec("triton") is None:
            _STATUS[key] = (False, "triton is not installed")
        elif key[0] == "cuda":
            _STATUS[key] = (True, "triton (cuda)")
        elif allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1":
            _STATUS[key] = (True, "triton (interpreter)")
        else:
            _STATUS[key] = (False, f"no Triton backend for {key[0]} tensors (set TRITON_INTERPRET=1 to test)")
    return _STATUS[key]


def load(name: str):
    """The kernel module ``memopt.kernels.<name>`` (imports triton)."""
    return importlib.import_module(f"memopt.kernels.{name}")


def kernel_usable(name: str, device: torch.device) -> tuple[bool, str]:
    """``(usable, reason)`` for kernel module ``name`` on ``device``'s type, decided once per process.

    The first time, each kernel of the module runs on a small problem beside its PyTorch reference
    (:mod:`memopt.kernels.self_check`); a compile or launch error, or a result outside compiled-numerics
    tolerance, makes the module unusable for the rest of the process, with one warning naming the kernel.
    """
    key = (name, torch.device(device).type)
    if key not in _SELF_CHECKED:
        try:
            from memopt.kernels.self_check import CHECKS

            problem = CHECKS[name](load(name), torch.device(device))
        except Exception as exc:  # noqa: BLE001  (a compile/launch failure of any kind)
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if problem:
            message = (f"memopt: the Triton kernel module {name!r} failed its first-use self-check on {key[1]} "
                       f"({problem}); its tensors use the PyTorch reference instead")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)
        _SELF_CHECKED[key] = (problem is None, f"self-check of the {name!r} kernels failed: {problem}" if problem
                              else "self-check passed")
    return _SELF_CHECKED[key]
