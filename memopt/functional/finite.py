"""Which gradients are entirely finite, and the ``finite`` flag the update functions take.

An update function given ``finite`` (a one-element bool tensor on the parameter's device) writes nothing when it
holds ``False``: the parameter and the state stay as they were. The Triton kernels read the flag on the device, so
the optimizer can check a step's gradients without waiting for the GPU; the PyTorch references read it on the host.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def finite_flags(tensors: Sequence[Tensor]) -> list[tuple[Tensor, list[int]]]:
    """Per (device, dtype) of ``tensors``: a bool tensor on that device saying whether each tensor is entirely
    finite, and the indices of those tensors in ``tensors``. A tensor is finite when its largest magnitude is: NaN
    propagates through the maximum, and unlike a sum of squares (2-norm) the maximum cannot overflow, so a finite
    gradient with elements above ~1.8e19 is not mistaken for an infinite one. Empty tensors are finite. No host
    sync."""
    by_kind: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype, t.numel() == 0), []).append(i)
    return [(torch.ones(len(idx), dtype=torch.bool, device=device) if empty else
             torch.isfinite(torch.stack(torch._foreach_norm([tensors[i] for i in idx], math.inf))), idx)
            for (device, _, empty), idx in by_kind.items()]


def check_finite_flag(finite: Optional[Tensor], param: Tensor) -> None:
    """Refuse a ``finite`` argument that is not ``None`` or a one-element bool tensor on ``param``'s device."""
    if finite is None:
        return
    if not isinstance(finite, Tensor) or finite.dtype != torch.bool or finite.numel() != 1:
        raise ValueError(f"finite must be None or a one-element bool tensor, got {finite!r}")
    if finite.device != param.device:
        raise ValueError(f"finite is on {finite.device}, the parameter on {param.device}")


def skipped(finite: Optional[Tensor], param: Tensor) -> bool:
    """For the PyTorch references: whether ``finite`` says to leave ``param`` and its state unchanged (a host read
    of the flag)."""
    check_finite_flag(finite, param)
    return finite is not None and not bool(finite)
