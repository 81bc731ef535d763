"""Writing fp32 results into low-precision parameters."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def stochastic_round_to_bf16(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased in expectation).

    Adds 16 uniform random bits below the bf16 mantissa and truncates, so an update smaller than half a bf16
    ulp still moves the weight on average instead of vanishing. Finite inputs only.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def write_param_(param: Tensor, value: Tensor, stochastic_rounding: bool = False) -> None:
    """``param.copy_(value)``, with stochastic rounding when asked for and the parameter is bf16."""
    if stochastic_rounding and param.dtype == torch.bfloat16:
        param.copy_(stochastic_round_to_bf16(value))
    else:
        param.copy_(value)
