"""Blockwise 8-bit quantize / dequantize in Triton. Twins: memopt.functional.quantize (same signatures)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from memopt.functional.quantize import check_code_map, check_codes, code_midpoints, default_code
from memopt.kernels._common import quantize_block, store_param


@triton.jit
def _quantize_blockwise_kernel(x_ptr, codes_ptr, absmax_ptr, mids_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    codes, amax = quantize_block(x, mids_ptr)
    # tl.max drops NaNs: flag a non-finite block through its absmax so the launcher can refuse it
    n_bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)
    amax = tl.where(n_bad > 0, float("nan"), amax)
    tl.store(codes_ptr + offs, codes, mask=mask)
    tl.store(absmax_ptr + pid, amax)


@triton.jit
def _dequantize_blockwise_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCK: tl.constexpr,
                                 OUT_KIND: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(code_ptr + idx, mask=mask, other=0.0) * tl.load(absmax_ptr + pid)
    store_param(out_ptr, offs, value, mask, OUT_KIND)


def dtype_kind(dtype: torch.dtype) -> int:
    """Constexpr tag for stores: 1 = bf16 (rounded to nearest even through integer bits), 0 = a plain cast."""
    return 1 if dtype == torch.bfloat16 else 0


def check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 16 or blocksize > 8192 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize={blocksize!r}: the Triton kernels need a power of two in [16, 8192]")


_MIDS: dict = {}


def code_and_midpoints(code: Optional[Tensor], signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """The map on ``device`` and its 255 midpoints. The default maps are built and copied once per device: a
    host-to-device copy per call would synchronise the host on every tensor of every step."""
    if code is None:
        key = (signed, str(device))
        if key not in _MIDS:
            default = default_code(signed, device)
            _MIDS[key] = (default, code_midpoints(default).contiguous())
        return _MIDS[key]
    code = code.to(device=device, dtype=torch.float32).contiguous()
    return code, code_midpoints(code).contiguous()


def quantize_blockwise(x: Tensor, code: Optional[Tensor] = None, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """Triton twin of :func:`memopt.functional.quantize_blockwise` (nearest rounding)."""
    check_blocksize(blocksize)
    check_code_map(code)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_blockwise (triton) supports fp32/bf16/fp16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("quantize_blockwise (triton) needs a contiguous tensor")
    n = x.numel()
    n_blocks = -(-n // blocksize)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n:
        _, mids = code_and_midpoints(code, True, x.device)
        _quantize_blockwise_kernel[(n_blocks,)](x, codes, absmax, mids, n, BLOCK=blocksize)
    if not torch.isfinite(absmax).all():
        raise ValueError("quantize_blockwise: input has NaN or Inf values")
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Optional[Tensor] = None, blocksize: int = 256,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Triton twin of :func:`memopt.functional.dequantize_blockwise`."""
    check_blocksize(blocksize)
    check_codes(codes, absmax, blocksize)
    check_code_map(code)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype!r}: dequantize_blockwise (triton) writes fp32/bf16/fp16")
    n_blocks = -(-codes.numel() // blocksize)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if codes.numel():
        _dequantize_blockwise_kernel[(n_blocks,)](codes.contiguous(), absmax.float().contiguous(),
                                                  code_and_midpoints(code, True, codes.device)[0], out, codes.numel(),
                                                  BLOCK=blocksize,
                                                  OUT_KIND=dtype_kind(dtype))
    return out
