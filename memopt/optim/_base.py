"""What every memopt optimizer shares: argument checks, non-finite gradient handling, 8-bit state choice,
and a ``load_state_dict`` that refuses foreign checkpoints and keeps state dtypes."""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from memopt.distributed import is_deepspeed_partitioned, is_dtensor
from memopt.functional.sgdsai import compute_dtype

logger = logging.getLogger("memopt")

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_BITS = (8, 32)
_OVERRIDE_ATTR = "_memopt_state_bits"
_RELEASE_OWNER_ATTR = "_memopt_release_owner"


def keep_32bit_state(params, bits: int = 32) -> None:
    """Per-parameter override of ``state_bits`` (e.g. keep embeddings in 32-bit state under ``state_bits=8``).

    Accepts a tensor, an iterable of tensors or an ``nn.Module`` (all its parameters). The mark lives on the
    tensor, so it must be set before the parameter's first step; a tensor's state format never changes later.
    """
    if bits not in STATE_BITS:
        raise ValueError(f"bits={bits!r} is not one of {STATE_BITS}")
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    elif isinstance(params, Tensor):
        params = [params]
    for p in params:
        setattr(p, _OVERRIDE_ATTR, bits)


def _refuse_dtensor(name: str, p: Tensor, why: str) -> None:
    if is_dtensor(p):
        raise NotImplementedError(
            f"{name} does not support FSDP2 / DTensor-sharded parameters{why}. Use optim='sgdsai' (32-bit state), "
            "DDP (accelerate launch --multi_gpu), or a single device."
        )


def _refuse_deepspeed(name: str, p: Tensor) -> None:
    if is_deepspeed_partitioned(p):
        raise NotImplementedError(
            f"{name} does not support DeepSpeed ZeRO-partitioned parameters: its per-tensor statistics would be "
            "computed per partition. Use DDP, FSDP2 (optim='sgdsai'), or a single device."
        )


def check_gradient(name: str, p: Tensor, g: Tensor) -> None:
    """The gradients no memopt optimizer can use, refused with one message per kind for every optimizer."""
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{name} does not support sparse gradients (layout {g.layout}): use a dense embedding "
                           "(nn.Embedding(sparse=False)) or an optimizer for sparse gradients such as "
                           "torch.optim.SparseAdam")
    if p.is_meta or g.is_meta:
        raise RuntimeError(f"{name} cannot update a parameter of shape {tuple(p.shape)} on the meta device (it holds "
                           "no data): materialise the model (load its weights or call to_empty) before training")


def check_float(name: str, value: Any, low: float, high: float = math.inf, *, low_open=False, high_open=True):
    if isinstance(value, Tensor):
        raise ValueError(f"{name}={value!r}: a tensor is not supported here, pass a Python float")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range {lo}{low}, {high}{hi}")


def check_adam_args(group: dict) -> None:
    """lr, betas, eps and weight_decay of an Adam-family group."""
    check_float("lr", group["lr"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r} must be a pair of floats")
    check_float("betas[0]", betas[0], 0.0, 1.0)
    check_float("betas[1]", betas[1], 0.0, 1.0)
    check_float("eps", group["eps"], 0.0, low_open=True)
    check_float("weight_decay", group["weight_decay"], 0.0)


def check_8bit_args(group: dict) -> None:
    if group["use_triton"] is not None and not isinstance(group["use_triton"], bool):
        raise ValueError(f"use_triton={group['use_triton']!r} must be None or a bool")
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"stochastic_rounding={group['stochastic_rounding']!r} must be a bool")
    check_8bit_layout(group)


def check_8bit_layout(group: dict) -> None:
    """state_bits, blocksize and min_8bit_size (and the check_finite/maximize flags) of a group."""
    for flag in ("maximize", "check_finite"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"{flag}={group[flag]!r} must be a bool")
    if group["state_bits"] not in STATE_BITS or isinstance(group["state_bits"], bool):
        raise ValueError(f"state_bits={group['state_bits']!r} is not one of {STATE_BITS}")
    for key in ("blocksize", "min_8bit_size"):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{key}={v!r} must be a positive int")
    b = group["blocksize"]
    if b < 16 or b > 8192 or b & (b - 1):
        # the same layout must work on every path: the Triton kernels take powers of two in [16, 8192]
        raise ValueError(f"blocksize={b!r} must be a power of two in [16, 8192]")
    if group["state_bits"] == 8 and not group["check_finite"]:
        raise ValueError("check_finite=False is not supported with state_bits=8: a non-finite value would "
                         "poison a whole quantization block")


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
    import sys

    state = sys.modules.get("accelerate.state")
    if state is None:
        return False
    return state.GradientState._shared_state.get("sync_gradients", True) is False


