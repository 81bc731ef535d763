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
    diff = (c_tri.int() - c_ref.int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() < 0.01  # ties may land one code apart
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
