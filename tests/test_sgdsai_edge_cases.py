"""Every edge case of docs/sgdsai.md, each with a test that fails on the reference implementations' behaviour."""

import io

import pytest
import torch

from memopt import SGDSaI, state_bytes


def _param(*shape, value=None, seed=0):
    if value is not None:
        return torch.nn.Parameter(torch.full(shape, float(value)))
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def test_numel_one_falls_back_to_sqrt_numel_and_does_not_freeze_others():
    # Reference: s = |g| / 1e-8 = 5e7 for the scalar; with the global max every other tensor gets scale ~1e-5.
    scalar, matrix = _param(1, value=1.0), _param(16, 16)
    opt = SGDSaI([scalar, matrix], lr=0.1, momentum=0.9, weight_decay=0.0, scale="gsnr_max")
    scalar.grad = torch.tensor([0.5])
    g = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    matrix.grad = g.clone()
    before = matrix.detach().clone()
    opt.step()
    assert opt.state[scalar]["gsnr"] == 1.0
    # the matrix has the largest g-SNR, so it moves at exactly lr
    torch.testing.assert_close(matrix.detach(), before - 0.1 * g)
    s_mat = opt.state[matrix]["gsnr"]
    torch.testing.assert_close(scalar.detach(), torch.tensor([1.0 - 0.1 * 0.5 / s_mat]))


def test_all_equal_gradient_uses_sqrt_numel_not_1e7():
    p = _param(10, 10, value=0.0)
    opt = SGDSaI([p], lr=1e-3, momentum=0.0, weight_decay=0.0, scale="gsnr")
    p.grad = torch.full((10, 10), 0.1)
    opt.step()
    assert opt.state[p]["gsnr"] == pytest.approx(10.0)
    torch.testing.assert_close(p.detach(), torch.full((10, 10), -1e-3 * 10.0 * 0.1))


def test_all_zero_first_gradient_defers_the_scale_instead_of_freezing():
    # LoRA A behind a zero-initialised B: the reference computes s = 0 and A never moves.
    a = _param(4, 8)
    opt = SGDSaI([a], lr=0.1, momentum=0.9, weight_decay=0.1, scale="gsnr_max")
    a0 = a.detach().clone()
    a.grad = torch.zeros(4, 8)
    opt.step()
    assert "gsnr" not in opt.state[a] and "momentum_buffer" not in opt.state[a]
    torch.testing.assert_close(a.detach(), a0 * (1 - 0.1 * 0.1))  # decoupled decay still applies
    g = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    a.grad = g.clone()
    a1 = a.detach().clone()
    opt.step()
    assert opt.state[a]["gsnr"] > 0
    torch.testing.assert_close(opt.state[a]["momentum_buffer"], g)  # m = g at its first real step
    torch.testing.assert_close(a.detach(), a1 * (1 - 0.01) - 0.1 * g)
    assert not torch.equal(a.detach(), a1 * (1 - 0.01))


def test_grad_none_then_present_joins_the_running_max():
    early, late = _param(8, 8, seed=1), _param(64, 64, seed=2)
    opt = SGDSaI([early, late], lr=0.1, momentum=0.9, weight_decay=0.0, scale="gsnr_max")
    gen = torch.Generator().manual_seed(5)
    early.grad = torch.randn(8, 8, generator=gen)
    opt.step()
    assert late not in opt.state or not opt.state[late]
    s_early = opt.state[early]["gsnr"]
    # late tensor arrives with a larger g-SNR (more elements): it becomes the max, early's scale drops below 1
    late.grad = torch.randn(64, 64, generator=gen)
    early.grad = torch.randn(8, 8, generator=gen)
    e_before, l_before = early.detach().clone(), late.detach().clone()
    m_early = 0.9 * opt.state[early]["momentum_buffer"] + 0.1 * early.grad
    opt.step()
    s_late = opt.state[late]["gsnr"]
    assert s_late > s_early
    torch.testing.assert_close(late.detach(), l_before - 0.1 * late.grad)  # scale exactly 1
    torch.testing.assert_close(early.detach(), e_before - 0.1 * (s_early / s_late) * m_early)


def test_grad_none_is_skipped_without_state():
    p, q = _param(3, 3), _param(3, 3)
    opt = SGDSaI([p, q], momentum=0.9)
    p.grad = torch.randn(3, 3)
    q0 = q.detach().clone()
    opt.step()
    assert q not in opt.state
    assert torch.equal(q.detach(), q0)


def test_param_groups_with_different_hyperparameters_and_empty_groups():
    p, q = _param(6, 6, seed=1), _param(6, 6, seed=2)
    opt = SGDSaI([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.0, "weight_decay": 0.0},
                  {"params": []}], scale="sqrt_numel")
    p0, q0 = p.detach().clone(), q.detach().clone()
    p.grad, q.grad = torch.randn(6, 6), torch.randn(6, 6)
    opt.step()
    assert torch.equal(q.detach(), q0)  # lr 0
    assert (p.detach() - p0).abs().min() > 0  # lr 0.1 moves every element
    r = _param(2, 2)
    opt.add_param_group({"params": [r], "momentum": 0.0})
    r.grad = torch.ones(2, 2)
    r0 = r.detach().clone()
    opt.step()
    assert "momentum_buffer" not in opt.state[r]  # momentum=0 in its group: no state tensor
    lr, wd = opt.defaults["lr"], opt.defaults["weight_decay"]
    torch.testing.assert_close(r.detach(), r0 * (1 - lr * wd) - lr * 2.0 * torch.ones(2, 2))


