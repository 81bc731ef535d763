"""Optimizers on the Triton path (CPU interpreter) agree with the reference path; the path is visible."""

import pytest
import torch

from conftest import KERNEL_DEVICE as DEV
from memopt import AdamW8bit, SGDSaI
from memopt.kernels import _STATUS, triton_status


def _setup(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 80), (300,), (7, 7)]
    params = [torch.nn.Parameter((0.1 * torch.randn(s, generator=g)).to(DEV, dtype)) for s in shapes]
    grads = [[(torch.randn(s, generator=g) * 1e-2).to(DEV, dtype) for s in shapes] for _ in range(4)]
    return params, grads


def _run(make, use_triton, dtype=torch.float32):
    params, grads = _setup(dtype=dtype)
    opt = make(params, use_triton)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


MAKERS = {
    "sgdsai_fp32": lambda ps, t: SGDSaI(ps, lr=0.05, use_triton=t),
    "sgdsai_8bit": lambda ps, t: SGDSaI(ps, lr=0.05, state_bits=8, min_8bit_size=256, use_triton=t),
    "adamw_8bit": lambda ps, t: AdamW8bit(ps, lr=1e-3, min_8bit_size=256, use_triton=t),
    "factored_fp32": lambda ps, t: SGDSaI(ps, lr=1e-3, scale="factored", use_triton=t),
    "factored_8bit": lambda ps, t: SGDSaI(ps, lr=1e-3, scale="factored", state_bits=8, min_8bit_size=256,
                                          use_triton=t),
}


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_matches_reference_path(name, dtype):
    ref, ref_opt = _run(MAKERS[name], False, dtype)
    tri, tri_opt = _run(MAKERS[name], True, dtype)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for a, b in zip(ref, tri):
        torch.testing.assert_close(b, a, **tol)
    if DEV == "cpu":  # on CUDA the default (None) path is the kernels too
        assert ref_opt.update_paths == {"torch": 3}
    assert tri_opt.update_paths.get("triton", 0) >= (2 if name == "adamw_8bit" else 3)


@pytest.mark.skipif(DEV == "cuda", reason="checks the CPU-only error; on a GPU machine CPU tensors have no backend")
def test_use_triton_true_without_a_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _STATUS.clear()
    try:
        assert triton_status(torch.device("cpu"), allow_interpreter=True)[0] is False
        p = torch.nn.Parameter(torch.randn(10))
        opt = SGDSaI([p], use_triton=True)
        p.grad = torch.randn(10)
        with pytest.raises(RuntimeError, match="use_triton=True but no Triton backend for cpu"):
            opt.step()
        with pytest.raises(ValueError, match="use_triton"):
            SGDSaI([p], use_triton="yes")
    finally:
        _STATUS.clear()


@pytest.mark.skipif(DEV == "cuda", reason="auto mode picks the kernels on CUDA")
def test_auto_mode_uses_the_reference_on_cpu():
    _, opt = _run(MAKERS["sgdsai_8bit"], None)
    assert opt.update_paths == {"torch": 3}


def test_forced_triton_falls_back_for_tensors_the_kernels_do_not_take():
    p64 = torch.nn.Parameter(torch.randn(300, dtype=torch.float64, device=DEV))
    nc = torch.nn.Parameter(torch.randn(30, 20, device=DEV).t())
    ok = torch.nn.Parameter(torch.randn(300, device=DEV))
    opt = SGDSaI([p64, nc, ok], use_triton=True)
    for p in (p64, nc, ok):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.update_paths == {"triton": 1, "torch": 2}


def test_kernel_path_leaves_the_global_rng_alone_without_stochastic_rounding():
    params, grads = _setup(dtype=torch.bfloat16)
    opt = SGDSaI(params, state_bits=8, min_8bit_size=256, use_triton=True, stochastic_rounding=False)
    for p, g in zip(params, grads[0]):
        p.grad = g
    before = torch.get_rng_state()
    opt.step()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.fixture
def fresh_self_check(monkeypatch):
    from memopt import kernels

    monkeypatch.setattr(kernels, "_SELF_CHECKED", {})
    yield kernels


def test_the_kernels_pass_their_first_use_self_check(fresh_self_check):
    for name in ("quantize", "sgdsai", "adamw"):
        assert fresh_self_check.kernel_usable(name, torch.device(DEV)) == (True, "self-check passed")


@pytest.mark.parametrize("fault", ["wrong_result", "compile_error"])
def test_a_kernel_failing_its_self_check_falls_back_with_one_warning_or_raises_when_required(
        fresh_self_check, monkeypatch, fault):
    from memopt.kernels import sgdsai as sgdsai_kernels

    real = sgdsai_kernels.sgdsai_update_8bit_

    def broken(param, *args, **kwargs):
        if fault == "compile_error":
            raise RuntimeError("PTX assembly aborted")
        real(param, *args, **kwargs)
        param.add_(1e-3)  # a subtly wrong kernel

    monkeypatch.setattr(sgdsai_kernels, "sgdsai_update_8bit_", broken)
    with pytest.raises(RuntimeError, match="use_triton=True but self-check of the 'sgdsai' kernels failed"):
        with pytest.warns(RuntimeWarning, match="'sgdsai' failed its first-use self-check"):
            _run(MAKERS["sgdsai_8bit"], True)
    # automatic choice: the device "has" Triton, the failed kernels are skipped and the result is the reference's
    monkeypatch.setattr("memopt.kernels.triton_status", lambda device, allow_interpreter=False: (True, "triton (test)"))
    ref, _ = _run(MAKERS["sgdsai_8bit"], False)
    auto, opt = _run(MAKERS["sgdsai_8bit"], None)
    assert opt.update_paths == {"torch": 3}
    assert all(torch.equal(a, b) for a, b in zip(ref, auto))
    # the AdamW kernels passed their own check and stay in use
    _, adam = _run(MAKERS["adamw_8bit"], None)
    assert adam.update_paths.get("triton", 0) >= 2
