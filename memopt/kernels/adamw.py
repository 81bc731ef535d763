"""Fused AdamW with blockwise 8-bit moments in Triton. Twin: memopt.functional.adamw.adamw_update_8bit_."""

from __future__ import annotations

import math
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from memopt.kernels._common import (check_8bit_state, check_update_args, quantize_block, random_seed,
                                    row_block_offsets, store_param_sr, torch_lerp)
from memopt.kernels.quantize import check_blocksize, code_and_midpoints, dtype_kind


@triton.jit
def _adamw_8bit_kernel(p_ptr, g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, scode_ptr, smids_ptr, ucode_ptr, umids_ptr,
                       row_len, per_row, decay, beta1w, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, seed,
                       SIGN: tl.constexpr, P_KIND: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = row_block_offsets(pid, row_len, per_row, BLOCK)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * SIGN
    mi = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
    vi = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(scode_ptr + mi, mask=mask, other=0.0) * tl.load(ma_ptr + pid)
    v = tl.load(ucode_ptr + vi, mask=mask, other=0.0) * tl.load(va_ptr + pid)
    m = torch_lerp(m, g, beta1w)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    store_param_sr(p_ptr, offs, p + step_size * (m / denom), mask, P_KIND, SR, seed)
    m_codes, m_amax = quantize_block(tl.where(mask, m, 0.0), smids_ptr)
    v_codes, v_amax = quantize_block(tl.where(mask, v, 0.0), umids_ptr)
    tl.store(mc_ptr + offs, m_codes, mask=mask)
    tl.store(ma_ptr + pid, m_amax)
    tl.store(vc_ptr + offs, v_codes, mask=mask)
    tl.store(va_ptr + pid, v_amax)


def adamw_update_8bit_(param: Tensor, grad: Tensor, exp_avg_codes: Tensor, exp_avg_absmax: Tensor,
                       exp_avg_sq_codes: Tensor, exp_avg_sq_absmax: Tensor, *, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, step: int, maximize: bool = False,
                       blocksize: int = 256, signed_code: Optional[Tensor] = None,
                       unsigned_code: Optional[Tensor] = None, stochastic_rounding: bool = False) -> None:
    """Fused twin of :func:`memopt.functional.adamw.adamw_update_8bit_`."""
    check_blocksize(blocksize)
    check_update_args("fused AdamW-8bit", param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                      exp_avg_sq_absmax)
    n = param.numel()
    n_blocks, row_len, per_row = check_8bit_state(n, tuple(param.shape), blocksize, exp_avg_codes, exp_avg_absmax,
                                                  exp_avg_sq_codes, exp_avg_sq_absmax)
    if n == 0:
        return
    scode, smids = code_and_midpoints(signed_code, True, param.device)
    ucode, umids = code_and_midpoints(unsigned_code, False, param.device)
    _adamw_8bit_kernel[(n_blocks,)](
        param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
        scode, smids, ucode, umids, row_len, per_row,
        1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**step), eps,
        -lr / (1.0 - beta1**step), random_seed(stochastic_rounding, param.dtype), SIGN=-1.0 if maximize else 1.0,
        P_KIND=dtype_kind(param.dtype),
        SR=stochastic_rounding, BLOCK=blocksize,
    )
