"""SGD-SaI: SGD with momentum and a per-tensor learning-rate scale set once from the gradient SNR."""

from __future__ import annotations

import math
import weakref
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from memopt.distributed import is_dtensor
from memopt.functional import sgdsai as _reference
from memopt.functional.quantize import check_block_maxima, layout_8bit, load_moment, quantize_rows, row_blocked
from memopt.functional.sgdsai import (gsnr, normalized_gradient, normalized_pieces, sgdsai_update_,
                                      sgdsai_update_foreach_)
from memopt.kernels import cpu as cpu_kernels
from memopt.kernels import load as load_kernels
from memopt.optim._base import MemoptOptimizer
from memopt.optim.sgdsai_fsdp import ShardedSGDSaIMixin
from memopt.optim._checks import check_8bit_args, check_float as _check_float

SCALE_MODES = ("factored", "gsnr_max", "gsnr", "sqrt_numel")
PAPER_MODES = SCALE_MODES[1:]  # the SGD-SaI paper's per-tensor scales: the buffer holds the momentum of the gradient
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SCALAR_STATE = frozenset({"gsnr", "started", "step"})

# Chosen from the quality benchmark in docs/sgdsai.md (several tasks, AdamW at its best lr beside it).
DEFAULT_SCALE = "factored"
DEFAULT_CLIP = 3.0
# torch.optim.AdamW's default lr for scale="factored" (it takes AdamW's learning rates); the paper modes' own.
_DEFAULT_LRS = {"factored": 1e-3, "gsnr_max": 3e-2, "gsnr": 1e-4, "sqrt_numel": 1e-5}


def default_lr(scale: str) -> float:
    """The class's default learning rate for a scale mode (an unknown mode is refused later, by the checks)."""
    return _DEFAULT_LRS.get(scale, 1e-3)


def _dtype_name(dtype: Union[None, str, torch.dtype]) -> Optional[str]:
    if dtype is None:
        return None
    name = None
    if isinstance(dtype, torch.dtype):
        name = next((n for n, d in _STATE_DTYPES.items() if d == dtype), str(dtype).replace("torch.", ""))
    elif isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                "float": "float32", "double": "float64", "fp64": "float64"}.get(name, name)
    if name == "float16":
        # fp16 tops out at 65504: an fp32/bf16 gradient above it overflows the buffer into Inf and then NaN
        # weights. bf16 has the same size and fp32's range. (fp16 parameters with the default state_dtype=None
        # get an fp16 buffer, which is safe: it averages fp16 gradients, which are bounded by the same limit.)
        raise ValueError("state_dtype='float16' is refused: the momentum overflows for gradients above 65504; use "
                         "'bfloat16' (same size, fp32's range)")
    if name in _STATE_DTYPES:
        return name
    raise ValueError(f"state_dtype={dtype!r} is not supported; use one of {sorted(_STATE_DTYPES)} or None")


