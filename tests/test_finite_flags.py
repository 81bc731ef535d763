"""Non-finite gradients checked on the device: the update functions' ``finite`` flag (kernels and references), the
optimizers' device-side check with skips counted later, and the overflow-free finiteness test."""

import inspect

import pytest
import torch

from conftest import KERNEL_DEVICE as DEV
from memopt import AdamW8bit, SGDSaI
from memopt.functional import adamw as ref_adamw
from memopt.functional import quantize as ref_quantize
from memopt.functional import sgdsai as ref_sgdsai
from memopt.functional.finite import finite_flags
from memopt.functional.quantize import layout_8bit
from memopt.kernels import adamw as tri_adamw
from memopt.kernels import quantize as tri_quantize
from memopt.kernels import sgdsai as tri_sgdsai

TWINS = [(tri_sgdsai, ref_sgdsai, "sgdsai_update_"), (tri_sgdsai, ref_sgdsai, "sgdsai_update_8bit_"),
         (tri_adamw, ref_adamw, "adamw_update_8bit_"), (tri_quantize, ref_quantize, "quantize_blockwise"),
         (tri_quantize, ref_quantize, "dequantize_blockwise")]


@pytest.mark.parametrize("kernel,reference,name", TWINS, ids=[t[2] for t in TWINS])
def test_every_kernel_has_the_signature_of_its_reference(kernel, reference, name):
    k, r = inspect.signature(getattr(kernel, name)), inspect.signature(getattr(reference, name))
    if name == "quantize_blockwise":
        # the reference also rounds stochastically (keyword-only options with defaults the kernel does not take)
        extra = list(r.parameters.values())[len(k.parameters):]
        assert [p.name for p in extra] == ["stochastic", "generator"]
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra)
        r = r.replace(parameters=list(r.parameters.values())[:len(k.parameters)])
    assert k == r


def _problem(name, shape=(3, 300)):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=g).to(DEV)
    grad = (torch.randn(shape, generator=g) * 0.1).to(DEV)
    if name == "sgdsai_update_":
        state = [torch.randn(shape, generator=g).to(DEV)]
        kw = dict(lr=0.1, scale=0.5, momentum=0.9, weight_decay=0.1)
    else:
        moments = 2 if name.startswith("adamw") else 1
        state = []
        for _ in range(moments):
            codes, absmax = (torch.zeros(s, dtype=d) for s, d in layout_8bit("m", shape, 256).values())
            state += [torch.randint(0, 256, codes.shape, generator=g, dtype=torch.uint8).to(DEV),
                      torch.rand(absmax.shape, generator=g).to(DEV)]
        kw = dict(lr=0.1, momentum=0.9, scale=0.5, weight_decay=0.1) if moments == 1 else \
            dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3)
    return p, grad, state, kw


UPDATES = [(tri, ref, name) for tri, ref, name in TWINS if "update" in name]


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("name", [u[2] for u in UPDATES])
def test_a_false_flag_writes_nothing_and_a_true_flag_changes_nothing(name, impl):
    module = {u[2]: u[0 if impl == "kernel" else 1] for u in UPDATES}[name]
    fn = getattr(module, name)
    p, grad, state, kw = _problem(name)
    bad = grad.clone()
    bad[1, 7] = float("nan")
    before = [t.clone() for t in (p, *state)]
    fn(p, bad, *state, finite=torch.tensor(False, device=DEV), **kw)
    for a, b in zip((p, *state), before):
        assert torch.equal(a, b)
    results = []
    for flag in (None, torch.tensor([True], device=DEV)):
        q, s = p.clone(), [t.clone() for t in state]
        fn(q, grad, *s, finite=flag, **kw)
        results.append([q, *s])
    assert not torch.equal(results[0][0], p)
    for a, b in zip(*results):
        assert torch.equal(a, b)  # elementwise math: bit for bit


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_a_bad_flag_is_refused(impl):
    fn = (tri_sgdsai if impl == "kernel" else ref_sgdsai).sgdsai_update_
    p, grad, state, kw = _problem("sgdsai_update_")
    for flag, match in ((torch.tensor(1.0, device=DEV), "one-element bool"), (True, "one-element bool"),
                        (torch.ones(2, dtype=torch.bool, device=DEV), "one-element bool"),
                        (torch.tensor(True, device="meta"), "is on meta")):
        with pytest.raises(ValueError, match=match):
            fn(p, grad, *state, finite=flag, **kw)


@pytest.mark.parametrize("host_read", [True, False], ids=["2-norm then maximum", "maximum"])
def test_finiteness_does_not_overflow(host_read, monkeypatch):
    from memopt.functional import finite

    monkeypatch.setattr(finite, "HOST_READ_DEVICES", {"cpu"} if host_read else set())
    big = torch.full((10,), 3e30)
    flags = finite_flags([big, big.to(torch.bfloat16), torch.tensor([1.0, float("nan")]),
                          torch.tensor([float("-inf"), 0.0]), torch.zeros(0), torch.full((3,), 300.0).half(),
                          torch.tensor([1.0, 2.0]), torch.tensor([float("inf"), 3e30])])
    out = {}
    for f, idx in flags:
        out.update(zip(idx, f.tolist()))
    assert out == {0: True, 1: True, 2: False, 3: False, 4: True, 5: True, 6: True, 7: False}


def test_the_sharded_check_applies_the_same_rule_to_each_shard():
    from memopt.distributed import finite_flags as sharded_flags

    # plain tensors are their own shard and need no all-reduce: the local rule, in the caller's order
    grads = [torch.full((10,), 3e30), torch.tensor([1.0, float("nan")]).bfloat16(), torch.zeros(0),
             torch.tensor([float("-inf"), 0.0]), torch.ones(3).half()]
    assert sharded_flags(grads) == [True, False, True, False, True]


