"""SGD-SaI: SGD with momentum and a per-tensor learning-rate scale set once from the gradient SNR."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from memopt.functional.sgdsai import (
    compute_dtype,
    gsnr,
    sgdsai_update_,
    sgdsai_update_8bit_,
    sgdsai_update_foreach_,
)

logger = logging.getLogger(__name__)

SCALE_MODES = ("gsnr_max", "gsnr", "sqrt_numel")
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_STATE_KEYS = {"momentum_buffer", "momentum_codes", "momentum_absmax", "gsnr"}
_STATE_BITS = (8, 32)
_OVERRIDE_ATTR = "_memopt_state_bits"


def keep_32bit_state(params, bits: int = 32) -> None:
    """Per-parameter override of ``state_bits`` (e.g. keep embeddings in 32-bit state under ``state_bits=8``).

    Accepts a tensor, an iterable of tensors or an ``nn.Module`` (all its parameters). The mark lives on the
    tensor, so it must be set before the parameter's first step; a tensor's state format never changes later.
    """
    if bits not in _STATE_BITS:
        raise ValueError(f"bits={bits!r} is not one of {_STATE_BITS}")
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    elif isinstance(params, Tensor):
        params = [params]
    for p in params:
        setattr(p, _OVERRIDE_ATTR, bits)

# Chosen from the sweep in docs/sgdsai.md (SmolLM2-135M on pydoc text, same seed/steps for every point).
DEFAULT_SCALE = "gsnr_max"
DEFAULT_LR = 3e-2


def _dtype_name(dtype: Union[None, str, torch.dtype]) -> Optional[str]:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, d in _STATE_DTYPES.items():
            if d == dtype:
                return name
        raise ValueError(f"state_dtype={dtype} is not supported; use one of {sorted(_STATE_DTYPES)} or None")
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                "float": "float32", "double": "float64", "fp64": "float64"}.get(name, name)
        if name in _STATE_DTYPES:
            return name
    raise ValueError(f"state_dtype={dtype!r} is not supported; use one of {sorted(_STATE_DTYPES)} or None")


def _check_float(name: str, value: Any, low: float, high: float = math.inf, *, low_open=False, high_open=True):
    if isinstance(value, Tensor):
        raise ValueError(f"{name}={value!r}: a tensor is not supported here, pass a Python float")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range {lo}{low}, {high}{hi}")


class SGDSaI(Optimizer):
    """SGD with momentum and Scaling at Initialization (SGD-SaI, arXiv 2412.11768).

    Per parameter tensor, at its first step with a non-zero gradient the optimizer records the gradient
    signal-to-noise ratio ``s = ||g|| / (std(g) + eps)``; every step then does
    ``θ ← θ(1 − lr·wd)`` (decoupled decay, not scaled), ``m ← β m + (1 − β) g`` (``m = g`` at the first step),
    ``θ ← θ − lr·scale·m``. The state is one momentum buffer per tensor: half of AdamW's.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 3e-2: recommended for full fine-tuning with ``scale="gsnr_max"``; use ~1.0 for
            LoRA, whose adapter gradients are tiny. docs/sgdsai.md has the sweep behind both numbers).
        momentum: EMA coefficient β in [0, 1) (default 0.9). ``0`` gives SaI-scaled SGD with no state tensors.
        weight_decay: decoupled weight decay λ ≥ 0 (default 1e-2), applied as ``θ·(1 − lr·λ)``.
        eps: added to the std in the g-SNR (default 1e-8).
        scale: how ``scale`` is derived, keyword-only (default ``"gsnr_max"``):
            ``"gsnr_max"`` (paper Algorithm 1): ``s / max_k s_k``, the max over every tensor in every
            ``gsnr_max`` group that has a scale so far; the tensor with the largest g-SNR moves at exactly lr.
            A tensor whose scale arrives later (its gradient was ``None`` or all zero before) joins that max
            when it arrives, so the max is a running max and every scale stays ≤ 1.
            ``"gsnr"`` (reference v1.0.3): ``s`` itself, ~sqrt(numel)× larger steps, so use a tiny lr.
            ``"sqrt_numel"`` (reference v1.1.0): ``sqrt(numel)``, needs no gradient statistics.
        maximize: maximize the objective instead of minimizing.
        foreach: use ``torch._foreach_*`` ops (default: True). Both paths give bit-identical results.
        state_dtype: dtype of the momentum buffer (default: the parameter's dtype). Update math is fp32.
        check_finite: skip the update of any tensor whose gradient has a NaN/Inf (param and state are left
            unchanged, a warning is logged and ``nonfinite_skips`` counts it). Costs one extra read of the
            gradients and one host sync per step. With ``False``, non-finite gradients propagate.

        state_bits: ``8`` holds the momentum as blockwise 8-bit codes (uint8) + one fp32 absmax per block of
            ``blocksize`` elements (1.0156 B/param at 256) for tensors with at least ``min_8bit_size`` (4096)
            elements; smaller tensors and those marked with :func:`keep_32bit_state` keep a full-precision buffer.
            The dequantized momentum is exact fp32 within the step; it is re-quantized against the new absmax.

    Use for: fine-tuning and training where AdamW's 8 B/param of state does not fit, or LoRA (with a larger lr).
    Not for: sparse gradients or complex parameters (refused).

    Edge cases (see the spec): ``numel == 1`` and all-equal gradients fall back to ``sqrt(numel)``; an all-zero
    first gradient defers the scale (the tensor only decays until its gradient becomes non-zero, then starts
    with ``m = g``); the scales live in ``state_dict()`` and are never recomputed on resume.
    """

    LR_HINT = ("SGD-SaI (scale=gsnr_max) wants learning_rate ~3e-2 for full fine-tuning and ~1.0 for LoRA "
               "(docs/sgdsai.md).")

    def __init__(
        self,
        params: Iterable,
        lr: float = DEFAULT_LR,
        momentum: float = 0.9,
        weight_decay: float = 1e-2,
        *,
        eps: float = 1e-8,
        scale: str = DEFAULT_SCALE,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        state_dtype: Union[None, str, torch.dtype] = None,
        check_finite: bool = True,
        state_bits: int = 32,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, scale=scale, maximize=maximize,
            foreach=foreach, state_dtype=state_dtype, check_finite=check_finite, state_bits=state_bits,
            blocksize=blocksize, min_8bit_size=min_8bit_size,
        )
        self._validate_group(defaults)
        defaults["state_dtype"] = _dtype_name(state_dtype)
        self.nonfinite_skips = 0
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_skips", 0)

    @staticmethod
    def _validate_group(group: dict) -> None:
        _check_float("lr", group["lr"], 0.0)
        _check_float("momentum", group["momentum"], 0.0, 1.0)
        _check_float("weight_decay", group["weight_decay"], 0.0)
        _check_float("eps", group["eps"], 0.0, low_open=True)
        if group["scale"] not in SCALE_MODES:
            raise ValueError(f"scale={group['scale']!r} is not one of {SCALE_MODES}")
        for flag in ("maximize", "check_finite"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"{flag}={group[flag]!r} must be a bool")
        if group["foreach"] is not None and not isinstance(group["foreach"], bool):
            raise ValueError(f"foreach={group['foreach']!r} must be None or a bool")
        if group["state_bits"] not in _STATE_BITS or isinstance(group["state_bits"], bool):
            raise ValueError(f"state_bits={group['state_bits']!r} is not one of {_STATE_BITS}")
        for key in ("blocksize", "min_8bit_size"):
            v = group[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{key}={v!r} must be a positive int")
        if group["state_bits"] == 8 and not group["check_finite"]:
            raise ValueError("check_finite=False is not supported with state_bits=8: a non-finite value would "
                             "poison a whole quantization block")
        _dtype_name(group["state_dtype"])

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears more than once in the same parameter group")
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError("SGDSaI does not support complex parameters (view them as real first)")
            if p.dtype not in _PARAM_DTYPES:
                raise ValueError(f"SGDSaI supports float32/bfloat16/float16/float64 params, got {p.dtype}")
        param_group = dict(param_group, params=params)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._validate_group(param_group)
        param_group["state_dtype"] = _dtype_name(param_group["state_dtype"])
        super().add_param_group(param_group)

    # ---------------------------------------------------------------------------------------------- step
    def _grad(self, p: Tensor) -> Optional[Tensor]:
        g = p.grad
        if g is None:
            return None
        if g.is_sparse:
            raise RuntimeError("SGDSaI does not support sparse gradients")
        if g.shape != p.shape:
            raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")
        return g

    def _finite_mask(self, grads: list[Tensor]) -> list[bool]:
        """One host sync for all gradients of a step: which tensors are entirely finite."""
        if not grads:
            return []
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            by_kind.setdefault((g.device, compute_dtype(g.dtype)), []).append(i)
        mask = [True] * len(grads)
        for (_, dtype), idx in by_kind.items():
            norms = torch._foreach_norm([grads[i] for i in idx], 2, dtype=dtype)
            flags = torch.isfinite(torch.stack(norms)).tolist()
            for i, ok in zip(idx, flags):
                mask[i] = ok
        return mask

    def _scale_of(self, group: dict, p: Tensor, gsnr_max: float) -> Optional[float]:
        mode = group["scale"]
        if mode == "sqrt_numel":
            return math.sqrt(p.numel())
        s = self.state[p].get("gsnr")
        if s is None:
            return None
        return s / gsnr_max if mode == "gsnr_max" else s

    @staticmethod
    def _wants_8bit(group: dict, p: Tensor) -> bool:
        # Small tensors (biases, norms) save almost nothing in 8-bit and are the most sensitive: keep 32-bit.
        bits = getattr(p, _OVERRIDE_ATTR, group["state_bits"])
        return bits == 8 and p.numel() >= group["min_8bit_size"]

    def _running_gsnr_max(self) -> float:
        values = [
            self.state[p]["gsnr"]
            for group in self.param_groups if group["scale"] == "gsnr_max"
            for p in group["params"] if "gsnr" in self.state.get(p, ())
        ]
        return max(values) if values else 1.0

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Pass 1: collect work, drop non-finite gradients, record missing g-SNRs (before the max is taken).
        work = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                g = self._grad(p)
                if g is None or p.numel() == 0:
                    continue
                params.append(p)
                grads.append(g)
            if group["check_finite"]:
                mask = self._finite_mask(grads)
                if not all(mask):
                    skipped = mask.count(False)
                    self.nonfinite_skips += skipped
                    logger.warning(
                        "SGDSaI: skipped %d tensor(s) with non-finite gradients this step (param and state "
                        "unchanged; %d skips in total)", skipped, self.nonfinite_skips,
                    )
                    params = [p for p, ok in zip(params, mask) if ok]
                    grads = [g for g, ok in zip(grads, mask) if ok]
            if group["scale"] != "sqrt_numel":
                for p, g in zip(params, grads):
                    state = self.state[p]
                    if "gsnr" not in state:
                        s = gsnr(g, group["eps"])
                        if s is not None:
                            state["gsnr"] = s
            work.append((group, params, grads))

        gsnr_max = self._running_gsnr_max()

        # Pass 2: the update.
        for group, params, grads in work:
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            state_dtype = group["state_dtype"]
            common = dict(lr=lr, momentum=beta, weight_decay=wd, maximize=group["maximize"])
            active_p, active_g, bufs, scales, firsts = [], [], [], [], []
            for p, g in zip(params, grads):
                scale = self._scale_of(group, p, gsnr_max)
                if scale is None:
                    # All-zero gradient so far: no scale yet, so only the decoupled decay applies.
                    if wd != 0.0:
                        p.mul_(1.0 - lr * wd)
                    continue
                state = self.state[p]
                first = "momentum_buffer" not in state and "momentum_codes" not in state
                if beta != 0.0 and first and self._wants_8bit(group, p):
                    n_blocks = -(-p.numel() // group["blocksize"])
                    state["momentum_codes"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                    state["momentum_absmax"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
                if "momentum_codes" in state:
                    sgdsai_update_8bit_(
                        p, g, state["momentum_codes"], state["momentum_absmax"], scale=scale, first_step=first,
                        blocksize=group["blocksize"], **common,
                    )
                    continue
                if beta != 0.0:
                    if first:
                        dtype = _STATE_DTYPES[state_dtype] if state_dtype else p.dtype
                        state["momentum_buffer"] = g.detach().to(dtype=dtype, copy=True)
                    bufs.append(state["momentum_buffer"])
                active_p.append(p)
                active_g.append(g)
                scales.append(scale)
                firsts.append(first)
            if not active_p:
                continue
            if group["foreach"] is False:
                for i, (p, g) in enumerate(zip(active_p, active_g)):
                    sgdsai_update_(p, g, bufs[i] if bufs else None, scale=scales[i], first_step=firsts[i], **common)
            else:
                sgdsai_update_foreach_(
                    active_p, active_g, bufs if beta != 0.0 else None, scales=scales, first_steps=firsts, **common
                )
        return loss

    # --------------------------------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or "state" not in state_dict:
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        for i, group in enumerate(groups):
            missing = {"scale", "momentum", "check_finite"} - set(group)
            if missing:
                raise ValueError(
                    f"this state dict was not written by SGDSaI: param group {i} lacks {sorted(missing)}"
                )
        for pid, st in state_dict["state"].items():
            unknown = set(st) - _STATE_KEYS
            if unknown:
                raise ValueError(
                    f"this state dict was not written by SGDSaI: state of param {pid} has keys {sorted(unknown)}"
                )
        id_to_param = {
            pid: p
            for saved, group in zip(groups, self.param_groups)
            for pid, p in zip(saved["params"], group["params"])
        }
        for pid, st in state_dict["state"].items():
            p = id_to_param.get(pid)
            for key in ("momentum_buffer", "momentum_codes"):
                if p is not None and key in st and st[key].shape != p.shape:
                    raise ValueError(
                        f"{key} of param {pid} has shape {tuple(st[key].shape)}, the parameter has "
                        f"{tuple(p.shape)}: the checkpoint belongs to another model"
                    )
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # keys added after a checkpoint was written take their defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # torch casts floating state to the param dtype; every state tensor keeps the dtype it was saved with
        # (state_dtype may differ from the param dtype; the 8-bit absmax is fp32), only the device follows.
        for pid, st in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                continue
            for key, value in st.items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
