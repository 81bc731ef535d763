"""Property tests (hypothesis, derandomized: the same examples on every run) over inputs drawn to be awkward: block
contents with outliers, zeros, denormals and huge values for the 8-bit quantizer; gradient sequences with outliers,
all-zero steps and tiny scales for the 8-bit AdamW step, whose size must stay within what exact Adam can take."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memopt import AdamW8bit
from memopt.functional.quantize import create_dynamic_map, dequantize_blockwise, quantize_blockwise

SETTINGS = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
KINDS = ("normal", "zeros", "outlier", "denormal", "equal", "mixed", "huge")


def _values(kind: str, n: int, seed: int, fill: float) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "outlier":  # one value 1e7 times the others every 64 elements
        x = x * 1e-3
        x[::64] = 1e4
    elif kind == "denormal":
        x = x.sign() * 1e-40
    elif kind == "equal":
        x = torch.full((n,), fill)
    elif kind == "mixed":
        x = torch.cat([x[: n // 2] * 1e-8, x[n // 2:] * 1e3])
    elif kind == "huge":
        x = x.clamp(-4, 4) * 8e37
    return x


@settings(max_examples=150, **SETTINGS)
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 1200), seed=st.integers(0, 2**31 - 1),
       fill=st.floats(-6e4, 6e4, allow_nan=False), blocksize=st.sampled_from([16, 64, 256, 2048]),
       signed=st.booleans())
def test_quantize_round_trip_stays_within_half_a_code_gap(kind, n, seed, fill, blocksize, signed):
    x = _values(kind, n, seed, fill)
    x = x if signed else x.abs()
    code = create_dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, code, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and torch.isfinite(absmax).all()
    y = dequantize_blockwise(codes, absmax, code, blocksize)
    scale = absmax.repeat_interleave(blocksize)[:n]
    normed = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    upper = torch.bucketize(normed, code).clamp(1, code.numel() - 1)
    half_gap = (code[upper] - code[upper - 1]) / 2 * scale
    # half the gap between the two codes around each value, times the block maximum, within fp32 rounding
    assert torch.all((y - x).abs() <= half_gap * (1 + 1e-5) + 1e-45)


def _adam_bound(beta1: float, beta2: float, t: int) -> float:
    """The largest |m̂ / sqrt(v̂)| exact Adam reaches at step t from zero moments, whatever the gradients: by
    Cauchy-Schwarz |m_t| <= (1 - β1) sqrt(Σ_j (β1²/β2)^j) sqrt(v_t / (1 - β2)), j < t."""
    ratio = beta1 * beta1 / beta2
    series = t if ratio == 1 else (1 - ratio**t) / (1 - ratio)
    return (1 - beta1) / (1 - beta1**t) * math.sqrt((1 - beta2**t) / (1 - beta2) * series)


@settings(max_examples=40, **SETTINGS)
@given(steps=st.lists(st.tuples(st.sampled_from(("normal", "outlier", "zeros", "tiny", "sign_flip")),
                                st.integers(0, 2**31 - 1)), min_size=2, max_size=6),
       cols=st.sampled_from([256, 300, 576]))
def test_adamw_8bit_never_steps_farther_than_exact_adam_can(steps, cols):
    # 8-bit moments carry rounding (m to half a code, v up to a code's ratio below its value), so the bound gets a
    # factor of 2; a second moment decoded as 0 beside a non-zero first moment once stepped |m| / eps: 1e7 x it
    lr, beta1, beta2 = 1e-3, 0.9, 0.999
    w = torch.nn.Parameter(torch.zeros(8, cols))
    opt = AdamW8bit([w], lr=lr, betas=(beta1, beta2), weight_decay=0.0, min_8bit_size=1)
    previous = torch.zeros(8, cols)
    for t, (kind, seed) in enumerate(steps, start=1):
        g = torch.randn(8, cols, generator=torch.Generator().manual_seed(seed))
        if kind == "outlier":
            g[:, ::97] *= 1e4
        elif kind == "zeros":
            g.zero_()
        elif kind == "tiny":
            g *= 1e-12
        elif kind == "sign_flip":
            g = -previous
        previous = g
        before = w.detach().clone()
        w.grad = g
        opt.step()
        moved = (w.detach() - before).abs()
        assert torch.isfinite(w).all()
        assert float(moved.max()) <= 2 * lr * _adam_bound(beta1, beta2, t), (t, kind)


def test_the_bound_is_what_exact_adam_reaches():
    # the bound is tight: a gradient growing as (β2/β1)^t makes every term of Cauchy-Schwarz equal
    beta1, beta2 = 0.9, 0.999
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([w], lr=1.0, betas=(beta1, beta2), eps=0.0, weight_decay=0.0)
    for t in range(1, 8):
        before = w.detach().clone()
        w.grad = torch.tensor([(beta2 / beta1) ** t])
        opt.step()
        assert abs(float(before - w.detach()) - _adam_bound(beta1, beta2, t)) < 1e-5 * _adam_bound(beta1, beta2, t)
