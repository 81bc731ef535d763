"""Lion: the sign of an interpolated momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
arXiv 2302.06675), with full-precision or blockwise 8-bit momentum."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from memopt.functional.quantize import layout_8bit, load_moment, quantize_rows
from memopt.functional.rounding import write_param_
from memopt.functional.sgdsai import compute_dtype
from memopt.kernels import cpu as cpu_kernels
from memopt.optim._base import MemoptOptimizer
from memopt.optim._checks import check_8bit_layout, check_betas, check_float


class Lion(MemoptOptimizer):
    """Lion (arXiv 2302.06675). Per tensor, in fp32 math:

    ``c = β1 m + (1 − β1) g``;  ``θ ← θ(1 − lr·λ) − lr·sign(c)``;  ``m ← β2 m + (1 − β2) g`` (``m`` starts at 0).

    Every element moves by exactly ``lr`` per step (plus decay), so Lion wants a learning rate 3-10x smaller than
    AdamW's and a weight decay 3-10x larger (the paper's advice). State: one momentum buffer (4 B/param in fp32,
    the parameter's dtype by default as in torch; ``state_bits=8``: blockwise 8-bit codes + fp32 block maxima for
    tensors of at least ``min_8bit_size`` elements, ~1.02 B/param).

    Args:
        params: parameters or groups.
        lr: learning rate (default 1e-4). betas: (β1, β2), default (0.9, 0.99). weight_decay: decoupled (0).
        maximize, check_finite: as the other memopt optimizers (non-finite gradients: that tensor is skipped and
            counted). state_bits, blocksize, min_8bit_size: the 8-bit layout (docs/8bit.md).
        stochastic_rounding: round bf16 parameter writes stochastically (default True).

    Use for: a one-buffer optimizer whose update size does not depend on the gradient's scale.
    Not for: sparse gradients, complex parameters (refused).
    """

    STATE_KEYS = frozenset()
    REQUIRED_GROUP_KEYS = frozenset({"betas", "state_bits", "stochastic_rounding"})
    LAYOUT_KEYS = ("state_bits", "blocksize", "min_8bit_size")

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, check_finite: bool = True,
                 state_bits: int = 32, blocksize: int = 256, min_8bit_size: int = 4096,
                 stochastic_rounding: bool = True):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, check_finite=check_finite,
                        state_bits=state_bits, blocksize=blocksize, min_8bit_size=min_8bit_size,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    @staticmethod
    def _validate_group(group: dict) -> None:
        check_float("lr", group["lr"], 0.0)
        check_float("weight_decay", group["weight_decay"], 0.0)
        check_betas(group["betas"])
        if not isinstance(group["stochastic_rounding"], bool):
            raise ValueError(f"stochastic_rounding={group['stochastic_rounding']!r} must be a bool")
        check_8bit_layout(group)

    def _normalize_group(self, group: dict) -> None:
        group["betas"] = tuple(float(b) for b in group["betas"])

    def _dtensor_refusal(self, group: dict) -> Optional[str]:
        return (": its update is elementwise and would be correct on a shard, but the shard path (8-bit row blocks, "
                "DCP state) is not built or tested for Lion")

    def state_layout(self, group: dict, p: Tensor) -> dict:
        if self._wants_8bit(group, p):
            return layout_8bit("exp_avg", tuple(p.shape), group["blocksize"])
        return {"exp_avg": (tuple(p.shape), self._full_state_dtype(group, p))}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = self._evaluate(closure)
        updated = 0
        work = [(group, *self._collect(group)) for group in self.param_groups]  # refusals before any update
        for group, params, grads in work:
            beta1, beta2 = group["betas"]
            updated += len(params)
            for p, grad in zip(params, grads):
                state = self._create_state(group, p)
                eight = "exp_avg_codes" in state
                tensors = [state["exp_avg_codes"], state["exp_avg_absmax"]] if eight else [state["exp_avg"]]
                if self._use_cpu_kernel(group, p, grad, tensors, group["blocksize"] if eight else None, matrix=eight):
                    cpu_kernels.lion_update_(p, grad, tensors, lr=group["lr"], beta1=beta1, beta2=beta2,
                                             weight_decay=group["weight_decay"], maximize=group["maximize"],
                                             blocksize=group["blocksize"])
                    self._cpu_updates += 1
                    continue
                cdt = compute_dtype(p.dtype)
                g = grad.to(cdt)
                if group["maximize"]:
                    g = -g
                m = load_moment(state, "exp_avg", group["blocksize"]).to(cdt, copy=True)
                direction = torch.lerp(m, g, 1.0 - beta1).sign_()
                m.lerp_(g, 1.0 - beta2)
                stored = quantize_rows(m, None, group["blocksize"]) if "exp_avg_codes" in state else None
                p32 = p if p.dtype == cdt else p.to(cdt)
                p32.mul_(1.0 - group["lr"] * group["weight_decay"]).sub_(direction, alpha=group["lr"])
                if p32 is not p:
                    write_param_(p, p32, group["stochastic_rounding"])
                if stored is not None:  # quantized before the parameter write: a corrupt state raised there
                    state["exp_avg_codes"], state["exp_avg_absmax"] = stored
                else:
                    state["exp_avg"].copy_(m)
        self._record_paths(0, updated)  # no Triton kernel; the fused CPU updates among them are counted as cpu
        return loss
