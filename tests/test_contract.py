"""The optimizer contract (docs/reliability.md), written once and run for every registered optimizer."""

import copy
import math
import io
import pickle

import pytest
import torch

import memopt
from memopt import create_optimizer, list_optimizers, state_bytes
from memopt.optim._matrix import MatrixOptimizer
from tiny import switch_cpu_loops

NAMES = list_optimizers()


def test_registry_lists_the_builtin_optimizers():
    assert "sgdsai" in NAMES
    with pytest.raises(ValueError, match="already registered"):
        memopt.register_optimizer("sgdsai", torch.optim.SGD, arg_types={})
    with pytest.raises(ValueError, match="lower-case"):
        memopt.register_optimizer("SGD-SaI", torch.optim.SGD, arg_types={})


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    return m.to(dtype)


def _loss(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 8, generator=g).to(next(m.parameters()).dtype)
    return (m(x).float() ** 2).mean()


def _steps(m, opt, n, start=0):
    for t in range(start, start + n):
        opt.zero_grad()
        _loss(m, t).backward()
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_negative_lr_is_refused(name):
    with pytest.raises(ValueError, match="lr"):
        create_optimizer(name, _model().parameters(), lr=-1.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_trains_and_stays_finite(name, dtype):
    m = _model(dtype=dtype)
    opt = create_optimizer(name, m.parameters(), lr=1e-2)
    first = _loss(m, 0).item()
    for _ in range(20):
        opt.zero_grad()
        _loss(m, 0).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert _loss(m, 0).item() < first


@pytest.mark.parametrize("name", NAMES)
def test_skips_params_without_grad_frozen_params_zero_size_and_empty_groups(name):
    m = _model()
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    unused = torch.nn.Parameter(torch.randn(2, 2))
    opt = create_optimizer(name, [{"params": list(m.parameters()) + [frozen, empty, unused]}, {"params": []}])
    f0, u0 = frozen.detach().clone(), unused.detach().clone()
    _loss(m).backward()
    empty.grad = torch.zeros(0, 4)
    opt.step()
    assert torch.equal(frozen, f0) and torch.equal(unused, u0)
    assert unused not in opt.state and frozen not in opt.state


def _matmul_path(opt) -> bool:
    """Projection optimizers multiply by a basis: BLAS may sum in another order for another memory layout."""
    return isinstance(opt, MatrixOptimizer)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cpu_loops", [False, True])
def test_non_contiguous_params_and_grads(name, seed, cpu_loops, monkeypatch):
    # The fused CPU loops take contiguous tensors only. With them off both layouts run the same PyTorch update (bit
    # for bit where it is elementwise); with them on the contiguous one may take a loop, equal to the PyTorch
    # update within a rounding (tests/test_cpu_kernels.py).
    switch_cpu_loops(monkeypatch, cpu_loops)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=gen)
    p = torch.nn.Parameter(base.t().contiguous().t())  # non-contiguous layout
    assert not p.is_contiguous()
    ref = torch.nn.Parameter(base.clone())
    o1, o2 = create_optimizer(name, [p]), create_optimizer(name, [ref])
    for _ in range(2):  # a first step (state created) and one past it
        g = torch.randn(8, 6, generator=gen).t()
        p.grad, ref.grad = g, g.contiguous()
        torch.manual_seed(0)  # optimizers that draw random subspaces draw the same one
        o1.step()
        torch.manual_seed(0)
        o2.step()
    # bit-identical where the update is elementwise on one path; through a matmul or across paths to rounding
    tol = dict(atol=1e-6, rtol=1e-6) if _matmul_path(o1) or cpu_loops else dict(atol=0, rtol=0)
    torch.testing.assert_close(p.detach(), ref.detach(), **tol)


