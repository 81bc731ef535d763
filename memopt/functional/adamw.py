"""AdamW math as plain functions, with full-precision or blockwise 8-bit moments (arXiv 2110.02861 for the
8-bit form). Same operation order as torch's single-tensor AdamW, so the 32-bit form matches it bit for bit."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from memopt.functional.quantize import (_cached, code_midpoints, default_code, dequantize_rows, in_row_pieces,
                                        quantize_rows)
from memopt.functional.finite import skipped
from memopt.functional.rounding import write_param_
from memopt.functional.sgdsai import compute_dtype


def adam_moments_(g: Tensor, m: Tensor, v: Tensor, *, beta1: float, beta2: float, maximize: bool = False) -> None:
    """Adam's moment update, in place: ``m ← β1 m + (1 − β1) g``, ``v ← β2 v + (1 − β2) g²`` (``-g`` when
    maximizing). Every Adam-type update in memopt uses it."""
    if maximize:
        g = -g
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def adam_direction(m: Tensor, v: Tensor, *, beta1: float, beta2: float, eps: float, step: int) -> Tensor:
    """The bias-corrected Adam direction ``m̂ / (sqrt(v̂) + eps)`` as a new tensor (the update is ``−lr`` times
    it): how the projection methods apply Adam to a (projected) gradient."""
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    return m / denom / (1.0 - beta1**step)


def second_moment_read_map(code: Tensor) -> Tensor:
    """The unsigned map ``code`` as an Adam update reads a stored second moment: its 0.0 replaced by the midpoint
    between 0 and the next code, the largest value (relative to the block maximum) that is stored as 0.

    Quantized against its block's maximum, a second moment up to that midpoint (1.6e-7 of the block maximum in the
    default map: a gradient ~4e-4 of the block's largest) is stored as 0, while the element's first moment, on the
    signed map, usually is not. Exact Adam never has ``v = 0`` where ``m != 0`` (both sum the same gradients), and
    ``m / (sqrt(v) + eps)`` with that 0 steps up to ``|m| / eps``: one outlier in a block would throw its neighbours'
    weights far. Read as the top of the interval it stands for, a stored ``v`` is at least its true value, so the
    step is at most the one exact Adam takes from the same ``m`` (docs/8bit.md, "Second moments stored as 0").
    Quantization is unchanged (it uses the map's midpoints), so is the state; an all-zero block (maximum 0) still
    reads as zeros. Built once per map; every AdamW 8-bit update (PyTorch, C, Triton) decodes ``v`` with it."""

    def build(code):
        out = code.clone()
        zeros = (code == 0).nonzero().flatten().tolist()
        if len(zeros) == 1 and zeros[0] + 1 < code.numel():
            out[zeros[0]] = code_midpoints(code)[zeros[0]]
        return out

    return _cached("second_moment_read", code, build)


def _adamw_apply_(p: Tensor, m: Tensor, v: Tensor, *, lr, beta1, beta2, eps, weight_decay, step) -> None:
    p.mul_(1.0 - lr * weight_decay)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)


def _adamw_math_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr, beta1, beta2, eps, weight_decay, step,
                 maximize) -> None:
    # the moments do not depend on p: the same result as torch's order (decay, moments, update), bit for bit
    adam_moments_(g, m, v, beta1=beta1, beta2=beta2, maximize=maximize)
    _adamw_apply_(p, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, step: int, maximize: bool = False,
                  stochastic_rounding: bool = False) -> None:
    """One AdamW step of one tensor with full-precision moments, in place (math in fp32 for low precision)."""
    cdt = compute_dtype(param.dtype)
    if param.dtype == cdt and grad.dtype == cdt and exp_avg.dtype == cdt and exp_avg_sq.dtype == cdt:
        _adamw_math_(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, step=step, maximize=maximize)
        return
    p, m, v = param.to(cdt), exp_avg.to(cdt), exp_avg_sq.to(cdt)
    _adamw_math_(p, grad.to(cdt), m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 step=step, maximize=maximize)
    write_param_(param, p, stochastic_rounding)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def adamw_update_8bit_(
    param: Tensor,
    grad: Tensor,
    exp_avg_codes: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq_codes: Tensor,
    exp_avg_sq_absmax: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    maximize: bool = False,
    blocksize: int = 256,
    signed_code: Optional[Tensor] = None,
    unsigned_code: Optional[Tensor] = None,
    stochastic_rounding: bool = False,
    finite: Optional[Tensor] = None,
) -> None:
    """AdamW with both moments as blockwise 8-bit codes: ``exp_avg`` on the signed dynamic map,
    ``exp_avg_sq`` (non-negative) on the unsigned one. Dequantize to fp32, update, re-quantize against the new
    block absmax (nearest code). Zero-initialised codes with absmax 0 dequantize to exact zeros (step 1).
    ``finite``: ``None``, or a one-element bool tensor whose ``False`` leaves param and moments unchanged
    (:mod:`memopt.functional.finite`)."""
    if skipped(finite, param):
        return
    if in_row_pieces(adamw_update_8bit_, param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                     exp_avg_sq_absmax, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     step=step, maximize=maximize, blocksize=blocksize, signed_code=signed_code,
                     unsigned_code=unsigned_code, stochastic_rounding=stochastic_rounding):
        return
    signed_code = default_code(True, param.device) if signed_code is None else signed_code
    unsigned_code = default_code(False, param.device) if unsigned_code is None else unsigned_code
    cdt = compute_dtype(param.dtype)
    m = dequantize_rows(exp_avg_codes, exp_avg_absmax, signed_code, blocksize, dtype=cdt)
    v = dequantize_rows(exp_avg_sq_codes, exp_avg_sq_absmax, second_moment_read_map(unsigned_code), blocksize,
                        dtype=cdt)
    adam_moments_(grad.to(cdt), m, v, beta1=beta1, beta2=beta2, maximize=maximize)
    # quantize first: a non-finite moment (corrupt state) raises here, before the parameter is written
    stored = [quantize_rows(m, signed_code, blocksize), quantize_rows(v, unsigned_code, blocksize)]
    p = param if param.dtype == cdt else param.to(cdt)
    _adamw_apply_(p, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    if p is not param:
        write_param_(param, p, stochastic_rounding)
    for (codes, absmax), (new_codes, new_absmax) in zip(((exp_avg_codes, exp_avg_absmax),
                                                         (exp_avg_sq_codes, exp_avg_sq_absmax)), stored):
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