class MemoptOptimizer(Optimizer):
    """Base class. Subclasses set ``STATE_KEYS`` (allowed per-param state keys), ``SHAPED_STATE_KEYS`` (state
    tensors shaped like the param), ``REQUIRED_GROUP_KEYS`` (how a checkpoint is recognised) and implement
    ``_validate_group``."""

    STATE_KEYS: frozenset = frozenset()
    SHAPED_STATE_KEYS: tuple = ()
    REQUIRED_GROUP_KEYS: frozenset = frozenset()

    def __init__(self, params, defaults: dict):
        self._validate_group(defaults)
        self.nonfinite_skips = 0
        self.update_paths: dict[str, int] = {}
        self._logged_paths: set = set()
        self._release_handles: list = []
        self._release_paths = [0, 0]
        self._group_index: Optional[dict[int, int]] = None
        self.max_released_grad_bytes = 0  # largest gradient alive at once under gradient release
        self._known_params: set[int] = set()
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_skips", 0)
        self.__dict__.setdefault("update_paths", {})
        self.__dict__.setdefault("_logged_paths", set())
        self.__dict__.setdefault("_release_handles", [])
        self.__dict__.setdefault("_release_paths", [0, 0])
        self.__dict__.setdefault("_group_index", None)
        self.__dict__.setdefault("max_released_grad_bytes", 0)
        self.__dict__.setdefault("_known_params", {id(p) for g in self.param_groups for p in g["params"]})

    # --------------------------------------------------------------------------------- gradient release
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

    def _release_update(self, group: dict, p: Tensor, g: Tensor) -> bool:
        """Update ``p`` from its finite gradient ``g`` inside backward; return True to keep ``p.grad`` for
        ``step()`` instead of freeing it. Counts the update path in ``self._release_paths``."""
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
        group = self._group_of(p)
        self.max_released_grad_bytes = max(self.max_released_grad_bytes, g.numel() * g.element_size())
        keep = False
        if p.numel():
            if group["check_finite"] and not self._finite_mask([g])[0]:
                self._count_skips(1)
            else:
                keep = self._release_update(group, p, g)
        if not keep:
            p.grad = None

    def _finish_release_step(self, n_triton: int, n_torch: int) -> None:
        """Called by ``step()``: the update paths of this step, released tensors included."""
        self._record_paths(n_triton + self._release_paths[0], n_torch + self._release_paths[1])
        self._release_paths = [0, 0]

    def _use_triton(self, group: dict, p: Tensor, g: Tensor, kernel: str) -> bool:
        """Whether this tensor's update runs the fused Triton kernel module ``kernel``. ``use_triton=None``
        (default): on CUDA when triton is installed and the kernels passed their first-use self-check;
        ``True``: required (CPU only under TRITON_INTERPRET=1), else RuntimeError; ``False``: the PyTorch
        reference. Tensors the kernels do not take (fp64, non-contiguous) always use the reference. The choice
        is logged once and counted in ``update_paths``."""
        from memopt.kernels import kernel_usable, triton_status

        flag = group["use_triton"]
        if flag is False:
            ok, reason = False, "use_triton=False"
        else:
            ok, reason = triton_status(p.device, allow_interpreter=flag is True)
            if ok:
                checked, why = kernel_usable(kernel, p.device)
                if not checked:
                    ok, reason = False, why
            if flag is True and not ok:
                raise RuntimeError(f"{type(self).__name__}: use_triton=True but {reason}")
            # tensors the kernels do not take fall back to the reference, one log line per reason
            if ok and not (p.is_contiguous() and g.is_contiguous()):
                ok, reason = False, "non-contiguous parameter or gradient"
            elif ok and (p.dtype not in _KERNEL_DTYPES or g.dtype != p.dtype or group.get("state_dtype") == "float64"):
                ok, reason = False, f"the kernels take fp32/bf16/fp16 params, grads and state (got {p.dtype})"
        path = reason if ok else f"torch reference ({reason})"
        if path not in self._logged_paths:
            self._logged_paths.add(path)
            logger.info("%s update path: %s", type(self).__name__, path)
        return ok

    def _record_paths(self, n_triton: int, n_torch: int) -> None:
        """Tensors updated by each path in the last step (shown by the memory report)."""
        self.update_paths = {k: v for k, v in (("triton", n_triton), ("torch", n_torch)) if v}

    @staticmethod
    def _validate_group(group: dict) -> None:
        raise NotImplementedError

    def _normalize_group(self, group: dict) -> None:
        """Hook to canonicalise values (e.g. dtype names) after validation."""

    def add_param_group(self, param_group: dict) -> None:
        name = type(self).__name__
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears more than once in the same parameter group")
        merged = {**self.defaults, **param_group}
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
            _refuse_deepspeed(name, p)
            why = self._dtensor_refusal(merged)
            if why is not None:
                _refuse_dtensor(name, p, why)
            self._known_params.add(id(p))
            if p.is_complex():
                raise ValueError(f"{name} does not support complex parameters (view them as real first)")
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(f"{name} supports float32/bfloat16/float16/float64 params, got {p.dtype}")
        param_group = dict(param_group, params=params)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._validate_group(param_group)
        self._normalize_group(param_group)
        super().add_param_group(param_group)
        if self._release_handles:  # parameters added after enable_gradient_release get their hooks too
            self._release_handles += [self._register_release_hook(p) for p in params if p.requires_grad]

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _evaluate(closure):
        """The closure's loss (evaluated once, with grad enabled), or None."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _dtensor_refusal(self, group: dict) -> Optional[str]:
        """``None`` when this group's math is shard-correct on FSDP2 DTensor parameters, else the reason."""
        return (": its whole-tensor statistics, projections and 8-bit blocks would be computed per shard")

    def _grad(self, p: Tensor, group: Optional[dict] = None) -> Optional[Tensor]:
        g = p.grad
        if g is None:
            return None
        # accelerate (FSDP2) and DeepSpeed replace the params after the optimizer is built: check at step time too
        if id(p) not in self._known_params:
            _refuse_deepspeed(type(self).__name__, p)
            if not is_dtensor(p):
                raise NotImplementedError(
                    f"a parameter of {type(self).__name__} was replaced after construction by a plain tensor of shape "
                    f"{tuple(p.shape)} (DeepSpeed ZeRO hands optimizers flat 1-D partitions): per-tensor statistics "
                    "would be computed per partition. Use DDP, FSDP2 (optim='sgdsai'), or a single device."
                )
            why = self._dtensor_refusal(group if group is not None else self.defaults)
            if why is not None:
                _refuse_dtensor(type(self).__name__, p, why)
            self._known_params.add(id(p))
        check_gradient(type(self).__name__, p, g)
        if g.shape != p.shape:
            raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")
        return g

    @staticmethod
    def _finite_mask(grads: list[Tensor]) -> list[bool]:
        """One host sync per (device, dtype) for all gradients of a step: which tensors are entirely finite."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            by_kind.setdefault((g.device, compute_dtype(g.dtype)), []).append(i)
        mask = [True] * len(grads)
        for (_, dtype), idx in by_kind.items():
            norms = torch._foreach_norm([grads[i] for i in idx], 2, dtype=dtype)
            for i, ok in zip(idx, torch.isfinite(torch.stack(norms)).tolist()):
                mask[i] = ok
        return mask

    def _collect(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """The group's (param, grad) pairs to update: grad present, non-empty, and finite if checked."""
        params, grads = [], []
        for p in group["params"]:
            g = self._grad(p, group)
            if g is None or p.numel() == 0:
                continue
            params.append(p)
            grads.append(g)
        if group["check_finite"] and grads:
            mask = self._finite_mask(grads)
            if not all(mask):
                self._count_skips(mask.count(False))
                params = [p for p, ok in zip(params, mask) if ok]
                grads = [g for g, ok in zip(grads, mask) if ok]
        return params, grads

    def _count_skips(self, skipped: int) -> None:
        self.nonfinite_skips += skipped
        logger.warning(
            "%s: skipped %d tensor(s) with non-finite gradients this step (param and state unchanged; "
            "%d skips in total)", type(self).__name__, skipped, self.nonfinite_skips,
        )

    @staticmethod
    def _wants_8bit(group: dict, p: Tensor) -> bool:
        # An explicit per-tensor mark wins. Otherwise small tensors (biases, norms) keep 32-bit state: they
        # save almost nothing in 8-bit and are the most sensitive.
        override = getattr(p, _OVERRIDE_ATTR, None)
        if override is not None:
            return override == 8
        return group["state_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    @staticmethod
    def _full_state_dtype(group: dict, p: Tensor) -> torch.dtype:
        """dtype of a full-precision state tensor: fp32 for the tensors an 8-bit optimizer keeps in 32-bit
        (docs/8bit.md) and for fp16 parameters (a squared fp16 gradient overflows above 256), the parameter's
        dtype otherwise (torch's convention)."""
        return torch.float32 if group["state_bits"] == 8 or p.dtype == torch.float16 else p.dtype

    # --------------------------------------------------------------------------------------- state dict
    # Group keys that fix the algorithm or the layout of the state: a checkpoint with other values is refused.
    LAYOUT_KEYS: tuple = ()
    # Group keys that are state, not settings (counters advanced by step()): the checkpoint's values are loaded.
    GROUP_STATE_KEYS: tuple = ()
    # Group keys the learning-rate schedule owns: the checkpoint's values are loaded (torch's convention).
    SCHEDULE_KEYS = ("lr", "initial_lr")
    ALGORITHM_KEY = "memopt_algorithm"

    def _layout(self, group: dict) -> dict:
        """The facts of a group that the saved state depends on (``LAYOUT_KEYS`` by default)."""
        return {key: group.get(key) for key in self.LAYOUT_KEYS}

    def _describe(self, group: dict) -> str:
        """``Class(key=value, ...)`` of a group's layout: how checkpoints name the algorithm that wrote them."""
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self._layout(group).items()) + ")"

    def state_dict(self) -> dict:
        out = super().state_dict()
        for saved, group in zip(out["param_groups"], self.param_groups):
            saved[self.ALGORITHM_KEY] = self._describe(group)
        return out

    def _expected_state_shapes(self, group: dict, p: Tensor, state: dict) -> dict[str, tuple]:
        """Shape of each state tensor a parameter ``p`` may hold (8-bit ``<key>_codes`` take ``<key>``'s shape)."""
        return {key: tuple(p.shape) for key in self.SHAPED_STATE_KEYS}

    def _check_param_state(self, pid, group: dict, p: Tensor, st: dict) -> None:
        """Refuse a saved per-parameter state whose keys, shapes, dtypes or numbers cannot belong to ``p`` under
        ``group``'s settings, before anything is written (checks run on the local shard of a DTensor)."""
        name = type(self).__name__
        unknown = set(st) - self.STATE_KEYS
        if unknown:
            raise ValueError(f"this state dict was not written by {name}: state of param {pid} has keys "
                             f"{sorted(unknown)}")
        expected = self._expected_state_shapes(group, p, st)
        for key, value in st.items():
            where = f"state {key!r} of param {pid} (shape {tuple(p.shape)})"
            if isinstance(value, Tensor):
                local = value.to_local() if is_dtensor(value) else value
                base = key[: -len("_codes")] if key.endswith("_codes") else key
                if key.endswith("_absmax"):
                    codes = st.get(key[: -len("_absmax")] + "_codes")
                    n_codes = codes.numel() if isinstance(codes, Tensor) else None
                    n_blocks = None if n_codes is None else -(-n_codes // group["blocksize"])
                    if value.dtype != torch.float32 or (n_blocks is not None and value.numel() != n_blocks):
                        raise ValueError(f"{where}: expected {n_blocks} float32 block maxima, got {value.dtype} of "
                                         f"{value.numel()}: the checkpoint belongs to another model or layout")
                    if local.numel() and not bool(torch.isfinite(local).all() and (local >= 0).all()):
                        raise ValueError(f"{where} holds NaN, Inf or negative block maxima: the checkpoint is corrupt")
                    continue
                if key.endswith("_codes") and value.dtype != torch.uint8:
                    raise ValueError(f"{where}: 8-bit codes must be uint8, got {value.dtype}")
                if base in expected and tuple(value.shape) != tuple(expected[base]):
                    raise ValueError(f"{where} has shape {tuple(value.shape)}, expected {tuple(expected[base])}: "
                                     "the checkpoint belongs to another model or optimizer settings")
                if value.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
                    raise ValueError(f"{where} holds NaN or Inf values: the checkpoint is corrupt")
            elif isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where} is {value}: the checkpoint is corrupt")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint, after checking everything in it (nothing is changed when a check fails).

        Rules (docs/reliability.md): the state must come from the same algorithm and state layout (class and
        ``LAYOUT_KEYS``: e.g. 8-bit vs 32-bit state), else ``ValueError`` naming both; every saved group passes
        the constructor's checks; every state tensor has the shape and dtype its parameter implies and holds
        finite numbers. Hyper-parameters the optimizer was built with (momentum, betas, weight decay, ...) win
        over the checkpoint's, and each difference is logged as a warning; the learning rate and step counters
        come from the checkpoint.
        """
        name = type(self).__name__
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(groups)} parameter groups, this {name} has "
                             f"{len(self.param_groups)}: it belongs to another model or optimizer set-up")
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"not an optimizer state dict: param group {i} has no 'params'")
            writer = saved.get(self.ALGORITHM_KEY)
            if writer is not None and writer != self._describe(group):
                raise ValueError(f"the checkpoint was not written by {self._describe(group)}: it was written by "
                                 f"{writer}. Resume with the optimizer and state settings it was saved with")
            missing = self.REQUIRED_GROUP_KEYS - set(saved)
            if missing:
                raise ValueError(f"this state dict was not written by {name}: param group {i} lacks {sorted(missing)}")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} of the checkpoint has {len(saved['params'])} parameters, this "
                                 f"{name} has {len(group['params'])}: it belongs to another model")
            merged = {**self.defaults, **{k: v for k, v in saved.items() if k != self.ALGORITHM_KEY}}
            try:
                self._validate_group(merged)
            except ValueError as exc:
                raise ValueError(f"param group {i} of the checkpoint is invalid: {exc}") from None
            self._normalize_group(merged)
            if writer is None and self._layout(merged) != self._layout(group):
                raise ValueError(f"the checkpoint was not written by {self._describe(group)}: its param group {i} "
                                 f"has {self._describe(merged)}")
        id_to_param = {
            pid: (p, group)
            for saved, group in zip(groups, self.param_groups)
            for pid, p in zip(saved["params"], group["params"])
        }
        for pid, st in state_dict["state"].items():
            if pid not in id_to_param:
                raise ValueError(f"the checkpoint has state for param {pid!r}, which is in none of its param groups")
            if not isinstance(st, dict):
                raise ValueError(f"state of param {pid} is not a dict: not an optimizer state dict")
            p, group = id_to_param[pid]
            self._check_param_state(pid, group, p, st)
        requested = [dict(group) for group in self.param_groups]
        clean = dict(state_dict, param_groups=[{k: v for k, v in g.items() if k != self.ALGORITHM_KEY}
                                               for g in groups])
        super().load_state_dict(clean)
        self._group_index = None
        changes = []
        keep = set(self.SCHEDULE_KEYS) | set(self.GROUP_STATE_KEYS) | {"params"}
        for i, (group, wanted) in enumerate(zip(self.param_groups, requested)):
            for key, value in self.defaults.items():  # keys added after a checkpoint was written take defaults
                group.setdefault(key, value)
            for key, value in wanted.items():
                if key in keep or key not in self.defaults or group.get(key) == value:
                    continue
                changes.append(f"group {i} {key}: {group.get(key)!r} -> {value!r}")
                group[key] = value
        if changes:
            logger.warning("%s.load_state_dict: the settings this optimizer was built with replace the checkpoint's "
                           "(%s)", name, "; ".join(changes))
        # torch casts floating state to the param dtype; every state tensor keeps the dtype it was saved with
        # (a state dtype may differ from the param dtype; 8-bit absmax is fp32), only the device follows.
        for pid, st in state_dict["state"].items():
            p = id_to_param[pid][0]
            for key, value in st.items():
                if isinstance(value, Tensor) and not is_dtensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)


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
        for flag in ("check_finite", "maximize"):
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
    def adam_direction(state: dict, g: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
        """Update AdamW moments (``exp_avg``, ``exp_avg_sq``, ``step``; created or re-created when ``g``'s shape
        changes) and return the bias-corrected direction ``m̂ / (sqrt(v̂) + eps)``."""
        if "exp_avg" not in state or state["exp_avg"].shape != g.shape:
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
            state["step"] = 0
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
        return m / denom / (1.0 - beta1**t)

    def _matrix_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        """Update of a projected parameter: ``p32`` is its fp32 value (updated in place), ``g`` the fp32
        gradient, ``p`` the parameter itself (for per-tensor marks)."""
        raise NotImplementedError

    def _dense_update(self, group: dict, state: dict, p32: Tensor, g: Tensor, p: Tensor) -> None:
        """Update of a parameter that is not projected: plain AdamW (subclasses may use their inner optimizer)."""
        beta1, beta2 = group["betas"]
        p32.sub_(self.adam_direction(state, g, beta1, beta2, group["eps"]), alpha=group["lr"])

    def _before_updates(self) -> None:
        """Hook run after the closure and before any parameter is updated (whole-step statistics)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        self._before_updates()
        for group in self.param_groups:
            params, grads = self._collect(group)
            for p, grad in zip(params, grads):
                g = (-grad if group["maximize"] else grad).float()
                state = self.state[p]
                p32 = p if p.dtype == torch.float32 else p.float()
                if group["weight_decay"]:
                    p32.mul_(1.0 - group["lr"] * group["weight_decay"])
                if self._projected(group, p):
                    self._matrix_update(group, state, p32, g, p)
                else:
                    self._dense_update(group, state, p32, g, p)
                if p32 is not p:
                    p.copy_(p32)
        return loss
