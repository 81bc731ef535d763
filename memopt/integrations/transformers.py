"""Transformers Trainer integration: ``TrainingArguments(optim="sgdsai")``, ``--optim sgdsai``, ``optim_args``.

Transformers (v5) has no public registry for third-party optimizer names, so memopt adds, for each name in
:func:`memopt.list_optimizers`:

1. a real member of ``transformers.training_args.OptimizerNames`` (so ``TrainingArguments`` validation and the
   ``HfArgumentParser`` choices accept it),
2. a handler in the private ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` dict (how the Trainer maps a
   name to ``(optimizer class, kwargs)``),
3. :class:`MemoryReportCallback` and :class:`GuardCallback` in ``transformers.trainer.DEFAULT_CALLBACKS`` (the
   report covers memopt optimizers unless ``MEMOPT_MEMORY_REPORT=all``; ``=off`` disables it; the guard refuses
   settings a memopt optimizer cannot honour),
4. resume guards in ``transformers.trainer``: ``get_last_checkpoint`` skips checkpoints a kill left incomplete, and
   ``Trainer._load_optimizer_and_scheduler`` refuses a checkpoint without the optimizer or scheduler file of a
   memopt optimizer (docs/reliability.md).

Each step is idempotent and checks that the private names it needs exist, with a clear error otherwise. The
no-patch route is :func:`optimizer_cls_and_kwargs` for ``Trainer(optimizer_cls_and_kwargs=...)``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping, Optional, Union

from torch.optim import Optimizer

from memopt.freeze import freeze_embeddings, parse_freeze_mode
from memopt.loss import chunked_loss, parse_chunked_loss
from memopt.registry import get_optimizer_spec, list_optimizers

TESTED_VERSIONS = "5.x (CI: 5.24)"
_PREPARED_ATTR = "_memopt_prepared"  # the model-level options prepare_model applied
_TRAINER_DEFAULT_LR = 5e-5
logger = logging.getLogger("memopt")


class UnsupportedTransformersVersion(RuntimeError):
    pass


def _unsupported(what: str, module) -> UnsupportedTransformersVersion:
    try:
        import transformers

        version = transformers.__version__
    except Exception:  # noqa: BLE001
        version = "unknown"
    return UnsupportedTransformersVersion(
        f"memopt cannot register its optimizer names on transformers {version}: {module.__name__} has no "
        f"{what} (memopt supports transformers {TESTED_VERSIONS}). Use the no-patch route instead: "
        "Trainer(..., optimizer_cls_and_kwargs=memopt.integrations.transformers.optimizer_cls_and_kwargs("
        "'sgdsai', training_args))"
    )


def _add_enum_member(enum_cls, value: str):
    """Add a real member to a (str, Enum) class. Returns the member; adding it twice returns the first one."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    name = value.upper()
    if name in enum_cls._member_map_:  # e.g. transformers' LION is "lion_32bit": the member gets a prefix
        name = f"MEMOPT_{name}"
    if name in enum_cls._member_map_:
        raise RuntimeError(f"{enum_cls.__name__}.{name} exists with another value")
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)
    return member


def _handler_for(name: str):
    def handler(ctx) -> tuple[type, dict[str, Any]]:
        prepare_model(ctx.model, name, ctx.args)
        cls, kwargs = optimizer_cls_and_kwargs(name, ctx.args, model=ctx.model)
        hint = cls.lr_hint(kwargs) if hasattr(cls, "lr_hint") else None
        if hint and ctx.args.learning_rate == _TRAINER_DEFAULT_LR:
            logger.warning(
                "optim=%r runs with the Trainer's default learning_rate=%g, which is tuned for AdamW. %s",
                name, _TRAINER_DEFAULT_LR, hint,
            )
        return cls, kwargs

    handler.__name__ = f"memopt_{name}_handler"
    handler.memopt_name = name
    return handler


