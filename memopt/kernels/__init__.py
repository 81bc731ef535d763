"""Triton kernels (optional): blockwise quantize/dequantize and fused optimizer updates.

Every kernel has a plain-PyTorch twin in ``memopt.functional`` with the same signature. ``import memopt``
never imports triton; this module decides, in one place, whether the Triton path can run for a tensor.
Kernel modules (``memopt.kernels.quantize``, ``.sgdsai``, ``.adamw``) import triton and are loaded on demand.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

_STATUS: dict[tuple[str, bool], tuple[bool, str]] = {}


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
