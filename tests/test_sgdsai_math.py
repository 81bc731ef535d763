import math

import pytest
import torch

from memopt import SGDSaI
from memopt.functional import gsnr
from reference_sgdsai import reference_sgdsai

SHAPES = [(7, 5), (33,), (4, 3, 2), (1,), (64, 16)]


def _run_memopt(params0, grads_per_step, **kw):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = SGDSaI(params, **kw)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def _random_problem(steps=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params0 = [0.25 * torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) * (0.1 + i) + 0.05 * i for i, s in enumerate(SHAPES)]
             for _ in range(steps)]
    return params0, grads


@pytest.mark.parametrize("scale", ["gsnr_max", "gsnr", "sqrt_numel"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_hand_written_reference(scale, foreach, momentum, maximize):
    params0, grads = _random_problem()
    lr = 1e-3 if scale == "gsnr_max" else 1e-4
    kw = dict(lr=lr, momentum=momentum, weight_decay=0.1, eps=1e-8, scale=scale, maximize=maximize)
    got, _ = _run_memopt(params0, grads, foreach=foreach, **kw)
    want = reference_sgdsai(params0, grads, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach().double(), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", ["gsnr_max", "gsnr", "sqrt_numel"])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.float16, None), (torch.bfloat16, "float32"),
                                                (torch.float32, "bfloat16")])
def test_foreach_equals_per_tensor_bitwise(scale, momentum, dtype, state_dtype):
    params0, grads = _random_problem(dtype=dtype)
    kw = dict(lr=1e-3, momentum=momentum, weight_decay=0.01, scale=scale, state_dtype=state_dtype)
    torch.manual_seed(0)  # bf16 writes round stochastically (default): same RNG stream for both paths
    a, oa = _run_memopt(params0, grads, foreach=False, **kw)
    torch.manual_seed(0)
    b, ob = _run_memopt(params0, grads, foreach=True, **kw)
    for x, y in zip(a, b):
        assert x.dtype == dtype
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        if momentum:
            assert torch.equal(oa.state[x]["momentum_buffer"], ob.state[y]["momentum_buffer"])


def test_low_precision_params_track_fp32_math():
    params0, grads = _random_problem()
    kw = dict(lr=1e-3, momentum=0.9, weight_decay=0.01, scale="gsnr_max")
    ref, _ = _run_memopt(params0, grads, **kw)
    bf, opt = _run_memopt([p.bfloat16() for p in params0], [[g.bfloat16() for g in s] for s in grads], **kw)
    for r, b in zip(ref, bf):
        assert b.dtype == torch.bfloat16 and opt.state[b]["momentum_buffer"].dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), r.detach(), atol=0.05, rtol=0.02)


def test_state_dtype_is_configurable():
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    opt = SGDSaI([p], state_dtype=torch.float32)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32


def test_gsnr_values():
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert gsnr(g, 0.0) == pytest.approx(g.norm().item() / g.std().item(), rel=1e-6)
    assert gsnr(torch.zeros(10)) is None
    assert gsnr(torch.tensor([5.0])) == 1.0
    assert gsnr(torch.full((100,), 0.1)) == pytest.approx(10.0)  # all equal: sqrt(numel), not 1e7
    assert math.isnan(gsnr(torch.tensor([1.0, float("nan")])))


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("state", ["fp32", "bf16_params"])
@pytest.mark.parametrize("clip", [3.0, 1.0, None])
def test_factored_mode_matches_hand_written_reference(momentum, maximize, state, clip):
    from reference_sgdsai import reference_factored

    params0, grads = _random_problem()
    # a tensor whose first gradients are zero starts later (LoRA A behind a zero B)
    grads[0][0] = torch.zeros(SHAPES[0])
    grads[1][0] = torch.zeros(SHAPES[0])
    kw = dict(lr=1e-3, momentum=momentum, weight_decay=0.1, eps=1e-8, maximize=maximize, clip=clip)
    if state == "bf16_params":
        params0 = [p.to(torch.bfloat16) for p in params0]
        grads = [[g.to(torch.bfloat16) for g in gs] for gs in grads]
    got, opt = _run_memopt(params0, grads, scale="factored", stochastic_rounding=False, **kw)
    want = reference_factored(params0, grads, **kw)
    tol = dict(atol=1e-6, rtol=1e-6) if state == "fp32" else dict(atol=2e-2, rtol=1e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach().double(), w.to(g.dtype).double(), **tol)
    assert opt.state[got[0]]["step"] == 3 and opt.state[got[1]]["step"] == 5


def test_factored_direction_is_scale_free_and_adam_like():
    from memopt.functional.sgdsai import normalized_gradient

    gen = torch.Generator().manual_seed(0)
    row_scale = 1 + 99 * torch.rand(64, 1, generator=gen)
    col_scale = (0.5 + torch.rand(1, 32, generator=gen)) * 1e-2
    g = torch.randn(64, 32, generator=gen) * row_scale * col_scale  # a rank-1 magnitude structure
    u = normalized_gradient(g)
    torch.testing.assert_close(normalized_gradient(g * 1e4), u, atol=1e-3, rtol=1e-3)  # up to eps: scale-free
    rms = u.square().mean().sqrt()
    assert 0.9 < float(rms) < 1.1  # an update of ~lr per element, whatever the gradient's size (as Adam's first step)
    assert torch.equal(normalized_gradient(torch.zeros(5, 7)), torch.zeros(5, 7))
    v = torch.tensor([3.0, -0.5, 0.0])
    torch.testing.assert_close(normalized_gradient(v), torch.tensor([1.0, -1.0, 0.0]), atol=1e-7, rtol=0)
