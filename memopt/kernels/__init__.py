"""Triton kernels (optional): blockwise quantize/dequantize and fused optimizer updates.

Every kernel has a plain-PyTorch twin in ``memopt.functional`` with the same signature. ``import memopt``
never imports triton; this module decides, in one place, whether the Triton path can run for a tensor.
Kernel modules (``memopt.kernels.quantize``, ``.sgdsai``, ``.adamw``) import triton and are loaded on demand.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import warnings
from typing import Optional

import torch

logger = logging.getLogger("memopt")
_STATUS: dict[tuple[str, bool], tuple[bool, str]] = {}
MIN_CAPABILITY = (8, 0)
_SELF_CHECKED: dict[tuple[str, str], tuple[bool, str]] = {}


def triton_status(device: torch.device, *, allow_interpreter: bool = False) -> tuple[bool, str]:
    """``(usable, reason)`` for running the Triton kernels on tensors of ``device``.

    CUDA tensors use the compiled kernels on GPUs of compute capability 8.0 or more (A100, H100 and later: what
    the kernels are built and checked for); older GPUs (V100, T4) use the reference. CPU tensors only run under
    ``TRITON_INTERPRET=1`` and only when asked for explicitly (``allow_interpreter``): the interpreter is for
    parity tests, not for speed.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device) if device.type == "cuda" else device.type, allow_interpreter)
    if key not in _STATUS:
        if importlib.util.find_spec("triton") is None:
            _STATUS[key] = (False, "triton is not installed")
        elif device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            _STATUS[key] = ((True, "triton (cuda)") if (major, minor) >= MIN_CAPABILITY else
                            (False, f"{device} has compute capability {major}.{minor}; the kernels need "
                                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or more"))
        elif allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1":
            _STATUS[key] = (True, "triton (interpreter)")
        else:
            _STATUS[key] = (False, f"no Triton backend for {device.type} tensors (set TRITON_INTERPRET=1 to test)")
    return _STATUS[key]


MAX_NUMEL = 2**31 - 1  # the kernels' offsets are int32
MAX_ROW_BLOCKS = 2**22  # row blocks are found by a float quotient, exact below this many blocks (docs/8bit.md)


def kernel_refusal(shape: tuple, blocksize: Optional[int] = None) -> Optional[str]:
    """Why the kernels cannot take a tensor of ``shape`` (with 8-bit state in ``blocksize`` blocks), or ``None``.
    The optimizers send such tensors to the PyTorch reference; the launchers raise."""
    from memopt.functional.quantize import row_layout

    n = math.prod(shape)
    if n > MAX_NUMEL:
        return f"{n} elements need 64-bit offsets (the kernels take at most {MAX_NUMEL})"
    if blocksize is not None:
        rows, length, per_row = row_layout(tuple(shape), blocksize)
        if rows > 1 and length % blocksize and rows * per_row >= MAX_ROW_BLOCKS:
            return (f"{rows * per_row} row blocks of rows not ending on a block boundary (the kernels take fewer "
                    f"than {MAX_ROW_BLOCKS})")
    return None


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
