"""Fused SGD-SaI kernels vs their PyTorch twins, on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from conftest import KERNEL_DEVICE as DEV
from memopt.functional import sgdsai as ref
from memopt.kernels import sgdsai as tri

SIZES = [1, 255, 257, 4097]
# row blocks with a partial last block, aligned rows, 3-D, and rows narrower than a block (flat blocks)
SHAPES_8BIT = [(1,), (255,), (257,), (4097,), (3, 300), (5, 256), (2, 3, 100), (64, 80)]
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}


def _case(n, dtype, seed=0):
    shape = n if isinstance(n, tuple) else (n,)
    g = torch.Generator().manual_seed(seed + sum(shape))
    p = (torch.randn(shape, generator=g) * 0.5).to(DEV, dtype)
    grads = [(torch.randn(shape, generator=g) * 1e-1).to(DEV, dtype) for _ in range(4)]
    return p, grads


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_fused_full_precision_matches_reference(n, dtype, momentum):
    p0, grads = _case(n, dtype)
    kw = dict(lr=1e-2, scale=0.7, momentum=momentum, weight_decay=0.1, maximize=False)
    out = []
    for impl in (ref, tri):
        p = p0.clone()
        m = grads[0].clone() if momentum else None
        for t, g in enumerate(grads):
            impl.sgdsai_update_(p, g, m, first_step=(t == 0), **kw)
        out.append((p, m))
    torch.testing.assert_close(out[1][0], out[0][0], **TOL[dtype])
    if momentum:
        torch.testing.assert_close(out[1][1], out[0][1], **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES_8BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_8bit_matches_reference(shape, dtype, maximize):
    from memopt.functional.quantize import layout_8bit

    p0, grads = _case(shape, dtype, seed=1)
    kw = dict(lr=1e-2, scale=0.5, momentum=0.9, weight_decay=0.01, maximize=maximize)
    results = []
    for impl in (ref, tri):
        p = p0.clone()
        codes, absmax = (torch.zeros(s, dtype=d, device=DEV) for s, d in layout_8bit("m", shape, 256).values())
        for t, g in enumerate(grads):
            impl.sgdsai_update_8bit_(p, g, codes, absmax, first_step=(t == 0), **kw)
        results.append((p, codes, absmax))
    (p_r, c_r, a_r), (p_t, c_t, a_t) = results
    torch.testing.assert_close(p_t, p_r, **TOL[dtype])
    torch.testing.assert_close(a_t, a_r, atol=1e-7, rtol=1e-5)
    diff = (c_t.int() - c_r.int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() < 0.02


def test_fused_launchers_validate():
    p = torch.randn(300)
    with pytest.raises(ValueError, match="dtype and shape"):
        tri.sgdsai_update_(p, torch.randn(300, dtype=torch.float64), None, lr=1.0, scale=1.0, momentum=0.0,
                           weight_decay=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        q = torch.randn(20, 15).t()
        tri.sgdsai_update_(q, torch.randn(20, 15).t(), None, lr=1.0, scale=1.0, momentum=0.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="match"):
        tri.sgdsai_update_8bit_(p, torch.randn(300), torch.zeros(300, dtype=torch.uint8), torch.zeros(1), lr=1.0,
                                scale=1.0, momentum=0.9, weight_decay=0.0)


@pytest.mark.parametrize("blocksize,shape", [(16, (37, 40)), (64, (9, 1000)), (256, (37, 300)), (256, (5, 576)),
                                             (1024, (7, 1500)), (8192, (3, 9000))])
def test_fused_8bit_row_blocks_across_programs(blocksize, shape):
    """Rows that do not end on a block boundary, with several rows per program and programs that start mid-row:
    every block's row comes from the kernel's float quotient."""
    from memopt.functional.quantize import layout_8bit

    p0, grads = _case(shape, torch.float32, seed=2)
    results = []
    for impl in (ref, tri):
        p = p0.clone()
        codes, absmax = (torch.zeros(s, dtype=d, device=DEV) for s, d in layout_8bit("m", shape, blocksize).values())
        for t, g in enumerate(grads):
            impl.sgdsai_update_8bit_(p, g, codes, absmax, lr=1e-2, scale=0.5, momentum=0.9, weight_decay=0.01,
                                     first_step=(t == 0), blocksize=blocksize)
        results.append((p, codes, absmax))
    (p_r, c_r, a_r), (p_t, c_t, a_t) = results
    torch.testing.assert_close(p_t, p_r, **TOL[torch.float32])
    torch.testing.assert_close(a_t, a_r, atol=1e-7, rtol=1e-5)
    diff = (c_t.int() - c_r.int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() < 0.02


def test_row_of_a_block_by_float_quotient_is_exact_below_the_limit():
    """The kernels find a block's row as trunc((blk + 1/2) * fp32(1 / blocks_per_row)) (``tile_offsets``): equal
    to blk // blocks_per_row for every block index below MAX_ROW_BLOCKS, for small, prime, power-of-two-adjacent
    and large row widths (the fp32 arithmetic the kernels do, in torch)."""
    from memopt.kernels import MAX_ROW_BLOCKS

    blk = torch.arange(MAX_ROW_BLOCKS, dtype=torch.int32)
    widths = [1, 2, 3, 5, 7, 43, 127, 255, 257, 1021, 4093, 65535, 65537, 1048573, MAX_ROW_BLOCKS - 1]
    for per_row in widths:
        inv = torch.tensor(1.0 / per_row, dtype=torch.float32)  # as the launcher passes it: a Python float to fp32
        row = ((blk.float() + 0.5) * inv).to(torch.int32)
        assert torch.equal(row, blk // per_row), per_row
