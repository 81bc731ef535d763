"""Gradient release: each parameter is updated inside ``backward()`` as soon as its gradient is complete, and the
gradient is freed (``Tensor.register_post_accumulate_grad_hook``), so the whole set of gradients never exists.
A mixin of :class:`memopt.optim._base.MemoptOptimizer`; an optimizer opts in with ``_supports_release`` and
``_release_update`` (docs/lean.md)."""

from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch
from torch import Tensor

_RELEASE_OWNER_ATTR = "_memopt_release_owner"


def _refuse_distributed_release() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise RuntimeError(
            "gradient release is not supported with more than one process: its hook runs before DDP's all-reduce "
            "(and FSDP's reduce-scatter), so each rank would update from its own local gradient. Train without "
            "grad_release under DDP/FSDP, or on one device"
        )


def _accumulating() -> bool:
    """True inside accelerate (the Trainer) during a backward that is not the last of an accumulation cycle."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return False
    return state.GradientState._shared_state.get("sync_gradients", True) is False




class GradientReleaseMixin:
    """The hooks, their ownership (one live optimizer per parameter) and the refusals of gradient release."""

    def _init_release(self) -> None:
        self._release_handles: list = []
        self._release_paths = [0, 0]
        self._group_index: Optional[dict[int, int]] = None
        self.max_released_grad_bytes = 0  # largest gradient alive at once under gradient release

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_release_handles", [])
        self.__dict__.setdefault("_release_paths", [0, 0])
        self.__dict__.setdefault("_group_index", None)
        self.__dict__.setdefault("max_released_grad_bytes", 0)

    @property
    def gradient_release(self) -> bool:
        """Whether parameters are updated inside backward (see :meth:`enable_gradient_release`)."""
        return bool(self._release_handles)

    def enable_gradient_release(self) -> None:
        """Update each parameter inside ``backward()`` as soon as its gradient is complete, then free that
        gradient (``Tensor.register_post_accumulate_grad_hook``), so the full set of gradients never exists.

        Contract: every ``backward()`` is one optimizer update of the parameters it reaches; call ``step()``
        once after it (it finishes deferred work and updates any parameter whose gradient was set without a
        backward) and ``zero_grad()`` as usual. The learning rate and other group values are read when the
        hook runs, so a scheduler stepped after ``step()`` acts on the next backward, as it does normally.

        Refused (RuntimeError): distributed runs with more than one process (the hook fires before DDP's
        all-reduce and before FSDP's reduce-scatter, so each rank would step on its local gradient); inside
        accelerate / the Trainer, a backward that is not the last of a gradient-accumulation cycle; a parameter
        that already has the hooks of another live optimizer. Not supported: global gradient-norm clipping (it
        cannot see freed gradients: the Trainer integration refuses ``max_grad_norm > 0``) and fp16 loss scaling
        (``GradScaler``: the hook would step with scaled gradients; the Trainer integration refuses ``fp16``).
        """
        if self._release_handles:
            return
        if not self._supports_release():
            raise NotImplementedError(f"{type(self).__name__} does not support gradient release")
        _refuse_distributed_release()
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            owner = getattr(p, _RELEASE_OWNER_ATTR, lambda: None)()
            if owner is not None and owner is not self and owner.gradient_release:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} already has gradient-release hooks from another live "
                    f"{type(owner).__name__}: call disable_gradient_release() on that optimizer (or delete it) first"
                )
        self._release_handles = [self._register_release_hook(p) for p in params if p.requires_grad]

    def _register_release_hook(self, p: Tensor):
        # The hook holds the optimizer weakly: a dropped optimizer's hooks do nothing and do not keep it alive.
        ref = weakref.ref(self)

        def hook(param: Tensor) -> None:
            opt = ref()
            if opt is not None and opt._release_handles:
                opt._release_hook(param)

        setattr(p, _RELEASE_OWNER_ATTR, ref)
        return p.register_post_accumulate_grad_hook(hook)

    def disable_gradient_release(self) -> None:
        """Remove the backward hooks (``step()`` then updates from ``.grad`` as usual)."""
        for handle in self._release_handles:
            handle.remove()
        self._release_handles = []
        for group in self.param_groups:
            for p in group["params"]:
                if getattr(p, _RELEASE_OWNER_ATTR, lambda: None)() is self:
                    delattr(p, _RELEASE_OWNER_ATTR)

    def _supports_release(self) -> bool:
        return False

    def _release_update(self, group: dict, p: Tensor, g: Tensor, finite: Optional[Tensor]) -> bool:
        """Update ``p`` from its gradient ``g`` inside backward (finite, or ``finite`` is its device-side flag, to
        pass to the update); return True to keep ``p.grad`` for ``step()`` instead of freeing it. Counts the update
        path in ``self._release_paths``."""
        raise NotImplementedError

    def _group_of(self, p: Tensor) -> dict:
        # groups are looked up by index at hook time: load_state_dict replaces the group dicts
        if self._group_index is None or id(p) not in self._group_index:
            self._group_index = {id(q): i for i, group in enumerate(self.param_groups) for q in group["params"]}
        return self.param_groups[self._group_index[id(p)]]

    @torch.no_grad()
    def _release_hook(self, p: Tensor) -> None:
        g = self._grad(p)
        if g is None:
            return
        if _accumulating():
            raise RuntimeError(
                f"{type(self).__name__} with gradient release updates parameters inside backward and cannot "
                "accumulate gradients: set gradient_accumulation_steps=1 (use a larger per-device batch instead)"
            )
        _refuse_distributed_release()
        self._settle_skips(before=self._generation)  # the previous step's flags, before a step count is used
        group = self._group_of(p)
        self.max_released_grad_bytes = max(self.max_released_grad_bytes, g.numel() * g.element_size())
        keep = False
        if p.numel():
            # no host sync for a tensor checked on the device (its kernel reads the flag); one for any other
            if not group["check_finite"]:
                keep = self._release_update(group, p, g, None)
            elif self._checked_on_device(group, p, g):
                keep = self._release_update(group, p, g, self._device_flags([p], [g])[0])
            elif self._checks_finite_itself(group, p, g) or self._finite_mask([g])[0]:
                keep = self._release_update(group, p, g, None)
            else:
                self._count_skips(1)
        if not keep:
            p.grad = None

    def _finish_release_step(self, n_triton: int, n_torch: int) -> None:
        """Called at the end of ``step()``: the update paths of this step, released tensors included."""
        self._record_paths(n_triton + self._release_paths[0], n_torch + self._release_paths[1])
        self._release_paths = [0, 0]
        self._generation += 1
