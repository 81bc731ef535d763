"""Subset-Norm + Subspace-Momentum (arXiv 2411.07120; docs/projection.md)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from memopt.functional import projection as proj
from memopt.kernels import cpu as cpu_kernels
from memopt.optim._checks import check_adam_args
from memopt.optim._matrix import MatrixOptimizer


def subset_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Heuristic partition of an m × n matrix: one subset per row if m ≥ n (statistic of shape (m, 1)), else one per
    column ((1, n))."""
    m, n = shape
    return (m, 1) if m >= n else (1, n)


def subset_sum_sq(g: Tensor) -> Tensor:
    """The SUM of squares of ``g`` over each subset of :func:`subset_shape` (so the lr is ~10x Adam's)."""
    return (g * g).sum(dim=1 if subset_shape(tuple(g.shape))[1] == 1 else 0, keepdim=True)


def _sm_config(group: dict) -> proj.ProjectionConfig:
    """Subspace-Momentum's projector: the top-``rank`` SVD basis, refreshed every ``update_gap`` steps."""
    return proj.ProjectionConfig(selection="svd", rank=group["rank"], density=None, update_gap=group["update_gap"])


class SubsetNormSM(MatrixOptimizer):
    """AdamSN, AdamSNSM and SGD-SM (Nguyen et al. 2024) for 2-D weights; plain AdamW for everything else.

    For a projectable matrix with gradient G:

    - Subset-Norm (``subset_norm=True``): ``v ← β2 v + (1 − β2) Σ_subset g²`` with one scalar per row (m ≥ n) or
      column, and the step is divided by ``sqrt(v / (1 − β2^t)) + eps``.
    - Subspace-Momentum (``subspace_momentum=True``): every ``update_gap`` steps P = top-``rank`` SVD of G
      (side rule as GaLore) and the momentum restarts at 0; ``R = Down(G)``, ``m ← β1 m + (1 − β1) R``,
      numerator ``Up(m̂) + (G − Up(R))`` (SGD in the complement). Otherwise the numerator is Adam's full ``m̂``.
      ``m̂`` is bias-corrected (steps since the last refresh) when ``subset_norm`` is on; SGD-SM uses raw ``m``,
      so with ``rank = min(m, n)`` it equals SGD with EMA momentum. The paper bias-corrects the whole step instead,
      the complement included (docs/projection.md: why memopt does not).

    Args:
        params: parameters or groups (group key ``project``: "auto" = 2-D params, True, False).
        lr (1e-2), betas ((0.9, 0.999)), eps (1e-6), weight_decay (decoupled, 0).
        rank (128, clamped to a matrix's min(m, n)), update_gap (200), subset_norm (True), subspace_momentum
        (True), check_finite, maximize.

    State per m×n matrix: M = max(m, n) (SN) + r·M (momentum) + r·min(m, n) (projector) elements.
    """

    STATE_KEYS = frozenset({"step", "sm_step", "proj_refreshed_at", "iteration"})
    REQUIRED_GROUP_KEYS = frozenset({"subset_norm", "subspace_momentum", "rank"})
    LAYOUT_KEYS = ("project", "subset_norm", "subspace_momentum", "rank", "update_gap")
    NON_NEGATIVE_STATE = ("exp_avg_sq", "sn")

    def state_layout(self, group: dict, p: Tensor) -> dict:
        """fp32 throughout. A projected matrix: the Subset-Norm statistic (``sn``, :func:`subset_shape`), and either
        Subspace-Momentum (``sm`` in the rank-r subspace + its ``proj_basis``) or a full ``exp_avg``. Other
        parameters: AdamW's ``exp_avg`` and ``exp_avg_sq``."""
        shape = tuple(p.shape)
        if not self._projected(group, p):
            return {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}
        out = {"sn": (subset_shape(shape), torch.float32)} if group["subset_norm"] else {}
        if group["subspace_momentum"]:
            cfg = _sm_config(group)
            out.update({k: (s, torch.float32) for k, s in proj.selector_shapes(shape, cfg).items()},
                       sm=(proj.projected_shape(shape, cfg), torch.float32))
        else:
            out["exp_avg"] = (shape, torch.float32)
        return out

    def __init__(self, params: Iterable, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int = 128, update_gap: int = 200,
                 subset_norm: bool = True, subspace_momentum: bool = True, check_finite: bool = True,
                 maximize: bool = False, stochastic_rounding: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap,
                        subset_norm=subset_norm, subspace_momentum=subspace_momentum, check_finite=check_finite,
                        maximize=maximize, project="auto", stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    @staticmethod
    def _validate_group(group: dict) -> None:
        check_adam_args(group)
        MatrixOptimizer._check_project(group)
        for flag in ("subset_norm", "subspace_momentum"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"{flag}={group[flag]!r} must be a bool")
        _sm_config(group).validate()

    def _matrix_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        beta1, beta2 = group["betas"]
        it = state.get("iteration", 0)
        state["iteration"] = it + 1
        shape = tuple(g.shape)
        if group["subset_norm"]:
            if "sn" not in state:
                state["sn"], state["step"] = g.new_zeros(subset_shape(shape)), 0
            state["step"] += 1
        if group["subspace_momentum"]:
            cfg = _sm_config(group)
            if proj.refresh_due(state, it, cfg):
                proj.refresh(state, g, it, cfg)
                state.pop("sm", None)  # momentum restarts in the new subspace
            low = proj.down(state, g, "svd")
            if "sm" not in state:
                state["sm"], state["sm_step"] = torch.zeros_like(low), 0
            state["sm_step"] += 1
            state["sm"].lerp_(low, 1.0 - beta1)
            m = state["sm"] / (1.0 - beta1 ** state["sm_step"]) if group["subset_norm"] else state["sm"]
            # Up(m) + (G - Up(R)) as G + Up(m - R): the projection is linear, so one product back up, not two
            numerator = g + proj.up(state, m - low, shape, "svd")
        else:
            if "exp_avg" not in state:
                state["exp_avg"], state["sm_step"] = torch.zeros_like(g), 0
            state["sm_step"] += 1
            if group["subset_norm"] and self._use_cpu_kernel(group, p32, g, [state["exp_avg"], state["sn"]], None):
                cpu_kernels.adamsn_update_(p32, g, state["exp_avg"], state["sn"], lr=group["lr"], beta1=beta1,
                                           beta2=beta2, eps=group["eps"],
                                           bias_correction1=1.0 - beta1 ** state["sm_step"],
                                           bias_correction2=1.0 - beta2 ** state["step"])
                self._cpu_updates += 1
                return
            state["exp_avg"].lerp_(g, 1.0 - beta1)
            numerator = state["exp_avg"] / (1.0 - beta1 ** state["sm_step"])
        if group["subset_norm"]:
            state["sn"].mul_(beta2).add_(subset_sum_sq(g), alpha=1.0 - beta2)
            denom = (state["sn"] / (1.0 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
            p32.sub_(numerator / denom, alpha=group["lr"])
        else:
            p32.sub_(numerator, alpha=group["lr"])
