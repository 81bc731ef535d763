"""Triton quantize/dequantize vs the PyTorch reference, run on CPU under TRITON_INTERPRET=1 (set in conftest)."""

import pytest
import torch

from conftest import KERNEL_DEVICE as DEV
from memopt.functional import quantize as ref
from memopt.kernels import quantize as tri

SIZES = [1, 255, 257, 4097, 2 * 2048 + 3]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_reference(n, dtype, signed):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(DEV, dtype)
    if not signed:
        x = x.abs()
    code = ref.create_dynamic_map(signed)
    c_ref, a_ref = ref.quantize_blockwise(x, code)
    c_tri, a_tri = tri.quantize_blockwise(x, code)
    assert torch.equal(a_tri, a_ref)
    assert torch.equal(c_tri, c_ref)  # the same fp32 x * (1 / absmax) and an exact search: bit for bit
    d_ref = ref.dequantize_blockwise(c_ref, a_ref, code, dtype=dtype)
    d_tri = tri.dequantize_blockwise(c_ref, a_ref, code, dtype=dtype)
    assert torch.equal(d_tri, d_ref)


def test_blocksize_2048_and_adversarial_blocks():
    x = torch.zeros(3 * 2048, device=DEV)
    x[2048:4096] = torch.randn(2048) * 1e-3
    x[2048] = 1e4  # one huge outlier
    c_ref, a_ref = ref.quantize_blockwise(x, blocksize=2048)
    c_tri, a_tri = tri.quantize_blockwise(x, blocksize=2048)
    assert torch.equal(a_tri, a_ref)
    assert (c_tri.int() - c_ref.int()).abs().max() <= 1
    assert torch.equal(tri.dequantize_blockwise(c_tri[:2048], a_tri[:1], blocksize=2048), torch.zeros(2048, device=DEV))


def test_launcher_validation():
    with pytest.raises(ValueError, match="power of two"):
        tri.quantize_blockwise(torch.randn(300), blocksize=300)
    with pytest.raises(ValueError, match="contiguous"):
        tri.quantize_blockwise(torch.randn(64, 64).t())
    with pytest.raises(ValueError, match="NaN or Inf"):
        tri.quantize_blockwise(torch.tensor([1.0, float("nan")], device=DEV))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("absmax", [1.0, 0.7, 3e-5])
def test_quantize_is_bit_exact_at_and_next_to_every_midpoint(signed, absmax):
    """Values on the decision boundaries (ties go to the lower code) and one ulp either side of each, in blocks whose
    maximum is ``absmax``: the kernel's table search gives the reference's code for every one."""
    code = ref.create_dynamic_map(signed)
    mids = ref.code_midpoints(code)
    vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    if signed:
        vals = torch.cat([vals, -vals])
    vals = vals.clamp(-1.0, 1.0) * absmax
    blocks = torch.cat([vals.view(-1, 1), torch.full((vals.numel(), 1), absmax)], 1)  # each pair: value, maximum
    x = torch.nn.functional.pad(blocks, (0, 14)).reshape(-1).to(DEV)  # blocks of 16
    c_ref, a_ref = ref.quantize_blockwise(x, code, blocksize=16)
    c_tri, a_tri = tri.quantize_blockwise(x, code, blocksize=16)
    assert torch.equal(a_tri, a_ref) and torch.equal(c_tri, c_ref)


def test_table_search_spec_equals_bucketize():
    """``kernel_code_index`` (the torch spelling of the kernels' table layout) against torch.bucketize, on random
    values over every exponent, on the midpoints and next to them, and on +-1 and one ulp beyond."""
    g = torch.Generator().manual_seed(0)
    for signed in (True, False):
        code = ref.create_dynamic_map(signed)
        mids = ref.code_midpoints(code)
        x = torch.cat([torch.rand(200_000, generator=g) * 2 - 1,
                       (torch.rand(200_000, generator=g) * 2 - 1) * 10.0 ** torch.randint(-30, 0, (200_000,),
                                                                                          generator=g).float(),
                       mids, -mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1 + 2**-23, -1 - 2**-23])])
        assert torch.equal(ref.kernel_code_index(x, code), torch.bucketize(x.clamp(-1, 1), mids))


def test_reciprocal_refinement_is_correctly_rounded():
    """The kernels' per-block reciprocal (``reciprocal_rn``): an approximation within 2 ulp, refined twice in fp64
    and rounded to fp32, is the correctly rounded 1 / a, here for approximations off by -2..2 ulp, over the whole
    normal exponent range (fp64 products rounded separately, as the interpreter computes them)."""
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(400_000, generator=g) + 1.0) * 2.0 ** torch.randint(-126, 126, (400_000,), generator=g).float()
    a = torch.cat([a, torch.tensor([torch.finfo(torch.float32).tiny, 1.0, 2.0 - 2**-23, 3.0])])
    exact = 1.0 / a  # torch's fp32 division is correctly rounded
    a64 = a.double()
    for ulps in (-2, -1, 0, 1, 2):
        approx = exact
        for _ in range(abs(ulps)):
            approx = torch.nextafter(approx, torch.tensor(float("inf") if ulps > 0 else 0.0))
        r = approx.double()
        r = r + r * (1.0 - a64 * r)
        r = r + r * (1.0 - a64 * r)
        assert torch.equal(r.float(), exact), ulps


def test_a_code_map_without_zero_quantizes_but_the_fused_updates_refuse_it():
    """quantize/dequantize take any valid map; the fused updates need the code 0.0 (their masked lanes load it)."""
    from memopt.kernels import sgdsai as tri_sgdsai

    code = torch.linspace(-1.0, 1.0, 256)  # 256 even steps: no exact 0.0
    assert not bool((code == 0).any())
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(DEV)
    c_ref, a_ref = ref.quantize_blockwise(x, code)
    c_tri, a_tri = tri.quantize_blockwise(x, code)
    assert torch.equal(a_tri, a_ref) and torch.equal(c_tri, c_ref)
    assert torch.equal(tri.dequantize_blockwise(c_ref, a_ref, code), ref.dequantize_blockwise(c_ref, a_ref, code))
    p, g = torch.randn(300, device=DEV), torch.randn(300, device=DEV)
    with pytest.raises(ValueError, match="holding 0.0 exactly once"):
        tri_sgdsai.sgdsai_update_8bit_(p, g, torch.zeros(300, dtype=torch.uint8, device=DEV),
                                       torch.zeros(2, device=DEV), lr=0.1, scale=1.0, momentum=0.9,
                                       weight_decay=0.0, code=code)