def _patch_training_args(module) -> None:
    enum_cls = getattr(module, "OptimizerNames", None)
    if enum_cls is None or not hasattr(enum_cls, "_value2member_map_"):
        raise _unsupported("OptimizerNames enum", module)
    for name in list_optimizers():
        _add_enum_member(enum_cls, name)


def _patch_trainer_optimizer(module) -> None:
    handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        raise _unsupported("_OPTIMIZER_HANDLERS dict", module)
    from transformers.training_args import OptimizerNames

    _patch_training_args(importlib.import_module("transformers.training_args"))
    for name in list_optimizers():
        current = handlers.get(name)
        if current is not None and getattr(current, "memopt_name", None) != name:
            raise RuntimeError(f"transformers already has an optimizer handler for {name!r}; memopt will not "
                               "replace it")
        if current is None:
            handlers[OptimizerNames(name)] = _handler_for(name)


def _patch_trainer(module) -> None:
    callbacks = getattr(module, "DEFAULT_CALLBACKS", None)
    trainer_cls = getattr(module, "Trainer", None)
    if not isinstance(callbacks, list):
        raise _unsupported("DEFAULT_CALLBACKS list", module)
    if not callable(getattr(module, "get_last_checkpoint", None)) or not callable(
            getattr(trainer_cls, "_load_optimizer_and_scheduler", None)):
        raise _unsupported("get_last_checkpoint / Trainer._load_optimizer_and_scheduler", module)
    from memopt.integrations.trainer_callback import GuardCallback, MemoryReportCallback

    for callback in (GuardCallback, MemoryReportCallback):
        if callback not in callbacks:
            callbacks.append(callback)
    _guard_resume(module, trainer_cls)


def _guard_resume(module, trainer_cls) -> None:
    """Resume never silently drops state (docs/reliability.md): ``resume_from_checkpoint=True`` skips checkpoints a
    kill left incomplete (for every optimizer: the Trainer would otherwise crash on or load a truncated file), and
    a memopt optimizer refuses a checkpoint without its optimizer or scheduler file."""
    from memopt.integrations import checkpoints

    if getattr(module.get_last_checkpoint, "memopt_wrapped", False):
        return
    module.get_last_checkpoint = checkpoints.last_complete_checkpoint
    checkpoints.last_complete_checkpoint.memopt_wrapped = True
    load = trainer_cls._load_optimizer_and_scheduler

    def _load_optimizer_and_scheduler(self, checkpoint):
        from memopt.integrations.trainer_callback import is_memopt_optimizer

        if checkpoint is not None and not getattr(self, "is_deepspeed_enabled", False) \
                and is_memopt_optimizer(self.optimizer):
            checkpoints.check_resume_files(checkpoint)
            checkpoints.template_from_dcp_checkpoint(self, checkpoint)
        return load(self, checkpoint)

    _load_optimizer_and_scheduler.memopt_wrapped = True
    trainer_cls._load_optimizer_and_scheduler = _load_optimizer_and_scheduler


_PATCHES = {
    "transformers.training_args": _patch_training_args,
    "transformers.trainer_optimizer": _patch_trainer_optimizer,
    "transformers.trainer": _patch_trainer,
}


def patch_module(name: str, module) -> None:
    _PATCHES[name](module)


def register() -> None:
    """Make every memopt optimizer name usable in ``TrainingArguments(optim=...)`` (idempotent).

    Raises:
        UnsupportedTransformersVersion: when the private hooks this relies on are missing.
    """
    for name, patch in _PATCHES.items():
        patch(importlib.import_module(name))


def is_registered(name: str = "sgdsai") -> bool:
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    return name in OptimizerNames._value2member_map_ and name in _OPTIMIZER_HANDLERS


