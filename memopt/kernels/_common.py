"""What the kernels share (Triton only): device functions, and the launchers' argument checks and RNG seed."""

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

from memopt.functional import quantize as _q
from memopt.functional.finite import check_finite_flag

KEY_EXP_LO = tl.constexpr(_q.KEY_EXP_LO)
MIN_ABSMAX = tl.constexpr(_q.MIN_ABSMAX)

KERNEL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def random_seed(stochastic_rounding: bool, dtype: torch.dtype) -> int:
    """Seed for a kernel's stochastic rounding, drawn from torch's global CPU RNG (no device sync; restored
    with the RNG state on Trainer resume). Drawn only when used, so the RNG stream is the same as on the
    reference path."""
    if not (stochastic_rounding and dtype == torch.bfloat16):
        return 0
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def check_update_args(kernel: str, param: Tensor, grad: Tensor, *state: Tensor) -> None:
    """What every fused update launcher requires: fp32/bf16/fp16 params, a gradient of the same dtype and shape,
    and contiguous tensors on the param's device."""
    if param.dtype not in KERNEL_FLOATS:
        raise ValueError(f"{kernel} supports fp32/bf16/fp16 params, got {param.dtype}")
    check_shape(kernel, tuple(param.shape))
    if grad.dtype != param.dtype or grad.shape != param.shape:
        raise ValueError("grad must have the param's dtype and shape")
    for t in (param, grad, *state):
        if t.device != param.device:
            raise ValueError(f"all tensors must be on {param.device}, got one on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{kernel} needs contiguous param, grad and state")


@triton.jit
def tile_offsets(pid, row_len, per_row, inv_per_row, n_blocks, NB: tl.constexpr, BLOCK: tl.constexpr,
                 ROWS: tl.constexpr):
    """Quantization blocks ``pid * NB ... pid * NB + NB - 1`` of a tensor as an ``(NB, BLOCK)`` tile: element
    offsets, element mask, block indices (= absmax indices) and block mask. ``ROWS``: row blocks of a tensor whose
    rows (``per_row`` blocks of ``row_len`` elements; ``inv_per_row`` = fp32 1 / per_row) do not end on a block
    boundary, so blocks never span two rows; otherwise the blocks are flat (``row_len`` = all elements) and the
    tile is contiguous, which lets the compiler vectorise its loads and stores. Offsets are int32: launchers refuse
    tensors of 2^31 or more elements (``memopt.kernels.kernel_refusal``)."""
    blk = pid * NB + tl.arange(0, NB)
    live = blk < n_blocks
    if ROWS:
        # row = blk // per_row without an integer division: (blk + 1/2) / per_row is at least 1/(2 per_row) from an
        # integer, and the fp32 product with the host's rounded 1 / per_row is within that of it while
        # n_blocks < MAX_ROW_BLOCKS = 2^22 (relative error < 2^-23 on a quotient below rows), so truncation is exact
        row = ((blk.to(tl.float32) + 0.5) * inv_per_row).to(tl.int32)
        in_row = ((blk - row * per_row) * BLOCK)[:, None] + tl.arange(0, BLOCK)[None, :]
        offs = (row * row_len)[:, None] + in_row
        mask = (in_row < row_len) & live[:, None]
    else:
        offs = (blk * BLOCK)[:, None] + tl.arange(0, BLOCK)[None, :]
        mask = offs < row_len
    return offs, mask, blk, live


def check_8bit_state(n: int, shape: tuple, blocksize: int, *state: Tensor) -> tuple[int, dict]:
    """The number of row blocks of a tensor of ``shape`` and the :func:`tile_offsets` arguments that lay them out
    (rows that end on a block boundary are passed as one flat row); refuses codes / absmax that do not match its row
    blocks (``memopt.functional.quantize.quantize_rows``) and shapes the kernels cannot take."""
    from memopt.functional.quantize import row_layout
    from memopt.kernels import kernel_refusal

    why = kernel_refusal(tuple(shape), blocksize)
    if why:
        raise ValueError(f"the Triton kernels cannot update this tensor: {why}")
    rows, length, per_row = row_layout(tuple(shape), blocksize)
    for codes, absmax in zip(state[::2], state[1::2]):
        if codes.dtype != torch.uint8 or absmax.dtype != torch.float32:
            raise ValueError("8-bit state must be uint8 codes and fp32 absmax")
        if codes.numel() != n or absmax.numel() != rows * per_row:
            raise ValueError("codes/absmax do not match the parameter's size and blocksize")
    if length % blocksize == 0 or rows == 1:
        return rows * per_row, dict(row_len=n, per_row=rows * per_row, inv_per_row=1.0, ROWS=False)
    return rows * per_row, dict(row_len=length, per_row=per_row, inv_per_row=1.0 / per_row, ROWS=True)


