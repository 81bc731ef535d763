"""Optimizer-state bytes, counted exactly.

memopt optimizers: the optimizer the Trainer route builds (the registered constructor with the name's defaults
and the ``optim_args``, the name's parameter groups, 32-bit state for embeddings under 8-bit state) is built over
the meta model's parameters, and each trainable parameter's ``state_layout`` is summed: the description the
optimizer creates its state from (pinned to the real state after a step by the contract tests). The baselines
that are not memopt's, torch AdamW and bitsandbytes AdamW 8-bit, have their rules here, each checked against the
real optimizer in tests/test_plan.py.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Iterable, Optional, Sequence

from memopt.plan.model import ParamInfo

BASELINES = ("adamw_torch", "adamw_bnb_8bit")
# bitsandbytes' 8-bit layout (as memopt's): tensors under MIN_8BIT_SIZE elements keep fp32 state; the others hold
# uint8 codes + one fp32 absmax per BLOCKSIZE elements, and two 256-entry fp32 maps shared by every 8-bit tensor.
MIN_8BIT_SIZE = 4096
BLOCKSIZE = 256
_BNB_QMAP_BYTES = 2 * 256 * 4
# torch AdamW (foreach / for-loop, not capturable): one fp32 ``step`` tensor per parameter tensor.
_TORCH_STEP_BYTES = 4


def elem_bytes(p: ParamInfo, weights_bytes: int) -> int:
    return 4 if p.fp32 else weights_bytes


def _blockwise_8bit_bytes(numel: int, blocksize: int = BLOCKSIZE) -> int:
    """uint8 codes + one fp32 absmax per block."""
    return numel + 4 * -(-numel // blocksize)


def shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a tensor of ``rows`` rows on ``rank`` of ``world`` under FSDP2's ``Shard(0)`` (``torch.chunk``:
    ``ceil(rows / world)`` per rank, the last ranks fewer or none)."""
    chunk = -(-rows // world) if world else rows
    return max(0, min(rows, (rank + 1) * chunk) - rank * chunk)


def shard_numel(shape: tuple, world: int, rank: int) -> int:
    """Elements of a tensor of ``shape`` on ``rank`` when its rows (dim 0) are sharded over ``world`` ranks."""
    rows = shape[0] if len(shape) else 1
    return math.prod(shape) * shard_rows(rows, world, rank) // rows if rows else 0


def torch_adamw_state_bytes(params: Sequence[ParamInfo], weights_bytes: int, *, gpus: int = 1, rank: int = 0) -> int:
    """``torch.optim.AdamW`` (foreach / for-loop): ``exp_avg`` + ``exp_avg_sq`` in the parameter dtype and a
    4-byte fp32 ``step`` tensor per tensor (the rule of ``memopt.adamw_state_bytes``). On ``rank`` of ``gpus``
    FSDP2 ranks the moments are shards of the parameter's rows (``step`` is on every rank)."""
    return sum(2 * shard_numel(p.shape, gpus, rank) * elem_bytes(p, weights_bytes) + _TORCH_STEP_BYTES
               for p in params)


def bnb_adamw8bit_state_bytes(params: Sequence[ParamInfo], *, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """bitsandbytes AdamW with ``optim_bits=8``, as the Trainer builds it for ``optim="adamw_bnb_8bit"``.

    bitsandbytes (``Optimizer2State.init_state``): a tensor with fewer than ``min_8bit_size`` elements, or with a
    32-bit override, keeps ``state1`` + ``state2`` in fp32 whatever the parameter dtype (8 B/element); the others
    hold two uint8 code tensors + two fp32 absmax vectors (block 256) and point at two shared 256-entry fp32
    quantization maps. ``step`` is a Python int. The Trainer registers a 32-bit override for every
    ``nn.Embedding`` weight (a tied LM head is the same tensor).
    """
    total, any_8bit = 0, False
    for p in params:
        if p.embedding or p.numel < min_8bit_size:
            total += 8 * p.numel
        else:
            total += 2 * _blockwise_8bit_bytes(p.numel)
            any_8bit = True
    return total + (_BNB_QMAP_BYTES if any_8bit else 0)


@contextlib.contextmanager
def _trainable_as(model, trainable: Optional[set]):
    """Temporarily: ``requires_grad`` = membership of ``trainable`` (ids; ``None`` leaves it)."""
    saved = {id(p): p.requires_grad for p in model.parameters()}
    try:
        if trainable is not None:
            for p in model.parameters():
                p.requires_grad_(id(p) in trainable)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])


class RefusedOnShards(ValueError):
    """The optimizer (with these settings) refuses FSDP2 parameters: no plan row for several GPUs."""


def memopt_state_bytes(name: str, optim_args: str, model, trainable: Iterable, *, in_model: bool = True,
                       gpus: int = 1) -> list[int]:
    """State bytes of registered optimizer ``name`` with ``optim_args`` over the ``trainable`` meta tensors, per
    rank of ``gpus`` (FSDP2 full sharding: state tensors whose rows are their parameter's rows are sharded with
    them, the others are on every rank; the optimizer applies its own rules for sharded parameters).

    ``in_model``: the tensors are parameters of ``model`` (full fine-tuning: the groups are the ones the ``optim=``
    route builds, ``memopt.integrations.transformers.param_groups_for``); otherwise (LoRA adapters) they form one
    group.

    Raises:
        RefusedOnShards: with ``gpus > 1``, when the optimizer refuses FSDP2 parameters (the reason).
    """
    from memopt.distributed import PLANNED_SHARDS_ATTR, shards_with_rows
    from memopt.integrations.transformers import param_groups_for
    from memopt.registry import INTEGRATION_ARGS, get_optimizer_spec

    spec = get_optimizer_spec(name)
    kwargs = {k: v for k, v in {**spec.defaults, **spec.parse_optim_args(optim_args)}.items()
              if k not in INTEGRATION_ARGS and k != "grad_release"}  # release needs autograd; state is the same
    trainable = list(trainable)
    with _trainable_as(model, {id(p) for p in trainable} if in_model else None):
        if in_model:
            args = types.SimpleNamespace(optim_target_modules=None, weight_decay=0.0)
            groups = param_groups_for(name, model, args, kwargs)
        else:
            groups = [{"params": trainable}]
        opt = spec.factory(groups, **kwargs)
        pairs = [(group, p) for group in opt.param_groups for p in group["params"] if p.requires_grad]
        if gpus > 1:
            for group in opt.param_groups:
                why = opt._dtensor_refusal(group)
                if why is not None and any(p.requires_grad for p in group["params"]):
                    raise RefusedOnShards(f"{type(opt).__name__}{why}")
        replicated = getattr(opt, "_REPLICATED_STATE", frozenset())
        totals = [0] * gpus
        try:
            for _, p in pairs:
                setattr(p, PLANNED_SHARDS_ATTR, gpus)
            for (group, p), layout in zip(pairs, opt.planned_state_layouts(pairs)):
                rows = p.shape[0] if p.dim() else 1
                for key, (shape, dtype) in layout.items():
                    sharded = gpus > 1 and shards_with_rows(key, tuple(shape), rows, replicated)
                    for r in range(gpus):
                        totals[r] += (shard_numel(shape, gpus, r) if sharded else math.prod(shape)) * dtype.itemsize
        finally:
            for _, p in pairs:
                if hasattr(p, PLANNED_SHARDS_ATTR):
                    delattr(p, PLANNED_SHARDS_ATTR)
        return totals