class SGDSaI(ShardedSGDSaIMixin, MemoptOptimizer):
    """SGD-SaI: SGD with momentum and a per-tensor step scale, with AdamW-like learning rates by default.

    Default (``scale="factored"``): every step, each tensor's gradient is divided element by element by a rank-1
    estimate of its RMS built from the current gradient's row and column mean squares (no second-moment state;
    :func:`memopt.functional.sgdsai.normalized_gradient`), clamped to ``[-clip, clip]``; the momentum buffer
    averages that normalised gradient: ``u = normalized_gradient(g)``, ``m ← β m + (1 − β) u`` (m starts at 0),
    ``θ ← θ(1 − lr·wd) − lr · m / (1 − β^t)``. Steps are then about as large per element as AdamW's, so AdamW's
    learning rates apply. The paper's modes (arXiv 2412.11768, ``scale="gsnr_max" | "gsnr" | "sqrt_numel"``)
    record the gradient signal-to-noise ratio ``s = ||g|| / (std(g) + eps)`` at a tensor's first step and then do
    ``m ← β m + (1 − β) g`` (``m = g`` at the first step), ``θ ← θ(1 − lr·wd) − lr·scale·m``. Either way the state
    is one momentum buffer per tensor: half of AdamW's. docs/sgdsai.md has the comparison with AdamW.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default: 1e-3 for ``scale="factored"``, AdamW's default; use the lr you would give
            AdamW, or 3x below it. The paper modes' defaults: 3e-2 ``gsnr_max``, 1e-4 ``gsnr``, 1e-5
            ``sqrt_numel``; ``gsnr_max`` needs ~1.0 for LoRA).
        momentum: EMA coefficient β in [0, 1) (default 0.9). ``0`` gives a stateless update.
        weight_decay: decoupled weight decay λ ≥ 0 (default 1e-2), applied as ``θ·(1 − lr·λ)``.
        eps: added to the RMS estimate (``factored``) or to the std in the g-SNR (default 1e-8).
        scale: keyword-only (default ``"factored"``, described above). The paper's modes:
            ``"gsnr_max"`` (paper Algorithm 1): ``s / max_k s_k``, the max over every tensor in every
            ``gsnr_max`` group that has a scale so far; the tensor with the largest g-SNR moves at exactly lr.
            A tensor whose scale arrives later (its gradient was ``None`` or all zero before) joins that max
            when it arrives, so the max is a running max and every scale stays ≤ 1.
            ``"gsnr"`` (reference v1.0.3): ``s`` itself, ~sqrt(numel)× larger steps, so use a tiny lr.
            ``"sqrt_numel"`` (reference v1.1.0): ``sqrt(numel)``, needs no gradient statistics.
        clip: ``scale="factored"`` only: the bound on each element of the normalised gradient (default 3.0;
            ``None``: no clamp). The paper modes ignore it.
        maximize: maximize the objective instead of minimizing.
        foreach: use ``torch._foreach_*`` ops (default: True). Both paths give bit-identical results.
        state_dtype: dtype of the momentum buffer (default: the parameter's dtype; fp32 for the tensors that
            keep full-precision state under ``state_bits=8``). Update math is fp32.
        check_finite: skip the update of any tensor whose gradient has a NaN/Inf (param and state are left
            unchanged, a warning is logged and ``nonfinite_skips`` counts it). Costs one extra read of the
            gradients; on the fused kernels past a tensor's first step the check stays on the device and the skip is
            counted at the next step, otherwise one host sync per group and dtype (docs/reliability.md). With
            ``False``, non-finite gradients propagate into params and state (only the g-SNR is protected: a
            non-finite gradient never sets it).

        state_bits: ``8`` holds the momentum as blockwise 8-bit codes (uint8) + one fp32 absmax per block of
            ``blocksize`` elements (1.0156 B/param at 256) for tensors with at least ``min_8bit_size`` (4096)
            elements; smaller tensors and those marked with :func:`keep_32bit_state` keep a full-precision buffer.
            The dequantized momentum is exact fp32 within the step; it is re-quantized against the new absmax.
        use_triton: fused Triton update per tensor (one read and one write of param, grad and state). ``None``
            (default): on CUDA tensors when triton is installed; ``True``: required (on CPU only under
            ``TRITON_INTERPRET=1``, for tests); ``False``: PyTorch reference. Logged once; counted per step in
            ``optimizer.update_paths`` and shown by the memory report.
        stochastic_rounding: round bf16 parameter writes stochastically (default True; it only acts on bf16
            parameters), so updates smaller than half a bf16 ulp still move the weights on average: bf16 weights
            train without an fp32 master copy. ``False``: round to nearest.
        grad_release: update each tensor inside ``backward()`` and free its gradient (see
            :meth:`enable_gradient_release`; default False). With ``scale="gsnr_max"`` a tensor's first update
            waits for ``step()`` (its buffer already holds ``m = g``), so the scales equal the normal step's;
            8-bit or low-precision buffers make that first update use the stored (rounded) ``g``. A tensor whose
            first non-zero gradient arrives after step 1 joins the max at that point of the backward: tensors
            updated earlier in the same backward used the previous max.

    Use for: fine-tuning and training where AdamW's 8 B/param of state does not fit, full or LoRA, at AdamW's lr.
    Not for: sparse gradients or complex parameters (refused).

    Edge cases (docs/sgdsai.md): an all-zero first gradient defers the start (the tensor only decays until its
    gradient becomes non-zero); paper modes: ``numel == 1`` and all-equal gradients fall back to
    ``sqrt(numel)``, and the g-SNRs live in ``state_dict()`` and are never recomputed on resume.
    """

    STATE_KEYS = _SCALAR_STATE
    STATE_MARKS = ("step", "gsnr")  # the paper's modes record the g-SNR in the step that creates the momentum
    REQUIRED_GROUP_KEYS = frozenset({"scale", "momentum", "check_finite"})
    LAYOUT_KEYS = ("state_bits", "blocksize", "min_8bit_size", "state_dtype")

    @staticmethod
    def lr_hint(kwargs: dict) -> Optional[str]:
        """The learning-rate advice for the Trainer's AdamW-tuned default lr, or ``None`` when it applies as is
        (``scale="factored"`` takes AdamW's learning rates)."""
        if kwargs.get("scale", DEFAULT_SCALE) in PAPER_MODES:
            return ("SGD-SaI's paper modes (scale=gsnr_max|gsnr|sqrt_numel) need learning rates far from AdamW's: "
                    "~3e-2 (full fine-tuning) and ~1.0 (LoRA) for gsnr_max (docs/sgdsai.md); the default "
                    "scale=factored takes AdamW's.")
        return None

    def __init__(
        self,
        params: Iterable,
        lr: Optional[float] = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-2,
        *,
        eps: float = 1e-8,
        scale: str = DEFAULT_SCALE,
        clip: Optional[float] = DEFAULT_CLIP,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        state_dtype: Union[None, str, torch.dtype] = None,
        check_finite: bool = True,
        state_bits: int = 32,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
        use_triton: Optional[bool] = None,
        stochastic_rounding: bool = True,
        grad_release: bool = False,
    ):
        defaults = dict(
            lr=default_lr(scale) if lr is None else lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
            scale=scale, clip=clip, maximize=maximize,
            foreach=foreach, state_dtype=state_dtype, check_finite=check_finite, state_bits=state_bits,
            blocksize=blocksize, min_8bit_size=min_8bit_size, use_triton=use_triton,
            stochastic_rounding=stochastic_rounding,
        )
        self._deferred: list[Tensor] = []
        self._gsnr_max_cache: Optional[float] = None
        self._cpu_plans: dict = {}
        super().__init__(params, defaults)
        self.defaults["state_dtype"] = _dtype_name(state_dtype)
        if not isinstance(grad_release, bool):
            raise ValueError(f"grad_release={grad_release!r} must be a bool")
        if grad_release:
            self.enable_gradient_release()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_deferred", [])
        self.__dict__.setdefault("_gsnr_max_cache", None)
        self.__dict__.setdefault("_cpu_plans", {})

    @staticmethod
    def _validate_group(group: dict) -> None:
        _check_float("lr", group["lr"], 0.0)
        _check_float("momentum", group["momentum"], 0.0, 1.0)
        _check_float("weight_decay", group["weight_decay"], 0.0)
        _check_float("eps", group["eps"], 0.0, low_open=True)
        if group["scale"] not in SCALE_MODES:
            raise ValueError(f"scale={group['scale']!r} is not one of {SCALE_MODES}")
        if group["clip"] is not None:
            _check_float("clip", group["clip"], 0.0, low_open=True)
        if group["foreach"] is not None and not isinstance(group["foreach"], bool):
            raise ValueError(f"foreach={group['foreach']!r} must be None or a bool")
        check_8bit_args(group)
        _dtype_name(group["state_dtype"])

    def _normalize_group(self, group: dict) -> None:
        group["state_dtype"] = _dtype_name(group["state_dtype"])

    def _resume_refusal(self, saved: dict, group: dict) -> Optional[str]:
        if (saved["momentum"] == 0.0) != (group["momentum"] == 0.0):
            return (f"the checkpoint was written with momentum={saved['momentum']!r} and this optimizer has "
                    f"momentum={group['momentum']!r}: momentum 0 keeps no buffer, so the state cannot continue "
                    "with one switched on or off; resume with a momentum on the same side of 0")
        return None

    def _layout(self, group: dict) -> dict:
        # the paper's modes share a buffer (momentum of the gradient); "factored" keeps the momentum of the
        # normalised gradient, so a checkpoint cannot move between the two families
        return {**super()._layout(group), "buffer": "normalized" if group["scale"] == "factored" else "gradient"}

    def _factored_update(self, group: dict, p: Tensor, g: Tensor, finite: Optional[Tensor] = None) -> Optional[bool]:
        """One tensor's ``scale="factored"`` step: ``u = normalized_gradient(g)``, ``m ← β m + (1 − β) u`` (m starts
        at 0), ``θ ← θ(1 − lr·λ) − lr · m / (1 − β^t)``. Returns whether the fused kernel ran, or ``None`` when the
        tensor still waits for its first non-zero gradient (then only the decay applies, as for a deferred g-SNR).
        ``finite``: the gradient's device-side flag (:meth:`_checked_on_device`), or ``None``."""
        state, beta = self.state[p], group["momentum"]
        if not state.get("step"):
            if not bool(g.detach().abs().amax() > 0):  # one host sync, at a tensor's first steps only
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                return None
            self._zero_momentum(group, p)
        step = state.get("step", 0) + 1
        scale = 1.0 / (1.0 - beta**step) if beta != 0.0 else 1.0
        plan = self._cpu_plans.pop(id(p), None)  # decided by _checks_finite_itself for this very gradient
        on_cpu = None if finite is not None else plan[1] if plan and plan[0]() is g else self._cpu_state(group, p, g)
        if on_cpu is not None:
            # the update's statistics check the gradient (_checks_finite_itself): a non-finite one is skipped
            if not cpu_kernels.factored_sgdsai_(p, g, on_cpu, lr=group["lr"], scale=scale, momentum=beta,
                                                weight_decay=group["weight_decay"], maximize=group["maximize"],
                                                eps=group["eps"], clip=group["clip"], blocksize=group["blocksize"],
                                                check_finite=group["check_finite"]):
                self._count_skips(1)
                return None
            state["step"] = step
            self._cpu_updates += 1
            return False
        state["step"] = step
        eight = "momentum_codes" in state
        # the kernel takes the normalised gradient: contiguous, in the gradient's dtype
        fused = self._use_triton(group, p, torch.empty(0, dtype=g.dtype, device=g.device), "sgdsai", eight_bit=eight)
        common = dict(lr=group["lr"], scale=scale, momentum=beta, weight_decay=group["weight_decay"],
                      maximize=group["maximize"], stochastic_rounding=group["stochastic_rounding"], first_step=False)
        state_tensors = [state["momentum_codes"], state["momentum_absmax"]] if eight else [state.get("momentum_buffer")]
        if not fused and finite is None and self._in_pieces(group, p, state_tensors):
            # PyTorch path: each piece of rows of the normalised gradient is applied while it is in the cache
            # as rows: the parameter, its buffer or codes, and the block maxima (already one row per parameter row)
            if eight:
                check_block_maxima(state_tensors)  # corrupt state raises before the first piece is written
            rows = [None if t is None else t.view(t.shape[0], -1) for t in (p, *state_tensors)]
            for r0, r1, u in normalized_pieces(g, group["eps"], clip=group["clip"]):
                piece = [t if t is None else t[r0:r1] for t in rows]
                if eight:
                    _reference.sgdsai_update_8bit_(piece[0], u, *piece[1:], blocksize=group["blocksize"], **common)
                else:
                    _reference.sgdsai_update_(piece[0], u, piece[1], **common)
            return False
        u = normalized_gradient(g, group["eps"], clip=group["clip"]).to(g.dtype)
        impl = load_kernels("sgdsai") if fused else _reference
        if eight:
            impl.sgdsai_update_8bit_(p, u, *state_tensors, blocksize=group["blocksize"], finite=finite, **common)
        else:
            impl.sgdsai_update_(p, u, state_tensors[0], finite=finite, **common)
        return fused

    def _cpu_state(self, group: dict, p: Tensor, g: Tensor) -> Optional[list]:
        """The state tensors of a tensor with ``scale="factored"`` state whose update is the fused CPU one (not the
        Triton kernels, :meth:`_use_cpu_kernel`), or ``None``."""
        state = self.state[p]
        if group["scale"] != "factored" or not ("momentum_codes" in state or "momentum_buffer" in state):
            return None
        eight = "momentum_codes" in state
        tensors = [state["momentum_codes"], state["momentum_absmax"]] if eight else [state.get("momentum_buffer")]
        if self._use_triton(group, p, torch.empty(0, dtype=g.dtype, device=g.device), "sgdsai", eight_bit=eight):
            return None
        return tensors if self._use_cpu_kernel(group, p, g, tensors, group["blocksize"] if eight else None) else None

    def _checks_finite_itself(self, group: dict, p: Tensor, g: Tensor) -> bool:
        # past a tensor's first step (a first step decides on the host whether the gradient is all zero), the fused
        # CPU update reads the whole gradient for its statistics first, and they say whether it is finite
        if not self.state[p].get("step"):
            return False
        tensors = self._cpu_state(group, p, g)
        # the update takes the same decision without asking again; the gradient is held weakly, so a tensor the
        # host check skips (or a step that raises) does not keep its gradient alive until the next step
        self._cpu_plans[id(p)] = (weakref.ref(g), tensors)
        return tensors is not None

    @staticmethod
    def _in_pieces(group: dict, p: Tensor, state_tensors: list) -> bool:
        """Whether the PyTorch update of ``scale="factored"`` runs in pieces of rows (:func:`normalized_pieces`): a
        tensor of two or more dimensions, contiguous with its state, whose 8-bit state (if any) is in row blocks."""
        if p.dim() < 2 or not p.is_contiguous() or not all(t is None or t.is_contiguous() for t in state_tensors):
            return False
        return len(state_tensors) == 1 or row_blocked(tuple(p.shape), group["blocksize"])

    def state_layout(self, group: dict, p: Tensor) -> dict:
        """One momentum buffer (none with ``momentum=0``): 8-bit codes + block maxima for the tensors
        :meth:`_wants_8bit` picks, else ``state_dtype`` (default: the parameter's dtype, fp32 for fp16 parameters
        and for the 32-bit tensors of an 8-bit optimizer)."""
        if group["momentum"] == 0.0:
            return {}
        if self._wants_8bit(group, p):
            return layout_8bit("momentum", tuple(p.shape), group["blocksize"])
        dtype = _STATE_DTYPES[group["state_dtype"]] if group["state_dtype"] else self._full_state_dtype(group, p)
        return {"momentum_buffer": (tuple(p.shape), dtype)}

    def _zero_momentum(self, group: dict, p: Tensor) -> None:
        """A zero momentum buffer for ``p`` (8-bit codes with absmax 0, or full precision), unless it has one."""
        self._create_state(group, p)

    def _scale_of(self, group: dict, p: Tensor, gsnr_max: float) -> Optional[float]:
        mode = group["scale"]
        if mode == "sqrt_numel":
            return math.sqrt(p.numel())
        s = self.state[p].get("gsnr")
        if not s:  # None, or 0.0: the sharded path's placeholder for "not computed yet"
            return None
        return s / gsnr_max if mode == "gsnr_max" else s

    def _running_gsnr_max(self) -> float:
        if self._gsnr_max_cache is None:  # recomputed only after a new g-SNR, a new group or a state load
            values = [
                self.state[p]["gsnr"]
                for group in self.param_groups if group["scale"] == "gsnr_max"
                for p in group["params"] if self.state.get(p, {}).get("gsnr")
            ]
            self._gsnr_max_cache = max(values) if values else 1.0
        return self._gsnr_max_cache

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._gsnr_max_cache = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._gsnr_max_cache = None
        self._deferred = []

    def _supports_release(self) -> bool:
        return True

    def _record_gsnr(self, group: dict, p: Tensor, g: Tensor) -> Optional[float]:
        state = self.state[p]
        if group["scale"] in ("gsnr_max", "gsnr") and not state.get("gsnr"):
            self._store_gsnr(state, gsnr(g, group["eps"]))
        return state.get("gsnr")

    def _store_gsnr(self, state: dict, s: Optional[float]) -> None:
        """Keep a computed g-SNR; ``None`` (all-zero gradient) and non-finite values (check_finite=False) defer."""
        if s is not None and math.isfinite(s):
            state["gsnr"] = s
            self._gsnr_max_cache = None

    def _new_momentum(self, group: dict, p: Tensor, g: Tensor) -> None:
        """Create the buffer of a tensor's first step holding ``g`` (8-bit codes or full precision)."""
        state = self._create_state(group, p)
        if "momentum_codes" in state:
            state["momentum_codes"], state["momentum_absmax"] = quantize_rows(g, None, group["blocksize"])
        else:
            state["momentum_buffer"].copy_(g)

    def _checked_on_device(self, group: dict, p: Tensor, g: Tensor) -> bool:
        # Tensors past their first step on the fused kernel: a skipped update then changes nothing on the host but
        # the step count (put back later). A first step (scale, buffer, start) is decided on the host.
        if is_dtensor(p):
            return False
        state = self.state[p]
        if group["scale"] == "factored":
            steady = bool(state.get("step"))
        else:
            has_buffer = "momentum_buffer" in state or "momentum_codes" in state
            scale_known = group["scale"] == "sqrt_numel" or bool(state.get("gsnr"))
            steady = scale_known and (group["momentum"] == 0.0 or state.get("started", has_buffer))
        return steady and self._use_triton(group, p, g, "sgdsai", eight_bit="momentum_codes" in state)

    def _release_update(self, group: dict, p: Tensor, g: Tensor, finite: Optional[Tensor]) -> bool:
        state = self.state[p]
        if group["scale"] == "factored":  # per-tensor statistics only: the update can happen right here
            fused = self._factored_update(group, p, g, finite)
            if fused is not None:
                self._release_paths[0 if fused else 1] += 1
            return False
        if any(q is p for q in self._deferred):
            raise RuntimeError("SGDSaI with gradient release: call step() after each backward (a tensor's first "
                               "update is still pending from the previous backward)")
        new_scale = group["scale"] == "gsnr_max" and not state.get("gsnr")
        if self._record_gsnr(group, p, g) is not None and new_scale:
            # This tensor joins the max now; its first update waits for step(), when every scale of this step
            # is known (same scales as without release). Its momentum buffer is the gradient itself (m = g), so
            # the gradient can be freed already; with momentum 0 there is no buffer and the gradient is kept.
            if group["momentum"] == 0.0:
                return True
            self._new_momentum(group, p, g)
            self._deferred.append(p)
            return False
        fused = self._update_work([(group, [p], [g], [finite])], self._running_gsnr_max())
        self._release_paths[0] += fused[0]
        self._release_paths[1] += fused[1]
        return False

    @torch.no_grad()
    def _apply_deferred(self) -> None:
        gsnr_max = self._running_gsnr_max()
        for p in self._deferred:
            group, state = self._group_of(p), self.state[p]
            m = load_moment(state, "momentum", group["blocksize"]) if "momentum_codes" in state else \
                state["momentum_buffer"]
            sgdsai_update_(p, m, None, lr=group["lr"], scale=self._scale_of(group, p, gsnr_max), momentum=0.0,
                           weight_decay=group["weight_decay"], maximize=group["maximize"],
                           stochastic_rounding=group["stochastic_rounding"])
            self._release_paths[1] += 1
        self._deferred = []

    def _dtensor_refusal(self, group: dict) -> Optional[str]:
        return None  # every mode and state format is shard-correct (sgdsai_fsdp.py)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = self._evaluate(closure)
        if any(is_dtensor(p) for group in self.param_groups for p in group["params"]):
            self._step_sharded()
            return loss
        self._settle_skips(before=self._generation)  # the previous step's flags, before a step count is used
        self._cpu_plans.clear()
        if self._deferred:
            self._apply_deferred()

        # Pass 1: collect work, drop non-finite gradients (flag them, past a tensor's first step on the fused
        # kernel), record missing g-SNRs (before the max is taken).
        work = []
        for group in self.param_groups:
            params, grads, flags = self._collect_flagged(group)
            for p, g in zip(params, grads):
                self._record_gsnr(group, p, g)
            work.append((group, params, grads, flags))
        # Pass 2: the update.
        n_triton, n_torch = self._update_work(work, self._running_gsnr_max())
        self._finish_release_step(n_triton, n_torch)
        if self.gradient_release:  # gradients kept by the hooks (first step with momentum 0) are done now
            for _, params, _, _ in work:
                for p in params:
                    p.grad = None
        return loss

    def _update_work(self, work: list, gsnr_max: float) -> tuple[int, int]:
        """Update every ``(group, params, grads, finite flags)`` of ``work``; returns the (Triton, torch) tensor
        counts."""
        n_triton = n_torch = 0
        for group, params, grads, flags in work:
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            common = dict(lr=lr, momentum=beta, weight_decay=wd, maximize=group["maximize"],
                          stochastic_rounding=group["stochastic_rounding"])
            active_p, active_g, bufs, scales, firsts = [], [], [], [], []
            for p, g, finite in zip(params, grads, flags):
                if group["scale"] == "factored":
                    fused = self._factored_update(group, p, g, finite)
                    n_triton += bool(fused)
                    n_torch += fused is False
                    continue
                scale = self._scale_of(group, p, gsnr_max)
                if scale is None:
                    # All-zero gradient so far: no scale yet, so only the decoupled decay applies.
                    if wd != 0.0:
                        p.mul_(1.0 - lr * wd)
                    continue
                state = self.state[p]
                first = not state.get("started", "momentum_buffer" in state or "momentum_codes" in state)
                if "started" in state:
                    state["started"] = True
                if beta != 0.0 and first and self._wants_8bit(group, p):
                    self._create_state(group, p)  # zero codes: the first step writes m = g
                fused = self._use_triton(group, p, g, "sgdsai", eight_bit="momentum_codes" in state)
                if fused:
                    n_triton += 1
                    kernels = load_kernels("sgdsai")
                else:
                    n_torch += 1
                if "momentum_codes" in state:
                    (kernels if fused else _reference).sgdsai_update_8bit_(
                        p, g, state["momentum_codes"], state["momentum_absmax"], scale=scale, first_step=first,
                        blocksize=group["blocksize"], finite=finite, **common,
                    )
                    continue
                if beta != 0.0 and first:
                    self._create_state(group, p)["momentum_buffer"].copy_(g)
                if fused or finite is not None:  # a flagged tensor takes its own update, which reads the flag
                    (kernels if fused else _reference).sgdsai_update_(
                        p, g, state.get("momentum_buffer"), scale=scale, first_step=first, finite=finite, **common)
                    continue
                if beta != 0.0:
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
        return n_triton, n_torch
