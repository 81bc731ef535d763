"""FRUGAL: full-rank updates with gradient splitting (arXiv 2411.07837; spec: algorithms.md §4)."""

from __future__ import annotations

import math
from typing import Iterable, Optional

from torch import Tensor

from memopt.functional import projection as proj
from memopt.functional.sgdsai import gsnr
from memopt.optim._base import MatrixOptimizer, check_adam_args, check_float

STATE_FREE_RULES = ("sign_sgd", "sgd", "none")
FREE_SCALES = ("none", "sai")


def _config(group: dict) -> proj.ProjectionConfig:
    return proj.ProjectionConfig(selection=group["selection"], rank=group["rank"], density=group["density"],
                                 update_gap=group["update_gap"], on_refresh=group["on_refresh"])


class FRUGAL(MatrixOptimizer):
    """FRUGAL: AdamW on a subspace of each projectable gradient, a state-free update on the rest.

    For a projectable (2-D) parameter with gradient G: ``gd = Down(G)``; AdamW state (m, v, step) lives in the
    subspace and gives ``u = Up(adam(gd))`` at ``lr``; the residual ``G − Up(gd)`` gets ``−lr·inactive_lr_scale
    ·sign(res)`` (``sign_sgd``), ``·res`` (``sgd``) or nothing (``none``). Decoupled weight decay applies to
    every parameter. Non-projectable parameters (groups with ``project=False``: embeddings, LM head, norms,
    biases) get plain AdamW. Every ``update_gap`` steps the subspace is chosen again (``on_refresh="reset"``:
    zero m, v and restart the bias correction; ``"keep"``; ``"reproject"`` for svd/random bases).

    Args:
        params: parameters or groups. Group key ``project``: ``"auto"`` (default: 2-D params projected, others
            plain AdamW), ``True`` (every param projected; a non-2-D one is refused), ``False`` (plain AdamW).
        lr, betas, eps, weight_decay: AdamW's (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2).
        density: ρ in [0, 1]: subspace rank ``round(ρ·min(m, n))`` or fraction of columns/rows; 0 makes every
            projectable parameter state-free, 1 with ``columns``/``rows`` is plain AdamW.
        selection: ``random`` (default, orthogonal), ``svd``, ``randomized_svd``, ``columns``, ``rows``.
        rank: a fixed subspace rank instead of ``density`` (for ``columns``/``rows``: a number of columns/rows).
        active_scale: factor on the state-full update (GaLore's α; default 1).
        update_gap: steps between subspace changes (default 200).
        state_free: ``sign_sgd`` (default), ``sgd`` or ``none``. inactive_lr_scale: its lr factor (1.0).
        free_scale: ``"sai"`` scales each tensor's state-free update by its SGD-SaI scale ``s_i / max_j s_j``
            (g-SNR at the tensor's first non-zero gradient, running max over the ``sai`` tensors; not in the
            FRUGAL paper); ``"none"`` (default) leaves it unscaled.
        check_finite, maximize: as the other memopt optimizers.

    Use for: fine-tuning or pre-training with ~ρ of AdamW's state on the projectable matrices.
    Not for: DeepSpeed-flattened (1-D) partitions, which lose the matrix shape: ``project=True`` refuses them.
    """

    STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "proj_basis", "proj_indices", "proj_seed", "proj_k",
                            "proj_refreshed_at", "refreshes", "iteration", "gsnr"})
    SHAPED_STATE_KEYS = ()
    REQUIRED_GROUP_KEYS = frozenset({"density", "selection", "state_free"})

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, density: float = 0.25, selection: str = "random",
                 update_gap: int = 200, on_refresh: str = "reset", state_free: str = "sign_sgd",
                 inactive_lr_scale: float = 1.0, check_finite: bool = True, maximize: bool = False,
                 rank: Optional[int] = None, active_scale: float = 1.0, free_scale: str = "none"):
        if rank is not None:
            density = None  # a fixed rank replaces the density
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density, selection=selection,
                        update_gap=update_gap, on_refresh=on_refresh, state_free=state_free,
                        inactive_lr_scale=inactive_lr_scale, check_finite=check_finite, maximize=maximize,
                        project="auto", rank=rank, active_scale=active_scale, free_scale=free_scale)
        super().__init__(params, defaults)

    @staticmethod
    def _validate_group(group: dict) -> None:
        check_adam_args(group)
        MatrixOptimizer._check_project(group)
        if group["density"] is not None:
            check_float("density", group["density"], 0.0, 1.0, high_open=False)
        check_float("inactive_lr_scale", group["inactive_lr_scale"], 0.0)
        check_float("active_scale", group["active_scale"], 0.0)
        if group["free_scale"] not in FREE_SCALES:
            raise ValueError(f"free_scale={group['free_scale']!r} is not one of {FREE_SCALES}")
        if group["state_free"] not in STATE_FREE_RULES:
            raise ValueError(f"state_free={group['state_free']!r} is not one of {STATE_FREE_RULES}")
        if group["on_refresh"] == "reproject" and group["selection"] in ("columns", "rows"):
            raise ValueError("on_refresh='reproject' needs a basis selection (svd, randomized_svd, random)")
        # the projector checks selection, rank, on_refresh and update_gap (density 0 is FRUGAL's own: no subspace)
        _config(dict(group, density=group["density"] or (None if group["rank"] is not None else 1.0))).validate()

    def _refresh(self, group: dict, state: dict, g: Tensor, step: int) -> None:
        old = proj.refresh(state, g, step, _config(group))
        state["refreshes"] = state.get("refreshes", 0) + 1
        side = proj.projection_side(tuple(g.shape))
        if group["on_refresh"] == "reset" or "exp_avg" not in state:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                state.pop(key, None)
        elif group["on_refresh"] == "reproject" and old is not None:
            new = state["proj_basis"]
            state["exp_avg"] = proj.reproject_linear(state["exp_avg"], old, new, side)
            state["exp_avg_sq"] = proj.reproject_square(state["exp_avg_sq"], old, new, side)

    def _matrix_update(self, group: dict, state: dict, p32: Tensor, g: Tensor) -> None:
        if group["density"] == 0 and group["rank"] is None:  # no subspace: every coordinate is state-free
            self._state_free(p32, g, group, state)
            return
        it = state.get("iteration", 0)
        if proj.refresh_due(state, it, _config(group)):
            self._refresh(group, state, g, it)
        state["iteration"] = it + 1
        sel, shape = group["selection"], tuple(g.shape)
        low = proj.down(state, g, sel)
        beta1, beta2 = group["betas"]
        direction = self.adam_direction(state, low, beta1, beta2, group["eps"])
        p32.sub_(proj.up(state, direction, shape, sel), alpha=group["lr"] * group["active_scale"])
        if group["state_free"] != "none":
            self._state_free(p32, g - proj.up(state, low, shape, sel), group, state)

    def _before_updates(self) -> None:
        # SaI scales of every tensor are recorded before any update, so the max is the same for all of them
        for group in self.param_groups:
            if group["free_scale"] != "sai":
                continue
            for p in group["params"]:
                if p.grad is not None and p.dim() == 2 and "gsnr" not in self.state[p]:
                    s = gsnr(p.grad, 1e-8)
                    if s is not None and math.isfinite(s):
                        self.state[p]["gsnr"] = s
        self._gsnr_max = max((st["gsnr"] for st in self.state.values() if "gsnr" in st), default=1.0)

    def _state_free(self, p32: Tensor, residual: Tensor, group: dict, state: Optional[dict] = None) -> None:
        lr_free = group["lr"] * group["inactive_lr_scale"]
        if group["free_scale"] == "sai":
            s = (state or {}).get("gsnr")
            if s is None:  # all-zero gradient so far: no scale, no state-free step
                return
            lr_free *= s / self._gsnr_max
        if group["state_free"] == "sign_sgd":
            p32.sub_(residual.sign(), alpha=lr_free)
        elif group["state_free"] == "sgd":
            p32.sub_(residual, alpha=lr_free)


class GaLoreAdamW(FRUGAL):
    """GaLore-style AdamW (arXiv 2403.03507): AdamW on ``R = Down(G)`` for a rank-r subspace chosen from the
    gradient every ``update_gap`` steps, the update projected back and scaled by ``scale`` (α); no update
    outside the subspace. It is FRUGAL with ``state_free="none"``; memopt's defaults follow GaLore: ``svd``
    selection, ``on_refresh="keep"`` (the reference behaviour; ``reset``/``reproject`` fix its known flaw).

    Args: as :class:`FRUGAL`, plus ``rank`` (default 128, clamped to min(m, n)) and ``scale`` (α, default 0.25).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, rank: Optional[int] = 128,
                 density: Optional[float] = None, scale: float = 0.25, selection: str = "svd",
                 update_gap: int = 200, on_refresh: str = "keep", check_finite: bool = True, maximize: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, density=density if rank is None else 0.25,
                         selection=selection, update_gap=update_gap, on_refresh=on_refresh, state_free="none",
                         check_finite=check_finite, maximize=maximize, rank=rank, active_scale=scale)
