"""Fused AdamW with blockwise 8-bit moments in Triton. Twin: memopt.functional.adamw.adamw_update_8bit_."""

from __future__ import annotations

import math
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from memopt.kernels._common import (check_8bit_state, check_update_args, device_guard, finite_arg, launch_config,
                                    fast_div, param_store_args, quantize_tile, store_param_sr, tile_offsets, torch_lerp)
from memopt.kernels.quantize import check_blocksize, code_map


@triton.jit
def _adamw_8bit_kernel(p_ptr, g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, ok_ptr, scode_ptr, stable_ptr, smids_ptr,
                       ucode_ptr, utable_ptr, umids_ptr, row_len, per_row, inv_per_row, n_blocks, s_zero, u_zero, decay,
                       beta1w, beta2, one_minus_beta2, inv_bc2_sqrt, eps, step_size, seed, SIGN: tl.constexpr,
                       P_KIND: tl.constexpr, SR: tl.constexpr, S_BITS: tl.constexpr, S_EXTRA: tl.constexpr,
                       U_BITS: tl.constexpr, U_EXTRA: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr, COMPILED: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask, blk, live = tile_offsets(pid, row_len, per_row, inv_per_row, n_blocks, NB, BLOCK, ROWS)
    ok = tl.load(ok_ptr)  # a non-finite gradient (ok = False): nothing is written
    mask = mask & ok
    live = live & ok
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * SIGN
    # masked lanes: m = 0, g = 0 and v = the read of the zero code (below the block's largest after the update:
    # the new maximum is the real elements'); ucode_ptr is the map an update decodes v with
    # (memopt.functional.adamw.second_moment_read_map), its midpoints the quantizer's
    mi = tl.load(mc_ptr + offs, mask=mask, other=s_zero).to(tl.int32)
    vi = tl.load(vc_ptr + offs, mask=mask, other=u_zero).to(tl.int32)
    m = tl.load(scode_ptr + mi) * tl.load(ma_ptr + blk, mask=live, other=0.0)[:, None]
    v = tl.load(ucode_ptr + vi) * tl.load(va_ptr + blk, mask=live, other=0.0)[:, None]
    m = torch_lerp(m, g, beta1w)
    v = v * beta2 + one_minus_beta2 * (g * g)
    # compiled sqrt and division are approximate (within 2 ulp; denom >= eps keeps the divisor in fast_div's range):
    # parameters agree with the reference to ~1e-6 relative; the stored moments do not depend on them
    denom = tl.sqrt(v) * inv_bc2_sqrt + eps
    store_param_sr(p_ptr, offs, p + step_size * fast_div(m, denom, COMPILED), mask, P_KIND, SR, seed, pid, NB, BLOCK)
    m_codes, m_amax = quantize_tile(m, stable_ptr, smids_ptr, S_BITS, S_EXTRA)
    v_codes, v_amax = quantize_tile(v, utable_ptr, umids_ptr, U_BITS, U_EXTRA, NONNEG=True)  # v >= +0
    tl.store(mc_ptr + offs, m_codes, mask=mask)
    tl.store(ma_ptr + blk, m_amax, mask=live)
    tl.store(vc_ptr + offs, v_codes, mask=mask)
    tl.store(va_ptr + blk, v_amax, mask=live)


def adamw_update_8bit_(param: Tensor, grad: Tensor, exp_avg_codes: Tensor, exp_avg_absmax: Tensor,
                       exp_avg_sq_codes: Tensor, exp_avg_sq_absmax: Tensor, *, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, step: int, maximize: bool = False,
                       blocksize: int = 256, signed_code: Optional[Tensor] = None,
                       unsigned_code: Optional[Tensor] = None, stochastic_rounding: bool = False,
                       finite: Optional[Tensor] = None) -> None:
    """Fused twin of :func:`memopt.functional.adamw.adamw_update_8bit_`."""
    check_blocksize(blocksize)
    check_update_args("fused AdamW-8bit", param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                      exp_avg_sq_absmax)
    n = param.numel()
    n_blocks, rows = check_8bit_state(n, tuple(param.shape), blocksize, exp_avg_codes, exp_avg_absmax,
                                      exp_avg_sq_codes, exp_avg_sq_absmax)
    if n == 0:
        return
    s = code_map(signed_code, True, param.device, needs_zero=True)
    u = code_map(unsigned_code, False, param.device, needs_zero=True)
    cfg = launch_config(blocksize)
    with device_guard(param):
        _adamw_8bit_kernel[(triton.cdiv(n_blocks, cfg["NB"]),)](
            param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, finite_arg(finite, param),
            s.code, s.table, s.mids, u.second_moment_read, u.table, u.mids, n_blocks=n_blocks, s_zero=s.zero,
            u_zero=u.zero,
            decay=1.0 - lr * weight_decay, beta1w=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
            inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2**step), eps=eps, step_size=-lr / (1.0 - beta1**step),
            SIGN=-1.0 if maximize else 1.0, S_BITS=s.m_bits, S_EXTRA=s.extra, U_BITS=u.m_bits, U_EXTRA=u.extra,
            BLOCK=blocksize, **rows, COMPILED=param.device.type != "cpu", **cfg,
            **param_store_args(param, stochastic_rounding),
        )
