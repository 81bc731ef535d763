"""FRUGAL: full-rank updates with gradient splitting (arXiv 2411.07837; docs/projection.md)."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional

import torch
from torch import Tensor

from memopt.distributed import agree_on_max, gsnr_many, is_dtensor, row_sharded
from memopt.functional import projection as proj
from memopt.functional.adamw import adam_direction, adam_moments_, second_moment_read_map
from memopt.functional.quantize import layout_8bit, load_moment, row_blocked, store_moment
from memopt.functional.sgdsai import gsnr
from memopt.kernels import cpu as cpu_kernels
from memopt.optim._checks import check_8bit_layout, check_adam_args, check_float
from memopt.optim._base import layout_bytes
from memopt.optim._matrix import MatrixOptimizer

STATE_FREE_RULES = ("sign_sgd", "sgd", "none")
FREE_SCALES = ("none", "sai")
INNER = ("adamw", "sgdsai")
# inner-optimizer state: (key, signed map) per moment; a moment is held as fp32 ``key`` or 8-bit ``key_codes`` +
# ``key_absmax``
_MOMENTS = {"adamw": (("exp_avg", True), ("exp_avg_sq", False)), "sgdsai": (("momentum_buffer", True),)}
_INNER_KEYS = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer",
               *(f"{k}_{part}" for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") for part in ("codes", "absmax")))


def _config(group: dict) -> proj.ProjectionConfig:
    return proj.ProjectionConfig(selection=group["selection"], rank=group["rank"], density=group["density"],
                                 update_gap=group["update_gap"], on_refresh=group["on_refresh"])


def _clear_inner(state: dict) -> None:
    for key in _INNER_KEYS:
        state.pop(key, None)


class FRUGAL(MatrixOptimizer):
    """FRUGAL: a state-full inner optimizer on a subspace of each projectable gradient, a state-free update on
    the rest (Zmushko et al. 2024, arXiv 2411.07837).

    For a projectable (2-D) parameter with gradient G: ``gd = Down(G)``; the inner optimizer's state lives in the
    subspace and gives ``u = Up(inner(gd))`` at ``lr·active_scale``; the residual ``G − Up(gd)`` gets
    ``−lr·inactive_lr_scale·sign(res)`` (``sign_sgd``), ``·res`` (``sgd``) or nothing (``none``). Decoupled weight
    decay applies to every parameter. Non-projectable parameters (groups with ``project=False``: embeddings,
    LM head, norms, biases) get the inner optimizer on their whole gradient. Every ``update_gap`` steps the
    subspace is chosen again (``on_refresh="reset"``: zero the inner state and restart its step count;
    ``"keep"``; ``"reproject"`` for svd/random bases).

    Args:
        params: parameters or groups. Group key ``project``: ``"auto"`` (default: 2-D params projected, others
            get the inner optimizer), ``True`` (every param projected; a non-2-D one is refused), ``False``.
        lr, betas, eps, weight_decay: the inner optimizer's (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2).
        inner: ``"adamw"`` (default) or ``"sgdsai"``: SGD-SaI momentum (``m = g`` on the first step after a
            reset, then ``m ← β1 m + (1 − β1) g``, update ``scale_i·m`` with the tensor's SGD-SaI scale
            ``s_i / max_j s_j``; ``betas[0]`` is the momentum, ``betas[1]`` and ``eps`` are unused). Its lr is
            SGD-SaI's (~3e-2 full FT), so lower ``inactive_lr_scale`` to keep the state-free step near AdamW's.
        state_bits: 32 (default) or 8: inner moments as blockwise 8-bit codes (``blocksize`` 256) for state
            tensors of at least ``min_8bit_size`` (4096) elements, unless the parameter is marked with
            :func:`memopt.keep_32bit_state`.
        density: ρ in [0, 1] (default 0.25 when no ``rank`` is given): subspace rank ``round(ρ·min(m, n))``,
            fraction of columns/rows, or (``blocks``) fraction of the projectable tensors; 0 makes every
            projectable parameter state-free.
        selection: ``blocks`` (default): ``round(ρ·T)`` of the T projectable tensors are state-full (the inner
            optimizer on the whole gradient), the rest state-free; the active set changes every ``update_gap``
            steps in ``block_order`` (``"random"`` or ``"descending"``: last layers first), and an inactive tensor
            holds no inner state. Or a subspace of every projectable tensor: ``random`` (an orthonormal basis),
            ``svd``, ``randomized_svd``, ``columns`` or ``rows`` (docs/projection.md: why ``blocks`` is the default).
        rank: a fixed subspace rank instead of ``density`` (for ``columns``/``rows``: a number of columns/rows);
            give one of the two, not both. A rank above a matrix's ``min(m, n)`` is clamped to it.
        active_scale: factor on the state-full update (GaLore's α; default 1).
        update_gap: steps between subspace changes (default 200).
        state_free: ``sign_sgd`` (default), ``sgd`` or ``none``. inactive_lr_scale: its lr factor (1.0).
        free_scale: ``"sai"`` scales each tensor's state-free update by its SGD-SaI scale ``s_i / max_j s_j``
            (not in the FRUGAL paper); ``"none"`` (default) leaves it unscaled.
        check_finite, maximize: as the other memopt optimizers.

    SGD-SaI scales: the g-SNR of a tensor's first non-zero, finite gradient (whole gradient, before projection),
    kept in its state; the max runs over every tensor that has one.

    Use for: fine-tuning or pre-training with ~ρ of AdamW's state on the projectable matrices.
    Not for: DeepSpeed-flattened (1-D) partitions, which lose the matrix shape: ``project=True`` refuses them.
    """

    STATE_KEYS = frozenset({"step", "proj_seed", "proj_k", "proj_refreshed_at", "refreshes", "iteration", "gsnr",
                            "block_round"})
    REQUIRED_GROUP_KEYS = frozenset({"density", "selection", "state_free"})
    LAYOUT_KEYS = ("project", "inner", "selection", "density", "rank", "update_gap", "on_refresh", "state_free",
                   "free_scale", "block_order", "state_bits", "blocksize", "min_8bit_size")
    GROUP_STATE_KEYS = ("block_step",)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, density: Optional[float] = None,
                 selection: str = "blocks", update_gap: int = 200, on_refresh: str = "reset",
                 state_free: str = "sign_sgd", inactive_lr_scale: float = 1.0, check_finite: bool = True,
                 maximize: bool = False, rank: Optional[int] = None, active_scale: float = 1.0,
                 free_scale: str = "none", inner: str = "adamw", state_bits: int = 32, blocksize: int = 256,
                 min_8bit_size: int = 4096, block_order: str = "random", stochastic_rounding: bool = True):
        if rank is not None and density is not None:
            raise ValueError(f"give density or rank, not both (density={density!r}, rank={rank!r})")
        if rank is None and density is None:
            density = 0.25
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density, selection=selection,
                        update_gap=update_gap, on_refresh=on_refresh, state_free=state_free,
                        inactive_lr_scale=inactive_lr_scale, check_finite=check_finite, maximize=maximize,
                        project="auto", rank=rank, active_scale=active_scale, free_scale=free_scale, inner=inner,
                        state_bits=state_bits, blocksize=blocksize, min_8bit_size=min_8bit_size,
                        block_order=block_order, block_step=0, stochastic_rounding=stochastic_rounding)
        self._gsnr_max = 1.0
        super().__init__(params, defaults)

    @staticmethod
    def _validate_group(group: dict) -> None:
        check_adam_args(group)
        MatrixOptimizer._check_project(group)
        check_8bit_layout(group)
        if group["density"] is not None:
            check_float("density", group["density"], 0.0, 1.0, high_open=False)
        check_float("inactive_lr_scale", group["inactive_lr_scale"], 0.0)
        check_float("active_scale", group["active_scale"], 0.0)
        for key, allowed in (("free_scale", FREE_SCALES), ("state_free", STATE_FREE_RULES), ("inner", INNER),
                             ("block_order", proj.BLOCK_ORDERS)):
            if group[key] not in allowed:
                raise ValueError(f"{key}={group[key]!r} is not one of {allowed}")
        sel = group["selection"]
        if group["on_refresh"] == "reproject" and sel in ("columns", "rows", "blocks"):
            raise ValueError("on_refresh='reproject' needs a basis selection (svd, randomized_svd, random)")
        if sel == "blocks":
            if group["rank"] is not None:
                raise ValueError("selection='blocks' (the default) takes density (a fraction of tensors), not rank: "
                                 "a rank needs a subspace selection, e.g. selection='random'")
            sel = "columns"  # validate the shared keys below (update_gap, on_refresh)
        # the projector checks selection, rank (exactly one of rank and density), on_refresh and update_gap;
        # density 0 is FRUGAL's own (no subspace): only the shared keys are checked then
        density = 1.0 if group["density"] == 0 and group["rank"] is None else group["density"]
        _config(dict(group, selection=sel, density=density)).validate()

    def _state_parts(self, group: dict, p: Tensor) -> list[tuple[set, tuple]]:
        """The projector's tensor (marked by its refresh step) and the inner optimizer's moments (marked by their
        step count) are created apart: a subspace is chosen before an SGD-SaI inner step waits for a non-zero
        gradient, and a refresh with ``reset`` drops the moments."""
        layout = set(self.state_layout(group, p))
        projector = {k for k in layout if k.startswith("proj_")}
        return [(projector, ("proj_refreshed_at",)), (layout - projector, ("step",))]

    def _check_param_state(self, pid, group: dict, p: Tensor, st: dict) -> None:
        super()._check_param_state(pid, group, p, st)
        idx = st.get("proj_indices")
        if idx is not None and idx.numel():
            local = idx.to_local() if is_dtensor(idx) else idx
            size = p.shape[1] if group["selection"] == "columns" else p.shape[0]
            if int(local.min()) < 0 or int(local.max()) >= size or torch.unique(local).numel() != local.numel():
                raise ValueError(f"state 'proj_indices' of param {pid} (shape {tuple(p.shape)}) is not a set of "
                                 f"distinct {group['selection']} of it: the checkpoint is corrupt")

    def state_layout(self, group: dict, p: Tensor) -> dict:
        """The projector's tensor (``proj_basis`` fp32 or ``proj_indices`` int32) and the inner optimizer's moments
        in the subspace's shape (the whole shape for parameters that are not projected, and for ``blocks``, where
        only the active tensors hold them); moments of at least ``min_8bit_size`` elements in 8 bits under
        ``state_bits=8``. State-free (``density=0``) matrices hold nothing."""
        shape = tuple(p.shape)
        projected = self._projected(group, p)
        if projected and group["density"] == 0 and group["rank"] is None:
            return {}
        out, low = {}, shape
        if projected and group["selection"] != "blocks":
            cfg = _config(group)
            low = proj.projected_shape(shape, cfg)
            out = {k: (s, torch.int32 if k == "proj_indices" else torch.float32)
                   for k, s in proj.selector_shapes(shape, cfg).items()}
        eight = self._moments_8bit(group, p, low)
        for key, _ in _MOMENTS[group["inner"]]:
            out.update(layout_8bit(key, low, group["blocksize"]) if eight else {key: (low, torch.float32)})
        return out

    def _moments_8bit(self, group: dict, p: Tensor, low: tuple) -> bool:
        """Whether the inner moments of ``p`` (global shape ``low``) are 8-bit: at least ``min_8bit_size``
        elements, and under FSDP2 rows that hold whole blocks (blocks must not span two ranks)."""
        return self._wants_8bit(group, p) and math.prod(low) >= group["min_8bit_size"] and (
            not row_sharded(p) or row_blocked(tuple(low), group["blocksize"]))

    def _dtensor_refusal(self, group: dict) -> Optional[str]:
        shard_friendly = group["selection"] in ("columns", "blocks") or (
            group["density"] == 0 and group["rank"] is None)
        if group["project"] is False or shard_friendly:
            return None  # the math of every remaining case is local to a row, or agreed over the group
        return (f" with selection={group['selection']!r}: its subspace needs the whole matrix on every rank (it would"
                " be computed per shard). Use selection='columns' or selection='blocks' under FSDP2")

    # ------------------------------------------------------------------------------------ inner optimizer
    def inner_direction(self, group: dict, state: dict, x: Tensor, p: Tensor) -> Optional[Tensor]:
        """Step the inner optimizer on ``x`` (the projected or whole fp32 gradient of ``p``) and return its
        update direction (to be multiplied by the lr), or ``None`` when SGD-SaI has no scale yet."""
        beta1, beta2 = group["betas"]
        bs = group["blocksize"]
        eight = self._inner_8bit(group, p, x)
        if group["inner"] == "sgdsai":
            s = state.get("gsnr")
            if s is None:  # all-zero gradient so far: the scale (and the step) waits for a non-zero one
                return None
            buf = load_moment(state, "momentum_buffer", bs)
            if buf is None or buf.shape != x.shape:
                buf = x.clone()  # first step after a (re)start: m = g
            else:
                buf.lerp_(x, 1.0 - beta1)
            store_moment(state, "momentum_buffer", buf, bs, True, eight)
            return buf * (s / self._gsnr_max)
        m = load_moment(state, "exp_avg", bs)
        if m is None or m.shape != x.shape:
            _clear_inner(state)
            m, v, state["step"] = torch.zeros_like(x), torch.zeros_like(x), 0
        else:
            v = load_moment(state, "exp_avg_sq", bs, signed=False, read=second_moment_read_map)
        state["step"] += 1
        adam_moments_(x, m, v, beta1=beta1, beta2=beta2)
        direction = adam_direction(m, v, beta1=beta1, beta2=beta2, eps=group["eps"], step=state["step"])
        for (key, signed), value in zip(_MOMENTS["adamw"], (m, v)):
            store_moment(state, key, value, bs, signed, eight)
        return direction

    def _inner_8bit(self, group: dict, p: Tensor, x: Tensor) -> bool:
        """Whether the inner moments of ``p`` for its (local) projected or whole gradient ``x`` are 8-bit."""
        return self._moments_8bit(group, p, (p.shape[0], *x.shape[1:]) if is_dtensor(p) else tuple(x.shape))

    def _inner_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor, lr: float) -> None:
        """The inner optimizer's step at ``lr`` on the whole gradient ``g`` of ``p`` (a parameter that is not
        projected, or an active ``blocks`` tensor): ``p32 -= lr · inner_direction(g)``, AdamW's by the fused CPU
        update where it takes the tensor (:meth:`_fused_adamw`)."""
        if group["inner"] == "adamw" and self._fused_adamw(group, state, p32, g, p, lr):
            return
        d = self.inner_direction(group, state, g, p)
        if d is not None:
            p32.sub_(d, alpha=lr)

    def _fused_adamw(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor, lr: float) -> bool:
        """The AdamW inner step on the whole gradient in one pass of :mod:`memopt.kernels.cpu` (fp32 moments: torch's
        fused CPU AdamW; 8-bit: memopt's loop): the same state layout and math as :meth:`inner_direction`, within a
        rounding of the parameter (docs/8bit.md, "On CPU: fused C loops"). ``False`` where it does not take the
        tensor (then the PyTorch form runs). Weight decay was applied before (``MatrixOptimizer.step``)."""
        bs, eight = group["blocksize"], self._inner_8bit(group, p, g)
        keys = [k for key, _ in _MOMENTS["adamw"] for k in (layout_8bit(key, tuple(g.shape), bs) if eight else [key])]
        if state.get(keys[0]) is None or state[keys[0]].shape != g.shape:  # a (re)start: zero moments
            _clear_inner(state)
            for key, signed in _MOMENTS["adamw"]:
                store_moment(state, key, torch.zeros_like(g), bs, signed, eight)
            state["step"] = 0
        return self._fused_adamw_step(group, state, p32, g, [state[k] for k in keys], lr, bs if eight else None)

    def _dense_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        self._inner_update(group, state, p32, g, p, group["lr"])

    # ------------------------------------------------------------------------------------ projection
    def _refresh(self, group: dict, state: dict, g: Tensor, step: int, p: Tensor) -> None:
        old = proj.refresh(state, g, step, _config(group))
        if is_dtensor(p):  # columns (the one index selection allowed on shards): every rank keeps the same ones
            seed = agree_on_max(state["proj_seed"], p)
            state["proj_seed"] = seed
            state["proj_indices"] = proj.random_indices(g.shape[1], state["proj_k"], seed).to(g.device)
        state["refreshes"] = state.get("refreshes", 0) + 1
        side = proj.projection_side(tuple(g.shape))
        if group["on_refresh"] == "reset":
            _clear_inner(state)
        elif group["on_refresh"] == "reproject" and old is not None:
            new = state["proj_basis"]
            eight = any(f"{key}_codes" in state for key, _ in _MOMENTS[group["inner"]])
            for key, signed in _MOMENTS[group["inner"]]:
                value = load_moment(state, key, group["blocksize"], signed)
                if value is None:
                    continue
                move = proj.reproject_square if key == "exp_avg_sq" else proj.reproject_linear
                store_moment(state, key, move(value, old, new, side), group["blocksize"], signed, eight)

    def _matrix_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        if group["density"] == 0 and group["rank"] is None:  # no subspace: every coordinate is state-free
            self._state_free(p32, g, group, state, whole=True)
            return
        if group["selection"] == "blocks":
            self._block_update(group, state, p32, g, p)
            return
        it = state.get("iteration", 0)
        if proj.refresh_due(state, it, _config(group)):
            self._refresh(group, state, g, it, p)
        state["iteration"] = it + 1
        sel, shape = group["selection"], tuple(g.shape)
        low = proj.down(state, g, sel)
        direction = self.inner_direction(group, state, low, p)
        if direction is not None:
            p32.sub_(proj.up(state, direction, shape, sel), alpha=group["lr"] * group["active_scale"])
        if group["state_free"] != "none":
            self._state_free(p32, g - proj.up(state, low, shape, sel), group, state)

    def _block_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        # one round counter per group, advanced once per step() (so every tensor is in the same round, also
        # one whose gradient was missing or skipped) and saved with the param groups
        rnd = (group["block_step"] - 1) // group["update_gap"]
        if state.get("block_round") != rnd:
            if group["on_refresh"] == "reset":
                _clear_inner(state)
            state["block_round"] = rnd
        if self._block_active(group, p):
            self._inner_update(group, state, p32, g, p, group["lr"] * group["active_scale"])
        else:  # inactive: its inner state was freed in _before_updates
            self._state_free(p32, g, group, state, whole=True)

    def _block_active(self, group: dict, p: Tensor) -> bool:
        """Whether ``p`` (a ``blocks`` tensor) is state-full in this step's round."""
        key = (len(self._block_params), group["density"], group["block_order"],
               (group["block_step"] - 1) // group["update_gap"])
        if key not in self._active_blocks:
            self._active_blocks[key] = set(proj.active_blocks(*key))
        return self._block_params[id(p)] in self._active_blocks[key]

    def planned_state_layouts(self, pairs: list) -> list[dict]:
        """As the base's, but of a group's ``blocks`` tensors only as many hold inner state as a round makes active
        (``round(ρ·T)`` of the T, at most the group's own), counted here as its largest ones: the most any round can
        hold, since the tensors that leave the active set are cleared before the new ones take state."""
        layouts = super().planned_state_layouts(pairs)
        n_blocks = sum(g["selection"] == "blocks" and self._projected(g, p) for g, p in pairs)
        for group in {id(g): g for g, _ in pairs}.values():
            if group["selection"] != "blocks" or not group["density"]:
                continue
            mine = [i for i, (g, p) in enumerate(pairs) if g is group and self._projected(g, p)]
            largest = sorted(mine, key=lambda i: layout_bytes(layouts[i]), reverse=True)
            keep = set(largest[:proj.active_count(n_blocks, group["density"])])
            for i in mine:
                if i not in keep:
                    layouts[i] = {}
        return layouts

    def _before_updates(self) -> None:
        # SaI scales of every tensor are recorded before any update, so the max is the same for all of them
        blocks: dict[int, int] = {}
        for group in self.param_groups:
            if group["selection"] == "blocks":
                group["block_step"] += 1
            for p in group["params"]:
                projected = self._projected(group, p)
                if projected and group["selection"] == "blocks" and p.requires_grad:
                    blocks[id(p)] = len(blocks)
                wants = group["inner"] == "sgdsai" or (group["free_scale"] == "sai" and projected)
                if wants and p.numel() and self._grad(p, group) is not None and "gsnr" not in self.state[p]:
                    s = gsnr_many([p.grad])[0] if is_dtensor(p) else gsnr(p.grad, 1e-8)  # whole-tensor g-SNR
                    if s is not None and math.isfinite(s):
                        self.state[p]["gsnr"] = s
        self._gsnr_max = max((st["gsnr"] for st in self.state.values() if "gsnr" in st), default=1.0)
        if blocks != getattr(self, "_block_params", None):
            self._block_params, self._active_blocks = blocks, {}
        for group in self.param_groups:  # tensors that left the active set free their state before any other grows
            if group["selection"] == "blocks" and group["density"]:
                for p in group["params"]:
                    if id(p) in blocks and self.state.get(p) and not self._block_active(group, p):
                        _clear_inner(self.state[p])

    def _state_free(self, p32: Tensor, residual: Tensor, group: dict, state: Optional[dict] = None,
                    whole: bool = False) -> None:
        """The state-free step on ``residual`` (``whole``: the parameter's whole gradient, its only update this step;
        sign descent then takes the fused CPU update where it can, bit for bit the same)."""
        lr_free = group["lr"] * group["inactive_lr_scale"]
        if group["free_scale"] == "sai":
            s = (state or {}).get("gsnr")
            if s is None:  # all-zero gradient so far: no scale, no state-free step
                return
            lr_free *= s / self._gsnr_max
        if group["state_free"] == "sign_sgd":
            if whole and self._use_cpu_kernel(group, p32, residual, [], None, matrix=False):
                cpu_kernels.sign_step_(p32, residual, lr=lr_free)
                self._cpu_updates += 1
            else:
                p32.sub_(residual.sign(), alpha=lr_free)
        elif group["state_free"] == "sgd":
            p32.sub_(residual, alpha=lr_free)


class GaLoreAdamW(FRUGAL):
    """GaLore-style AdamW (arXiv 2403.03507): AdamW on ``R = Down(G)`` for a rank-r subspace chosen from the
    gradient every ``update_gap`` steps, the update projected back and scaled by ``scale`` (α); no update
    outside the subspace. It is FRUGAL with ``state_free="none"``; memopt's defaults follow GaLore: ``svd``
    selection, ``on_refresh="keep"`` (the reference behaviour; ``reset``/``reproject`` fix its known flaw).

    Args: as :class:`FRUGAL`, plus ``rank`` (default 128 unless ``density`` is given instead; clamped to
    min(m, n)) and ``alpha`` (GaLore's α, the factor on the projected-back update, default 0.25; ``scale`` is its
    former name, deprecated);
    ``state_bits=8`` holds the inner AdamW moments as blockwise 8-bit codes (GaLore's 8-bit variant).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, rank: Optional[int] = None,
                 density: Optional[float] = None, alpha: float = 0.25, selection: str = "svd",
                 update_gap: int = 200, on_refresh: str = "keep", check_finite: bool = True, maximize: bool = False,
                 state_bits: int = 32, blocksize: int = 256, min_8bit_size: int = 4096,
                 stochastic_rounding: bool = True, scale: Optional[float] = None):
        if scale is not None:
            # "scale" names a mode string in SGD-SaI: one meaning per argument name across memopt
            warnings.warn("GaLoreAdamW(scale=...) is deprecated: the argument is now called alpha",
                          FutureWarning, stacklevel=2)
            alpha = scale
        check_float("alpha", alpha, 0.0)  # checked again as FRUGAL's active_scale: named as the caller wrote it
        if rank is None and density is None:
            rank = 128
        super().__init__(params, lr, betas, eps, weight_decay, density=density,
                         selection=selection, update_gap=update_gap, on_refresh=on_refresh, state_free="none",
                         check_finite=check_finite, maximize=maximize, rank=rank, active_scale=alpha,
                         stochastic_rounding=stochastic_rounding,
                         state_bits=state_bits, blocksize=blocksize, min_8bit_size=min_8bit_size)
