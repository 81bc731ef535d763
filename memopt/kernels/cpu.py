"""Fused CPU updates: C loops (``cpu_update.c``) that make one pass over a tensor where the PyTorch form
(``memopt.functional``, the specification and parity oracle) makes a dozen. Built on first use with the system C
compiler into a per-user cache and loaded with ctypes; no compiler, a failed build or ``MEMOPT_CPU_KERNELS=0``
leaves every update on the PyTorch form, with one log line (docs/optimizers.md, "Step time on CPU").

The functions take the reference's arguments. :func:`refusal` says, in one place, which tensors they take.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from memopt._cache import cache_dir
from memopt._env import env_flag
from memopt.functional.adamw import second_moment_read_map
from memopt.functional.quantize import _midpoint_lut, check_block_maxima, default_code, row_blocked
from memopt.functional.sgdsai import _TINY

logger = logging.getLogger("memopt")

SOURCE = Path(__file__).with_name("cpu_update.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
_LIB: dict = {}


def _cpu_id() -> str:
    """What ``-march=native`` compiles for: the processor's model and feature flags (Linux), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()[0]
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found)")
    source = SOURCE.read_bytes()
    # -march=native: a library built on one CPU may not run on another (a home directory shared between machines)
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, sys.platform, _cpu_id()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_update-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: processes building at once each install a whole library
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32
    lib.memopt_factored_sgdsai.restype = i64
    lib.memopt_factored_sgdsai.argtypes = [ptr] * 5 + [i64, i64, ptr, ptr, i32] + [f32] * 6 + [i64, ptr, ptr, ptr, i32,
                                                                                          i32]
    lib.memopt_square_sums.restype = i32
    lib.memopt_square_sums.argtypes = [ptr, i64, i64, ptr, ptr, i32]
    lib.memopt_lion.restype = i64
    lib.memopt_lion.argtypes = [ptr] * 5 + [i64, i64] + [f32] * 4 + [i32, i64, ptr, ptr, ptr, i32, i32]
    lib.memopt_adamw_8bit.restype = i64
    lib.memopt_adamw_8bit.argtypes = [ptr] * 6 + [i64, i64, i64] + [f32] * 7 + [i32] + [ptr, ptr, ptr, i32] * 2 + [i32]
    lib.memopt_adamsn.restype = i32
    lib.memopt_adamsn.argtypes = [ptr] * 4 + [i64, i64, i32] + [f32] * 7 + [i32]
    lib.memopt_sign_step.restype = None
    lib.memopt_sign_step.argtypes = [ptr, ptr, i64, f32, i32]
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded library, or ``None`` when the fused CPU updates are off or cannot be built (logged once)."""
    if "lib" not in _LIB:
        if not env_flag("MEMOPT_CPU_KERNELS", True):
            _LIB["lib"], why = None, "MEMOPT_CPU_KERNELS=0"
        else:
            try:
                _LIB["lib"], why = _build(), None
            except Exception as exc:  # noqa: BLE001  (no compiler, a failed build or load)
                _LIB["lib"], why = None, f"{type(exc).__name__}: {exc}"
        if why:
            logger.warning("memopt: fused CPU updates unavailable (%s); CPU tensors use the PyTorch updates", why)
    return _LIB["lib"]


def refusal(p: Tensor, g: Tensor, state: list, blocksize: Optional[int] = None, matrix: bool = True) -> Optional[str]:
    """Why the fused CPU updates cannot take parameter ``p`` with gradient ``g`` and state tensors ``state`` (8-bit
    codes and maxima in row blocks of ``blocksize``, or fp32 buffers), or ``None``: CPU, fp32, contiguous, two or
    more dimensions (unless not ``matrix``: an elementwise update), 8-bit state in row blocks."""
    if any(t is None for t in state):
        return "no state buffer"
    if p.numel() == 0:
        return "empty"
    tensors = [p, g, *state]
    if p.device.type != "cpu" or any(t.device != p.device for t in tensors):
        return "not a CPU tensor"
    if not all(t.is_contiguous() for t in tensors):
        return "not contiguous"
    if matrix and p.dim() < 2:
        return "not a tensor of two or more dimensions"
    if p.dtype != torch.float32 or g.dtype != torch.float32 or \
            any(t.is_floating_point() and t.dtype != torch.float32 for t in state):
        return "not fp32"
    if blocksize is not None and not row_blocked(tuple(p.shape), blocksize):
        return "8-bit state not in row blocks"
    if library() is None:
        return "the fused CPU updates are unavailable"
    return None


def square_sums(grad: Tensor) -> tuple[tuple[Tensor, Tensor], bool]:
    """The sums of squares of the rows and of the columns of fp32 ``grad`` viewed as ``rows × rest`` (accumulated in
    double, rounded once; the order of the column sums depends on the thread count), and whether ``grad`` is
    entirely finite: the C function :func:`factored_sgdsai_` runs first, one read of the gradient for both the
    statistics of ``scale="factored"`` and its finite check; here on its own, for tests and
    ``benchmarks/sgdsai_step_parts.py``."""
    rows = grad.shape[0]
    cols = grad.numel() // rows
    row_ss = torch.empty(rows, dtype=torch.float32)
    col_ss = torch.empty(cols, dtype=torch.float32)
    finite = library().memopt_square_sums(grad.data_ptr(), rows, cols, row_ss.data_ptr(), col_ss.data_ptr(),
                                          torch.get_num_threads())
    if finite < 0:
        raise MemoryError(f"memopt_square_sums: no memory for {torch.get_num_threads()} x {cols} column sums")
    return (row_ss, col_ss), bool(finite)


def _map(code: Optional[Tensor], signed: bool) -> tuple[list, list]:
    """The tensors and the C arguments (values, midpoint counts, padded midpoints, passes) of a code map: the
    default dynamic map when ``code`` is ``None`` (built once: its tables live as long as the process). The caller
    holds the tensors during the call."""
    if code is None:
        if signed not in _DEFAULT_MAPS:
            _DEFAULT_MAPS[signed] = _map(default_code(signed, torch.device("cpu")), signed)
        return _DEFAULT_MAPS[signed]
    code = code.float().contiguous()
    low, padded, extra = _midpoint_lut(code)
    return [code, low, padded], [code.data_ptr(), low.data_ptr(), padded.data_ptr(), extra]


_DEFAULT_MAPS: dict = {}


def _raise_if(bad: int) -> None:
    if bad < 0:
        raise MemoryError("the fused CPU update could not allocate its per-thread block buffers")
    if bad:
        raise ValueError(f"{bad} block(s) of the new 8-bit state are NaN or Inf (overflow): those blocks and their "
                         f"parameters were left unchanged, the others were updated")


def _momentum_args(state: list) -> list:
    """The C arguments (fp32 buffer, codes, block maxima; the absent ones ``None``) of a momentum held as ``state``:
    one fp32 buffer, or 8-bit codes and block maxima, which must be finite (checked before anything is written)."""
    if len(state) == 1:
        return [state[0].data_ptr(), None, None]
    check_block_maxima(state)
    return [None, state[0].data_ptr(), state[1].data_ptr()]


def factored_sgdsai_(param: Tensor, grad: Tensor, state: list, *, lr: float, scale: float, momentum: float,
                     weight_decay: float, eps: float, clip: Optional[float], maximize: bool = False,
                     blocksize: int = 256, check_finite: bool = True, r: Optional[Tensor] = None,
                     c: Optional[Tensor] = None) -> bool:
    """One ``scale="factored"`` SGD-SaI step past the first (``memopt.optim.sgdsai``) in one call: the gradient's sums
    of squares (:func:`square_sums`) and from them the factors (as :func:`memopt.functional.sgdsai.factored_scales`),
    then one pass for the normalised gradient, its momentum (``state``: one fp32 buffer, or 8-bit codes and block
    maxima) and the parameter. Given the factors ``r`` (rows, 1) and ``c`` (1, rest), the pass equals
    :func:`memopt.functional.sgdsai.normalized_pieces` applied by ``sgdsai_update_(_8bit_)`` bit for bit. Returns
    ``False``, having written nothing, when ``check_finite`` and the gradient holds NaN or Inf."""
    rows = param.shape[0]
    _held, code_args = _map(None, True)
    factors = [None, None] if r is None else [r.contiguous(), c.contiguous()]
    bad = library().memopt_factored_sgdsai(
        param.data_ptr(), grad.data_ptr(), *_momentum_args(state), rows, param.numel() // rows,
        *(None if f is None else f.data_ptr() for f in factors), int(check_finite), _TINY, eps,
        float("inf") if clip is None else clip, 1.0 - momentum, 1.0 - lr * weight_decay,
        (lr * scale) if maximize else -(lr * scale), blocksize, *code_args, torch.get_num_threads())
    if bad == -2:
        return False
    _raise_if(bad)
    return True


def _adam_args(*, lr, beta1, beta2, eps, weight_decay, step, maximize) -> list:
    """The C functions' AdamW arguments, as the PyTorch form computes them (memopt/functional/adamw.py)."""
    return [1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay, math.sqrt(1.0 - beta2**step), eps,
            -lr / (1.0 - beta1**step), int(maximize)]


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, step: int, maximize: bool = False,
                  stochastic_rounding: bool = False) -> None:
    """:func:`memopt.functional.adamw.adamw_update_` (fp32: ``stochastic_rounding`` has no effect) on torch's fused CPU
    AdamW kernel, the one ``torch.optim.AdamW(fused=True)`` runs: equal to that bit for bit, and to the PyTorch
    form within a rounding (its operations differ in order in places)."""
    torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))], lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize)


