"""Blockwise 8-bit dynamic quantization (arXiv 2110.02861; docs/8bit.md), plain PyTorch.

This is the reference (and CPU path) for the Triton kernels: a tensor is cut into blocks of ``blocksize``
elements (256 for optimizer states), each block is divided by its absolute maximum, and every element is stored
as the index (uint8) of the nearest of 256 code values of the dynamic ("tree") map.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

_MAX_EXPONENT_LEVELS = 7  # levels i = 0..6, each covering [0.1, 1] x 10**(i-6)
_MAPS: dict[tuple[bool, str], Tensor] = {}


def create_dynamic_map(signed: bool = True) -> Tensor:
    """The 256-entry dynamic quantization map (fp32, sorted ascending).

    For each exponent level ``i = 0..6`` the map holds the midpoints of ``linspace(0.1, 1, k + 1)`` scaled by
    ``10**(i - 6)``, with ``k = 2**i`` (signed: plus their negatives) or ``k = 2**(i + 1)`` (unsigned, for
    non-negative states such as Adam's second moment); then 0 and 1.0. Smallest non-zero magnitude: 5.5e-7
    (signed), 3.3e-7 (unsigned). The arithmetic is fp32 throughout, so the values equal bitsandbytes'
    ``create_dynamic_map`` bit for bit (tested).
    """
    values: list[Tensor] = []
    for i in range(_MAX_EXPONENT_LEVELS):
        k = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        level = mids * (10.0 ** (i - (_MAX_EXPONENT_LEVELS - 1)))
        values.append(level)
        if signed:
            values.append(-level)
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    code = torch.cat(values)
    if code.numel() != 256:
        raise AssertionError(f"dynamic map has {code.numel()} entries, expected 256")
    return torch.sort(code).values


def default_code(signed: bool, device: torch.device) -> Tensor:
    """The dynamic map on ``device``, built and copied once per device."""
    key = (signed, str(device))
    if key not in _MAPS:
        _MAPS[key] = create_dynamic_map(signed).to(device)
    return _MAPS[key]


# The smallest stored absmax of a block that is not all zero: fp32's smallest normal number, 2^-126 (the kernels
# read it too)
MIN_ABSMAX = torch.finfo(torch.float32).tiny

# A block is padded to its full size: a block of millions of elements is a mistake (and a huge allocation).
MAX_BLOCKSIZE = 1 << 20


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 0 < blocksize <= MAX_BLOCKSIZE:
        raise ValueError(f"blocksize={blocksize!r} must be a positive int of at most {MAX_BLOCKSIZE}")


def check_code_map(code: Optional[Tensor]) -> None:
    """A quantization map is 256 finite float32 values in [-1, 1], sorted strictly ascending (the nearest-code
    search depends on it). ``None`` (the default map) and the cached default maps pass without any work."""
    if code is None or any(code is m for m in _MAPS.values()):
        return
    if not isinstance(code, Tensor):
        raise ValueError(f"code must be a tensor of 256 float32 values, got {type(code).__name__}")
    if code.dtype != torch.float32 or code.dim() != 1 or code.numel() != 256:
        raise ValueError(f"code must be a 1-D float32 tensor of 256 values, got {code.dtype} of shape "
                         f"{tuple(code.shape)}")
    c = code.detach()
    if not bool(torch.isfinite(c).all()) or float(c.abs().max()) > 1.0:
        raise ValueError("code must hold finite values in [-1, 1]")
    if not bool((c[1:] > c[:-1]).all()):
        raise ValueError("code must be sorted strictly ascending (the nearest-code search relies on it)")


def _blocks(x: Tensor, blocksize: int) -> Tensor:
    """``x`` flattened, zero-padded to a whole number of blocks, shaped (n_blocks, blocksize)."""
    flat = x.reshape(-1)
    n_blocks = -(-flat.numel() // blocksize)
    pad = n_blocks * blocksize - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(n_blocks, blocksize)


def quantize_blockwise(
    x: Tensor,
    code: Optional[Tensor] = None,
    blocksize: int = 256,
    *,
    stochastic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to uint8 codes (same shape as ``x``) and one fp32 absmax per block: each element's code is
    the nearest to ``x * (1 / absmax)`` (fp32, the reciprocal rounded once per block).

    Args:
        x: fp32/bf16/fp16 tensor; math is done in fp32. Must be finite (NaN/Inf raise ``ValueError``: a
            non-finite value would make its whole block's absmax meaningless).
        code: the 256-value map (default: the signed dynamic map; pass ``create_dynamic_map(False)`` for
            non-negative states).
        blocksize: elements per block (default 256).
        stochastic: round to one of the two neighbouring codes with probability proportional to proximity
            (unbiased in expectation) instead of to the nearest code.

    An all-zero block gets absmax 0 and the code of 0.0, and dequantizes to exact zeros. A block whose largest
    magnitude is below 2^-126 (fp32's smallest normal number) is stored against 2^-126.
    """
    code = _quantize_args(x, code, blocksize)
    idx, absmax = _quantize_blocks(_blocks(x.detach().float(), blocksize), code, blocksize, stochastic, generator)
    absmax = absmax.view(-1)
    codes = idx.to(torch.uint8).reshape(-1)[: x.numel()].view(x.shape)
    return codes, absmax


def _quantize_args(x: Tensor, code: Optional[Tensor], blocksize: int) -> Tensor:
    """Refuse a bad block size, map or input of the quantizers; returns the map to use, on ``x``'s device."""
    _check_blocksize(blocksize)
    check_code_map(code)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize_blockwise: x must be a floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    return default_code(True, x.device) if code is None else code.to(device=x.device)


def _block_views(t: Tensor, blocksize: int) -> list[tuple[Tensor, slice]]:
    """The row blocks of a 2-D ``t`` (rows × length) as views whose last dimension is one block: the whole blocks of
    every row, then the short last block of every row when the length is not a multiple of ``blocksize``; each with
    its columns of the ``(rows, blocks per row)`` maxima."""
    full = t.shape[1] // blocksize
    cut = full * blocksize
    views = [(t[:, :cut].unflatten(1, (full, blocksize)), slice(0, full))] if full else []
    if cut < t.shape[1]:
        views.append((t[:, cut:].unsqueeze(1), slice(full, full + 1)))
    return views


def _quantize_blocks(x2: Tensor, code: Tensor, blocksize: int, stochastic: bool = False,
                     generator=None) -> tuple[Tensor, Tensor]:
    """The nearest-code indices (shaped like ``x2``) and the block maxima ``(rows, blocks per row)`` of an fp32
    ``x2`` of rows cut into blocks (:func:`_block_views`: no zero-padded copy of a row with a short last block).
    Raises ``ValueError`` on NaN/Inf."""
    rows = x2.shape[0]
    absmax = torch.empty((rows, -(-x2.shape[1] // blocksize)), dtype=torch.float32, device=x2.device)
    for view, cols in _block_views(x2, blocksize):
        torch.amax(view.abs(), dim=-1, out=absmax[:, cols])
    if not torch.isfinite(absmax).all():
        raise ValueError("quantize_blockwise: input has NaN or Inf values")
    # a block whose largest magnitude is below fp32's smallest normal number is stored against that number (its
    # reciprocal would overflow); an all-zero block keeps absmax 0
    absmax = torch.where(absmax > 0, absmax.clamp(min=MIN_ABSMAX), absmax)
    # x times the block's correctly rounded reciprocal: one division per block, and every path (CPU, interpreter,
    # compiled kernels) gets the same fp32 value, so the same code, even next to a midpoint
    recip = 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = torch.empty_like(x2)
    for (view, cols), (out, _) in zip(_block_views(x2, blocksize), _block_views(normed, blocksize)):
        torch.mul(view, recip[:, cols, None], out=out)
    normed.clamp_(-1.0, 1.0)
    idx = _nearest_code(normed, code)
    if stochastic:
        idx = _stochastic_round(normed, code, idx, generator)
    return idx, absmax


def code_midpoints(code: Tensor) -> Tensor:
    """The 255 decision boundaries between neighbouring codes (fp32), shared with the Triton kernels."""
    return (code[1:] + code[:-1]) / 2.0


def _nearest_code(normed: Tensor, code: Tensor) -> Tensor:
    # Decision boundaries are the midpoints between neighbouring codes; the index is the number of midpoints
    # strictly below the value, so a value exactly on a midpoint goes to the lower code.
    if normed.device.type == "cpu" and normed.dtype == torch.float32:
        return _nearest_code_cpu(normed, code)
    return torch.bucketize(normed, code_midpoints(code), right=False)


_LUT_CACHE: dict = {}


def _cached(kind: str, code: Tensor, build):
    """A table of ``kind`` built from a code map, once per map: the cached default maps are known by identity (no
    read of their values per call), any other map by its values."""
    default = next((k for k, m in _MAPS.items() if m is code), None)
    key = (kind, default) if default is not None else (kind, tuple(code.tolist()))
    hit = _LUT_CACHE.get(key)
    if hit is None:
        if len(_LUT_CACHE) > 32:
            _LUT_CACHE.clear()
        hit = _LUT_CACHE[key] = build(code)
    return hit


def _cell_counts(mids: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, int]:
    """For cells of fp32 values ``[lo, hi]``: how many midpoints lie below each cell's smallest value (``low``),
    and the most midpoints any cell holds (``extra``). Then for a value ``x`` of a cell
    ``count(mids < x) = low + #{steps of idx += (mids[idx] < x)}``, exact after ``extra`` steps (the midpoints
    padded with +inf so a step never reads past them). Cells with a non-finite end count from 0."""
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    low = torch.bucketize(torch.where(finite, lo, torch.zeros_like(lo)), mids, right=False)
    high = torch.bucketize(torch.where(finite, hi, torch.zeros_like(hi)), mids, right=False)
    return low.to(torch.int32), int((high - low).max())


def _bits_to_float(bits: Tensor) -> Tensor:
    """int64 bit patterns (0 .. 2^32-1) as the fp32 values they encode."""
    return (bits - (1 << 32) * (bits >= (1 << 31))).to(torch.int32).view(torch.float32)


def _padded_midpoints(code: Tensor) -> Tensor:
    mids = code_midpoints(code.float())
    return torch.cat([mids, mids.new_full((1,), float("inf"))])


def _int32_pairs(first: Tensor, second: Tensor) -> Tensor:
    """Two 32-bit tensors of one length as one int64 tensor whose ``view(torch.int32)`` reads ``first[i], second[i]``
    at ``2i, 2i + 1`` (in the machine's byte order): one table read gives both."""
    return torch.stack([first.view(torch.int32), second.view(torch.int32)], 1).contiguous().view(torch.int64).view(-1)


def _midpoint_lut(code: Tensor) -> tuple[Tensor, Tensor, int]:
    """The CPU path's table: one cell per value of the top 16 bits of an fp32 number (``_cell_counts``): the count
    ``low`` of midpoints below each cell (int32), the padded midpoints and ``extra``. (Not paired with the first
    midpoint in one int64 entry as in the kernels' table: that saves a read but makes 1 MiB temporaries per 2^17
    values, no faster with glibc's defaults and slower where large blocks get their own mapping.)"""
    def build(code):
        tops = torch.arange(65536, dtype=torch.int64) << 16
        first, last = _bits_to_float(tops), _bits_to_float(tops | 0xFFFF)
        low, extra = _cell_counts(code_midpoints(code.float()), torch.minimum(first, last),
                                  torch.maximum(first, last))
        return low, _padded_midpoints(code), extra

    return _cached("midpoints", code, build)


def _pair_table(code: Tensor) -> Tensor:
    """``code`` values of every pair of codes: entry ``u`` holds the values of the two codes whose bytes, in memory
    order, make up the uint16 ``u`` (:func:`_int32_pairs`). Dequantizing two codes takes one table read."""
    def build(code):
        pairs = torch.arange(65536, dtype=torch.int32).to(torch.uint16).view(torch.uint8).view(65536, 2).long()
        values = code.float().cpu()
        return _int32_pairs(values[pairs[:, 0]], values[pairs[:, 1]]).to(code.device)

    return _cached("pairs", code, build)


def code_values(code: Tensor, codes: Tensor) -> Tensor:
    """``code[codes]`` in fp32, shaped like ``codes``. On CPU, contiguous codes whose last dimension is even are read
    two at a time (:func:`_pair_table`, 1.6x faster, the same values)."""
    if codes.device.type == "cpu" and codes.dim() and codes.shape[-1] % 2 == 0 and codes.is_contiguous():
        pairs = _lookup(_pair_table(code), codes.view(torch.uint16).int())
        return pairs.view(torch.float32).view(codes.shape)
    return _lookup(code.float(), codes.int())


# The Triton kernels' table (docs/8bit.md, "Nearest-code search"). A value x is keyed on the exponent and the top
# ``m_bits`` mantissa bits of |x| (read together as one integer t, monotone in |x|), counted from 2^(KEY_EXP_LO - 127)
# = 2^-22 as an unsigned number, so that every |x| below it (t - offset < 0 wraps around) and anything that is not
# a number in [-2, 2] land in one cell, ``top``; then on the sign:
#     t = (bits(x) & 0x7FFFFFFF) >> (23 - m_bits)
#     key = min(uint32(t - (KEY_EXP_LO << m_bits)), top) + (x < 0) * (top + 1),   top = (127 - KEY_EXP_LO) << m_bits + 1
# (two instructions fewer than a signed clamp). The codes need |x| <= 1 + 2^-23, which x * (1 / absmax) meets.
# A few KB, so it stays in the GPU's L1 cache: one table read and ``extra`` midpoint comparisons per value.
KEY_EXP_LO = 105
KEY_MAX_EXTRA = 1  # m_bits is the smallest of 4..8 whose cells hold at most this many midpoints


def key_top(m_bits: int) -> int:
    """The key of the cell of small magnitudes (below 2^-22); the keys below it cover [2^-22, 1 + 2^-m_bits)."""
    return ((127 - KEY_EXP_LO) << m_bits) + 1


def _kernel_key_cells(m_bits: int) -> tuple[Tensor, Tensor]:
    """The smallest and largest fp32 value of every key (in key order)."""
    t = torch.arange(key_top(m_bits), dtype=torch.int64) + (KEY_EXP_LO << m_bits)
    lo_bits = torch.cat([t << (23 - m_bits), torch.zeros(1, dtype=torch.int64)])
    hi_bits = torch.cat([((t + 1) << (23 - m_bits)) - 1, torch.tensor([(KEY_EXP_LO << 23) - 1])])
    lo, hi = _bits_to_float(lo_bits), _bits_to_float(hi_bits)
    return torch.cat([lo, -hi]), torch.cat([hi, -lo])  # sign 0, then sign 1 (negated: lo and hi swap)


def kernel_code_table(code: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """``(table, padded midpoints, m_bits, extra)`` of a code map for the Triton kernels' nearest-code search.
    ``table[key(x)]`` (int64) holds, for ``x``'s cell, the number ``low`` of midpoints below the cell (low 32 bits)
    and the midpoint ``mids[low]`` (fp32 bits, high 32 bits): one read gives the first compare-and-step, and
    ``extra - 1`` more reads of the padded midpoints (256 fp32, the last +inf) finish the count exactly
    (:func:`_cell_counts`; at least one step is always taken, which is exact for cells without midpoints too)."""
    mids = code_midpoints(code.detach().float().cpu())
    for m_bits in range(4, 9):
        low, extra = _cell_counts(mids, *_kernel_key_cells(m_bits))
        if extra <= KEY_MAX_EXTRA:
            break
    padded = _padded_midpoints(code.detach().cpu())
    first = padded[low.long()].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return (first << 32) | low.to(torch.int64), padded, m_bits, extra


def kernel_code_index(x: Tensor, code: Tensor) -> Tensor:
    """The Triton kernels' nearest-code search written with torch ops (fp32 ``x``, ``|x| <= 1 + 2^-23``): the spec
    of the table layout, tested equal to :func:`torch.bucketize` of the midpoints of the clamped value."""
    table, mids, m_bits, extra = kernel_code_table(code)
    bits = x.float().contiguous().view(torch.int32)
    top = key_top(m_bits)
    t = ((bits & 0x7FFFFFFF) >> (23 - m_bits)).long() - (KEY_EXP_LO << m_bits)
    key = torch.where(t < 0, top, t.clamp(max=top)) + ((bits >> 31) & (top + 1))
    entry = table.to(x.device)[key.long()]
    first = (entry >> 32).to(torch.int32).view(torch.float32)
    idx = (entry & 0xFFFFFFFF) + (first < x)
    mids = mids.to(x.device)
    for _ in range(extra - 1):
        idx += mids[idx] < x
    return idx


def _nearest_code_cpu(normed: Tensor, code: Tensor) -> Tensor:
    """:func:`torch.bucketize` of fp32 ``normed`` against the code midpoints, exactly, by a 65536-entry table on
    the value's top 16 bits plus at most ``extra`` compare-and-step passes (3x faster than bucketize on CPU)."""
    low, padded, extra = _midpoint_lut(code)
    idx = _lookup(low, (normed.view(torch.int32) >> 16) & 0xFFFF)  # int32 indices: half the traffic of int64
    for _ in range(extra):
        idx += _lookup(padded, idx) < normed
    return idx


def _lookup(table: Tensor, idx: Tensor) -> Tensor:
    """``table[idx]`` for a 1-D table: ``index_select`` on the flattened indices, 2-4x faster than advanced indexing on
    CPU (which converts int32 indices to int64 first) and the same values."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _stochastic_round(normed: Tensor, code: Tensor, nearest: Tensor, generator) -> Tensor:
    value = code[nearest]
    lower = torch.where(value > normed, (nearest - 1).clamp_(min=0), nearest)
    upper = (lower + 1).clamp_(max=code.numel() - 1)
    lo, hi = code[lower], code[upper]
    span = hi - lo
    p_up = torch.where(span > 0, (normed - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(span))
    u = torch.rand(normed.shape, generator=generator, device=normed.device)
    return torch.where(u < p_up, upper, lower)


def _check_code_dtypes(codes: Tensor, absmax: Tensor) -> None:
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if not isinstance(absmax, Tensor) or not absmax.is_floating_point():
        raise ValueError(f"absmax must be a floating-point tensor, got "
                         f"{getattr(absmax, 'dtype', type(absmax).__name__)}")


def check_codes(codes: Tensor, absmax: Tensor, blocksize: int) -> None:
    """uint8 codes with one floating absmax per block of ``blocksize``: what every dequantize path expects."""
    _check_code_dtypes(codes, absmax)
    n_blocks = -(-codes.numel() // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, {codes.numel()} codes need {n_blocks} blocks of "
                         f"blocksize={blocksize}: blocksize does not match the codes and absmax given")


def _dequantize_args(codes: Tensor, absmax: Tensor, code: Optional[Tensor], blocksize: int, dtype) -> Tensor:
    """Refuse a bad block size, codes, block maxima, map or output dtype of the dequantizers; returns the map to use,
    on the codes' device."""
    _check_blocksize(blocksize)
    _check_code_dtypes(codes, absmax)
    check_code_map(code)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating-point dtype")
    return default_code(True, codes.device) if code is None else code.to(device=codes.device)


def dequantize_blockwise(
    codes: Tensor,
    absmax: Tensor,
    code: Optional[Tensor] = None,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax[block]``, shaped like ``codes``."""
    code = _dequantize_args(codes, absmax, code, blocksize, dtype)
    check_codes(codes, absmax, blocksize)
    values = _blocks(code_values(code, codes.reshape(-1)), blocksize) * absmax.float()[:, None]
    return values.reshape(-1)[: codes.numel()].view(codes.shape).to(dtype)


# ------------------------------------------------------------------------------- 8-bit optimizer state helpers
# Optimizer state in 8 bits uses row blocks: a tensor of two or more dimensions is viewed as ``shape[0]`` rows of
# ``numel / shape[0]`` elements, and each row is cut into blocks of ``blocksize`` (its last block may be shorter).
# Blocks never span two rows, so a tensor sharded by rows (FSDP2's ``Shard(0)``) holds whole blocks on every rank,
# the block maxima shard with the rows (``absmax`` has shape ``(rows, blocks per row)``), and a checkpoint reshards
# to any world size. A vector, and a tensor whose rows are shorter than one block (e.g. LoRA's B, out x r), is cut
# into flat blocks instead (per-row blocks would hold one maximum per few elements). When the row length is a
# multiple of ``blocksize`` the row blocks are exactly the flat blocks of :func:`quantize_blockwise`.
# A state tensor ``key`` held in 8 bits is two tensors: ``<key>_codes`` (uint8, the tensor's shape) and
# ``<key>_absmax`` (float32). These helpers are the one place that knows it.
def blocks_of(numel: int, blocksize: int) -> int:
    """How many quantization blocks ``numel`` elements take."""
    return -(-numel // blocksize)


def row_blocked(shape: tuple, blocksize: int) -> bool:
    """Whether a state tensor of ``shape`` uses row blocks (two or more dimensions, rows of at least one block)."""
    return len(shape) >= 2 and shape[0] > 0 and math.prod(shape) // shape[0] >= blocksize


def row_layout(shape: tuple, blocksize: int) -> tuple[int, int, int]:
    """``(rows, row length, blocks per row)`` of a state tensor of ``shape`` (flat blocks: one row)."""
    numel = math.prod(shape)
    rows = shape[0] if row_blocked(tuple(shape), blocksize) else 1
    length = numel // rows if rows else 0
    return rows, length, blocks_of(length, blocksize)


def _absmax_shape(shape: tuple, blocksize: int) -> tuple:
    rows, _, per_row = row_layout(tuple(shape), blocksize)
    return (rows, per_row) if row_blocked(tuple(shape), blocksize) else (per_row,)


def quantize_rows(x: Tensor, code: Optional[Tensor] = None, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """:func:`quantize_blockwise` in row blocks (see above): uint8 codes shaped like ``x`` and float32 block maxima
    of shape ``(rows, blocks per row)`` (a vector: ``(blocks,)``). Rows whose length is not a multiple of
    ``blocksize`` are quantized as two views (:func:`_block_views`): the same values as zero-padding every row to
    whole blocks (zeros leave a block's maximum alone), without the padded copies."""
    rows, length, _ = row_layout(tuple(x.shape), blocksize)
    if rows == 1:
        codes, absmax = quantize_blockwise(x, code, blocksize)
        return codes, absmax.view(_absmax_shape(tuple(x.shape), blocksize))
    code = _quantize_args(x, code, blocksize)
    idx, absmax = _quantize_blocks(x.detach().reshape(rows, length).float(), code, blocksize)
    return idx.to(torch.uint8).view(x.shape), absmax


def dequantize_rows(codes: Tensor, absmax: Tensor, code: Optional[Tensor] = None, blocksize: int = 256,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_rows`."""
    shape = tuple(codes.shape)
    rows, length, _ = row_layout(shape, blocksize)
    if absmax.shape != _absmax_shape(shape, blocksize):
        raise ValueError(f"absmax has shape {tuple(absmax.shape)}, codes of shape {shape} in row blocks of "
                         f"blocksize={blocksize} need {_absmax_shape(shape, blocksize)}")
    if rows == 1:
        return dequantize_blockwise(codes, absmax.reshape(-1), code, blocksize, dtype)
    code = _dequantize_args(codes, absmax, code, blocksize, dtype)
    values = code_values(code, codes.reshape(rows, length))
    for view, cols in _block_views(values, blocksize):
        view.mul_(absmax[:, cols, None].float())
    return values.view(shape).to(dtype)


# Large tensors are updated in pieces of whole rows: the temporaries of a piece stay in the CPU's caches and are
# reused by the allocator, where whole-tensor temporaries cost a page fault per 4 KB. CHUNK_ELEMENTS bounds the pieces
# of scale="factored", whose temporaries live in one reused buffer (scratch); STATE_CHUNK_ELEMENTS those of the 8-bit
# updates, whose PyTorch ops allocate a temporary each: 2^17 elements keep an fp32 temporary at 512 KB, below glibc's
# mmap threshold in its default and in the benchmarks' 1 MiB setting (measured on the demo parameter set, interleaved:
# 2^17 takes 0.82x the step of 2^20 by default and 0.56x at a 1 MiB threshold). Every piece is a whole number of row
# blocks, so the result is the same as in one piece.
CHUNK_ELEMENTS = 1 << 20
STATE_CHUNK_ELEMENTS = 1 << 17


_SCRATCH: dict = {}


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable 1-D buffer of ``numel`` elements (at most ``CHUNK_ELEMENTS``) for a piece's temporary: one per
    device and dtype, allocated once, so its memory is not first-touched again at every step (4 MB in fp32). For
    one piece at a time, from one thread."""
    key = (torch.device(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(max(numel, CHUNK_ELEMENTS), dtype=dtype, device=device)
    return buf[:numel]


def row_ranges(shape: tuple, elements: Optional[int] = None) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` cutting a tensor of ``shape`` (``shape[0]`` rows) into pieces of at most ``elements``
    (default ``CHUNK_ELEMENTS``) elements, at least one row each."""
    rows = shape[0] if shape else 1
    length = math.prod(shape) // rows if rows else 0
    step = max(1, (elements or CHUNK_ELEMENTS) // max(length, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def check_block_maxima(state: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` when a floating tensor of ``state`` (8-bit codes and their block maxima) holds NaN or Inf:
    an update in pieces calls it before its first piece, so corrupt state raises before anything is written, as it
    does in one piece."""
    for t in state:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("the 8-bit state holds NaN or Inf block maxima: it is corrupt")


def in_row_pieces(update, *tensors: Tensor, **kwargs) -> bool:
    """Run ``update(*pieces, **kwargs)`` on pieces of whole rows (``STATE_CHUNK_ELEMENTS``) of ``tensors`` (a parameter,
    its gradient, and its 8-bit state in row blocks of ``kwargs["blocksize"]``: codes and block maxima have one row
    per parameter row) when the parameter is larger than one piece; returns whether it did (``False``: the caller
    updates it whole). Contiguous row-blocked tensors only."""
    shape = tuple(tensors[0].shape)
    if math.prod(shape) <= STATE_CHUNK_ELEMENTS or not row_blocked(shape, kwargs["blocksize"]) or \
            not all(t.is_contiguous() for t in tensors):
        return False
    check_block_maxima(tensors[2:])
    for r0, r1 in row_ranges(shape, STATE_CHUNK_ELEMENTS):
        update(*(t[r0:r1] for t in tensors), **kwargs)
    return True


def layout_8bit(key: str, shape: tuple, blocksize: int) -> dict:
    """``{state key: (shape, dtype)}`` of state ``key`` held in 8 bits (row blocks)."""
    return {f"{key}_codes": (tuple(shape), torch.uint8),
            f"{key}_absmax": (_absmax_shape(tuple(shape), blocksize), torch.float32)}


def load_moment(state: dict, key: str, blocksize: int, signed: bool = True, read=None) -> Optional[Tensor]:
    """State ``key`` in full precision: the tensor itself, or its 8-bit form dequantized to fp32 (``signed``: which
    dynamic map; ``read``: a function giving the values to read the map's codes as, e.g.
    :func:`memopt.functional.adamw.second_moment_read_map`); ``None`` when the state has neither."""
    if key in state:
        return state[key]
    codes = state.get(f"{key}_codes")
    if codes is None:
        return None
    code = default_code(signed, codes.device)
    return dequantize_rows(codes, state[f"{key}_absmax"], code if read is None else read(code), blocksize)


def store_moment(state: dict, key: str, value: Tensor, blocksize: int, signed: bool, eight: bool) -> None:
    """Keep ``value`` as state ``key``: quantized to 8 bits in row blocks (``eight``) or as it is."""
    if eight:
        state[f"{key}_codes"], state[f"{key}_absmax"] = quantize_rows(value, default_code(signed, value.device),
                                                                      blocksize)
    else:
        state[key] = value
