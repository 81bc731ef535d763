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


# Devices whose host reads cost nothing (no queue of work to wait for): there the check takes the fast 2-norm and
# confirms a non-finite one with the maximum on the host (torch's CPU maximum-reduction is ~10x slower than its sum
# of squares; on a GPU both run at memory bandwidth, and a host read would wait for the device).
HOST_READ_DEVICES = {"cpu"}


def finite_flags(tensors: Sequence[Tensor]) -> list[tuple[Tensor, list[int]]]:
    """Per (device, dtype) of ``tensors``: a bool tensor on that device saying whether each tensor is entirely
    finite, and the indices of those tensors in ``tensors``. Empty tensors are finite.

    The rule: a tensor is finite when its largest magnitude is (NaN propagates through the maximum, and the maximum
    cannot overflow). On a GPU the maximum is computed as such, with no host sync. On CPU (``HOST_READ_DEVICES``) the
    2-norm is computed first, in the tensor's dtype; only a tensor whose 2-norm is not finite (a NaN/Inf, or a sum
    of squares that overflowed: elements above ~1.8e19, or ~256 in fp16) is decided by its maximum. Both ways give
    the same answer."""
    by_kind: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype, t.numel() == 0), []).append(i)
    out = []
    for (device, _, empty), idx in by_kind.items():
        group = [tensors[i] for i in idx]
        if empty:
            flags = torch.ones(len(idx), dtype=torch.bool, device=device)
        elif device.type in HOST_READ_DEVICES:
            flags = torch.isfinite(torch.stack(torch._foreach_norm(group, 2)))
            if not bool(flags.all()):
                redo = [k for k, ok in enumerate(flags.tolist()) if not ok]
                flags[redo] = torch.isfinite(torch.stack(torch._foreach_norm([group[k] for k in redo], math.inf)))
        else:
            flags = torch.isfinite(torch.stack(torch._foreach_norm(group, math.inf)))
        out.append((flags, idx))
    return out


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