def test_every_test_starts_from_the_same_seeded_rng():
    # conftest seeds the global generators before each test; without it a test's draws depend on what ran before
    expected = torch.rand(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_steps(name):
    m = _model()
    opt = create_optimizer(name, list(m[0].parameters()))
    _steps(m, opt, 2)
    opt.add_param_group({"params": list(m[2].parameters()), "lr": 1e-3})
    w0 = m[2].weight.detach().clone()
    _steps(m, opt, 1, start=2)
    assert not torch.equal(m[2].weight, w0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip_is_bit_identical(name):
    m1, m2 = _model(), _model()
    o1 = create_optimizer(name, m1.parameters(), lr=1e-2)
    _steps(m1, o1, 3)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2.load_state_dict(ck["model"])
    o2 = create_optimizer(name, m2.parameters(), lr=1e-2)
    o2.load_state_dict(ck["opt"])
    _steps(m1, o1, 3, start=3)
    _steps(m2, o2, 3, start=3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_pickle_and_zero_grad(name):
    m = _model()
    opt = create_optimizer(name, m.parameters())
    _steps(m, opt, 1)
    clone = copy.deepcopy(opt)
    assert state_bytes(clone) == state_bytes(opt)
    restored = pickle.loads(pickle.dumps(opt))
    assert len(restored.state_dict()["state"]) == len(opt.state_dict()["state"])
    _loss(m).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    runs = []
    for _ in range(2):
        m = _model(seed=3)
        opt = create_optimizer(name, m.parameters())
        _steps(m, opt, 4)
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skips_inf_steps(name):
    m = _model()
    opt = create_optimizer(name, m.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    scaler.scale(_loss(m)).backward()
    m[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert scaler.get_scale() < 2.0**10
    opt.zero_grad()
    scaler.scale(_loss(m)).backward()
    scaler.step(opt)
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_training(name):
    m = _model()
    opt = create_optimizer(name, m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(m)
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_and_meta_parameters_get_one_clear_message(name):
    p = torch.nn.Parameter(torch.randn(10, 4))
    opt = create_optimizer(name, [p])
    p.grad = torch.randn(10, 4).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.isfinite(p).all()
    q = torch.nn.Parameter(torch.empty(10, 4, device="meta"))
    opt = create_optimizer(name, [q])
    q.grad = torch.empty(10, 4, device="meta")
    with pytest.raises(RuntimeError, match="on the meta device"):
        opt.step()
    # the refusal comes before any update: a group before the offending one is left as it was
    a, b = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(10, 4))
    opt = create_optimizer(name, [{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.randn(16, 8), torch.randn(10, 4).to_sparse()
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(a.detach(), before) and not opt.state.get(a)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_after_real_steps_is_exactly_the_state_layout(name, dtype):
    # the one description of every optimizer's state: what it creates, what checkpoints are checked against and
    # what memopt plan counts
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4)).to(dtype)
    small = {"min_8bit_size": 256} if name.endswith("_8bit") else {}  # the subspaces of this model are small
    opt = create_optimizer(name, m.parameters(), lr=1e-3, **small)
    for t in range(2):
        opt.zero_grad()
        x = torch.randn(6, 80, generator=torch.Generator().manual_seed(t)).to(dtype)
        (m(x).float() ** 2).mean().backward()
        opt.step()
    expected_bytes = 0
    for group in opt.param_groups:
        for p in group["params"]:
            layout = {k: (tuple(s), d) for k, (s, d) in opt.state_layout(group, p).items()}
            held = {k: (tuple(v.shape), v.dtype) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            # FRUGAL's blocks: a tensor outside this round's active set holds no state at all
            inactive = group.get("selection") == "blocks" and p.dim() == 2 and not held
            assert held == layout or inactive, (tuple(p.shape), held, layout)
            expected_bytes += 0 if inactive else sum(math.prod(s) * d.itemsize for s, d in layout.values())
    assert state_bytes(opt) == expected_bytes
    if name.endswith("_8bit"):
        assert any(d == torch.uint8 for g in opt.param_groups for p in g["params"]
                   for _, d in opt.state_layout(g, p).values())


@pytest.mark.parametrize("name", NAMES)
def test_closure_runs_once_and_a_scheduler_sets_the_step(name):
    # torch's contract: step(closure) evaluates it once and returns its loss; an lr scheduler's factor 0 stops
    # every update (the lr reaches each parameter's step), factor 1 does not
    p = torch.nn.Parameter(torch.randn(32, 24))
    opt = create_optimizer(name, [p], lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None and len(calls) == 1
    for factor in (0.0, 1.0):
        q = torch.nn.Parameter(torch.randn(32, 24), requires_grad=True)
        opt = create_optimizer(name, [q, torch.nn.Parameter(torch.randn(24))], lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factor)
        before = q.detach().clone()
        for t in range(3):
            for x in opt.param_groups[0]["params"]:
                x.grad = torch.randn(x.shape)
            opt.step()
            sched.step()
        assert torch.equal(q.detach(), before) == (factor == 0.0), factor