def adamw_update_8bit_(param: Tensor, grad: Tensor, exp_avg_codes: Tensor, exp_avg_absmax: Tensor,
                       exp_avg_sq_codes: Tensor, exp_avg_sq_absmax: Tensor, *, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float, step: int, maximize: bool = False, blocksize: int = 256,
                       signed_code: Optional[Tensor] = None, unsigned_code: Optional[Tensor] = None,
                       stochastic_rounding: bool = False, finite: Optional[Tensor] = None) -> None:
    """:func:`memopt.functional.adamw.adamw_update_8bit_` in one pass (fp32 parameters: ``stochastic_rounding`` has
    no effect; ``finite`` must be ``None``, the CPU path checks gradients before the update). The state equals the
    PyTorch form's bit for bit, the parameter within one rounding of its step (``sqrt``)."""
    if finite is not None:
        raise ValueError("the fused CPU update takes no device-side finite flag")
    state = [exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    check_block_maxima(state)
    rows = param.shape[0]
    _held_m, m_args = _map(signed_code, True)
    _held_v, v_args = _map(unsigned_code, False)
    read_v = second_moment_read_map(_held_v[0])  # v is decoded with it, quantized with the map's own midpoints
    bad = library().memopt_adamw_8bit(
        *(t.data_ptr() for t in (param, grad, *state)), rows, param.numel() // rows, blocksize,
        *_adam_args(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                    maximize=maximize), *m_args, read_v.data_ptr(), *v_args[1:], torch.get_num_threads())
    _raise_if(bad)


def lion_update_(param: Tensor, grad: Tensor, state: list, *, lr: float, beta1: float, beta2: float,
                 weight_decay: float, maximize: bool = False, blocksize: int = 256) -> None:
    """One Lion step (``memopt.optim.lion``) in one pass: ``state`` is the fp32 momentum (any shape) or its 8-bit codes
    and block maxima (row blocks). Equal to the PyTorch form bit for bit."""
    rows = param.shape[0] if len(state) == 2 else 1  # fp32 momentum: one flat row of any shape
    _held, code_args = _map(None, True)
    bad = library().memopt_lion(
        param.data_ptr(), grad.data_ptr(), *_momentum_args(state), rows, param.numel() // rows, 1.0 - beta1,
        1.0 - beta2, 1.0 - lr * weight_decay, lr, int(maximize), blocksize, *code_args, torch.get_num_threads())
    _raise_if(bad)


def sign_step_(param: Tensor, grad: Tensor, *, lr: float) -> None:
    """``param.sub_(grad.sign(), alpha=lr)`` (FRUGAL's state-free step) in one pass, without the sign tensor: equal
    to it bit for bit."""
    library().memopt_sign_step(param.data_ptr(), grad.data_ptr(), param.numel(), lr, torch.get_num_threads())


def adamsn_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, sn: Tensor, *, lr: float, beta1: float,
                   beta2: float, eps: float, bias_correction1: float, bias_correction2: float) -> None:
    """AdamSN's step of a matrix (:class:`memopt.optim.snsm.SubsetNormSM` with ``subset_norm=True`` and no subspace
    momentum, whose ``_matrix_update`` is the PyTorch form; weight decay and ``maximize`` are applied by the caller)
    in one pass over gradient, moment and parameter, plus one read of the gradient first when its subsets are
    columns: ``sn`` is the subset statistic, ``(rows, 1)`` or ``(1, cols)``. The moment equals the PyTorch form's bit
    for bit; the subset sums are taken in double (the PyTorch form's in fp32), so the statistic and the parameter
    agree with it within a few roundings."""
    rows = param.shape[0]
    cols = param.numel() // rows
    by_rows = tuple(sn.shape) == (rows, 1)
    if not by_rows and tuple(sn.shape) != (1, cols):
        raise ValueError(f"subset statistic of shape {tuple(sn.shape)} for a {rows} x {cols} matrix")
    if library().memopt_adamsn(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), sn.data_ptr(), rows, cols,
                               int(by_rows), 1.0 - beta1, beta2, 1.0 - beta2, bias_correction1, bias_correction2,
                               eps, lr, torch.get_num_threads()) < 0:
        raise MemoryError("the fused AdamSN update could not allocate its column sums")