def test_momentum_zero_keeps_no_state_tensors():
    p = _param(32, 32)
    opt = SGDSaI([p], momentum=0.0)
    p.grad = torch.randn(32, 32)
    opt.step()
    assert state_bytes(opt) == 0


def test_state_bytes_is_four_bytes_per_param_in_fp32():
    params = [_param(10, 7), _param(13), _param(5, 5, 5)]
    opt = SGDSaI(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert state_bytes(opt) == 4 * sum(p.numel() for p in params)


def _train(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("scale", ["gsnr_max", "gsnr", "sqrt_numel"])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, "float32")])
def test_save_and_resume_is_bit_identical_through_weights_only_load(scale, dtype, state_dtype):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(8, 8, generator=gen).to(dtype), torch.randn(5, generator=gen).to(dtype),
            torch.randn(4, 4, generator=gen).to(dtype)]
    # third tensor: no grad, then a zero grad, then real grads -> its scale arrives after the checkpoint
    grads = [[torch.randn(8, 8, generator=gen).to(dtype), torch.randn(5, generator=gen).to(dtype),
              None if t == 0 else (torch.zeros(4, 4, dtype=dtype) if t < 4
                                   else torch.randn(4, 4, generator=gen).to(dtype))]
             for t in range(8)]
    kw = dict(lr=1e-2, scale=scale, state_dtype=state_dtype)

    torch.manual_seed(0)  # bf16 writes round stochastically (default): same RNG stream for both runs
    straight = [torch.nn.Parameter(t.clone()) for t in init]
    opt = SGDSaI(straight, **kw)
    _train(opt, straight, grads)

    torch.manual_seed(0)
    first = [torch.nn.Parameter(t.clone()) for t in init]
    opt1 = SGDSaI(first, **kw)
    _train(opt1, first, grads[:3])
    buf = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "params": [p.detach() for p in first]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = SGDSaI(resumed, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for p in resumed[:2]:
        expect = torch.float32 if state_dtype == "float32" else dtype
        assert opt2.state[p]["momentum_buffer"].dtype == expect  # no silent cast to the param dtype
    _train(opt2, resumed, grads[3:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_load_refuses_foreign_or_mismatched_checkpoints():
    p = _param(4, 4)
    adam = torch.optim.AdamW([p])
    p.grad = torch.randn(4, 4)
    adam.step()
    opt = SGDSaI([p])
    with pytest.raises(ValueError, match="not written by SGDSaI"):
        opt.load_state_dict(adam.state_dict())
    other = _param(2, 8)
    src = SGDSaI([other])
    other.grad = torch.randn(2, 8)
    src.step()
    with pytest.raises(ValueError, match="another model"):
        SGDSaI([p]).load_state_dict(src.state_dict())


def test_nonfinite_gradient_skips_only_that_tensor_and_keeps_state_clean():
    p, q = _param(4, 4, seed=1), _param(4, 4, seed=2)
    opt = SGDSaI([p, q], lr=0.1)
    p.grad, q.grad = torch.randn(4, 4), torch.randn(4, 4)
    opt.step()
    p_before, buf_before = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    q_before = q.detach().clone()
    bad = torch.randn(4, 4)
    bad[1, 2] = float("nan")
    p.grad, q.grad = bad, torch.randn(4, 4)
    opt.step()
    assert torch.equal(p.detach(), p_before)
    assert torch.equal(opt.state[p]["momentum_buffer"], buf_before)
    assert not torch.equal(q.detach(), q_before)
    assert opt.nonfinite_skips == 1
    inf = torch.randn(4, 4)
    inf[0, 0] = float("inf")
    fresh = _param(4, 4, seed=3)
    opt.add_param_group({"params": [fresh]})
    fresh.grad = inf
    opt.step()
    assert fresh not in opt.state or "gsnr" not in opt.state[fresh]  # no g-SNR from a non-finite gradient
    assert torch.isfinite(fresh).all()


def test_nonfinite_check_can_be_disabled():
    p = _param(4, 4)
    opt = SGDSaI([p], check_finite=False)
    p.grad = torch.randn(4, 4)
    opt.step()
    g = torch.randn(4, 4)
    g[0, 0] = float("nan")
    p.grad = g
    opt.step()
    assert torch.isnan(p).any()


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=torch.tensor(0.1)), "lr"),
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"), (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(eps=0.0), "eps"), (dict(scale="adam"), "scale"), (dict(state_dtype="int8"), "state_dtype"),
    (dict(maximize="yes"), "maximize"), (dict(foreach=1), "foreach"),
])
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SGDSaI([_param(2)], **kwargs)


def test_refuses_duplicates_complex_sparse_and_integer_params():
    p = _param(3)
    with pytest.raises(ValueError, match="more than once"):
        SGDSaI([p, p])
    with pytest.raises(ValueError, match="complex"):
        SGDSaI([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="float32/bfloat16"):
        SGDSaI([torch.zeros(3, dtype=torch.int64)])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SGDSaI(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_lr_scheduler_changes_the_step():
    p = _param(4, 4)
    opt = SGDSaI([p], lr=0.1, momentum=0.0, weight_decay=0.0, scale="sqrt_numel")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.ones(4, 4)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    sched.step()
    torch.testing.assert_close(before - p.detach(), 0.1 * 4 * g)
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(before - p.detach(), 0.05 * 4 * g)