def prepare_model(model, name: str, args=None, *, optim_args: Union[None, str, Mapping[str, Any]] = None) -> dict:
    """Apply the model-level options of ``optim_args`` to ``model``, before its optimizer is built (the
    ``optim=`` route does this for you): ``freeze_embeddings=true`` (:func:`memopt.freeze_embeddings`) and
    ``chunked_loss=...`` (:func:`memopt.chunked_loss`). Returns the options applied; calling it again with the same
    options changes nothing.

    Raises:
        ValueError: a bad option, ``freeze_embeddings=untie`` (a resumed run would load the head and the embedding
            into one tensor: call ``memopt.freeze_embeddings(model, untie=True)`` yourself), or ``chunked_loss``
            with ``label_smoothing_factor > 0``.
    """
    spec = get_optimizer_spec(name)
    raw = optim_args if optim_args is not None else getattr(args, "optim_args", None)
    parsed = spec.parse_optim_args(raw)
    options = {"freeze_embeddings": parse_freeze_mode(parsed.get("freeze_embeddings", "false")),
               "chunked_loss": parse_chunked_loss(parsed.get("chunked_loss", "false"))}
    if getattr(model, _PREPARED_ATTR, None) == options:
        return options
    if options["freeze_embeddings"] == "untie":
        # the Trainer loads a checkpoint's weights before it builds the optimizer: untying here would load both
        # the head and the embedding of a resumed run into the one shared tensor
        raise ValueError("optim_args freeze_embeddings=untie is not supported (a resumed run would load the head "
                         "and the embedding into one tensor): call memopt.freeze_embeddings(model, untie=True) "
                         "before Trainer(...), and leave freeze_embeddings out of optim_args")
    if options["chunked_loss"] is not None and (getattr(args, "label_smoothing_factor", 0) or 0) > 0:
        raise ValueError("optim_args chunked_loss=... with label_smoothing_factor > 0: the Trainer then computes "
                         "the loss from the full logits itself, so there is nothing to chunk; drop one of them")
    if options["freeze_embeddings"] != "false":
        freeze_embeddings(model)
    if options["chunked_loss"] is not None:
        chunked_loss(model, options["chunked_loss"] or None)
    setattr(model, _PREPARED_ATTR, options)
    return options


def param_groups_for(name: str, model, args=None, kwargs: Optional[Mapping[str, Any]] = None) -> list[dict]:
    """The parameter groups the ``optim=`` route gives optimizer ``name`` on ``model``: the name's own groups
    (projection methods pick their target matrices) or the Trainer's decay / no-decay groups, over the trainable
    parameters. Under 8-bit state (``kwargs`` or the name's defaults), ``nn.Embedding`` weights move to groups of
    their own with ``state_bits=32`` (the 8-bit paper's "stable embedding" lesson; the Trainer does the same for
    bitsandbytes; a tied LM head is the same tensor). ``memopt plan`` builds its groups with this function too."""
    spec = get_optimizer_spec(name)
    settings = {**spec.defaults, **(kwargs or {})}
    if spec.build_groups is not None:
        groups = spec.build_groups(model, args, _trainer_decay_names(model))
    else:
        groups = _trainer_groups(model, args)
    if settings.get("state_bits") != 8:
        return groups
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in embeddings]
        kept = [p for p in group["params"] if id(p) in embeddings]
        if rest:
            out.append({**group, "params": rest})
        if kept:
            out.append({**group, "params": kept, "state_bits": 32})
            logger.info("memopt: %d embedding parameters keep 32-bit optimizer state",
                        sum(p.numel() for p in kept))
    return out


