"""Optimizer names -> factories, shared by the Trainer integration, the examples and the tests.

A name is lower-case with underscores (the Trainer's style). Each entry says which ``optim_args`` keys it
accepts and their types, so ``optim_args="momentum=0.95,scale=sqrt_numel"`` is parsed and type-checked here
with an error that names the bad key; value ranges are then checked by the optimizer's constructor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from torch.optim import Optimizer

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ARG_TYPES = ("float", "int", "bool", "str", "optional_bool", "optional_float", "optional_int")
# constructor arguments that are never optim_args: the parameters, and what the Trainer's own arguments set
_NOT_OPTIM_ARGS = frozenset({"params", "lr", "weight_decay", "betas"})
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer, the single place for what the rest of memopt needs to know about it:
    ``factory(params, lr=..., **kwargs)`` builds it; ``arg_types`` (the typed ``optim_args`` keys) are derived from
    the factory's signature; ``defaults`` fix what the name stands for (e.g. ``state_bits=8``); ``label`` is the
    short name ``memopt plan`` and the docs table show; ``from_training_args`` takes kwargs from the Trainer's
    arguments (Adam betas); ``build_groups`` builds the parameter groups from the model (projection methods). The
    state-bytes rule is the optimizer class's own ``state_layout`` (``memopt plan`` and the tests use it)."""

    name: str
    factory: Callable[..., Optimizer]
    arg_types: Mapping[str, str]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # kwargs taken from transformers' TrainingArguments (e.g. Adam betas), given the args object
    from_training_args: Optional[Callable[[Any], dict]] = None
    # builds the parameter groups itself from (model, args, decay_names) (projection methods need the model)
    build_groups: Optional[Callable[[Any, Any, Optional[set]], list]] = None
    label: str = ""

    def parse_optim_args(self, optim_args: Union[None, str, Mapping[str, Any]]) -> dict[str, Any]:
        """Turn ``"k=v,k2=v2"`` (or a dict of strings/values) into typed keyword arguments.

        Raises:
            ValueError: naming the key, for an unknown key, a malformed item or a value of the wrong type.
        """
        if optim_args is None or optim_args == "":
            items: Iterable[tuple[str, Any]] = ()
        elif isinstance(optim_args, str):
            pairs = []
            for item in optim_args.split(","):
                item = item.strip()
                if not item:
                    continue
                if "=" not in item:
                    raise ValueError(f"optim_args item {item!r} for {self.name!r} is not of the form key=value")
                key, value = item.split("=", 1)
                pairs.append((key.strip(), value.strip()))
            items = pairs
        elif isinstance(optim_args, Mapping):
            items = optim_args.items()
        else:
            raise ValueError(f"optim_args must be a 'k=v,...' string or a mapping, got {type(optim_args).__name__}")
        out: dict[str, Any] = {}
        for key, value in items:
            if key in INTEGRATION_ARGS:
                if key in out:
                    raise ValueError(f"optim_args key {key!r} is given twice")
                out[key] = _convert(key, value, INTEGRATION_ARGS[key])
                continue
            if key not in self.arg_types:
                raise ValueError(
                    f"optim_args key {key!r} is not accepted by {self.name!r}; accepted keys: "
                    f"{sorted(self.arg_types)} (lr and weight_decay come from the training arguments)"
                )
            if key in out:
                raise ValueError(f"optim_args key {key!r} is given twice")
            out[key] = _convert(key, value, self.arg_types[key])
        return out

    def create(self, params, **kwargs) -> Optimizer:
        return self.factory(params, **{**self.defaults, **kwargs})


def _convert(key: str, value: Any, kind: str) -> Any:
    if not isinstance(value, str):
        return value  # already typed (Python API); the optimizer validates it
    text = value.strip()
    low = text.lower()
    try:
        if kind == "float":
            result = float(text)
            if not math.isfinite(result):
                raise ValueError
            return result
        if kind == "int":
            return int(text)
        if kind.startswith("optional_") and low in ("none", "null", "auto"):
            return None
        if kind == "optional_float":
            kind = "float"
        if kind == "optional_int":
            return int(text)
        if kind == "float":
            result = float(text)
            if not math.isfinite(result):
                raise ValueError
            return result
        if kind in ("bool", "optional_bool"):
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind == "str":
            if not text:
                raise ValueError
            return text
    except ValueError:
        pass
    raise ValueError(f"optim_args key {key!r}: {value!r} is not a valid {kind.replace('_', ' ')}")


_REGISTRY: dict[str, OptimizerSpec] = {}

# optim_args keys every optimizer accepts; the Trainer integration acts on them (they need the model) and removes
# them before the optimizer is built: freeze_embeddings = true | false | untie (memopt.freeze_embeddings),
# chunked_loss = true | false | auto | <tokens per chunk> (memopt.chunked_loss)
INTEGRATION_ARGS = {"freeze_embeddings": "str", "chunked_loss": "str"}


