"""SGD-SaI math as plain functions (arXiv 2412.11768, "No More Adam"; docs/sgdsai.md).

These are the reference for the optimizer class and for later fused kernels. Every function works in place on
the tensors it is given and never allocates optimizer state itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch import Tensor

from memopt.functional.finite import skipped
from memopt.functional.rounding import write_param_

# An all-equal gradient has std == 0 in exact arithmetic, but fp32 reductions leave a residue of about
# 1e-7 * rms. Below this relative floor the g-SNR is meaningless (it would be ~1e7 and explode the tensor),
# so we fall back to sqrt(numel), the value the g-SNR takes for a zero-mean gradient.
_STD_REL_FLOOR = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gsnr_from_stats(n: int, norm: float, std: float, eps: float = 1e-8) -> Optional[float]:
    """The g-SNR rule from a whole tensor's element count, L2 norm and unbiased std (the single-device and the
    sharded computations both end here): ``nan`` when non-finite, ``None`` for an all-zero gradient, ``1.0`` for
    one element, ``sqrt(n)`` when the std is rounding residue of an all-equal tensor, else ``norm / (std + eps)``."""
    if not (math.isfinite(norm) and math.isfinite(std)):
        return float("nan")
    if norm == 0.0:
        return None
    if n == 1:
        return 1.0
    if std <= _STD_REL_FLOOR * norm / math.sqrt(n):
        return math.sqrt(n)
    return norm / (std + eps)


def gsnr_bound(n: int) -> float:
    """The largest g-SNR :func:`gsnr_from_stats` gives a tensor of ``n`` elements: ``sqrt(n)`` for a std at or below
    the floor, else ``norm / (std + eps) < norm / std`` with ``std > floor · norm / sqrt(n)``, so below
    ``sqrt(n) / floor``. A g-SNR read from a checkpoint must be at most this (0: not measured yet)."""
    return math.sqrt(max(n, 1)) / _STD_REL_FLOOR


def gsnr(grad: Tensor, eps: float = 1e-8) -> Optional[float]:
    """Gradient signal-to-noise ratio ``||g||_2 / (std(g) + eps)`` of one whole tensor, as a Python float.

    ``std`` is the unbiased standard deviation over all elements, computed in fp32 (fp64 for fp64 grads).
    Costs one host synchronisation; SGD-SaI calls it once per tensor.

    Returns:
        ``None`` when the gradient is all zero (the caller defers the scale to the first non-zero gradient,
        so a LoRA ``A`` matrix behind a zero-initialised ``B`` is not frozen forever);
        ``sqrt(numel)`` when ``numel == 1`` or the entries are all equal (std numerically zero), where the
        ratio is undefined; the ratio itself otherwise. A non-finite gradient gives ``nan``.
    """
    n = grad.numel()
    if n == 0:
        raise ValueError("gsnr() of an empty tensor is undefined")
    g = grad.detach()
    if g.dtype != compute_dtype(g.dtype):
        g = g.to(compute_dtype(g.dtype))
    norm_t = torch.linalg.vector_norm(g)
    if n == 1:
        return gsnr_from_stats(1, norm_t.item(), 0.0, eps)
    norm, std = torch.stack([norm_t, torch.std(g)]).tolist()
    return gsnr_from_stats(n, norm, std, eps)


# Below this tensor mean square the gradient is treated as all zero (it is ~1e-30 of fp32's smallest normal).
_TINY = 1e-30


def factored_scales(grad: Tensor, *, reduce_columns=None) -> tuple[Tensor, Tensor]:
    """The factors of :func:`normalized_gradient`'s RMS estimate ``d_ij = r_i · c_j`` of a tensor of two or more
    dimensions viewed as ``rows × rest``: ``r = sqrt(R_i)`` shaped ``(rows, 1)`` and ``c = sqrt(C_j / M)`` shaped
    ``(1, rest)``, in fp32 (fp64 for fp64). The sums of squares are taken in pieces of whole rows
    (:func:`normalized_ranges`), so no temporary is as large as the gradient."""
    from memopt.functional.quantize import scratch

    cdt = compute_dtype(grad.dtype)
    g2 = grad.detach().reshape(grad.shape[0], -1)
    rows, cols = g2.shape
    row_ss = torch.empty(rows, dtype=cdt, device=g2.device)
    col_ss = torch.zeros(cols, dtype=cdt, device=g2.device)
    for r0, r1 in normalized_ranges(grad):
        piece = g2[r0:r1].to(cdt)
        sq = torch.mul(piece, piece, out=scratch(piece.numel(), cdt, g2.device).view(piece.shape))
        torch.sum(sq, 1, out=row_ss[r0:r1])
        col_ss.add_(sq.sum(0))
    if reduce_columns is not None:
        col_ss, rows = reduce_columns(col_ss, rows)
    col_ms = col_ss / max(rows, 1)
    ms = col_ms.mean().clamp_min(_TINY)
    return row_ss.div_(cols).sqrt_()[:, None], col_ms.div_(ms).sqrt_()[None, :]


def _normalize_into(out: Tensor, g: Tensor, r: Tensor, c: Tensor, eps: float, clip: Optional[float]) -> Tensor:
    """``out = clamp(g / (r · c + eps), -clip, clip)`` for rows of a 2-D view (``out`` may not alias ``g``)."""
    d = torch.mul(r, c, out=out).add_(eps)
    torch.div(g, d, out=d)
    return d.clamp_(-clip, clip) if clip is not None else d


def normalized_gradient(grad: Tensor, eps: float = 1e-8, *, clip: Optional[float] = None,
                        reduce_columns=None) -> Tensor:
    """The gradient divided, element by element, by an estimate of its RMS: the update direction of
    ``scale="factored"`` (docs/sgdsai.md).

    A tensor of two or more dimensions is viewed as ``rows × rest`` (``shape[0]`` rows). With ``R_i`` the mean
    square of row i, ``C_j`` that of column j and ``M`` that of the whole tensor, the RMS of element (i, j) is
    estimated by the rank-1 ("factored") form ``d_ij = sqrt(R_i · C_j / M)`` (Adafactor's factorisation,
    arXiv 1804.04235, here of the current gradient alone: no state), and the result is ``g_ij / (d_ij + eps)``.
    A vector is divided by its own magnitude, ``g / (|g| + eps)``. Computed in fp32 (fp64 for fp64); an all-zero
    gradient gives zeros.

    Args:
        clip: clamp every element of the result to ``[-clip, clip]`` (``None``: no clamp). The rank-1 estimate
            is too small for the few elements far above their row's and column's scale; clipping bounds their
            step, as Adam's per-element normalisation does.
        reduce_columns: for a tensor sharded by rows over several processes (FSDP2): a function
            ``(column_sums_of_squares, local_rows) -> (global sums, global rows)`` so every rank divides by the
            statistics of the whole tensor.
    """
    if grad.dim() < 2:
        g = grad.detach().to(compute_dtype(grad.dtype))
        return g / (g.abs() + eps)  # |u| <= 1: nothing to clip
    r, c = factored_scales(grad, reduce_columns=reduce_columns)
    g2 = grad.detach().reshape(grad.shape[0], -1)
    u = torch.empty(g2.shape, dtype=c.dtype, device=g2.device)
    for r0, r1 in normalized_ranges(grad):
        _normalize_into(u[r0:r1], g2[r0:r1].to(c.dtype), r[r0:r1], c, eps, clip)
    return u.reshape(grad.shape)


def normalized_ranges(grad: Tensor) -> list[tuple[int, int]]:
    """The row pieces in which :func:`factored_scales`, :func:`normalized_gradient` and :func:`normalized_pieces`
    work (two or more dimensions)."""
    from memopt.functional.quantize import row_ranges

    return row_ranges((grad.shape[0], grad.numel() // max(grad.shape[0], 1)))


def normalized_pieces(grad: Tensor, eps: float = 1e-8, *, clip: Optional[float] = None):
    """:func:`normalized_gradient` of a tensor of two or more dimensions one piece of whole rows at a time: yields
    ``(r0, r1, u)`` with ``u`` the rows ``r0:r1`` (viewed as ``rows × rest``) in ``grad``'s dtype, equal bit for bit
    to ``normalized_gradient(grad, eps, clip=clip).to(grad.dtype)`` there. The CPU update of ``scale="factored"``
    applies each piece before the next is computed: the normalised gradient never exists whole, and each piece is
    still in the cache when it is used. A piece lives in a reused buffer (:func:`memopt.functional.quantize.scratch`):
    it is valid until the next is yielded."""
    from memopt.functional.quantize import scratch

    r, c = factored_scales(grad)
    g2 = grad.detach().reshape(grad.shape[0], -1)
    for r0, r1 in normalized_ranges(grad):
        out = scratch((r1 - r0) * g2.shape[1], c.dtype, g2.device).view(r1 - r0, g2.shape[1])
        u = _normalize_into(out, g2[r0:r1].to(c.dtype), r[r0:r1], c, eps, clip)
        yield r0, r1, u.to(grad.dtype)


def _update_low_precision_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    *,
    alpha: float,
    decay: float,
    momentum: float,
    first_step: bool,
    stochastic_rounding: bool = False,
) -> None:
    cdt = compute_dtype(param.dtype)
    p = param.to(cdt)
    g = grad.to(cdt)
    if decay != 1.0:
        p.mul_(decay)
    if momentum_buffer is None:
        upd = g
    else:
        if first_step:
            upd = g  # the buffer already holds g (rounded to its dtype); use the exact value for this step
        else:
            upd = momentum_buffer.to(cdt, copy=True).lerp_(g, 1.0 - momentum)
            momentum_buffer.copy_(upd)
    p.add_(upd, alpha=alpha)
    write_param_(param, p, stochastic_rounding)


def sgdsai_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    *,
    lr: float,
    scale: float,
    momentum: float,
    weight_decay: float,
    maximize: bool = False,
    first_step: bool = False,
    stochastic_rounding: bool = False,
    finite: Optional[Tensor] = None,
) -> None:
    """One SGD-SaI step of one tensor, in place.

    ``θ ← θ(1 − lr·wd);  m ← g (first step) or β m + (1 − β) g;  θ ← θ − lr·scale·m``.

    Args:
        param: the parameter (fp32, bf16, fp16 or fp64); low-precision params are updated in fp32 math.
        grad: its gradient, same shape.
        momentum_buffer: the momentum state, or ``None`` when ``momentum == 0`` (plain SaI-scaled SGD).
            On the first step the caller has already filled it with ``grad``; ``first_step=True`` skips the EMA.
        lr, scale, momentum, weight_decay: as in the spec; ``scale`` is the final per-tensor factor.
        maximize: ascend instead of descend. The buffer keeps the momentum of the raw gradient and the sign is
            applied to the update, which is exact (negation commutes with lerp) and needs no temporary.
        stochastic_rounding: round the bf16 parameter write stochastically (no effect on other dtypes).
        finite: ``None``, or a one-element bool tensor: ``False`` leaves param and buffer unchanged
            (:mod:`memopt.functional.finite`; the fused kernel reads it on the device).
    """
    if skipped(finite, param):
        return
    alpha = (lr * scale) if maximize else -(lr * scale)
    decay = 1.0 - lr * weight_decay
    same = param.dtype == compute_dtype(param.dtype) and grad.dtype == param.dtype
    if momentum_buffer is not None:
        same = same and momentum_buffer.dtype == param.dtype
    if not same:
        _update_low_precision_(
            param, grad, momentum_buffer, alpha=alpha, decay=decay, momentum=momentum, first_step=first_step,
            stochastic_rounding=stochastic_rounding,
        )
        return
    if decay != 1.0:
        param.mul_(decay)
    if momentum_buffer is None:
        param.add_(grad, alpha=alpha)
        return
    if not first_step:
        momentum_buffer.lerp_(grad, 1.0 - momentum)
    param.add_(momentum_buffer, alpha=alpha)


def sgdsai_update_foreach_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Optional[Sequence[Tensor]],
    *,
    lr: float,
    scales: Sequence[float],
    momentum: float,
    weight_decay: float,
    maximize: bool = False,
    first_steps: Sequence[bool],
    stochastic_rounding: bool = False,
) -> None:
    """Multi-tensor form of :func:`sgdsai_update_`; gives bit-identical results.

    Tensors whose param, grad and buffer share one full-precision dtype go through ``torch._foreach_*`` ops
    (one launch per op and device on GPU); the parameter update is batched per distinct ``lr·scale``.
    Tensors that need a cast (bf16/fp16 params or state) take the per-tensor path, which holds one fp32
    temporary at a time instead of one for the whole model.
    """
    n = len(params)
    if not (len(grads) == n == len(scales) == len(first_steps)) or (
        momentum_buffers is not None and len(momentum_buffers) != n
    ):
        raise ValueError("params, grads, momentum_buffers, scales and first_steps must have the same length")
    decay = 1.0 - lr * weight_decay
    sign = 1.0 if maximize else -1.0
    fast: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, (p, g) in enumerate(zip(params, grads)):
        m = None if momentum_buffers is None else momentum_buffers[i]
        full = p.dtype == compute_dtype(p.dtype) and g.dtype == p.dtype and (m is None or m.dtype == p.dtype)
        if full:
            fast[(p.device, p.dtype)].append(i)
        else:
            sgdsai_update_(
                p, g, m, lr=lr, scale=scales[i], momentum=momentum, weight_decay=weight_decay,
                maximize=maximize, first_step=first_steps[i], stochastic_rounding=stochastic_rounding,
            )
    for idx in fast.values():
        ps = [params[i] for i in idx]
        if decay != 1.0:
            torch._foreach_mul_(ps, decay)
        if momentum_buffers is None:
            sources = [grads[i] for i in idx]
        else:
            sources = [momentum_buffers[i] for i in idx]
            ema = [k for k, i in enumerate(idx) if not first_steps[i]]
            if ema:
                torch._foreach_lerp_([sources[k] for k in ema], [grads[idx[k]] for k in ema], 1.0 - momentum)
        by_alpha: dict[float, list[int]] = defaultdict(list)
        for k, i in enumerate(idx):
            by_alpha[sign * lr * scales[i]].append(k)
        for alpha, ks in by_alpha.items():
            torch._foreach_add_([ps[k] for k in ks], [sources[k] for k in ks], alpha=alpha)


def sgdsai_update_8bit_(
    param: Tensor,
    grad: Tensor,
    codes: Tensor,
    absmax: Tensor,
    *,
    lr: float,
    scale: float,
    momentum: float,
    weight_decay: float,
    maximize: bool = False,
    first_step: bool = False,
    blocksize: int = 256,
    code: Optional[Tensor] = None,
    stochastic_rounding: bool = False,
    finite: Optional[Tensor] = None,
) -> None:
    """:func:`sgdsai_update_` with the momentum held as blockwise 8-bit codes + one fp32 absmax per block (row
    blocks: :func:`memopt.functional.quantize.quantize_rows`).

    Per tensor: dequantize the momentum to fp32, take the EMA with the fp32 gradient (``m = g`` on the first
    step), update the parameter with that fp32 momentum, then re-quantize it against the NEW block absmax
    (nearest code) into ``codes``/``absmax`` in place. The fused kernel does the same per block in registers.
    ``grad`` must be finite unless ``finite`` (as in :func:`sgdsai_update_`) says to skip the update.
    """
    from memopt.functional.quantize import dequantize_rows, in_row_pieces, quantize_rows

    if skipped(finite, param):
        return
    if in_row_pieces(sgdsai_update_8bit_, param, grad, codes, absmax, lr=lr, scale=scale,
                     momentum=momentum, weight_decay=weight_decay, maximize=maximize, first_step=first_step,
                     blocksize=blocksize, code=code, stochastic_rounding=stochastic_rounding):
        return

    cdt = compute_dtype(param.dtype)
    g = grad.to(cdt)
    if first_step:
        m = g.clone() if g is grad else g
    else:
        m = dequantize_rows(codes, absmax, code, blocksize, dtype=cdt).lerp_(g, 1.0 - momentum)
    # quantize first: a non-finite momentum (corrupt state) raises here, before the parameter is written
    new_codes, new_absmax = quantize_rows(m, code, blocksize)
    p = param if param.dtype == cdt else param.to(cdt)
    decay = 1.0 - lr * weight_decay
    if decay != 1.0:
        p.mul_(decay)
    p.add_(m, alpha=(lr * scale) if maximize else -(lr * scale))
    if p is not param:
        write_param_(param, p, stochastic_rounding)
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)
