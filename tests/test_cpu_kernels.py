"""The fused CPU updates (memopt.kernels.cpu, C loops) against their PyTorch specification (memopt.functional and
Lion's step): SGD-SaI's scale="factored" step bit for bit given the same statistics, and the statistics (sums of
squares, in double) within one fp32 rounding; 8-bit AdamW's state bit for bit and its parameters within one rounding
of the update (torch's CPU sqrt is not correctly rounded, C's is); 32-bit AdamW state on torch's fused kernel; Lion
bit for bit; AdamSN's moment bit for bit and its subset statistic within a rounding; the finite check the statistics
make; the dispatch, its refusals and its faults."""

import logging

import pytest
import torch

from memopt import AdamW8bit, SGDSaI
from memopt.functional import sgdsai as ref
from memopt.functional.adamw import adamw_update_8bit_
from memopt.functional.quantize import default_code, quantize_rows
from memopt.kernels import cpu
from tiny import switch_cpu_loops

CPU = torch.device("cpu")
# rows of whole blocks, rows with a short last block (576 = 2 x 256 + 64, the demo model's width), short rows,
# a 3-D tensor, and one larger than a piece of the PyTorch path (several pieces there)
SHAPES = [(64, 512), (40, 576), (17, 515), (3, 8, 300), (300, 576)]


def _factored_reference(p, g, state, *, lr, scale, momentum, weight_decay, maximize, eps, clip, blocksize):
    """What SGDSaI's PyTorch path does with one tensor: the normalised gradient in pieces, applied piece by piece."""
    common = dict(lr=lr, scale=scale, momentum=momentum, weight_decay=weight_decay, maximize=maximize,
                  first_step=False)
    rows = [t.view(t.shape[0], -1) for t in (p, *state)]
    for r0, r1, u in ref.normalized_pieces(g, eps, clip=clip):
        piece = [t[r0:r1] for t in rows]
        if len(state) == 2:
            ref.sgdsai_update_8bit_(piece[0], u, *piece[1:], blocksize=blocksize, **common)
        else:
            ref.sgdsai_update_(piece[0], u, piece[1], **common)


def _state(shape, eight, gen):
    m = torch.randn(shape, generator=gen) * 0.1
    return list(quantize_rows(m, None, 256)) if eight else [m]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eight", [False, True], ids=["fp32", "8bit"])
@pytest.mark.parametrize("momentum,weight_decay,maximize,clip", [(0.9, 0.0, False, 3.0), (0.3, 0.1, True, None)])
def test_factored_sgdsai_equals_the_pytorch_path_bit_for_bit(shape, eight, momentum, weight_decay, maximize, clip):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen) * 3
    g.view(-1)[::97] *= 50  # elements far above their row's and column's scale: clipped
    state = _state(shape, eight, gen)
    kw = dict(lr=1e-2, scale=1.0 / (1.0 - 0.9**3), momentum=momentum, weight_decay=weight_decay, maximize=maximize,
              eps=1e-8, clip=clip, blocksize=256)
    p_fast, state_fast = p.clone(), [t.clone() for t in state]
    _factored_reference(p, g, state, **kw)
    r, c = ref.factored_scales(g)
    assert cpu.factored_sgdsai_(p_fast, g, state_fast, r=r, c=c, **kw)
    assert torch.equal(p_fast, p)
    for fast, slow in zip(state_fast, state):
        assert torch.equal(fast, slow)
    # its own factors, from sums in double: the same within the statistics' rounding
    p_own, state_own = p_fast.clone(), [t.clone() for t in state_fast]
    cpu.factored_sgdsai_(p_own, g, state_own, **kw)
    cpu.factored_sgdsai_(p_fast, g, state_fast, r=r, c=c, **kw)
    if eight:
        assert float((p_own - p_fast).abs().max()) <= 1e-2 * 0.02 * 3 / (1 - 0.9**3)  # a code step at most
    else:
        torch.testing.assert_close(p_own, p_fast, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state_own[0], state_fast[0], rtol=1e-5, atol=1e-6)