@triton.jit
def nearest_code_index(v, table_ptr, mids_ptr, M_BITS: tl.constexpr, EXTRA: tl.constexpr,
                       NONNEG: tl.constexpr = False):
    """Index of the nearest code for each value (up to 1 + 2^-23 in magnitude; beyond 1: that of -1 or 1): the
    number of the 255 sorted midpoints strictly below it (ties go to the lower code, as in the PyTorch reference).
    One read of a small table keyed on sign, exponent and top mantissa bits gives the count below the value's cell
    and the first midpoint to compare with; ``EXTRA - 1`` more comparisons follow (none for the dynamic maps). The
    layout is ``memopt.functional.quantize.kernel_code_index`` (its torch spelling). ``NONNEG``: the values are
    known to be +0 or more (Adam's second moment), so the sign part of the key is left out."""
    TOP: tl.constexpr = ((127 - KEY_EXP_LO) << M_BITS) + 1
    bits = v.to(tl.int32, bitcast=True)
    t = ((bits & 0x7FFFFFFF) >> (23 - M_BITS)) - (KEY_EXP_LO << M_BITS)
    key = tl.minimum(t.to(tl.uint32), TOP).to(tl.int32)
    if not NONNEG:
        key += (bits >> 31) & (TOP + 1)
    entry = tl.load(table_ptr + key)  # int64: count below the cell | first midpoint's bits << 32
    idx = entry.to(tl.int32) + ((entry >> 32).to(tl.int32).to(tl.float32, bitcast=True) < v).to(tl.int32)
    for _ in tl.static_range(EXTRA - 1):
        idx += (tl.load(mids_ptr + idx) < v).to(tl.int32)
    return idx


@triton.jit
def quantize_tile(m, table_ptr, mids_ptr, M_BITS: tl.constexpr, EXTRA: tl.constexpr, NONNEG: tl.constexpr = False):
    """The stored absmax of each row of an ``(NB, BLOCK)`` tile (padding lanes zero) and the codes against it."""
    amax = stored_absmax(tl.max(tl.abs(m), axis=1))
    return encode_tile(m, amax, table_ptr, mids_ptr, M_BITS, EXTRA, NONNEG), amax


@triton.jit
def stored_absmax(amax):
    """A block's largest magnitude as stored: at least fp32's smallest normal number unless the block is all zero
    (``memopt.functional.quantize.quantize_blockwise``); NaN stays NaN."""
    return tl.where(amax > 0, tl.maximum(amax, MIN_ABSMAX), amax)


@triton.jit
def reciprocal_rn(a):
    """1 / a rounded to nearest fp32, for normal ``a``, with no out-of-line call (a correctly rounded division
    calls a slow path, and its calling convention spills registers around it): an approximate fp32 reciprocal
    (within 2 ulp) refined twice in fp64 is within 2^-52 relative of 1 / a, closer than any fp32 rounding boundary
    can be to the reciprocal of an fp32 number (2^-48 relative), so one rounding to fp32 gives the correctly
    rounded result; the interpreter's exact division gets there too."""
    a64 = a.to(tl.float64)
    r = (1.0 / a).to(tl.float64)
    r = r + r * (1.0 - a64 * r)
    r = r + r * (1.0 - a64 * r)
    return r.to(tl.float32)


@triton.jit
def encode_tile(m, amax, table_ptr, mids_ptr, M_BITS: tl.constexpr, EXTRA: tl.constexpr,
                NONNEG: tl.constexpr = False):
    """Codes of an ``(NB, BLOCK)`` tile against its rows' stored maxima (:func:`stored_absmax`): each value times the
    row's correctly rounded reciprocal (once per block), as in the reference, so a value next to a midpoint gets the
    same code on every path."""
    inv = reciprocal_rn(tl.where(amax > 0, amax, 1.0))
    # no clamp to [-1, 1] (the reference's): a value an ulp beyond falls in the table's outermost cell, whose code
    # is the clamped value's
    return nearest_code_index(m * inv[:, None], table_ptr, mids_ptr, M_BITS, EXTRA, NONNEG).to(tl.uint8)


@triton.jit
def fast_div(a, b, COMPILED: tl.constexpr):
    """``a / b`` within 2 ulp for ``2^-126 <= |b| <= 2^126`` (PTX ``div.approx.f32``: a reciprocal and a multiply,
    where ``/`` spends eight instructions on range scaling). ``COMPILED=False`` (the CPU interpreter, which has no
    libdevice) divides exactly."""
    if COMPILED:
        q = libdevice.fast_dividef(a, b)
    else:
        q = a / b
    return q


