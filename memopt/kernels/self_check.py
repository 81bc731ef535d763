"""First-use self-check of the Triton kernels: each kernel runs once on a small problem (two quantization blocks
and a tail) beside its PyTorch reference, before any parameter of the user's model goes through it.

A kernel that fails to compile or launch, or whose result is off by more than compiled numerics allow, is not used:
``memopt.kernels.kernel_usable`` falls back to the reference with one warning (or raises when the user asked for
``use_triton=True``). Tolerances: fp32 parameters agree to 1e-5 relative (compiled ``/`` and ``sqrt`` are
approximate, the interpreter's are exact); 8-bit state agrees to one code step of the dynamic map (a value next
to a midpoint may round to the other neighbour), i.e. 0.015 of the block's absmax.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from memopt.functional import adamw as ref_adamw
from memopt.functional import quantize as ref_quantize
from memopt.functional import sgdsai as ref_sgdsai

_N = 2 * 256 + 17  # two quantization blocks and a tail
_SHAPE = (3, 300)  # 8-bit state in row blocks: two blocks per row, the second one partial
_CODE_STEP = 0.015  # largest gap between neighbouring codes of the signed / unsigned dynamic maps, over 1.0


def _problem(device: torch.device, shape=(_N,)):
    g = torch.Generator().manual_seed(1234)
    p = (0.1 * torch.randn(shape, generator=g)).to(device)
    grads = [(1e-2 * torch.randn(shape, generator=g)).to(device) for _ in range(3)]
    return p, grads


def _zero_state(shape, device, moments: int) -> list:
    from memopt.functional.quantize import layout_8bit

    out = []
    for _ in range(moments):
        for s, d in layout_8bit("m", shape, 256).values():
            out.append(torch.zeros(s, dtype=d, device=device))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> Optional[str]:
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-7):
        return f"{what} differs from the reference by {float((a - b).abs().max()):.3g}"
    return None


def _state_close(codes_a, absmax_a, codes_b, absmax_b, signed: bool, what: str) -> Optional[str]:
    code = ref_quantize.default_code(signed, codes_a.device)
    a = ref_quantize.dequantize_rows(codes_a, absmax_a, code)
    b = ref_quantize.dequantize_rows(codes_b, absmax_b, code)
    bound = _CODE_STEP * float(torch.maximum(absmax_a, absmax_b).max()) + 1e-12
    if not torch.allclose(absmax_a, absmax_b, rtol=1e-5, atol=0) or bool(((a - b).abs() > bound).any()):
        return f"{what} differs from the reference by more than one code step"
    return None


def check_quantize(module, device: torch.device) -> Optional[str]:
    x = _problem(device)[0]
    codes, absmax = module.quantize_blockwise(x)
    ref_codes, ref_absmax = ref_quantize.quantize_blockwise(x)
    problem = _state_close(codes, absmax, ref_codes, ref_absmax, True, "quantize_blockwise")
    if problem:
        return problem
    return _close(module.dequantize_blockwise(ref_codes, ref_absmax),
                  ref_quantize.dequantize_blockwise(ref_codes, ref_absmax), "dequantize_blockwise")


def check_sgdsai(module, device: torch.device) -> Optional[str]:
    p0, grads = _problem(device)
    kw = dict(lr=0.1, scale=0.5, momentum=0.9, weight_decay=0.01)
    p_k, p_r = p0.clone(), p0.clone()
    m_k, m_r = grads[0].clone(), grads[0].clone()
    for t, g in enumerate(grads):
        module.sgdsai_update_(p_k, g, m_k, first_step=t == 0, **kw)
        ref_sgdsai.sgdsai_update_(p_r, g, m_r, first_step=t == 0, **kw)
    problem = _close(p_k, p_r, "sgdsai_update_ (parameter)") or _close(m_k, m_r, "sgdsai_update_ (momentum)")
    if problem:
        return problem
    p0, grads = _problem(device, _SHAPE)
    p_k, p_r = p0.clone(), p0.clone()
    state_r = _zero_state(_SHAPE, device, 1)
    for t, g in enumerate(grads):
        state_k = [s.clone() for s in state_r]  # the same state in: each step checks one kernel call
        module.sgdsai_update_8bit_(p_k, g, *state_k, first_step=t == 0, **kw)
        ref_sgdsai.sgdsai_update_8bit_(p_r, g, *state_r, first_step=t == 0, **kw)
        problem = _close(p_k, p_r, "sgdsai_update_8bit_ (parameter)") or _state_close(
            *state_k, *state_r, True, "sgdsai_update_8bit_ (momentum)")
        if problem:
            return problem
        p_k = p_r.clone()
    return None


def check_adamw(module, device: torch.device) -> Optional[str]:
    p0, grads = _problem(device, _SHAPE)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    p_k, p_r = p0.clone(), p0.clone()
    state_r = _zero_state(_SHAPE, device, 2)
    for t, g in enumerate(grads, start=1):
        state_k = [s.clone() for s in state_r]
        module.adamw_update_8bit_(p_k, g, *state_k, step=t, **kw)
        ref_adamw.adamw_update_8bit_(p_r, g, *state_r, step=t, **kw)
        problem = _close(p_k, p_r, "adamw_update_8bit_ (parameter)") or _state_close(
            *state_k[:2], *state_r[:2], True, "adamw_update_8bit_ (exp_avg)") or _state_close(
            *state_k[2:], *state_r[2:], False, "adamw_update_8bit_ (exp_avg_sq)")
        if problem:
            return problem
        p_k = p_r.clone()
    return None


CHECKS: dict[str, Callable] = {"quantize": check_quantize, "sgdsai": check_sgdsai, "adamw": check_adamw}