def optimizer_cls_and_kwargs(
    name: str,
    args=None,
    *,
    lr: Optional[float] = None,
    optim_args: Union[None, str, Mapping[str, Any]] = None,
    model=None,
) -> tuple[type, dict[str, Any]]:
    """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``, with no patching. It does not
    change the model: model-level ``optim_args`` need :func:`prepare_model` first.

    Args:
        name: a memopt optimizer name (``memopt.list_optimizers()``).
        args: the ``TrainingArguments``; its ``learning_rate`` and ``optim_args`` are used unless overridden.
        lr, optim_args: overrides.
        model: the parameter groups are built as the ``optim=`` route builds them (:func:`param_groups_for`:
            the name's own groups, embeddings with 32-bit state under 8-bit state). Without it the Trainer builds
            its decay / no-decay groups (projection methods need it).

    Raises:
        ValueError: unknown name, a bad ``optim_args`` key/value (named in the message), or model-level
            ``optim_args`` (``freeze_embeddings``, ``chunked_loss``) not applied by :func:`prepare_model`.
    """
    spec = get_optimizer_spec(name)
    if not (isinstance(spec.factory, type) and issubclass(spec.factory, Optimizer)):
        raise TypeError(f"memopt optimizer {name!r} is not an Optimizer class and cannot be built by the Trainer")
    raw = optim_args if optim_args is not None else getattr(args, "optim_args", None)
    from_args = spec.from_training_args(args) if (args is not None and spec.from_training_args) else {}
    parsed = spec.parse_optim_args(raw)
    wanted = {"freeze_embeddings": parse_freeze_mode(parsed.pop("freeze_embeddings", "false")),
              "chunked_loss": parse_chunked_loss(parsed.pop("chunked_loss", "false"))}
    if wanted != {"freeze_embeddings": "false", "chunked_loss": None} and \
            getattr(model, _PREPARED_ATTR, None) != wanted:
        raise ValueError("optim_args freeze_embeddings / chunked_loss act on the model: call "
                         f"memopt.integrations.transformers.prepare_model(model, {name!r}, args) before building the "
                         "optimizer, and pass model=")
    kwargs: dict[str, Any] = {**spec.defaults, **from_args, **parsed}
    if lr is not None:
        kwargs["lr"] = lr
    elif args is not None:
        kwargs["lr"] = args.learning_rate
    if kwargs.get("grad_release") and args is not None:
        check_release_args(f"optim={name!r} with grad_release=true", args)
    if model is not None:
        kwargs["params"] = param_groups_for(name, model, args, kwargs)
    elif spec.build_groups is not None:
        raise ValueError(f"{name!r} builds its parameter groups from the model: pass model= and the args")
    return spec.factory, kwargs


def _trainer_groups(model, args) -> list[dict]:
    """The Trainer's decay / no-decay groups over the trainable parameters."""
    decay = _trainer_decay_names(model)
    wd = getattr(args, "weight_decay", 0.0) if args is not None else 0.0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if decay is None or n in decay], "weight_decay": wd},
              {"params": [p for n, p in named if decay is not None and n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_release_args(what: str, args) -> None:
    """Training arguments that gradient release cannot honour are refused, naming the setting to change
    (``what`` names the optimizer set-up in the message)."""
    problems = []
    if getattr(args, "gradient_accumulation_steps", 1) != 1:
        problems.append("gradient_accumulation_steps must be 1 (each backward is an update; use a larger batch)")
    if (getattr(args, "max_grad_norm", 0) or 0) > 0:
        problems.append("max_grad_norm must be 0: global gradient clipping needs every gradient at once, and "
                        "they are freed during backward")
    if getattr(args, "fp16", False):
        problems.append("fp16 (GradScaler) is not supported: use bf16 or fp32")
    if getattr(args, "world_size", 1) > 1 or getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        problems.append("distributed training (DDP/FSDP/DeepSpeed) is not supported: the hook runs before the "
                        "gradient reduction")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def _trainer_decay_names(model) -> Optional[set]:
    """The Trainer's own decay / no-decay rule (its method does not use the Trainer instance)."""
    try:
        from transformers import Trainer

        return set(Trainer.get_decay_parameter_names(None, model))
    except Exception:  # noqa: BLE001  (a transformers version without it: every 2-D param decays)
        return None


def __getattr__(name: str):
    if name == "MemoryReportCallback":
        from memopt.integrations.trainer_callback import MemoryReportCallback

        return MemoryReportCallback
    raise AttributeError(name)
