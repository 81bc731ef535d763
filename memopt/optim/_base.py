"""The base of every memopt optimizer: parameter checks at construction, non-finite gradient handling, the
update-path choice (Triton kernel or PyTorch reference), 8-bit state choice, and a ``load_state_dict`` that
checks everything it loads (docs/reliability.md)."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from memopt.distributed import is_dtensor, row_sharded, rows_like
from memopt.functional.finite import finite_flags
from memopt.functional.quantize import row_blocked
from memopt.functional.sgdsai import gsnr_bound
from memopt import kernels as _kernels  # looked up at call time: tests replace its functions
from memopt.kernels import cpu as _cpu_kernels
from memopt.optim._checks import (_KERNEL_DTYPES, _OVERRIDE_ATTR, PARAM_DTYPES, _refuse_deepspeed, _refuse_dtensor,
                                  check_gradient)
from memopt.optim._release import GradientReleaseMixin

logger = logging.getLogger("memopt")


def layout_bytes(layout: dict) -> int:
    """The bytes of a state layout ``{key: (shape, dtype)}`` (:meth:`MemoptOptimizer.state_layout`)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


def _check_scalar_state(where: str, key: str, value, numel: int) -> None:
    """Refuse a saved scalar that no step writes (docs/reliability.md): ``started`` is a bool, ``gsnr`` a g-SNR in
    ``(0, gsnr_bound(numel)]`` or 0 (not measured yet: FSDP2 creates the entry before the first gradient), every
    other scalar (step counts, refresh steps, seeds, index counts) an int >= 0."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "started":
        ok = isinstance(value, bool)
    elif key == "gsnr":
        ok = number and 0.0 <= value <= gsnr_bound(numel)
    else:
        ok = number and isinstance(value, int) and value >= 0
    if not ok:
        raise ValueError(f"{where} is {value!r}, which no step writes: the checkpoint is corrupt")


class MemoptOptimizer(GradientReleaseMixin, Optimizer):
    """Base class. Subclasses implement ``_validate_group`` and :meth:`state_layout` (the state tensors), and set
    ``STATE_KEYS`` (the non-tensor state entries, e.g. step counts), ``REQUIRED_GROUP_KEYS`` (how a checkpoint
    without a descriptor is recognised) and ``LAYOUT_KEYS`` (group keys that fix the state format)."""

    STATE_KEYS: frozenset = frozenset()
    REQUIRED_GROUP_KEYS: frozenset = frozenset()

    def __init__(self, params, defaults: dict):
        self._validate_group(defaults)
        self._skips = 0
        self._pending: list = []  # device-side finite flags not read yet (_watch_flags)
        self._generation = 0  # step() calls so far
        self.update_paths: dict[str, int] = {}
        self._cpu_updates = 0  # fused CPU updates since the last _record_paths
        self._logged_paths: set = set()
        self._init_release()
        self._known_params: set[int] = set()
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_skips", self.__dict__.pop("nonfinite_skips", 0))
        self.__dict__.setdefault("_pending", [])
        self.__dict__.setdefault("_generation", 0)
        self.__dict__.setdefault("update_paths", {})
        self.__dict__.setdefault("_logged_paths", set())
        self.__dict__.setdefault("_cpu_updates", 0)
        self.__dict__.setdefault("_known_params", {id(p) for g in self.param_groups for p in g["params"]})

    def _use_triton(self, group: dict, p: Tensor, g: Tensor, kernel: str, eight_bit: bool = False) -> bool:
        """Whether this tensor's update runs the fused Triton kernel module ``kernel``. ``use_triton=None``
        (default): on CUDA when triton is installed and the kernels passed their first-use self-check;
        ``True``: required (CPU only under TRITON_INTERPRET=1), else RuntimeError; ``False``: the PyTorch
        reference. Tensors the kernels do not take (fp64, non-contiguous, too large for int32 offsets: see
        ``memopt.kernels.kernel_refusal``; ``eight_bit``: the state is in 8-bit row blocks) always use the
        reference. The choice is logged once and counted in ``update_paths``."""
        flag = group["use_triton"]
        if flag is False:
            ok, reason = False, "use_triton=False"
        else:
            ok, reason = _kernels.triton_status(p.device, allow_interpreter=flag is True)
            if ok:
                checked, why = _kernels.kernel_usable(kernel, p.device)
                if not checked:
                    ok, reason = False, why
            if flag is True and not ok:
                raise RuntimeError(f"{type(self).__name__}: use_triton=True but {reason}")
            # tensors the kernels do not take fall back to the reference, one log line per reason
            if ok and not (p.is_contiguous() and g.is_contiguous()):
                ok, reason = False, "non-contiguous parameter or gradient"
            elif ok and (p.dtype not in _KERNEL_DTYPES or g.dtype != p.dtype or group.get("state_dtype") == "float64"):
                ok, reason = False, f"the kernels take fp32/bf16/fp16 params, grads and state (got {p.dtype})"
            elif ok:
                why = _kernels.kernel_refusal(tuple(p.shape), group["blocksize"] if eight_bit else None)
                if why:
                    ok, reason = False, why
        path = reason if ok else f"torch reference ({reason})"
        if path not in self._logged_paths:
            self._logged_paths.add(path)
            logger.info("%s update path: %s", type(self).__name__, path)
        return ok

    def _use_cpu_kernel(self, group: dict, p: Tensor, g: Tensor, state: list, blocksize: Optional[int],
                        matrix: bool = True) -> bool:
        """Whether this tensor's update (not on the Triton kernels) runs the fused CPU update of
        :mod:`memopt.kernels.cpu`: a tensor it takes (``memopt.kernels.cpu.refusal``; ``state``: the tensor's state
        tensors, 8-bit in row blocks of ``blocksize`` or ``None`` for fp32 buffers; ``matrix``: the update needs two or
        more dimensions), unless ``use_triton=False`` (the PyTorch reference everywhere). Logged once per reason;
        the caller counts the updates it runs in ``_cpu_updates`` (``cpu`` in ``update_paths``)."""
        why = ("use_triton=False" if group.get("use_triton") is False
               else _cpu_kernels.refusal(p, g, state, blocksize, matrix))
        path = "fused CPU update" if why is None else f"torch reference ({why})"
        if path not in self._logged_paths:
            self._logged_paths.add(path)
            logger.info("%s update path: %s", type(self).__name__, path)
        return why is None

    def _checks_finite_itself(self, group: dict, p: Tensor, g: Tensor) -> bool:
        """Whether this tensor's update checks its gradient for NaN/Inf itself, in a pass over it that it makes
        anyway (then skipping it as the optimizer's check would, and counting the skip): the optimizer does not read
        the gradient once more beforehand."""
        return False

    def _record_paths(self, n_triton: int, n_torch: int) -> None:
        """Tensors updated by each path in the last step (shown by the memory report): ``n_torch`` counts every
        update not on the Triton kernels, of which the fused CPU ones (:meth:`_use_cpu_kernel`) are shown as ``cpu``."""
        n_cpu, self._cpu_updates = self._cpu_updates, 0
        self.update_paths = {k: v for k, v in (("triton", n_triton), ("cpu", n_cpu), ("torch", n_torch - n_cpu)) if v}

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

    # ------------------------------------------------------------------------------ non-finite gradients
    @property
    def nonfinite_skips(self) -> int:
        """Tensors whose update was skipped for a non-finite gradient, over the optimizer's life (reading it waits
        for the flags of the last step still on the device)."""
        self._settle_skips()
        return self._skips

    @staticmethod
    def _finite_mask(grads: list[Tensor]) -> list[bool]:
        """Which gradients are entirely finite, read on the host: one sync per (device, dtype) of ``grads``."""
        mask = [True] * len(grads)
        for flags, idx in finite_flags(grads):
            for i, ok in zip(idx, flags.tolist()):
                mask[i] = ok
        return mask

    def _checked_on_device(self, group: dict, p: Tensor, g: Tensor) -> bool:
        """Whether ``p``'s gradient is checked on the device: its update takes the finite flag (a Triton kernel
        reads it without a host sync) and skipping it needs no decision on the host but the step counter, which
        :meth:`_settle_skips` puts back. ``False`` (default): checked on the host before the update."""
        return False

    def _device_flags(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Each gradient's finiteness as a one-element bool tensor on its device, without a host sync; the skips are
        counted when the flags are read later (:meth:`_settle_skips`)."""
        out: list = [None] * len(grads)
        for flags, idx in finite_flags(grads):
            for k, i in enumerate(idx):
                out[i] = flags[k]
            self._watch_flags(flags, [params[i] for i in idx])
        return out

    def _watch_flags(self, flags: Tensor, params: list[Tensor]) -> None:
        event = None
        if flags.device.type == "cuda":  # copied to the host behind the step's work; read once it has landed
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            with torch.cuda.device(flags.device):
                event = torch.cuda.Event()
                event.record()
            flags = host
        self._pending.append((self._generation, flags, params, event))

    def _settle_skips(self, before: Optional[int] = None) -> None:
        """Read the device-side flags of earlier steps (those of step() calls before ``before``; all if ``None``):
        count the skipped tensors, log them, and take back the step count their skipped update advanced. Called at
        the start of every step() and gradient-release hook (for the previous step's flags, which the device has
        long finished), and before the state or the count is read."""
        if not self._pending:
            return
        skipped, keep = [], []
        for entry in self._pending:
            generation, flags, params, event = entry
            if before is not None and generation >= before:
                keep.append(entry)
                continue
            if event is not None:
                event.synchronize()
            skipped += [p for p, ok in zip(params, flags.tolist()) if not ok]
        self._pending = keep
        for p in skipped:
            state = self.state.get(p)
            if state and isinstance(state.get("step"), int):
                state["step"] -= 1
        if skipped:
            self._count_skips(len(skipped))

    def _collect(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """The group's (param, grad) pairs to update: grad present, non-empty, and finite if checked on the host."""
        params, grads, _ = self._collect_flagged(group, on_device=False)
        return params, grads

    def _collect_flagged(self, group: dict, on_device: bool = True
                         ) -> tuple[list[Tensor], list[Tensor], list[Optional[Tensor]]]:
        """:meth:`_collect`, plus each tensor's device-side finite flag when ``on_device`` and
        :meth:`_checked_on_device` say so (``None``: checked on the host, or not checked): the update must be
        given it as ``finite=``."""
        params, grads = [], []
        for p in group["params"]:
            g = self._grad(p, group)
            if g is None or p.numel() == 0:
                continue
            params.append(p)
            grads.append(g)
        flags: list = [None] * len(grads)
        if not (group["check_finite"] and grads):
            return params, grads, flags
        if is_dtensor(grads[0]):  # FSDP2 shards: each whole gradient's finiteness, agreed over the group
            from memopt.distributed import finite_flags as sharded_flags

            mask = sharded_flags(grads)
        else:
            device = [i for i, (p, g) in enumerate(zip(params, grads))
                      if on_device and self._checked_on_device(group, p, g)]
            for i, flag in zip(device, self._device_flags([params[i] for i in device], [grads[i] for i in device])):
                flags[i] = flag
            on_host = [i for i in range(len(grads))
                       if flags[i] is None and not self._checks_finite_itself(group, params[i], grads[i])]
            mask = [True] * len(grads)
            if on_host:  # no host check at all when every flag stays on the device
                for i, ok in zip(on_host, self._finite_mask([grads[i] for i in on_host])):
                    mask[i] = ok
        if not all(mask):
            self._count_skips(mask.count(False))
            keep = [i for i, ok in enumerate(mask) if ok]
            params, grads, flags = ([x[i] for i in keep] for x in (params, grads, flags))
        return params, grads, flags

    def _count_skips(self, skipped: int) -> None:
        self._skips += skipped
        logger.warning(
            "%s: skipped %d tensor(s) with non-finite gradients (param and state unchanged; %d skips in total)",
            type(self).__name__, skipped, self._skips,
        )

    @staticmethod
    def _wants_8bit(group: dict, p: Tensor) -> bool:
        # An explicit per-tensor mark wins. Otherwise small tensors (biases, norms) keep 32-bit state: they
        # save almost nothing in 8-bit and are the most sensitive.
        if row_sharded(p) and not row_blocked(tuple(p.shape), group["blocksize"]):
            return False  # sharded by rows: only row blocks stay within a rank (vectors keep 32-bit state)
        override = getattr(p, _OVERRIDE_ATTR, None)
        if override is not None:
            return override == 8
        return group["state_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    def _full_state_dtype(self, group: dict, p: Tensor) -> torch.dtype:
        """dtype of a full-precision state tensor: fp32 in an 8-bit optimizer (the tensors it keeps out of 8 bits:
        small ones, embeddings, groups with ``state_bits=32``; docs/8bit.md) and for fp16 parameters (a squared fp16
        gradient overflows above 256), the parameter's dtype otherwise (torch's convention)."""
        eight = group["state_bits"] == 8 or self.defaults.get("state_bits") == 8
        return torch.float32 if eight or p.dtype == torch.float16 else p.dtype

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
        self._settle_skips()
        out = super().state_dict()
        for saved, group in zip(out["param_groups"], self.param_groups):
            saved[self.ALGORITHM_KEY] = self._describe(group)
        return out

    def state_layout(self, group: dict, p: Tensor) -> dict[str, tuple[tuple, torch.dtype]]:
        """``{state key: (shape, dtype)}`` of every tensor the state of ``p`` can hold under ``group``'s settings:
        the one description of the state format. State is created from it (:meth:`_create_state`, or checked
        against it after one real step for every registered optimizer in the tests), checkpoints are checked
        against it, and ``memopt plan`` counts bytes with it. Non-tensor entries (step counts, the g-SNR) are
        listed in ``STATE_KEYS``. A tensor's format never changes once created."""
        return {}

    def planned_state_layouts(self, pairs: list) -> list[dict]:
        """The :meth:`state_layout` of each ``(group, p)`` of ``pairs`` when the optimizer holds the most state, as
        ``memopt plan`` counts it: every tensor's whole layout unless an optimizer holds state for only some of its
        tensors at a time."""
        return [self.state_layout(group, p) for group, p in pairs]

    def _create_state(self, group: dict, p: Tensor) -> dict:
        """Zero state tensors of ``p`` per :meth:`state_layout` for the keys it does not hold yet (same-shape ones
        are ``zeros_like(p)``: a DTensor for an FSDP2 parameter)."""
        state = self.state[p]
        for key, (shape, dtype) in self.state_layout(group, p).items():
            if key in state:
                continue
            if tuple(shape) == tuple(p.shape):
                state[key] = torch.zeros_like(p, dtype=dtype)
            elif is_dtensor(p):  # 8-bit block maxima: one row per parameter row, sharded with the rows
                state[key] = rows_like(p, tuple(shape), dtype)
            else:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        return state

    # State tensors that hold sums of squares: negative values cannot come from a step.
    NON_NEGATIVE_STATE: tuple = ("exp_avg_sq",)
    # Scalars written by the step that creates a parameter's state tensors: a state with one of them has them all.
    STATE_MARKS: tuple = ("step",)

    def _resume_refusal(self, saved: dict, group: dict) -> Optional[str]:
        """Why a checkpoint's (valid) group ``saved`` cannot continue under this optimizer's ``group`` although
        their layouts agree, or ``None``: a requested setting that needs state the checkpoint does not have."""
        return None

    def _state_parts(self, group: dict, p: Tensor) -> list[tuple[set, tuple]]:
        """The state tensors of ``p`` as the parts created together, each with the scalars written by the step that
        creates it: here the whole :meth:`state_layout` (:meth:`_create_state` makes it at once), marked by
        ``STATE_MARKS``."""
        return [(set(self.state_layout(group, p)), self.STATE_MARKS)]

    def _missing_state(self, group: dict, p: Tensor, st: dict) -> set:
        """The state tensors ``st`` lacks: a part of :meth:`_state_parts` of which ``st`` holds a tensor or a mark
        must be held whole."""
        held = {k for k, v in st.items() if isinstance(v, Tensor)}
        return {key for part, marks in self._state_parts(group, p)
                if part & held or any(mark in st for mark in marks) for key in part - held}

    def _check_param_state(self, pid, group: dict, p: Tensor, st: dict) -> None:
        """Refuse a saved per-parameter state whose keys, shapes, dtypes or numbers cannot belong to ``p`` under
        ``group``'s settings, before anything is written (checks run on the local shard of a DTensor)."""
        name = type(self).__name__
        layout = self.state_layout(group, p)
        unknown = {k for k, v in st.items() if k not in (layout if isinstance(v, Tensor) else self.STATE_KEYS)}
        if unknown:
            raise ValueError(f"this state dict was not written by {name} with these settings: state of param {pid} "
                             f"(shape {tuple(p.shape)}) has keys {sorted(unknown)}; this optimizer expects "
                             f"{sorted(layout)} (and scalars {sorted(self.STATE_KEYS)})")
        missing = self._missing_state(group, p, st)
        if missing:
            raise ValueError(f"state of param {pid} (shape {tuple(p.shape)}) lacks {sorted(missing)}, which "
                             f"{name} with these settings keeps beside {sorted(st)}: the checkpoint is incomplete")
        for key, value in st.items():
            where = f"state {key!r} of param {pid} (shape {tuple(p.shape)})"
            if isinstance(value, Tensor):
                shape, dtype = layout[key]
                if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                    raise ValueError(f"{where} is {value.dtype} of shape {tuple(value.shape)}, expected {dtype} of "
                                     f"shape {tuple(shape)}: the checkpoint belongs to another model or optimizer "
                                     "settings")
                local = value.to_local() if is_dtensor(value) else value
                if value.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
                    raise ValueError(f"{where} holds NaN or Inf values: the checkpoint is corrupt")
                if (key.endswith("_absmax") or key in self.NON_NEGATIVE_STATE) and local.numel() and \
                        not bool((local >= 0).all()):
                    raise ValueError(f"{where} holds negative values, which no step writes: the checkpoint is "
                                     "corrupt")
            else:
                _check_scalar_state(where, key, value, p.numel())

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
        self._settle_skips()
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
            refusal = self._resume_refusal(merged, group)
            if refusal:
                raise ValueError(f"param group {i}: {refusal}")
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
                if is_dtensor(value):  # a shard of FSDP2 state: already on its mesh (8-bit codes stay uint8)
                    self.state[p][key] = value.detach().clone()
                elif isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