def _adamw_state(shape, gen, outliers=False):
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 1e-2
    if outliers:  # one v of 1e5 every 97 elements: most small v of those blocks are stored on the zero code
        v.view(-1)[::97] = 1e5
    return [*quantize_rows(m, default_code(True, CPU), 256), *quantize_rows(v, default_code(False, CPU), 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("maximize,weight_decay,outliers", [(False, 0.0, False), (True, 0.1, False),
                                                            (False, 0.0, True)])
def test_adamw_8bit_state_bit_for_bit_and_parameters_within_one_rounding(shape, maximize, weight_decay, outliers):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    state = _adamw_state(shape, gen, outliers)
    lifted = int(((state[2] == 0) & (state[0] != 127)).sum())  # v on its zero code where m is not 0: lifted
    assert (lifted > 0) == outliers
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, step=7, maximize=maximize)
    p_fast, state_fast = p.clone(), [t.clone() for t in state]
    before = p.clone()
    adamw_update_8bit_(p, g, *state, **kw)
    cpu.adamw_update_8bit_(p_fast, g, *state_fast, **kw)
    for fast, slow in zip(state_fast, state):
        assert torch.equal(fast, slow)
    # the two differ only in sqrt(v) (one rounding): the step differs by at most ~2^-23 of itself, which the
    # parameter's own rounding may turn into one unit in its last place
    step = (p - before).abs()
    ulp = torch.finfo(torch.float32).eps * p.abs()
    assert ((p_fast - p).abs() <= 2 * torch.finfo(torch.float32).eps * step + ulp).all()
    assert not torch.equal(p, before)


@pytest.mark.parametrize("shape", [(1000,), (7,), (40, 576), (3, 8, 30)])
@pytest.mark.parametrize("maximize,weight_decay", [(False, 0.0), (True, 0.1)])
def test_adamw_with_fp32_moments_is_torch_fused_adamw_and_the_pytorch_form_but_for_one_rounding(
        shape, maximize, weight_decay):
    from memopt.functional.adamw import adamw_update_

    gen = torch.Generator().manual_seed(6)
    p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    m, v = torch.randn(shape, generator=gen) * 0.1, torch.rand(shape, generator=gen) * 1e-2
    m0, v0 = m.clone(), v.clone()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, step=3, maximize=maximize)
    fast = [t.clone() for t in (p, m, v)]
    before = p.clone()
    adamw_update_(p, g, m, v, **kw)
    cpu.adamw_update_(fast[0], g, *fast[1:], **kw)
    # torch's fused kernel orders a few operations differently (here: the second moment of a short tensor's tail)
    torch.testing.assert_close(fast[1], m, rtol=2.0**-23, atol=0)
    torch.testing.assert_close(fast[2], v, rtol=2.0**-23, atol=0)
    step = (p - before).abs()
    assert ((fast[0] - p).abs() <= 2 * torch.finfo(torch.float32).eps * step
            + torch.finfo(torch.float32).eps * p.abs()).all()
    fused = torch.nn.Parameter(before.clone())
    fused.grad = g
    opt = torch.optim.AdamW([fused], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            maximize=maximize, fused=True)
    opt.state[fused] = {"step": torch.tensor(2.0), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
    opt.step()
    assert torch.equal(fused.detach(), fast[0])


def _params(gen, shapes=((64, 576), (40, 300), (576,))):
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


MAKERS = {
    "sgdsai": lambda ps, **kw: SGDSaI(ps, lr=1e-2, weight_decay=0.1, **kw),
    "sgdsai_8bit": lambda ps, **kw: SGDSaI(ps, lr=1e-2, state_bits=8, min_8bit_size=256, **kw),
    "adamw_8bit": lambda ps, **kw: AdamW8bit(ps, lr=1e-2, min_8bit_size=256, **kw),
}


def _train(name, steps=4, **kw):
    gen = torch.Generator().manual_seed(2)
    params = _params(gen)
    opt = MAKERS[name](params, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", list(MAKERS))
def test_optimizers_take_the_fused_cpu_update_by_default_and_the_reference_with_use_triton_false(name):
    fast, opt = _train(name)
    assert opt.update_paths == {"cpu": 2, "torch": 1}  # the vector (SGD-SaI: 1-D; AdamW: 8-bit in flat blocks)
    slow, opt_ref = _train(name, use_triton=False)
    assert opt_ref.update_paths == {"torch": 3}
    _assert_near_the_pytorch_path(name, fast, slow)


def _assert_near_the_pytorch_path(name, fast, slow):
    """The documented bounds (docs/optimizers.md) after a few steps at lr 1e-2: SGD-SaI's statistics are summed in
    another order (in double, rounded once) and AdamW's sqrt rounds once more correctly, so parameters differ in
    their last bits; with 8-bit momentum a value that lands within a rounding of a midpoint between two codes may
    take the neighbouring code, a difference of up to one code step times the lr, in a few elements."""
    for a, b in zip(fast, slow):
        if a.dim() < 2:
            assert torch.equal(a, b)  # vectors take the PyTorch update on both paths
        elif name == "sgdsai_8bit":
            far = (a - b).abs() > 1e-6
            assert float((a - b).abs().max()) <= 1e-4 and int(far.sum()) <= a.numel() // 100
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_corrupt_block_maxima_raise_before_anything_is_written():
    gen = torch.Generator().manual_seed(3)
    p, g = torch.randn(40, 576, generator=gen), torch.randn(40, 576, generator=gen)
    for update, state in [
        (lambda st: cpu.factored_sgdsai_(p, g, st, lr=1e-2, scale=1.0, momentum=0.9, weight_decay=0.0, eps=1e-8,
                                         clip=3.0), _state(p.shape, True, gen)),
        (lambda st: cpu.adamw_update_8bit_(p, g, *st, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                           step=2), _adamw_state(p.shape, gen)),
        (lambda st: cpu.lion_update_(p, g, st, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0),
         _state(p.shape, True, gen)),
    ]:
        state[-1][-1, -1] = float("nan")  # the last block of the last row
        before = [t.clone() for t in (p, *state)]
        with pytest.raises(ValueError, match="NaN or Inf"):
            update(state)
        for old, now in zip(before, (p, *state)):
            assert torch.equal(old.view(torch.uint8), now.view(torch.uint8))  # bit patterns: NaN included


def test_a_moment_that_overflows_leaves_its_block_unchanged_and_raises():
    gen = torch.Generator().manual_seed(4)
    p, g = torch.randn(8, 512, generator=gen), torch.randn(8, 512, generator=gen)
    g[5, 300] = 1e21  # finite, but (1 - beta2) g^2 overflows fp32: the second moment of its block is Inf
    state = _adamw_state(p.shape, gen)
    p0, s0 = p.clone(), [t.clone() for t in state]
    with pytest.raises(ValueError, match=r"1 block\(s\) of the new 8-bit state are NaN or Inf"):
        cpu.adamw_update_8bit_(p, g, *state, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=2)
    assert torch.equal(p[5, 256:], p0[5, 256:]) and torch.equal(state[2][5, 256:], s0[2][5, 256:])
    assert torch.equal(state[3][5, 1], s0[3][5, 1])
    assert not torch.equal(p[5, :256], p0[5, :256]) and not torch.equal(p[4], p0[4])


@pytest.mark.parametrize("make,why", [
    (lambda: (torch.randn(8, 512, dtype=torch.bfloat16), [torch.zeros(8, 512)]), "not fp32"),
    (lambda: (torch.randn(512, 8).t(), [torch.zeros(8, 512)]), "not contiguous"),
    (lambda: (torch.randn(512), [torch.zeros(512)]), "not a tensor of two or more dimensions"),
    (lambda: (torch.randn(8, 512), [None]), "no state buffer"),
    (lambda: (torch.zeros(0, 512), [torch.zeros(0, 512)]), "empty"),
    (lambda: (torch.randn(8, 100), list(quantize_rows(torch.zeros(8, 100), None, 256))), "not in row blocks"),
])
def test_refusals_name_the_reason(make, why):
    p, state = make()
    g = torch.zeros_like(p)
    assert why in cpu.refusal(p, g, state, 256 if len(state) == 2 else None)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_LIB", {})
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path))
    return tmp_path


