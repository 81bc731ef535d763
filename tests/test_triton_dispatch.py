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


# what the automatic choice gives the three tensors of _setup without Triton kernels: on CPU the fused CPU update for
# the (7, 7) tensor (fp32 state); the (64, 80) tensor's 8-bit state is in flat blocks and the vector is 1-D, which
# only the PyTorch updates take (memopt.kernels.cpu.refusal)
NO_TRITON_PATHS = {"cpu": 1, "torch": 2} if DEV == "cpu" else {"torch": 3}


@pytest.mark.skipif(DEV == "cuda", reason="auto mode picks the kernels on CUDA")
def test_auto_mode_uses_the_fused_cpu_update_where_it_can_on_cpu():
    _, opt = _run(MAKERS["sgdsai_8bit"], None)
    assert opt.update_paths == NO_TRITON_PATHS


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
    assert opt.update_paths == NO_TRITON_PATHS
    for a, b in zip(ref, auto):  # the fused CPU update's statistics are summed in another order (test_cpu_kernels.py)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the AdamW kernels passed their own check and stay in use
    _, adam = _run(MAKERS["adamw_8bit"], None)
    assert adam.update_paths.get("triton", 0) >= 2


def test_launches_go_to_the_tensors_gpu(monkeypatch):
    """Parameters on several GPUs in one process: each launch runs under its tensor's device, not the current one."""
    from memopt.kernels import _common
    from memopt.kernels import sgdsai as sgdsai_kernels

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)

    class FakeCuda:
        device = torch.device("cuda", 1)

    with _common.device_guard(FakeCuda()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.zeros(1)):  # CPU tensors: no CUDA context is touched
        pass
    assert entered == [torch.device("cuda", 1)]
    # and every launcher enters the guard with its parameter
    guarded = []
    real = _common.device_guard
    monkeypatch.setattr(sgdsai_kernels, "device_guard", lambda t: guarded.append(t) or real(t))
    p, g = torch.randn(300, device=DEV), torch.randn(300, device=DEV)
    codes, absmax = torch.zeros(300, dtype=torch.uint8, device=DEV), torch.zeros(2, device=DEV)
    sgdsai_kernels.sgdsai_update_8bit_(p, g, codes, absmax, lr=0.1, scale=1.0, momentum=0.9, weight_decay=0.0,
                                       first_step=True)
    sgdsai_kernels.sgdsai_update_(p, g, None, lr=0.1, scale=1.0, momentum=0.0, weight_decay=0.0)
    assert len(guarded) == 2 and all(t is p for t in guarded)


@pytest.mark.parametrize("capability,usable", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_triton_is_used_only_on_compute_capability_8_or_more(monkeypatch, capability, usable):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    _STATUS.clear()
    try:
        ok, reason = triton_status(torch.device("cuda", 0))
        assert ok is usable
        if not usable:
            assert f"compute capability {capability[0]}.{capability[1]}" in reason and "8.0 or more" in reason
        assert triton_status(torch.device("cuda"))[0] is usable  # the current device, same answer
    finally:
        _STATUS.clear()


def test_tensors_too_large_for_int32_offsets_go_to_the_reference(monkeypatch):
    """Offsets in the kernels are int32: a tensor of 2^31 or more elements (here: the limit lowered to 1000, a
    stub for a 2^31-element parameter) is updated by the reference and the launchers refuse it."""
    from memopt import kernels
    from memopt.kernels import sgdsai as sgdsai_kernels

    monkeypatch.setattr(kernels, "MAX_NUMEL", 1000)
    assert "64-bit offsets" in kernels.kernel_refusal((2000,))
    big = torch.nn.Parameter(torch.randn(40, 50, device=DEV))
    small = torch.nn.Parameter(torch.randn(30, 20, device=DEV))
    opt = SGDSaI([big, small], lr=0.01, state_bits=8, min_8bit_size=256, use_triton=True)
    for _ in range(2):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        opt.step()
    assert opt.update_paths == {"triton": 1, "torch": 1}
    with pytest.raises(ValueError, match="64-bit offsets"):
        sgdsai_kernels.sgdsai_update_(big.data, big.grad, None, lr=0.1, scale=1.0, momentum=0.0, weight_decay=0.0)


def test_tensors_with_too_many_unaligned_row_blocks_go_to_the_reference(monkeypatch):
    """Row blocks are found by a float quotient that is exact below MAX_ROW_BLOCKS blocks (here lowered to 8)."""
    from memopt import kernels

    monkeypatch.setattr(kernels, "MAX_ROW_BLOCKS", 8)
    assert kernels.kernel_refusal((5, 300), 256) is not None  # 10 row blocks, rows of 300 (not a multiple of 256)
    assert kernels.kernel_refusal((5, 512), 256) is None  # rows end on a block boundary: flat blocks, no limit
    assert kernels.kernel_refusal((5, 300)) is None  # full-precision state has no row blocks
    p = torch.nn.Parameter(torch.randn(5, 300, device=DEV))
    opt = AdamW8bit([p], lr=1e-3, min_8bit_size=256, use_triton=True)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.update_paths == ({"cpu": 1} if DEV == "cpu" else {"torch": 1})  # no Triton; on CPU the C loops
