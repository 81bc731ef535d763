"""The PyTorch updates of large tensors run in pieces of whole rows (memopt.functional.quantize.CHUNK_ELEMENTS and
STATE_CHUNK_ELEMENTS):
the same numbers as in one piece, bit for bit (bf16 stochastic rounding draws per piece)."""

import pytest
import torch

from memopt import AdamW8bit, SGDSaI
from memopt.functional import adamw as ref_adamw
from memopt.functional import quantize
from memopt.functional import sgdsai as ref_sgdsai
from memopt.functional.quantize import layout_8bit
from memopt.optim.sgdsai import SGDSaI as _SGDSaI

SHAPES = [(64, 300), (33, 4, 80), (300,), (7, 7), (40, 100)]  # 3-D, vector, small, rows shorter than a block
# use_triton=False: the PyTorch updates (the fused CPU ones, memopt.kernels.cpu, are tested in test_cpu_kernels.py)
MAKERS = {
    "factored": lambda ps, sr: SGDSaI(ps, lr=1e-2, stochastic_rounding=sr, use_triton=False),
    "factored_8bit": lambda ps, sr: SGDSaI(ps, lr=1e-2, state_bits=8, min_8bit_size=256, stochastic_rounding=sr,
                                           use_triton=False),
    "gsnr_max_8bit": lambda ps, sr: SGDSaI(ps, lr=5e-2, scale="gsnr_max", state_bits=8, min_8bit_size=256,
                                           stochastic_rounding=sr, use_triton=False),
    "adamw_8bit": lambda ps, sr: AdamW8bit(ps, lr=1e-2, min_8bit_size=256, stochastic_rounding=sr, use_triton=False),
}


def _train(name, dtype, sr=False):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    opt = MAKERS[name](params, sr)
    for _ in range(4):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(dtype)
        opt.step()
    return params, opt


def _small_pieces(monkeypatch):
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(quantize, "STATE_CHUNK_ELEMENTS", 600)


def _whole(monkeypatch):
    monkeypatch.setattr(quantize, "in_row_pieces", lambda *a, **k: False)
    monkeypatch.setattr(ref_sgdsai, "in_row_pieces", lambda *a, **k: False, raising=False)
    monkeypatch.setattr(ref_adamw, "in_row_pieces", lambda *a, **k: False)
    monkeypatch.setattr(_SGDSaI, "_in_pieces", staticmethod(lambda *a: False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MAKERS)
def test_pieces_give_the_numbers_of_one_piece(name, dtype, monkeypatch):
    _small_pieces(monkeypatch)  # every 2-D tensor here takes several pieces
    a, oa = _train(name, dtype)
    _whole(monkeypatch)
    b, ob = _train(name, dtype)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for key, value in oa.state[pa].items():
            assert torch.equal(value, ob.state[pb][key]) if isinstance(value, torch.Tensor) else value == \
                ob.state[pb][key]


def test_bf16_stochastic_rounding_draws_per_piece(monkeypatch):
    _small_pieces(monkeypatch)
    a, oa = _train("factored_8bit", torch.bfloat16, sr=True)
    _whole(monkeypatch)
    b, ob = _train("factored_8bit", torch.bfloat16, sr=True)
    for pa, pb in zip(a, b):
        # the momentum never reads the parameter: equal; the parameters differ by the rounding draws only
        assert all(torch.equal(v, ob.state[pb][k]) for k, v in oa.state[pa].items() if isinstance(v, torch.Tensor))
        diff = (pa.float() - pb.float()).abs()
        size = pa.detach().float().abs()
        assert float(diff.max()) <= 4 * 2.0**-7 * float(size.max())  # a few bf16 ulps at most
        assert float(diff.mean()) <= 2.0**-7 * float(size.mean())  # under one ulp on average


def test_normalized_pieces_equal_the_whole_normalized_gradient(monkeypatch):
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 500)
    g = torch.randn(37, 3, 50, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        x = g.to(dtype)
        whole = ref_sgdsai.normalized_gradient(x, 1e-8, clip=3.0).to(dtype).reshape(37, -1)
        ends = []
        for r0, r1, u in ref_sgdsai.normalized_pieces(x, 1e-8, clip=3.0):  # a piece is valid until the next one
            assert u.dtype == dtype and torch.equal(u, whole[r0:r1])
            ends.append(r1)
        assert len(ends) > 1 and ends[-1] == 37


def test_factored_statistics_match_float64():
    g = torch.randn(300, 70, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 1, 70)
    u = ref_sgdsai.normalized_gradient(g, 1e-8)
    d = g.double()
    row, col = d.square().mean(1, keepdim=True), d.square().mean(0, keepdim=True)
    expected = d / ((row * col / col.mean()).sqrt() + 1e-8)
    torch.testing.assert_close(u.double(), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("which", ["sgdsai", "adamw", "factored_8bit"])
def test_corrupt_block_maxima_raise_before_any_piece_is_written(which, monkeypatch):
    _small_pieces(monkeypatch)
    shape = (40, 300)
    p, g = torch.randn(shape), torch.randn(shape) * 1e-2
    if which == "factored_8bit":  # the optimizer's pieces of the normalised gradient, each in pieces of its own
        param = torch.nn.Parameter(p)
        opt = MAKERS[which]([param], False)
        for _ in range(2):
            param.grad = g.clone()
            opt.step()
        opt.state[param]["momentum_absmax"][-1, -1] = float("nan")
        before = param.detach().clone()
        with pytest.raises(ValueError, match="NaN or Inf"):
            opt.step()
        assert torch.equal(param.detach(), before)
        return
    state = []
    for _ in range(1 if which == "sgdsai" else 2):
        codes, absmax = (torch.zeros(s, dtype=dt) for s, dt in layout_8bit("m", shape, 256).values())
        state += [codes, absmax.fill_(1e-3)]
    state[1][-1, -1] = float("nan")
    before = p.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        if which == "sgdsai":
            ref_sgdsai.sgdsai_update_8bit_(p, g, *state, lr=0.1, scale=1.0, momentum=0.9, weight_decay=0.0)
        else:
            ref_adamw.adamw_update_8bit_(p, g, *state, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                                         step=2)
    assert torch.equal(p, before)