@triton.jit
def torch_lerp(start, end, weight):
    """torch.lerp's formula, ``start + w (end - start)`` for ``w < 0.5`` else ``end - (end - start)(1 - w)``, so
    results match the reference's lerp_; written as one multiply-add from a selected base (no branch)."""
    low = weight < 0.5
    return tl.where(low, start, end) + tl.where(low, weight, weight - 1.0) * (end - start)


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16 with round-to-nearest-even through integer bits (the interpreter's cast truncates)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_param(ptr, offs, x, mask, P_DTYPE: tl.constexpr):
    if P_DTYPE == 1:
        tl.store(ptr + offs, to_bf16_rne(x), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def sr_noise(seed, pid, NB: tl.constexpr, BLOCK: tl.constexpr):
    """16 random bits for each element of program ``pid``'s ``(NB, BLOCK)`` tile: one Philox draw (four 32-bit
    numbers, each split in two halves) per eight elements, counters unique over the whole launch."""
    Q: tl.constexpr = NB * BLOCK // 8
    r0, r1, r2, r3 = tl.randint4x(seed, pid * Q + tl.arange(0, Q))
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (4 * Q,)).to(tl.uint32, bitcast=True)
    halves = tl.join(words & 0xFFFF, words >> 16)  # logical shift: the top half
    return tl.reshape(halves, (NB, BLOCK)).to(tl.int32)


@triton.jit
def store_param_sr(ptr, offs, x, mask, P_KIND: tl.constexpr, SR: tl.constexpr, seed, pid, NB: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Parameter store of an ``(NB, BLOCK)`` tile; with SR (bf16 parameters only: ``param_store_args``), stochastic
    rounding: 16 random bits are added below the bf16 mantissa before truncation (unbiased in expectation)."""
    if SR:
        bits = x.to(tl.int32, bitcast=True) + sr_noise(seed, pid, NB, BLOCK)
        tl.store(ptr + offs, (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        store_param(ptr, offs, x, mask, P_KIND)


# ------------------------------------------------------------------------------------------- launching
TILE = 4096  # elements per program of the 8-bit kernels (several quantization blocks per program)
ELEMS_PER_THREAD = 16
# Registers per thread, passed to ptxas (left alone it may aim for 32 and spill): 128 leave room for 16 warps per SM
# (65536 / (128 x 32)); at 16 elements per thread that is over 80 KB of loads in flight per SM, above the ~30 KB
# that hiding ~0.8 us of memory latency at 4.8 TB/s over 132 SMs takes
MAX_REGISTERS = 128


def launch_config(blocksize: int) -> dict:
    """Blocks per program (``NB``) and ``num_warps`` of the 8-bit kernels for a blocksize: a program holds
    ``max(TILE, blocksize)`` elements and its warps give each thread ``ELEMS_PER_THREAD`` of them, so the register
    use per thread stays the same from blocksize 16 to 8192; ``maxnreg``: the register budget given to ptxas."""
    elems = max(TILE, blocksize)
    return {"NB": elems // blocksize, "num_warps": max(1, min(32, elems // (32 * ELEMS_PER_THREAD))),
            "maxnreg": MAX_REGISTERS}


def param_store_args(param: Tensor, stochastic_rounding: bool) -> dict:
    """The parameter-store constexprs of an update kernel (``P_KIND``, ``SR``) and its RNG ``seed``."""
    sr = bool(stochastic_rounding) and param.dtype == torch.bfloat16  # bf16 only: one variant fewer for the rest
    return {"P_KIND": store_kind(param.dtype, param.device), "SR": sr, "seed": random_seed(sr, param.dtype)}


def store_kind(dtype: torch.dtype, device: torch.device) -> int:
    """Constexpr tag for stores: 1 = bf16 rounded to nearest even through integer bits (needed in the CPU
    interpreter, whose bf16 cast truncates), 0 = a plain cast (compiled casts round to nearest even)."""
    return 1 if dtype == torch.bfloat16 and torch.device(device).type == "cpu" else 0


def check_shape(kernel: str, shape: tuple) -> None:
    """Refuse a tensor the kernels cannot take (``memopt.kernels.kernel_refusal``; the optimizers route such tensors
    to the PyTorch reference before they get here)."""
    from memopt.kernels import kernel_refusal

    why = kernel_refusal(tuple(shape))
    if why:
        raise ValueError(f"{kernel}: {why}")


_ALWAYS: dict = {}


def finite_arg(finite, param: Tensor) -> Tensor:
    """The ``ok_ptr`` argument of an update kernel: the caller's ``finite`` flag (checked), or a cached ``True`` on
    the parameter's device. The kernel folds it into its masks, so a ``False`` flag writes nothing."""
    check_finite_flag(finite, param)
    if finite is not None:
        return finite.reshape(())
    if param.device not in _ALWAYS:
        _ALWAYS[param.device] = torch.ones((), dtype=torch.bool, device=param.device)
    return _ALWAYS[param.device]


def device_guard(t: Tensor):
    """Launch on ``t``'s GPU, not the current one (parameters may sit on several GPUs in one process)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