def test_the_library_builds_into_the_cache_and_is_reused(fresh_library):
    assert cpu.library() is not None
    built = list(fresh_library.glob("cpu_update-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu._LIB.clear()
    assert cpu.library() is not None and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("env,message", [({"MEMOPT_CPU_KERNELS": "0"}, "MEMOPT_CPU_KERNELS=0"),
                                         ({"CC": "no-such-compiler-here"}, "no C compiler")])
def test_without_the_library_updates_fall_back_with_one_log_line(fresh_library, monkeypatch, caplog, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with caplog.at_level(logging.WARNING, logger="memopt"):
        fast, opt = _train("sgdsai_8bit", steps=2)
    assert opt.update_paths == {"torch": 3}
    lines = [r.message for r in caplog.records if "fused CPU updates unavailable" in r.message]
    assert len(lines) == 1 and message in lines[0]
    cpu._LIB.clear()
    monkeypatch.delenv(next(iter(env)))
    slow, _ = _train("sgdsai_8bit", steps=2)
    _assert_near_the_pytorch_path("sgdsai_8bit", slow, fast)


def test_a_failed_build_is_reported(fresh_library, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "FLAGS", [*cpu.FLAGS, "-fno-such-flag-anywhere"])
    with caplog.at_level(logging.WARNING, logger="memopt"):
        assert cpu.library() is None
    assert "failed" in caplog.text and "no-such-flag" in caplog.text
    assert not list(fresh_library.glob("*.so"))  # no half-written library left behind


@pytest.mark.parametrize("shape", [(64, 576), (17, 515), (3, 8, 300), (1, 7)])
def test_square_sums_are_the_float64_sums_rounded_once(shape):
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(shape, generator=gen) * torch.logspace(-15, 15, shape[0])[(...,) + (None,) * (len(shape) - 1)]
    (row_ss, col_ss), finite = cpu.square_sums(g)
    g64 = g.double().reshape(shape[0], -1) ** 2
    assert finite
    # the double sums carry ~n 2^-53 relative error; one rounding to fp32 adds at most 2^-24
    torch.testing.assert_close(row_ss.double(), g64.sum(1), rtol=2.0**-23, atol=0)
    torch.testing.assert_close(col_ss.double(), g64.sum(0), rtol=2.0**-23, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_square_sums_say_whether_the_gradient_is_finite(bad):
    g = torch.ones(33, 300)
    assert cpu.square_sums(g * 1e30)[1]  # finite, though its squares overflow fp32
    g[32, 299] = bad
    assert not cpu.square_sums(g)[1]


def test_a_non_finite_gradient_is_skipped_by_the_statistics_without_a_separate_check(monkeypatch, caplog):
    """Past a tensor's first step the fused SGD-SaI update's statistics are its finite check: the optimizer's own
    check (one more read of the gradient) is not made for it, and a NaN gradient is skipped all the same."""
    from memopt.optim import _base

    checked = []
    real = _base.MemoptOptimizer._finite_mask
    monkeypatch.setattr(_base.MemoptOptimizer, "_finite_mask",
                        staticmethod(lambda grads: checked.append([tuple(g.shape) for g in grads]) or real(grads)))
    params, opt = _train("sgdsai_8bit", steps=2)
    assert checked[0] == [(64, 576), (40, 300), (576,)]  # the first step: checked by the optimizer
    assert checked[-1] == [(576,)]  # afterwards only the tensor on the PyTorch update
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params]
    steps = [opt.state[p]["step"] for p in params]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    params[0].grad[3, 5] = float("nan")
    with caplog.at_level(logging.WARNING, logger="memopt"):
        opt.step()
    assert "skipped 1 tensor(s) with non-finite gradients" in caplog.text
    assert torch.equal(params[0].detach(), before[0]) and not torch.equal(params[1].detach(), before[1])
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in state[0].items())
    assert opt.state[params[0]]["step"] == steps[0] and opt.state[params[1]]["step"] == steps[1] + 1


@pytest.mark.parametrize("release", [False, True])
def test_a_skipped_gradient_is_not_kept_by_the_optimizer(release):
    """A NaN gradient of a tensor on the PyTorch update (the 1-D one here) is skipped by the optimizer's check;
    once it is dropped (zero_grad; with gradient release, by the hook inside backward), nothing holds it."""
    import gc
    import weakref

    params, opt = _train("sgdsai", steps=2)
    seen = []
    params[2].register_post_accumulate_grad_hook(lambda p: seen.append(weakref.ref(p.grad)))  # before release's
    weights = [torch.full_like(p, 1e-3) for p in params]
    weights[2][7] = float("nan")
    if release:
        opt.enable_gradient_release()
    for p in params:
        p.grad = None
    sum((p * w).sum() for p, w in zip(params, weights)).backward()
    if not release:
        opt.step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    assert opt.nonfinite_skips == 1 and params[2].grad is None
    assert seen and seen[0]() is None


def test_with_check_finite_off_a_non_finite_gradient_reaches_the_parameter():
    params, opt = _train("sgdsai", steps=2)
    opt.param_groups[0]["check_finite"] = False
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    params[0].grad[3, 5] = float("nan")
    opt.step()
    assert params[0].isnan().any()


@pytest.mark.parametrize("bits,shape", [(32, (64, 576)), (32, (1000,)), (8, (64, 576)), (8, (300, 515))])
@pytest.mark.parametrize("maximize,weight_decay", [(False, 0.0), (True, 0.1)])
def test_lion_equals_the_pytorch_form_bit_for_bit(fresh_library, monkeypatch, bits, shape, maximize, weight_decay):
    from memopt import Lion

    def run(fused):
        switch_cpu_loops(monkeypatch, fused)
        gen = torch.Generator().manual_seed(7)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        opt = Lion([p], lr=1e-2, weight_decay=weight_decay, maximize=maximize, state_bits=bits, min_8bit_size=256)
        for _ in range(3):
            p.grad = torch.randn(shape, generator=gen)
            opt.step()
        return p, opt

    (fast, opt), (slow, ref) = run(True), run(False)
    assert opt.update_paths == {"cpu": 1} and ref.update_paths == {"torch": 1}
    assert torch.equal(fast, slow)
    assert all(torch.equal(v, ref.state[slow][k]) for k, v in opt.state[fast].items())


def test_sign_step_equals_torch_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(3001, generator=gen)
    g = torch.randn(3001, generator=gen)
    g[:4] = torch.tensor([0.0, -0.0, float("nan"), 1e-40])  # zeros stay, a NaN reaches the parameter as torch's does
    want = p.clone().sub_(g.sign(), alpha=3e-3)
    cpu.sign_step_(p, g, lr=3e-3)
    assert torch.equal(p[3:], want[3:]) and torch.equal(p[:2], want[:2]) and p[2].isnan()


def _frugal_run(state_bits, steps=6):
    from memopt.optim.frugal import FRUGAL

    gen = torch.Generator().manual_seed(3)
    params = _params(gen, ((64, 576), (40, 300), (96, 512), (576,)))
    opt = FRUGAL(params, lr=1e-2, selection="blocks", density=0.5, update_gap=2, state_bits=state_bits,
                 min_8bit_size=256, weight_decay=0.1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return params, opt


@pytest.mark.parametrize("state_bits,paths", [(32, {"cpu": 4}), (8, {"cpu": 3, "torch": 1})])
def test_frugal_blocks_take_the_fused_updates_within_a_rounding_of_the_pytorch_form(monkeypatch, state_bits, paths):
    """Active tensors: AdamW by torch's fused kernel (32-bit) or memopt's 8-bit loop; inactive ones: sign descent in
    one pass; the vector's 8-bit state is in flat blocks, which the loops do not take. The active set moves every
    two steps, so both kinds of update and their (re)starts are exercised."""
    from memopt.optim.frugal import FRUGAL

    fast, opt = _frugal_run(state_bits)
    assert opt.update_paths == paths
    monkeypatch.setattr(FRUGAL, "_use_cpu_kernel", lambda self, *a, **k: False)
    slow, opt_ref = _frugal_run(state_bits)
    assert opt_ref.update_paths == {"torch": 4}
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for p_fast, p_slow in zip(fast, slow):  # the same tensors hold the same state; the 8-bit codes bit for bit
        st, ref_st = opt.state[p_fast], opt_ref.state[p_slow]
        assert sorted(st) == sorted(ref_st)
        for key in st:
            if key.endswith("_codes") or key == "step":
                assert torch.equal(torch.as_tensor(st[key]), torch.as_tensor(ref_st[key])), key
            elif torch.is_tensor(st[key]):
                torch.testing.assert_close(st[key], ref_st[key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pytorch"])
def test_frugal_8bit_with_corrupt_block_maxima_raises_before_anything_is_written(monkeypatch, fused):
    from memopt.optim.frugal import FRUGAL

    if not fused:
        monkeypatch.setattr(FRUGAL, "_use_cpu_kernel", lambda self, *a, **k: False)
    gen = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(64, 576, generator=gen))
    opt = FRUGAL([w], lr=1e-2, selection="blocks", density=1.0, state_bits=8, min_8bit_size=256)
    w.grad = torch.randn(64, 576, generator=gen)
    opt.step()
    assert opt.update_paths == ({"cpu": 1} if fused else {"torch": 1})
    opt.state[w]["exp_avg_absmax"][3, 1] = float("nan")
    before, codes = w.detach().clone(), opt.state[w]["exp_avg_codes"].clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["exp_avg_codes"], codes)


def _adamsn_run(steps=4, **kw):
    from memopt import SubsetNormSM

    gen = torch.Generator().manual_seed(6)
    # subsets by rows (m >= n, also a square one), by columns (m < n, also a single row) and a vector (plain AdamW)
    params = _params(gen, ((96, 40), (64, 64), (24, 576), (1, 300), (40,)))
    opt = SubsetNormSM(params, lr=1e-2, subspace_momentum=False, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return params, opt


@pytest.mark.parametrize("maximize,weight_decay", [(False, 0.0), (True, 0.1)])
def test_adamsn_moment_bit_for_bit_and_statistic_and_parameters_within_a_rounding(monkeypatch, maximize, weight_decay):
    """The fused AdamSN loop against its PyTorch form (SubsetNormSM._matrix_update): the first moment is the same
    lerp; the subset sums are taken in double here and in fp32 there, so the statistic and the parameters differ in
    their last bits. The vector takes plain AdamW, on torch's fused kernel (moments within a rounding)."""
    from memopt import SubsetNormSM

    fast, opt = _adamsn_run(maximize=maximize, weight_decay=weight_decay)
    assert opt.update_paths == {"cpu": 5}
    monkeypatch.setattr(SubsetNormSM, "_use_cpu_kernel", lambda self, *a, **k: False)
    slow, ref_opt = _adamsn_run(maximize=maximize, weight_decay=weight_decay)
    assert ref_opt.update_paths == {"torch": 5}
    for a, b in zip(fast, slow):
        st, ref_st = opt.state[a], ref_opt.state[b]
        assert sorted(st) == sorted(ref_st)
        assert all(st[k] == ref_st[k] for k in st if not torch.is_tensor(st[k]))  # the step counts
        if "sn" in st:
            assert torch.equal(st["exp_avg"], ref_st["exp_avg"])
            torch.testing.assert_close(st["sn"], ref_st["sn"], rtol=1e-6, atol=0)
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(st[key], ref_st[key], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(fast, slow))  # the two really ran different code


def test_adamsn_refuses_a_statistic_of_the_wrong_shape():
    p, g, m = torch.zeros(6, 4), torch.ones(6, 4), torch.zeros(6, 4)
    before = p.clone()
    with pytest.raises(ValueError, match=r"subset statistic of shape \(1, 6\) for a 6 x 4 matrix"):
        cpu.adamsn_update_(p, g, m, torch.zeros(1, 6), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6,
                           bias_correction1=0.1, bias_correction2=0.001)
    assert torch.equal(p, before) and torch.equal(m, torch.zeros(6, 4))