def arg_types_of(factory: Callable, exclude=()) -> dict[str, str]:
    """The ``optim_args`` keys of a factory and their types, read from its signature and annotations: ``float``,
    ``int``, ``bool``, ``str`` and their ``Optional`` forms (``Union[None, str, ...]`` reads as ``str``). Arguments
    without such a type, ``params``, ``lr``, ``weight_decay``, ``betas`` and ``exclude`` are not ``optim_args``."""
    import inspect
    import typing

    target = factory.__init__ if isinstance(factory, type) else factory
    hints = typing.get_type_hints(target)
    out = {}
    for name, param in inspect.signature(target).parameters.items():
        if name in _NOT_OPTIM_ARGS or name in exclude or name == "self" or param.kind in (
                param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(name)
        args = set(typing.get_args(hint)) if typing.get_origin(hint) is Union else {hint}
        optional = type(None) in args
        args.discard(type(None))
        if str in args:
            out[name] = "str"
        elif args == {bool}:
            out[name] = "optional_bool" if optional else "bool"
        elif args == {float}:
            out[name] = "optional_float" if optional else "float"
        elif args == {int}:
            out[name] = "optional_int" if optional else "int"
    return out


def register_optimizer(
    name: str,
    factory: Callable[..., Optimizer],
    *,
    arg_types: Optional[Mapping[str, str]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    description: str = "",
    from_training_args: Optional[Callable[[Any], dict]] = None,
    build_groups: Optional[Callable[[Any, Any, Optional[set]], list]] = None,
    label: str = "",
    fixed: tuple = (),
) -> OptimizerSpec:
    """Register ``name`` (registering the same name with the same factory and arguments again is a no-op).

    Args:
        arg_types: the ``optim_args`` keys and types; default: derived from the factory's signature
            (:func:`arg_types_of`), minus ``fixed``: the ``defaults`` that define what the name stands for and that
            ``optim_args`` must not change (e.g. SN-SM's ``subset_norm`` flags).
        label: the short name ``memopt plan`` shows (default: the name).
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"optimizer name {name!r} must be lower-case letters, digits and underscores")
    if arg_types is None:
        arg_types = arg_types_of(factory, exclude=fixed)
    for key, kind in arg_types.items():
        if kind not in _ARG_TYPES:
            raise ValueError(f"arg type {kind!r} of {key!r} is not one of {_ARG_TYPES}")
    spec = OptimizerSpec(name, factory, dict(arg_types), dict(defaults or {}), description, from_training_args,
                         build_groups, label or name)
    existing = _REGISTRY.get(name)
    if existing is not None and existing != spec:
        raise ValueError(f"optimizer name {name!r} is already registered with a different factory")
    _REGISTRY[name] = spec
    return spec


def get_optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown memopt optimizer {name!r}; registered: {list_optimizers()}") from None


def list_optimizers() -> list[str]:
    """Names usable as ``TrainingArguments(optim=...)`` after ``import memopt``."""
    return sorted(_REGISTRY)


def create_optimizer(name: str, params, optim_args: Union[None, str, Mapping[str, Any]] = None, **kwargs):
    """Build a registered optimizer: ``create_optimizer("sgdsai", model.parameters(), lr=1e-2)``."""
    spec = get_optimizer_spec(name)
    parsed = spec.parse_optim_args(optim_args)
    for key in INTEGRATION_ARGS:
        if key in parsed:
            raise ValueError(f"optim_args key {key!r} acts on the model: call memopt.{key}(model) before building "
                             "the optimizer from params (the Trainer route applies it for you)")
    return spec.create(params, **{**parsed, **kwargs})


def _adam_training_args(args) -> dict:
    return {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def _projection_groups(model, args, decay_names):
    from memopt.targets import projection_groups

    return projection_groups(model, getattr(args, "optim_target_modules", None), args.weight_decay, decay_names)


def _snsm_groups(model, args, decay_names):
    # SN-SM (docs/projection.md): every nn.Linear including an untied LM head; embeddings and norms get plain Adam
    from memopt.targets import projection_groups

    targets = getattr(args, "optim_target_modules", None) or "all-linear"
    return projection_groups(model, targets, args.weight_decay, decay_names, include_output=True)


def _register_builtin() -> None:
    from memopt.optim.adamw import AdamW8bit
    from memopt.optim.frugal import FRUGAL, GaLoreAdamW
    from memopt.optim.lion import Lion
    from memopt.optim.snsm import SubsetNormSM
    from memopt.optim.sgdsai import SGDSaI

    register_optimizer(
        "sgdsai", SGDSaI, label="SGD-SaI",
        description="SGD-SaI: momentum of the factored-RMS-normalised gradient, AdamW's learning rates (4 B/param)")
    register_optimizer(
        "sgdsai_8bit", SGDSaI, defaults={"state_bits": 8}, label="SGD-SaI 8-bit",
        description="SGD-SaI with blockwise 8-bit momentum (~1.02 B/param; small tensors keep 32-bit state)")
    # Not "adamw_8bit": that name is Transformers' alias for bitsandbytes' AdamW8bit.
    register_optimizer(
        "memopt_adamw_8bit", AdamW8bit, defaults={"state_bits": 8}, label="AdamW 8-bit (memopt)",
        description="AdamW with blockwise 8-bit moments (~2.03 B/param)", from_training_args=_adam_training_args)
    # Not "lion_8bit" / "lion_32bit": Transformers' names for bitsandbytes' Lion.
    for name, defaults, label in (("lion", {}, "Lion"), ("memopt_lion_8bit", {"state_bits": 8}, "Lion 8-bit")):
        register_optimizer(name, Lion, defaults=defaults, label=label,
                           description=f"{label}: sign of the interpolated momentum (one buffer; lr 3-10x below "
                                       "AdamW's)")
    for name, defaults, label, what in (
            ("frugal", {}, "FRUGAL (AdamW inner)",
             "FRUGAL: AdamW on a quarter of the target matrices at a time, sign-SGD on the rest"),
            ("frugal_8bit", {"state_bits": 8}, "FRUGAL 8-bit inner",
             "FRUGAL with its AdamW moments in blockwise 8-bit"),
            ("frugal_sgdsai", {"inner": "sgdsai", "inactive_lr_scale": 0.03}, "FRUGAL (SGD-SaI inner)",
             "FRUGAL with SGD-SaI momentum on a quarter of the target matrices at a time (SGD-SaI's lr; state-free "
             "step at 0.03 lr)")):
        register_optimizer(name, FRUGAL, defaults=defaults, label=label, description=what,
                           from_training_args=_adam_training_args, build_groups=_projection_groups)
    # Not "galore_adamw": Transformers has its own galore_* names (galore-torch).
    for name, defaults, label, what in (
            ("memopt_galore", {}, "GaLore-style AdamW",
             "GaLore-style AdamW: rank-r gradient projection, refreshed every update_gap steps"),
            ("memopt_galore_8bit", {"state_bits": 8}, "GaLore-style AdamW 8-bit",
             "GaLore-style AdamW with blockwise 8-bit moments")):
        register_optimizer(name, GaLoreAdamW, defaults=defaults, label=label, description=what,
                           from_training_args=_adam_training_args, build_groups=_projection_groups)
    for name, sn, sm, label, what in (
            ("adamsn", True, False, "AdamSN", "Adam with Subset-Norm (one 2nd-moment scalar per row/col)"),
            ("adamsnsm", True, True, "AdamSNSM", "AdamSN + Subspace-Momentum (rank-r momentum)"),
            ("sgdsm", False, True, "SGD-SM", "SGD with Subspace-Momentum")):
        register_optimizer(name, SubsetNormSM, defaults={"subset_norm": sn, "subspace_momentum": sm}, label=label,
                           description=what, build_groups=_snsm_groups, fixed=("subset_norm", "subspace_momentum"),
                           from_training_args=lambda args: {"betas": (args.adam_beta1, args.adam_beta2)})


_register_builtin()


def state_bytes_per_param(name: str, shape: tuple = (4096, 4096), dtype=None, count: int = 8) -> float:
    """Optimizer-state bytes per parameter of ``name`` (with its defaults) on ``count`` weight matrices of ``shape``
    (fp32 unless ``dtype``), from the optimizer's own planned state (``planned_state_layouts``: each matrix's
    ``state_layout``, or, for FRUGAL's ``blocks``, the matrices one round makes state-full): the figure the docs
    table shows."""
    import torch

    from memopt.optim._base import layout_bytes

    params = [torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dtype or torch.float32))
              for _ in range(count)]
    opt = create_optimizer(name, params)
    layouts = opt.planned_state_layouts([(opt.param_groups[0], p) for p in params])
    return sum(map(layout_bytes, layouts)) / (count * params[0].numel())


def optimizer_table() -> str:
    """The markdown table of every registered optimizer (docs/optimizers.md holds it; a test keeps it current)."""
    lines = ["| `optim=` | what it is | state B/param (eight 4096×4096 fp32 / bf16 weights) |", "|---|---|---|"]
    for name in list_optimizers():
        import torch

        spec = get_optimizer_spec(name)
        fp32, bf16 = (state_bytes_per_param(name, dtype=d) for d in (torch.float32, torch.bfloat16))
        lines.append(f"| `{name}` | {spec.description} | {fp32:.3f} / {bf16:.3f} |")
    return "\n".join(lines)
