"""What the kernels share (Triton only): device functions, and the launchers' argument checks and RNG seed."""

import torch
import triton
import triton.language as tl
from torch import Tensor

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
    if grad.dtype != param.dtype or grad.shape != param.shape:
        raise ValueError("grad must have the param's dtype and shape")
    for t in (param, grad, *state):
        if t.device != param.device:
            raise ValueError(f"all tensors must be on {param.device}, got one on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{kernel} needs contiguous param, grad and state")


@triton.jit
def row_block_offsets(pid, row_len, per_row, BLOCK: tl.constexpr):
    """Element offsets and mask of quantization block ``pid`` in row blocks (``per_row`` blocks per row of
    ``row_len`` elements; a flat tensor is one row): blocks never span two rows, absmax index = ``pid``."""
    row = pid // per_row
    in_row = (pid - row * per_row) * BLOCK + tl.arange(0, BLOCK)
    return row * row_len + in_row, in_row < row_len


def check_8bit_state(n: int, shape: tuple, blocksize: int, *state: Tensor) -> tuple[int, int, int]:
    """(grid size = blocks, row length, blocks per row) for a fused 8-bit update of a tensor of ``shape``; refuses
    codes / absmax that do not match its row blocks (``memopt.functional.quantize.quantize_rows``)."""
    from memopt.functional.quantize import row_layout

    rows, length, per_row = row_layout(tuple(shape), blocksize)
    for codes, absmax in zip(state[::2], state[1::2]):
        if codes.dtype != torch.uint8 or absmax.dtype != torch.float32:
            raise ValueError("8-bit state must be uint8 codes and fp32 absmax")
        if codes.numel() != n or absmax.numel() != rows * per_row:
            raise ValueError("codes/absmax do not match the parameter's size and blocksize")
    return rows * per_row, length, per_row


@triton.jit
def nearest_code_index(v, mids_ptr):
    """Index of the nearest code for each value: the number of the 255 sorted midpoints strictly below it
    (binary lifting, 8 gathers). Ties go to the lower code, as in the PyTorch reference."""
    pos = tl.zeros_like(v).to(tl.int32)
    for k in tl.static_range(8):
        cand = pos + (128 >> k)
        ok = cand <= 255
        mid = tl.load(mids_ptr + cand - 1, mask=ok, other=float("inf"))
        pos = tl.where(ok & (mid < v), cand, pos)
    return pos


@triton.jit
def quantize_block(m, mids_ptr):
    """Absmax of a block (a 1-D tensor, padding lanes zero) and its codes against that absmax."""
    amax = tl.max(tl.abs(m), axis=0)
    safe = tl.where(amax > 0, amax, 1.0)
    normed = tl.minimum(tl.maximum(m / safe, -1.0), 1.0)
    return nearest_code_index(normed, mids_ptr).to(tl.uint8), amax


@triton.jit
def torch_lerp(start, end, weight):
    """torch.lerp's formula (two branches on the weight), so results match the reference's lerp_."""
    if weight < 0.5:
        out = start + weight * (end - start)
    else:
        out = end - (end - start) * (1.0 - weight)
    return out


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
def store_param_sr(ptr, offs, x, mask, P_KIND: tl.constexpr, SR: tl.constexpr, seed):
    """Parameter store; with SR and a bf16 parameter, stochastic rounding: 16 random bits are added below
    the bf16 mantissa before truncation (unbiased in expectation)."""
    if SR and P_KIND == 1:
        noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
        bits = x.to(tl.int32, bitcast=True) + noise
        tl.store(ptr + offs, (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        store_param(ptr, offs, x, mask, P_KIND)
