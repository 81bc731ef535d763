"""Argument checks and refusals shared by every memopt optimizer: each raises an error that names the argument
(or the set-up) and says what to do instead (docs/reliability.md)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from memopt.distributed import is_deepspeed_partitioned, is_dtensor

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_BITS = (8, 32)
_OVERRIDE_ATTR = "_memopt_state_bits"


def keep_32bit_state(params, bits: int = 32) -> None:
    """Per-parameter override of ``state_bits`` (e.g. keep embeddings in 32-bit state under ``state_bits=8``).

    Accepts a tensor, an iterable of tensors or an ``nn.Module`` (all its parameters). The mark lives on the
    tensor, so it must be set before the parameter's first step; a tensor's state format never changes later.
    """
    if bits not in STATE_BITS:
        raise ValueError(f"bits={bits!r} is not one of {STATE_BITS}")
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    elif isinstance(params, Tensor):
        params = [params]
    for p in params:
        setattr(p, _OVERRIDE_ATTR, bits)


def _refuse_dtensor(name: str, p: Tensor, why: str) -> None:
    if is_dtensor(p):
        raise NotImplementedError(
            f"{name} does not support FSDP2 / DTensor-sharded parameters{why}. On FSDP2 use optim='sgdsai', "
            "'sgdsai_8bit', 'memopt_adamw_8bit' or FRUGAL with selection='columns'|'blocks' (docs/multi_gpu.md); "
            "or DDP (accelerate launch --multi_gpu), or a single device."
        )


def _refuse_deepspeed(name: str, p: Tensor) -> None:
    if is_deepspeed_partitioned(p):
        raise NotImplementedError(
            f"{name} does not support DeepSpeed ZeRO-partitioned parameters: its per-tensor statistics would be "
            "computed per partition. Use DDP, FSDP2 (optim='sgdsai'), or a single device."
        )


def check_gradient(name: str, p: Tensor, g: Tensor) -> None:
    """The gradients no memopt optimizer can use, refused with one message per kind for every optimizer."""
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{name} does not support sparse gradients (layout {g.layout}): use a dense embedding "
                           "(nn.Embedding(sparse=False)) or an optimizer for sparse gradients such as "
                           "torch.optim.SparseAdam")
    if p.is_meta or g.is_meta:
        raise RuntimeError(f"{name} cannot update a parameter of shape {tuple(p.shape)} on the meta device (it holds "
                           "no data): materialise the model (load its weights or call to_empty) before training")


def check_float(name: str, value: Any, low: float, high: float = math.inf, *, low_open=False, high_open=True):
    if isinstance(value, Tensor):
        raise ValueError(f"{name}={value!r}: a tensor is not supported here, pass a Python float")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range {lo}{low}, {high}{hi}")


def check_betas(betas: Any) -> None:
    """A pair of coefficients in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r} must be a pair of floats")
    check_float("betas[0]", betas[0], 0.0, 1.0)
    check_float("betas[1]", betas[1], 0.0, 1.0)


def check_adam_args(group: dict) -> None:
    """lr, betas, eps and weight_decay of an Adam-family group."""
    check_float("lr", group["lr"], 0.0)
    check_betas(group["betas"])
    check_float("eps", group["eps"], 0.0, low_open=True)
    check_float("weight_decay", group["weight_decay"], 0.0)


def check_8bit_args(group: dict) -> None:
    if group["use_triton"] is not None and not isinstance(group["use_triton"], bool):
        raise ValueError(f"use_triton={group['use_triton']!r} must be None or a bool")
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"stochastic_rounding={group['stochastic_rounding']!r} must be a bool")
    check_8bit_layout(group)


def check_8bit_layout(group: dict) -> None:
    """state_bits, blocksize and min_8bit_size (and the check_finite/maximize flags) of a group."""
    for flag in ("maximize", "check_finite"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"{flag}={group[flag]!r} must be a bool")
    if group["state_bits"] not in STATE_BITS or isinstance(group["state_bits"], bool):
        raise ValueError(f"state_bits={group['state_bits']!r} is not one of {STATE_BITS}")
    for key in ("blocksize", "min_8bit_size"):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{key}={v!r} must be a positive int")
    b = group["blocksize"]
    if b < 16 or b > 8192 or b & (b - 1):
        # the same layout must work on every path: the Triton kernels take powers of two in [16, 8192]
        raise ValueError(f"blocksize={b!r} must be a power of two in [16, 8192]")
    if group["state_bits"] == 8 and not group["check_finite"]:
        raise ValueError("check_finite=False is not supported with state_bits=8: a non-finite value would "
                         "poison a whole quantization block")
