"""Fused SGD-SaI updates in Triton: each element of param, grad and state is read once and written once.
Twins (same signatures): memopt.functional.sgdsai.sgdsai_update_ and sgdsai_update_8bit_."""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from memopt.kernels._common import (KERNEL_FLOATS, TILE, check_8bit_state, check_update_args, device_guard,
                                    finite_arg, launch_config, param_store_args, quantize_tile, store_kind, store_param,
                                    store_param_sr, tile_offsets, torch_lerp)
from memopt.kernels.quantize import check_blocksize, code_map



@triton.jit
def _sgdsai_kernel(p_ptr, g_ptr, m_ptr, ok_ptr, n, alpha, decay, weight, seed, HAS_M: tl.constexpr, FIRST: tl.constexpr,
                   P_KIND: tl.constexpr, M_KIND: tl.constexpr, SR: tl.constexpr, NB: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = (pid * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (offs < n) & tl.load(ok_ptr)  # a non-finite gradient (ok = False): nothing is written
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    upd = g
    if HAS_M:
        if not FIRST:  # on the first step the buffer already holds g; the exact g is used for this step
            upd = torch_lerp(tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32), g, weight)
            store_param(m_ptr, offs, upd, mask, M_KIND)
    store_param_sr(p_ptr, offs, p + alpha * upd, mask, P_KIND, SR, seed, pid, NB, BLOCK)


@triton.jit
def _sgdsai_8bit_kernel(p_ptr, g_ptr, codes_ptr, absmax_ptr, ok_ptr, code_ptr, table_ptr, mids_ptr, row_len, per_row,
                        inv_per_row, n_blocks, zero, alpha, decay, weight, seed, FIRST: tl.constexpr,
                        P_KIND: tl.constexpr, SR: tl.constexpr, M_BITS: tl.constexpr, EXTRA: tl.constexpr,
                        NB: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask, blk, live = tile_offsets(pid, row_len, per_row, inv_per_row, n_blocks, NB, BLOCK, ROWS)
    ok = tl.load(ok_ptr)  # a non-finite gradient (ok = False): nothing is written
    mask = mask & ok
    live = live & ok
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        m = g
    else:
        idx = tl.load(codes_ptr + offs, mask=mask, other=zero).to(tl.int32)  # masked lanes: m = 0, g = 0
        scale = tl.load(absmax_ptr + blk, mask=live, other=0.0)
        m = torch_lerp(tl.load(code_ptr + idx) * scale[:, None], g, weight)
    store_param_sr(p_ptr, offs, p + alpha * m, mask, P_KIND, SR, seed, pid, NB, BLOCK)
    codes, amax = quantize_tile(m, table_ptr, mids_ptr, M_BITS, EXTRA)  # masked lanes hold 0
    tl.store(codes_ptr + offs, codes, mask=mask)
    tl.store(absmax_ptr + blk, amax, mask=live)


def sgdsai_update_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], *, lr: float, scale: float,
                   momentum: float, weight_decay: float, maximize: bool = False, first_step: bool = False,
                   stochastic_rounding: bool = False, finite: Optional[Tensor] = None) -> None:
    """Fused twin of :func:`memopt.functional.sgdsai.sgdsai_update_` (full-precision momentum)."""
    check_update_args("fused SGD-SaI", param, grad, *([] if momentum_buffer is None else [momentum_buffer]))
    if momentum_buffer is not None and momentum_buffer.dtype not in KERNEL_FLOATS:
        raise ValueError(f"momentum buffer dtype {momentum_buffer.dtype} is not supported")
    n = param.numel()
    if n == 0:
        return
    alpha = (lr * scale) if maximize else -(lr * scale)
    m = grad if momentum_buffer is None else momentum_buffer
    cfg = launch_config(TILE)
    with device_guard(param):
        _sgdsai_kernel[(triton.cdiv(n, TILE),)](
            param, grad, m, finite_arg(finite, param), n, alpha, 1.0 - lr * weight_decay, 1.0 - momentum,
            HAS_M=momentum_buffer is not None,
            FIRST=first_step and momentum_buffer is not None, M_KIND=store_kind(m.dtype, m.device), NB=1, BLOCK=TILE,
            num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"], **param_store_args(param, stochastic_rounding),
        )


def sgdsai_update_8bit_(param: Tensor, grad: Tensor, codes: Tensor, absmax: Tensor, *, lr: float, scale: float,
                        momentum: float, weight_decay: float, maximize: bool = False, first_step: bool = False,
                        blocksize: int = 256, code: Optional[Tensor] = None,
                        stochastic_rounding: bool = False, finite: Optional[Tensor] = None) -> None:
    """Fused twin of :func:`memopt.functional.sgdsai.sgdsai_update_8bit_`: per block, dequantize → fp32 EMA →
    param update → new absmax → re-quantize, in registers."""
    check_blocksize(blocksize)
    check_update_args("fused SGD-SaI", param, grad, codes, absmax)
    n = param.numel()
    n_blocks, rows = check_8bit_state(n, tuple(param.shape), blocksize, codes, absmax)
    if n == 0:
        return
    cm = code_map(code, True, param.device, needs_zero=True)
    alpha = (lr * scale) if maximize else -(lr * scale)
    cfg = launch_config(blocksize)
    with device_guard(param):
        _sgdsai_8bit_kernel[(triton.cdiv(n_blocks, cfg["NB"]),)](
            param, grad, codes, absmax, finite_arg(finite, param), cm.code, cm.table, cm.mids, n_blocks=n_blocks,
            zero=cm.zero, alpha=alpha,
            decay=1.0 - lr * weight_decay, weight=1.0 - momentum, FIRST=first_step, M_BITS=cm.m_bits, EXTRA=cm.extra,
            BLOCK=blocksize, **rows, **cfg, **param_store_args(param, stochastic_rounding),
        )
