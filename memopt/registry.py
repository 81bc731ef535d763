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
_ARG_TYPES = ("float", "int", "bool", "str", "optional_bool")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: ``factory(params, lr=..., **kwargs)`` builds it."""

    name: str
    factory: Callable[..., Optimizer]
    arg_types: Mapping[str, str]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # kwargs taken from transformers' TrainingArguments (e.g. Adam betas), given the args object
    from_training_args: Optional[Callable[[Any], dict]] = None
    # builds the parameter groups itself from (model, args, decay_names) (projection methods need the model)
    build_groups: Optional[Callable[[Any, Any, Optional[set]], list]] = None

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
        if kind in ("bool", "optional_bool"):
            if kind == "optional_bool" and low in ("none", "null", "auto"):
                return None
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


def register_optimizer(
    name: str,
    factory: Callable[..., Optimizer],
    *,
    arg_types: Mapping[str, str],
    defaults: Optional[Mapping[str, Any]] = None,
    description: str = "",
    from_training_args: Optional[Callable[[Any], dict]] = None,
    build_groups: Optional[Callable[[Any, Any, Optional[set]], list]] = None,
) -> OptimizerSpec:
    """Register ``name``. Registering the same name with the same factory and arguments again is a no-op."""
    if not _NAME_RE.match(name):
        raise ValueError(f"optimizer name {name!r} must be lower-case letters, digits and underscores")
    for key, kind in arg_types.items():
        if kind not in _ARG_TYPES:
            raise ValueError(f"arg type {kind!r} of {key!r} is not one of {_ARG_TYPES}")
    spec = OptimizerSpec(name, factory, dict(arg_types), dict(defaults or {}), description, from_training_args,
                         build_groups)
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
    from memopt.optim.snsm import SubsetNormSM
    from memopt.optim.sgdsai import SGDSaI

    sgdsai_args = {
        "momentum": "float", "eps": "float", "scale": "str", "clip": "float", "maximize": "bool",
        "foreach": "optional_bool",
        "state_dtype": "str", "check_finite": "bool", "state_bits": "int", "blocksize": "int",
        "min_8bit_size": "int", "use_triton": "optional_bool", "stochastic_rounding": "bool", "grad_release": "bool",
    }
    register_optimizer(
        "sgdsai",
        SGDSaI,
        arg_types=sgdsai_args,
        description="SGD-SaI: SGD momentum + per-tensor g-SNR lr scale (4 B/param fp32 state)",
    )
    register_optimizer(
        "sgdsai_8bit",
        SGDSaI,
        arg_types=sgdsai_args,
        defaults={"state_bits": 8},
        description="SGD-SaI with blockwise 8-bit momentum (~1.02 B/param; small tensors keep 32-bit state)",
    )
    # Not "adamw_8bit": that name is Transformers' alias for bitsandbytes' AdamW8bit.
    register_optimizer(
        "memopt_adamw_8bit",
        AdamW8bit,
        arg_types={"eps": "float", "maximize": "bool", "check_finite": "bool", "state_bits": "int",
                   "blocksize": "int", "min_8bit_size": "int", "use_triton": "optional_bool",
                   "stochastic_rounding": "bool", "grad_release": "bool"},
        defaults={"state_bits": 8},
        description="AdamW with blockwise 8-bit moments (~2.03 B/param)",
        from_training_args=_adam_training_args,
    )
    layout_8bit = {"state_bits": "int", "blocksize": "int", "min_8bit_size": "int"}
    frugal_args = {"density": "float", "rank": "int", "selection": "str", "block_order": "str", "update_gap": "int",
                   "on_refresh": "str", "state_free": "str", "inactive_lr_scale": "float", "active_scale": "float",
                   "eps": "float", "check_finite": "bool", "maximize": "bool", "free_scale": "str", "inner": "str",
                   **layout_8bit}
    for name, defaults, what in (
            ("frugal", {}, "FRUGAL: AdamW in a subspace of each target matrix, sign-SGD on the rest"),
            ("frugal_8bit", {"state_bits": 8}, "FRUGAL with the subspace AdamW moments in blockwise 8-bit"),
            ("frugal_sgdsai", {"inner": "sgdsai", "inactive_lr_scale": 0.03},
             "FRUGAL with SGD-SaI momentum in the subspace (SGD-SaI's lr; state-free step at 0.03 lr)")):
        register_optimizer(name, FRUGAL, arg_types=frugal_args, defaults=defaults, description=what,
                           from_training_args=_adam_training_args, build_groups=_projection_groups)
    # Not "galore_adamw": Transformers has its own galore_* names (galore-torch).
    galore_args = {"rank": "int", "scale": "float", "selection": "str", "update_gap": "int", "on_refresh": "str",
                   "eps": "float", "check_finite": "bool", "maximize": "bool", **layout_8bit}
    for name, defaults, what in (
            ("memopt_galore", {}, "GaLore-style AdamW: rank-r gradient projection, refreshed every update_gap steps"),
            ("memopt_galore_8bit", {"state_bits": 8}, "GaLore-style AdamW with blockwise 8-bit moments")):
        register_optimizer(name, GaLoreAdamW, arg_types=galore_args, defaults=defaults, description=what,
                           from_training_args=_adam_training_args, build_groups=_projection_groups)
    snsm_args = {"rank": "int", "update_gap": "int", "eps": "float", "check_finite": "bool", "maximize": "bool"}
    for name, sn, sm, what in (("adamsn", True, False, "Adam with Subset-Norm (one 2nd-moment scalar per row/col)"),
                               ("adamsnsm", True, True, "AdamSN + Subspace-Momentum (rank-r momentum)"),
                               ("sgdsm", False, True, "SGD with Subspace-Momentum")):
        register_optimizer(name, SubsetNormSM, arg_types=snsm_args, defaults={"subset_norm": sn,
                           "subspace_momentum": sm}, description=what, build_groups=_snsm_groups,
                           from_training_args=lambda args: {"betas": (args.adam_beta1, args.adam_beta2)})


_register_builtin()
