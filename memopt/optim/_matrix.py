"""The base of the projection methods (FRUGAL, GaLore-style, SN-SM): per-parameter fp32 math with decoupled weight
decay, 2-D parameters through a matrix update, the others through plain AdamW (docs/projection.md)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memopt.functional.adamw import adam_direction, adam_moments_
from memopt.functional.quantize import check_block_maxima
from memopt.functional.rounding import write_param_
from memopt.kernels import cpu as cpu_kernels
from memopt.distributed import is_dtensor, local, sharded_like, shards_with_rows
from memopt.optim._base import MemoptOptimizer



class MatrixOptimizer(MemoptOptimizer):
    """Base for the projection methods: per-parameter math in fp32 with decoupled weight decay, and a group key
    ``project`` ("auto": 2-D params take the matrix update, others plain AdamW; True: every param, a non-2-D
    one is refused, e.g. a DeepSpeed-flattened partition; False: plain AdamW). Subclasses implement
    ``_matrix_update(group, state, p32, g)``."""

    def _normalize_group(self, group: dict) -> None:
        group["betas"] = tuple(float(b) for b in group["betas"])

    @staticmethod
    def _check_project(group: dict) -> None:
        if group["project"] not in ("auto", True, False):
            raise ValueError(f"project={group['project']!r} must be 'auto', True or False")
        for flag in ("check_finite", "maximize", "stochastic_rounding"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"{flag}={group[flag]!r} must be a bool")

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("project", self.defaults.get("project")) is True:
            params = param_group["params"]
            for p in ([params] if isinstance(params, Tensor) else list(params)):
                if p.dim() != 2:
                    raise ValueError(
                        f"{type(self).__name__} projects 2-D matrices; a parameter of shape {tuple(p.shape)} is in "
                        "a group with project=True (put 1-D params, or DeepSpeed-flattened partitions, in a group "
                        "with project=False)"
                    )
        super().add_param_group(param_group)

    @staticmethod
    def _projected(group: dict, p: Tensor) -> bool:
        return group["project"] is True or (group["project"] == "auto" and p.dim() == 2)

    @staticmethod
    def _adam_state(state: dict, g: Tensor) -> list[Tensor]:
        """AdamW's moments ``exp_avg``, ``exp_avg_sq`` of a tensor: created (zero, ``step`` 0) when absent or of
        another shape than ``g``."""
        if "exp_avg" not in state or state["exp_avg"].shape != g.shape:
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
            state["step"] = 0
        return [state["exp_avg"], state["exp_avg_sq"]]

    @classmethod
    def adam_direction(cls, state: dict, g: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
        """Update AdamW moments (:meth:`_adam_state`, ``step``) and return the bias-corrected direction
        ``m̂ / (sqrt(v̂) + eps)``."""
        cls._adam_state(state, g)
        state["step"] += 1
        adam_moments_(g, state["exp_avg"], state["exp_avg_sq"], beta1=beta1, beta2=beta2)
        return adam_direction(state["exp_avg"], state["exp_avg_sq"], beta1=beta1, beta2=beta2, eps=eps,
                              step=state["step"])

    def _matrix_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        """Update of a projected parameter: ``p32`` is its fp32 value (updated in place), ``g`` the fp32
        gradient, ``p`` the parameter itself (for per-tensor marks)."""
        raise NotImplementedError

    def _dense_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        """Update of a parameter that is not projected: plain AdamW (subclasses may use their inner optimizer), on
        torch's fused CPU AdamW where the fused CPU updates take the tensor (:meth:`_use_cpu_kernel`; the same state,
        within a rounding of the parameter: docs/8bit.md, "On CPU: fused C loops"). Weight decay was applied
        before (:meth:`step`)."""
        if self._fused_adamw_step(group, state, p32, g, self._adam_state(state, g), group["lr"]):
            return
        beta1, beta2 = group["betas"]
        p32.sub_(self.adam_direction(state, g, beta1, beta2, group["eps"]), alpha=group["lr"])

    def _fused_adamw_step(self, group: dict, state: dict, p32: Tensor, g: Tensor, moments: list[Tensor], lr: float,
                          blocksize: Optional[int] = None) -> bool:
        """One AdamW step at ``lr`` of ``p32`` on the whole gradient ``g`` with the moments ``moments`` (fp32: torch's
        fused CPU AdamW; with ``blocksize``: codes and maxima in 8-bit row blocks, memopt's loop), advancing
        ``state["step"]``, where the fused CPU updates take the tensor (:meth:`_use_cpu_kernel`); ``False``, with
        nothing done, elsewhere. Weight decay was applied before (:meth:`step`)."""
        if not self._use_cpu_kernel(group, p32, g, moments, blocksize, matrix=blocksize is not None):
            return False
        state["step"] += 1
        beta1, beta2 = group["betas"]
        args = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=0.0, step=state["step"])
        if blocksize is None:
            cpu_kernels.adamw_update_(p32, g, *moments, **args)
        else:
            cpu_kernels.adamw_update_8bit_(p32, g, *moments, blocksize=blocksize, **args)
        self._cpu_updates += 1
        return True

    def _before_updates(self) -> None:
        """Hook run after the closure and before any parameter is updated (whole-step statistics)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        work = [(group, *self._collect(group)) for group in self.param_groups]  # refusals before any update
        self._before_updates()
        updated = 0
        for group, params, grads in work:
            updated += len(params)
            for p, grad in zip(params, grads):
                # FSDP2: the math runs on the local rows (state holds local tensors between steps; state_dict()
                # hands checkpoints DTensors)
                g = (-local(grad) if group["maximize"] else local(grad)).float()
                state = self.state[p]
                # corrupt 8-bit state (NaN/Inf block maxima) raises before anything of this tensor is written
                check_block_maxima([v for k, v in state.items() if k.endswith("_absmax")])
                lp = local(p)
                p32 = lp if lp.dtype == torch.float32 else lp.float()
                if group["weight_decay"]:
                    p32.mul_(1.0 - group["lr"] * group["weight_decay"])
                if self._projected(group, p):
                    self._matrix_update(group, state, p32, g, p)
                else:
                    self._dense_update(group, state, p32, g, p)
                if p32 is not lp:  # bf16 weights: stochastic rounding as the other memopt optimizers (default on)
                    write_param_(lp, p32, group["stochastic_rounding"])
        self._record_paths(0, updated)  # no Triton kernel; the fused CPU updates among them are counted as cpu
        return loss

    # ------------------------------------------------------------------------------------------ FSDP2 state
    def state_dict(self) -> dict:
        """As the base's, with the state of FSDP2 parameters as DTensors: tensors whose rows are the parameter's
        local rows are sharded with them, the others (selected indices, per-tensor maps) are the same on every
        rank. ``torch.distributed.checkpoint`` then reshards them."""
        out = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, st in out["state"].items():
            p = params[index] if isinstance(index, int) and index < len(params) else None
            if p is None or not is_dtensor(p):
                continue
            rows = local(p).shape[0]
            out["state"][index] = {k: sharded_like(p, v) if torch.is_tensor(v) and shards_with_rows(
                k, tuple(v.shape), rows, self._REPLICATED_STATE) else v for k, v in st.items()}
        return out

    _REPLICATED_STATE = frozenset({"proj_indices"})

    def init_state_like_checkpoint(self, model: torch.nn.Module, checkpoint_id, key: str = "optim") -> None:
        """Give this (fresh) optimizer exactly the state entries a ``torch.distributed.checkpoint`` checkpoint holds
        for it, as zeros of the checkpoint's shapes and dtypes, so that ``get_optimizer_state_dict(model, self)``
        is a load template with the checkpoint's keys. DCP fills only the keys its template holds and stops on a
        template key the checkpoint lacks; which tensors hold inner state can depend on the step (FRUGAL with
        ``selection="blocks"``), so a template from a fresh optimizer's own first step would not match.

        ``key`` is the top-level key the optimizer state was saved under (``{"model": ..., key: osd}``; accelerate
        saves it alone under ``"optimizer"``). Reads only the checkpoint's metadata; allocates what the load will
        fill. Works at any world size (the rows of sharded state follow the parameter's local rows)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = FileSystemReader(str(checkpoint_id)).read_metadata().state_dict_metadata
        prefix = f"{key}.state."
        wanted: dict[str, dict] = {}
        for flat, md in meta.items():
            if flat.startswith(prefix):
                fqn, _, entry = flat[len(prefix):].rpartition(".")
                wanted.setdefault(fqn, {})[entry] = md
        if not wanted:
            raise ValueError(f"checkpoint {checkpoint_id} has no optimizer state under {key!r} (its keys start with "
                             f"{sorted({k.split('.')[0] for k in meta})})")
        params = dict(model.named_parameters())
        unknown = sorted(set(wanted) - set(params))
        if unknown:
            raise ValueError(f"checkpoint {checkpoint_id} holds optimizer state for parameters this model does not "
                             f"have: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
        self.state.clear()
        for fqn, entries in wanted.items():
            p = params[fqn]
            lp = local(p)
            st = self.state[p]
            for entry, md in entries.items():
                if not isinstance(md, TensorStorageMetadata):
                    st[entry] = 0  # a number or flag: DCP replaces it with the saved value
                    continue
                shape = tuple(md.size)
                if shards_with_rows(entry, shape, p.shape[0], self._REPLICATED_STATE):
                    shape = (lp.shape[0], *shape[1:])  # this rank's rows
                st[entry] = torch.zeros(shape, dtype=md.properties.dtype, device=lp.device)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for st in self.state.values():  # back to the local rows the math works on
            for k, v in list(st.items()):
                if is_dtensor(v):
                    st[k] = v.to_local()
