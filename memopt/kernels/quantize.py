"""Blockwise 8-bit quantize / dequantize in Triton. Twins: memopt.functional.quantize (same signatures)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from memopt.functional.adamw import second_moment_read_map
from memopt.functional.quantize import check_code_map, check_codes, default_code, kernel_code_table
from memopt.kernels._common import (check_shape, device_guard, encode_tile, launch_config, store_kind,
                                    store_param, stored_absmax, tile_offsets)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_blockwise_kernel(x_ptr, codes_ptr, absmax_ptr, table_ptr, mids_ptr, n, n_blocks,
                               M_BITS: tl.constexpr, EXTRA: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask, blk, live = tile_offsets(pid, n, n_blocks, 1.0, n_blocks, NB, BLOCK, False)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # a maximum that keeps NaNs (compiled max drops them): a block with NaN or Inf gets a non-finite absmax, which
    # the launcher refuses
    amax = stored_absmax(tl.reduce(tl.abs(x), 1, _max_keeping_nan))
    tl.store(codes_ptr + offs, encode_tile(x, amax, table_ptr, mids_ptr, M_BITS, EXTRA), mask=mask)
    tl.store(absmax_ptr + blk, amax, mask=live)


@triton.jit
def _dequantize_blockwise_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n, n_blocks, OUT_KIND: tl.constexpr,
                                 NB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask, blk, live = tile_offsets(pid, n, n_blocks, 1.0, n_blocks, NB, BLOCK, False)
    idx = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + blk, mask=live, other=0.0)
    store_param(out_ptr, offs, tl.load(code_ptr + idx) * scale[:, None], mask, OUT_KIND)


def check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 16 or blocksize > 8192 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize={blocksize!r}: the Triton kernels need a power of two in [16, 8192]")


class CodeMap(NamedTuple):
    """A code map as the kernels read it (all on the launch device): the 256 codes, the nearest-code table, the
    256 padded midpoints, the table's constexprs (``memopt.functional.quantize.kernel_code_table``), and the index
    of the code 0.0 (the code a masked lane of an update kernel loads, so it dequantizes to exactly 0 and leaves the
    absmax alone; -1 where the map has none), and the codes an AdamW update decodes a second moment with
    (``memopt.functional.adamw.second_moment_read_map``)."""
    code: Tensor
    table: Tensor
    mids: Tensor
    m_bits: int
    extra: int
    zero: int
    second_moment_read: Tensor


_MAPS: dict = {}


def code_map(code: Optional[Tensor], signed: bool, device: torch.device, needs_zero: bool = False) -> CodeMap:
    """The kernels' form of ``code`` (``None``: the default signed or unsigned dynamic map) on ``device``. The
    default maps are built and copied once per device: a host-to-device copy per call would synchronise the host
    on every tensor of every step. ``needs_zero`` (the update kernels): refuse a map without the code 0.0."""
    key = (signed, str(device))
    if code is None and key in _MAPS:
        return _MAPS[key]
    base = default_code(signed, torch.device("cpu")) if code is None else code.detach().float().cpu()
    zeros = (base == 0).nonzero()
    if needs_zero and zeros.numel() != 1:
        raise ValueError("the fused Triton updates need a code map holding 0.0 exactly once (masked lanes load it)")
    table, mids, m_bits, extra = kernel_code_table(base)
    out = CodeMap(base.to(device).contiguous(), table.to(device), mids.to(device), m_bits, extra,
                  int(zeros[0]) if zeros.numel() else -1, second_moment_read_map(base).to(device).contiguous())
    if code is None:
        _MAPS[key] = out
    return out


def launch_quantize(x: Tensor, codes: Tensor, absmax: Tensor, code: Optional[Tensor], blocksize: int) -> None:
    """The quantize kernel into preallocated ``codes`` / ``absmax`` (arguments checked by the caller), without the
    finite check of :func:`quantize_blockwise` (which waits for the GPU): a block with NaN or Inf gets a
    non-finite absmax."""
    n = x.numel()
    if n:
        n_blocks = absmax.numel()
        cm = code_map(code, True, x.device)
        cfg = launch_config(blocksize)
        with device_guard(x):
            _quantize_blockwise_kernel[(triton.cdiv(n_blocks, cfg["NB"]),)](
                x, codes, absmax, cm.table, cm.mids, n, n_blocks, M_BITS=cm.m_bits, EXTRA=cm.extra,
                BLOCK=blocksize, **cfg)


def quantize_blockwise(x: Tensor, code: Optional[Tensor] = None, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """Triton twin of :func:`memopt.functional.quantize_blockwise` (nearest rounding)."""
    check_blocksize(blocksize)
    check_code_map(code)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_blockwise (triton) supports fp32/bf16/fp16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("quantize_blockwise (triton) needs a contiguous tensor")
    check_shape("quantize_blockwise (triton)", tuple(x.shape))
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-x.numel() // blocksize), dtype=torch.float32, device=x.device)
    launch_quantize(x, codes, absmax, code, blocksize)
    if not torch.isfinite(absmax).all():  # one host sync: a NaN/Inf input is refused
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
    check_shape("dequantize_blockwise (triton)", tuple(codes.shape))
    if codes.numel():
        cfg = launch_config(blocksize)
        with device_guard(codes):
            _dequantize_blockwise_kernel[(triton.cdiv(n_blocks, cfg["NB"]),)](
                codes.contiguous(), absmax.float().contiguous(),
                default_code(True, codes.device) if code is None else code.to(codes.device).contiguous(), out,
                codes.numel(), n_blocks, OUT_KIND=store_kind(dtype, codes.device), BLOCK=blocksize, **cfg)
    return out
