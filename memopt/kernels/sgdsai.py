"""Fused SGD-SaI updates in Triton: each element of param, grad and state is read once and written once.
Twins (same signatures): memopt.functional.sgdsai.sgdsai_update_ and sgdsai_update_8bit_."""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from memopt.kernels._common import (KERNEL_FLOATS, check_8bit_state, check_update_args, quantize_block,
                                    random_seed, row_block_offsets, store_param, store_param_sr, torch_lerp)
from memopt.kernels.quantize import check_blocksize, code_and_midpoints, dtype_kind

_FP32_BLOCK = 1024


@triton.jit
def _sgdsai_kernel(p_ptr, g_ptr, m_ptr, n, alpha, decay, weight, seed, HAS_M: tl.constexpr, FIRST: tl.constexpr,
                   P_KIND: tl.constexpr, M_KIND: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    upd = g
    if HAS_M:
        if not FIRST:  # on the first step the buffer already holds g; the exact g is used for this step
            upd = torch_lerp(tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32), g, weight)
            store_param(m_ptr, offs, upd, mask, M_KIND)
    store_param_sr(p_ptr, offs, p + alpha * upd, mask, P_KIND, SR, seed)


@triton.jit
def _sgdsai_8bit_kernel(p_ptr, g_ptr, codes_ptr, absmax_ptr, code_ptr, mids_ptr, row_len, per_row, alpha, decay,
                        weight, seed, FIRST: tl.constexpr, P_KIND: tl.constexpr, SR: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = row_block_offsets(pid, row_len, per_row, BLOCK)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        m = g
    else:
        idx = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.load(code_ptr + idx, mask=mask, other=0.0) * tl.load(absmax_ptr + pid)
        m = torch_lerp(m, g, weight)
    store_param_sr(p_ptr, offs, p + alpha * m, mask, P_KIND, SR, seed)
    codes, amax = quantize_block(m, mids_ptr)  # padding lanes are 0 and do not move the absmax
    tl.store(codes_ptr + offs, codes, mask=mask)
    tl.store(absmax_ptr + pid, amax)


def sgdsai_update_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], *, lr: float, scale: float,
                   momentum: float, weight_decay: float, maximize: bool = False, first_step: bool = False,
                   stochastic_rounding: bool = False) -> None:
    """Fused twin of :func:`memopt.functional.sgdsai.sgdsai_update_` (full-precision momentum)."""
    check_update_args("fused SGD-SaI", param, grad, *([] if momentum_buffer is None else [momentum_buffer]))
    if momentum_buffer is not None and momentum_buffer.dtype not in KERNEL_FLOATS:
        raise ValueError(f"momentum buffer dtype {momentum_buffer.dtype} is not supported")
    n = param.numel()
    if n == 0:
        return
    alpha = (lr * scale) if maximize else -(lr * scale)
    m = grad if momentum_buffer is None else momentum_buffer
    _sgdsai_kernel[(triton.cdiv(n, _FP32_BLOCK),)](
        param, grad, m, n, alpha, 1.0 - lr * weight_decay, 1.0 - momentum,
        random_seed(stochastic_rounding, param.dtype),
        HAS_M=momentum_buffer is not None, FIRST=first_step, P_KIND=dtype_kind(param.dtype),
        M_KIND=dtype_kind(m.dtype), SR=stochastic_rounding, BLOCK=_FP32_BLOCK,
    )


def sgdsai_update_8bit_(param: Tensor, grad: Tensor, codes: Tensor, absmax: Tensor, *, lr: float, scale: float,
                        momentum: float, weight_decay: float, maximize: bool = False, first_step: bool = False,
                        blocksize: int = 256, code: Optional[Tensor] = None,
                        stochastic_rounding: bool = False) -> None:
    """Fused twin of :func:`memopt.functional.sgdsai.sgdsai_update_8bit_`: per block, dequantize → fp32 EMA →
    param update → new absmax → re-quantize, in registers."""
    check_blocksize(blocksize)
    check_update_args("fused SGD-SaI", param, grad, codes, absmax)
    n = param.numel()
    n_blocks, row_len, per_row = check_8bit_state(n, tuple(param.shape), blocksize, codes, absmax)
    if n == 0:
        return
    code, mids = code_and_midpoints(code, True, param.device)
    alpha = (lr * scale) if maximize else -(lr * scale)
    _sgdsai_8bit_kernel[(n_blocks,)](
        param, grad, codes, absmax, code, mids, row_len, per_row, alpha, 1.0 - lr * weight_decay, 1.0 - momentum,
        random_seed(stochastic_rounding, param.dtype), FIRST=first_step, P_KIND=dtype_kind(param.dtype),
        SR=stochastic_rounding, BLOCK=blocksize,
    )