@pytest.mark.parametrize("use_triton", [False, True])
def test_a_huge_finite_gradient_is_applied(use_triton):
    p = torch.nn.Parameter(torch.zeros(300, device=DEV))
    opt = SGDSaI([p], lr=1e-3, use_triton=use_triton)
    for _ in range(2):  # the second step is past the first, where the kernel path checks on the device
        p.grad = torch.full((300,), 1e30, device=DEV)
        opt.step()
    assert opt.nonfinite_skips == 0 and bool((p < 0).all())


# ----------------------------------------------------------------------------------- optimizers
MAKERS = {
    "adamw_8bit": lambda ps, rel: AdamW8bit(ps, lr=1e-2, min_8bit_size=256, use_triton=True, grad_release=rel),
    "gsnr_max_8bit": lambda ps, rel: SGDSaI(ps, lr=0.05, scale="gsnr_max", state_bits=8, min_8bit_size=256,
                                            use_triton=True, grad_release=rel),
    "gsnr_max_fp32": lambda ps, rel: SGDSaI(ps, lr=0.05, scale="gsnr_max", use_triton=True, grad_release=rel),
    "sqrt_numel_m0": lambda ps, rel: SGDSaI(ps, lr=1e-4, scale="sqrt_numel", momentum=0.0, use_triton=True,
                                            grad_release=rel),
    "factored_fp32": lambda ps, rel: SGDSaI(ps, lr=1e-2, use_triton=True, grad_release=rel),
    "factored_8bit": lambda ps, rel: SGDSaI(ps, lr=1e-2, state_bits=8, min_8bit_size=256, use_triton=True,
                                            grad_release=rel),
}
SHAPES = [(64, 80), (300,), (7, 7)]
BAD_STEP = 2


def _train(name, release, bad, log=None):
    """Five steps whose gradients come from backward (``sum(p * c)``: the gradient is exactly ``c``). At step
    ``BAD_STEP`` the first tensor's gradient holds a NaN (``bad=True``) or it has no gradient at all."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter((0.1 * torch.randn(s, generator=g)).to(DEV)) for s in SHAPES]
    coefs = [[(torch.randn(s, generator=g) * 1e-2).to(DEV) for s in SHAPES] for _ in range(5)]
    opt = MAKERS[name](params, release)
    snapshots = {}
    for t, cs in enumerate(coefs):
        if log is not None:
            log.append(t)
        terms = list(zip(params, cs))
        if t == BAD_STEP:
            snapshots["before"] = [params[0].detach().clone()] + [
                v.clone() for v in opt.state[params[0]].values() if isinstance(v, torch.Tensor)]
            if bad:
                cs[0][3, 4] = float("nan")
            else:
                terms = terms[1:]
        sum((p * c).sum() for p, c in terms).backward()
        opt.step()
        opt.zero_grad()
        if t == BAD_STEP:
            snapshots["after"] = [params[0].detach().clone()] + [
                v.clone() for v in opt.state[params[0]].values() if isinstance(v, torch.Tensor)]
            snapshots["saved"] = opt.state_dict()["state"][0]  # before the next step() reads the flags
    return params, opt, snapshots


@pytest.mark.parametrize("release", [False, True], ids=["step", "release"])
@pytest.mark.parametrize("name", MAKERS)
def test_a_skip_on_the_device_equals_no_gradient(name, release, monkeypatch):
    from memopt.optim._base import MemoptOptimizer

    log = []  # step numbers, and the shapes of each host check
    real = MemoptOptimizer._finite_mask
    monkeypatch.setattr(MemoptOptimizer, "_finite_mask",
                        staticmethod(lambda grads: log.append([tuple(g.shape) for g in grads]) or real(grads)))
    a, oa, snap = _train(name, release, bad=True, log=log)
    monkeypatch.undo()
    b, ob, snap_b = _train(name, release, bad=False)
    # past their first steps no tensor is checked on the host (AdamW's small 32-bit tensor neither)
    assert [shapes for shapes in log[log.index(BAD_STEP):] if isinstance(shapes, list)] == []
    for x, y in zip(snap["before"], snap["after"]):
        assert torch.equal(x, y)  # the skipped update wrote nothing
    _same_state(snap["saved"], snap_b["saved"])  # saved with the step count of the skipped update taken back
    assert oa.nonfinite_skips == 1 and ob.nonfinite_skips == 0
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    _same_state(oa.state[a[0]], ob.state[b[0]])


def _same_state(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k, v in x.items():
        assert torch.equal(v, y[k]) if isinstance(v, torch.Tensor) else v == y[k], k


@pytest.mark.parametrize("name", ["factored_8bit", "adamw_8bit"])
def test_a_steady_kernel_step_reads_nothing_on_the_host_but_the_last_steps_flags(name, monkeypatch):
    """On the kernel path, step() past the first steps reads one flag tensor per (device, dtype) of the previous
    step, and no value of this step: on a GPU nothing in it waits for the device."""
    params = [torch.nn.Parameter(torch.randn(s).to(DEV)) for s in SHAPES]
    from memopt.functional import finite

    # the device's way (on CPU the check may read a non-finite 2-norm on the host: free there, nothing to wait for)
    monkeypatch.setattr(finite, "HOST_READ_DEVICES", set())
    opt = MAKERS[name](params, False)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    reads = []
    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _m=method, _r=real, **k: reads.append((_m, tuple(self.shape))) or _r(
                                self, *a, **k))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    reads_in_step = list(reads)
    monkeypatch.undo()
    assert reads_in_step == [("tolist", (len(SHAPES),))]
