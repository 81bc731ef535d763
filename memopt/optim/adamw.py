"""AdamW with blockwise 8-bit moments: the state-full inner optimizer that projection methods reuse."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from memopt.distributed import is_dtensor, local
from memopt.functional import adamw as _functional
from memopt.functional.adamw import adamw_update_, adamw_update_8bit_
from memopt.functional.quantize import layout_8bit
from memopt.kernels import cpu as cpu_kernels
from memopt.kernels import load as load_kernels
from memopt.optim._base import MemoptOptimizer
from memopt.optim._checks import check_8bit_args, check_adam_args

_CODES = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


class AdamW8bit(MemoptOptimizer):
    """AdamW (decoupled weight decay) whose two moments are held as blockwise 8-bit codes (arXiv 2110.02861).

    State per quantized tensor: ``exp_avg`` on the signed dynamic map, ``exp_avg_sq`` on the unsigned map, each
    uint8 codes + one fp32 absmax per ``blocksize`` elements: 2 × 1.0156 B/param at 256 (torch AdamW: 8).
    Tensors below ``min_8bit_size`` elements and tensors marked with :func:`memopt.keep_32bit_state` (the Trainer
    marks embeddings) keep fp32 moments and follow torch's AdamW exactly.

    Args:
        params: parameters or groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2).
        maximize: ascend instead of descend.
        check_finite: skip tensors whose gradient has NaN/Inf (param and state unchanged, counted in
            ``nonfinite_skips``); required for 8-bit state.
        state_bits: 8 (default) or 32. blocksize: elements per quantization block (256).
        min_8bit_size: smaller tensors keep 32-bit moments (4096).
        use_triton: fused Triton kernel for 8-bit tensors (``None``: on CUDA when available; ``True``: required,
            CPU only under ``TRITON_INTERPRET=1``; ``False``: PyTorch reference). Counted in ``update_paths``.
        stochastic_rounding: round bf16 parameter writes stochastically (default True; acts on bf16 params only).
        grad_release: update each tensor inside ``backward()`` and free its gradient (default False; see
            :meth:`enable_gradient_release`). Every tensor's update is independent, so it equals the normal step.

    Use for: a 4× smaller AdamW state; the inner optimizer of FRUGAL / GaLore-style methods.
    Not for: sparse gradients, complex params (refused).
    """

    STATE_KEYS = frozenset({"step"})
    REQUIRED_GROUP_KEYS = frozenset({"betas", "eps", "state_bits"})
    LAYOUT_KEYS = ("state_bits", "blocksize", "min_8bit_size")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        check_finite: bool = True,
        state_bits: int = 8,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
        use_triton: Optional[bool] = None,
        stochastic_rounding: bool = True,
        grad_release: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        check_finite=check_finite, state_bits=state_bits, blocksize=blocksize,
                        min_8bit_size=min_8bit_size, use_triton=use_triton,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        if not isinstance(grad_release, bool):
            raise ValueError(f"grad_release={grad_release!r} must be a bool")
        if grad_release:
            self.enable_gradient_release()

    @staticmethod
    def _validate_group(group: dict) -> None:
        check_adam_args(group)
        check_8bit_args(group)

    def state_layout(self, group: dict, p: torch.Tensor) -> dict:
        """Both moments as 8-bit codes + block maxima for the tensors :meth:`_wants_8bit` picks, else full
        precision (the parameter's dtype; fp32 for fp16 parameters and under ``state_bits=8``)."""
        shape = tuple(p.shape)
        if self._wants_8bit(group, p):
            return {**layout_8bit("exp_avg", shape, group["blocksize"]),
                    **layout_8bit("exp_avg_sq", shape, group["blocksize"])}
        dtype = self._full_state_dtype(group, p)
        return {"exp_avg": (shape, dtype), "exp_avg_sq": (shape, dtype)}

    def _normalize_group(self, group: dict) -> None:
        group["betas"] = tuple(float(b) for b in group["betas"])

    def _supports_release(self) -> bool:
        return True

    def _release_update(self, group: dict, p: torch.Tensor, g: torch.Tensor, finite) -> bool:
        self._release_paths[0 if self._update_one(group, p, g, finite) else 1] += 1
        return False

    def _checked_on_device(self, group: dict, p: torch.Tensor, g: torch.Tensor) -> bool:
        # Where the fused kernels run (a GPU): a skipped update changes nothing but the step count (put back later).
        # 8-bit tensors take the kernel, which reads the flag; the 32-bit ones (small tensors) keep the result of
        # the PyTorch update where the flag is true (see _update_one).
        eight = "exp_avg_codes" in self.state_layout(group, p)
        return not is_dtensor(p) and self._use_triton(group, p, g, "adamw", eight_bit=eight)

    def _update_one(self, group: dict, p: torch.Tensor, g: torch.Tensor, finite=None) -> bool:
        """One tensor's AdamW step; returns whether the fused kernel ran. ``finite``: the gradient's device-side
        flag (:meth:`_checked_on_device`), or ``None`` when it was checked on the host."""
        beta1, beta2 = group["betas"]
        common = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                      maximize=group["maximize"], stochastic_rounding=group["stochastic_rounding"])
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            self._create_state(group, p)
        state["step"] += 1
        # FSDP2: every tensor is row-sharded alike, and row blocks never leave a rank: the single-device update runs
        # on the local shards
        p, g = local(p), local(g)
        if "exp_avg_codes" in state:
            fused = self._use_triton(group, p, g, "adamw", eight_bit=True)
            codes = [local(state[k]) for k in _CODES]
            if fused:
                update = load_kernels("adamw").adamw_update_8bit_
            elif finite is None and self._use_cpu_kernel(group, p, g, codes, group["blocksize"]):
                update = cpu_kernels.adamw_update_8bit_
                self._cpu_updates += 1
            else:
                update = adamw_update_8bit_
            update(p, g, *codes, step=state["step"], blocksize=group["blocksize"], finite=finite, **common)
            return fused
        m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
        if finite is None:
            on_cpu = self._use_cpu_kernel(group, p, g, [m, v], None, matrix=False)
            (cpu_kernels if on_cpu else _functional).adamw_update_(p, g, m, v, step=state["step"], **common)
            self._cpu_updates += on_cpu
            return False
        # checked on the device: update copies and keep them where the flag is true, without reading it on the host
        # (a small tensor: 32-bit state is for tensors below min_8bit_size or marked to keep it)
        new = [t.clone() for t in (p, m, v)]
        adamw_update_(*new[:1], g, *new[1:], step=state["step"], **common)
        for old, value in zip((p, m, v), new):
            old.copy_(torch.where(finite, value, old))
        return False

    def _dtensor_refusal(self, group: dict) -> Optional[str]:
        return None  # elementwise math in row blocks: shard-correct

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every trainable parameter's state now (zero moments, ``step`` 0) instead of at its first step: the
        template a fresh optimizer gives ``torch.distributed.checkpoint`` must hold every key a checkpoint holds.
        FSDP2 parameters get it at the first step; call it before loading a DCP checkpoint into a fresh one."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and "step" not in self.state[p]:
                    self.state[p]["step"] = 0
                    self._create_state(group, p)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = self._evaluate(closure)
        if any(is_dtensor(p) for group in self.param_groups for p in group["params"]):
            if self.gradient_release:
                raise RuntimeError("gradient release is not supported with FSDP2 parameters")
            self.init_state()
        self._settle_skips(before=self._generation)  # the previous step's flags, before a step count is used
        n_triton = n_torch = 0
        work = [(group, *self._collect_flagged(group)) for group in self.param_groups]  # refusals before any update
        for group, params, grads, flags in work:
            for p, g, finite in zip(params, grads, flags):
                fused = self._update_one(group, p, g, finite)
                n_triton += fused
                n_torch += not fused
            if self.gradient_release:
                for p in params:
                    p.grad = None
        self._finish_release_step(n_triton, n_torch)
        return loss
