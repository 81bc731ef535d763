"""The 8-bit SGD-SaI update as first written here (one quantization block per program, nearest code by binary
search over the 255 midpoints: 8 dependent reads per element), kept to show that the instruction budget of
tests/test_kernels_compile.py refuses it."""

import triton
import triton.language as tl


@triton.jit
def binary_search_8bit_kernel(p_ptr, g_ptr, codes_ptr, absmax_ptr, code_ptr, mids_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    idx = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(code_ptr + idx, mask=mask, other=0.0) * tl.load(absmax_ptr + pid) * 0.9 + 0.1 * g
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) - 0.01 * m
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    amax = tl.max(tl.abs(m), axis=0)
    v = m / tl.where(amax > 0, amax, 1.0)
    pos = tl.zeros_like(v).to(tl.int32)
    for k in tl.static_range(8):
        cand = pos + (128 >> k)
        ok = cand <= 255
        mid = tl.load(mids_ptr + cand - 1, mask=ok, other=float("inf"))
        pos = tl.where(ok & (mid < v), cand, pos)
    tl.store(codes_ptr + offs, pos.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + pid, amax)
