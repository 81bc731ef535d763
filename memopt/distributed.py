"""Whole-tensor statistics of FSDP2 (DTensor) shards, reduced over the shard group, so every rank computes what
a single device computes (docs/multi_gpu.md).

Collectives are matched by call order: every rank must call these with the same tensors in the same order.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from memopt.functional.sgdsai import gsnr_from_stats



def is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "device_mesh")


PLANNED_SHARDS_ATTR = "_memopt_planned_shards"  # memopt plan marks meta parameters it plans as FSDP2 shards


def row_sharded(t: Tensor) -> bool:
    """Whether ``t`` is (or is planned as) a parameter sharded by rows over several processes (FSDP2): the rules
    that keep state within a rank apply to it."""
    return is_dtensor(t) or getattr(t, PLANNED_SHARDS_ATTR, 1) > 1


def shards_with_rows(key: str, shape: tuple, rows: int, replicated: frozenset = frozenset()) -> bool:
    """Whether the state tensor ``key`` of ``shape``, kept for a parameter with ``rows`` rows, is sharded with the
    parameter's rows under FSDP2 (its first dim is those rows); the others (scalars, selected indices, per-tensor
    maps, the keys in ``replicated``) are the same on every rank."""
    return len(shape) > 0 and shape[0] == rows and key not in replicated


def is_deepspeed_partitioned(t: Tensor) -> bool:
    """A DeepSpeed ZeRO-partitioned parameter (ZeRO-3 marks its params with ``ds_id`` / ``ds_numel``)."""
    return hasattr(t, "ds_id") or hasattr(t, "ds_numel")


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def _shard_groups(t: Tensor) -> list:
    if not is_dtensor(t):
        return []
    if any(pl.is_partial() for pl in t.placements):
        raise ValueError("a gradient with Partial placement is not reduced yet; memopt steps after the reduction")
    return [t.device_mesh.get_group(i) for i, pl in enumerate(t.placements) if pl.is_shard()]


def _all_reduce(buf: Tensor, groups: list, op=None) -> Tensor:
    import torch.distributed as dist

    for group in groups:
        dist.all_reduce(buf, op=op or dist.ReduceOp.SUM, group=group)
    return buf


def finite_flags(grads: Sequence[Tensor]) -> list[bool]:
    """Whether each whole (all shards) gradient is finite: one all-reduce for the whole list."""
    from memopt.functional.finite import finite_flags as local_flags

    if not grads:
        return []
    locs = [local(g) for g in grads]
    bad = torch.zeros(len(grads), dtype=torch.int32, device=locs[0].device)
    for flags, idx in local_flags(locs):  # each shard by the single-device rule
        bad[idx] = (~flags).to(torch.int32)
    _all_reduce(bad, _shard_groups(grads[0]))
    return [not b for b in bad.tolist()]


def gsnr_many(grads: Sequence[Tensor], eps: float = 1e-8) -> list[Optional[float]]:
    """:func:`memopt.functional.gsnr` of each whole gradient from its shards: ``||g|| / (std(g) + eps)``.

    Two passes (two all-reduces for the whole list): the global mean from the shards' sums, then the sums of
    squared deviations and of squares (a one-pass ``Σg² − n·mean²`` loses all precision when the mean dominates).
    Accumulators are fp64. Same conventions as the single-device function: ``None`` for an all-zero gradient,
    ``1.0`` for one element, ``sqrt(numel)`` when the std is rounding residue, ``nan`` when non-finite.
    """
    if not grads:
        return []
    groups = _shard_groups(grads[0])
    locs = [local(g).detach() for g in grads]
    locs = [x if x.dtype == torch.float64 else x.float() for x in locs]
    counts = [g.numel() for g in grads]  # a DTensor's numel is the global count
    sums = _all_reduce(torch.stack([x.sum(dtype=torch.float64) for x in locs]), groups)
    means = (sums / torch.tensor(counts, dtype=torch.float64)).tolist()
    stats = torch.stack([torch.stack([(x - mu).square().sum(dtype=torch.float64), x.square().sum(dtype=torch.float64),
                                      (~torch.isfinite(x)).sum().double()]) for x, mu in zip(locs, means)])
    _all_reduce(stats, groups)
    out: list[Optional[float]] = []
    for n, (ssd, ssq, bad) in zip(counts, stats.tolist()):
        if bad > 0:
            out.append(float("nan"))
            continue
        std = math.sqrt(ssd / (n - 1)) if n > 1 and math.isfinite(ssd) else 0.0
        out.append(gsnr_from_stats(n, math.sqrt(ssq), std, eps))
    return out


def any_nonzero(grads: Sequence[Tensor]) -> list[bool]:
    """Whether each whole (all shards) gradient has a non-zero element: one all-reduce for the whole list."""
    if not grads:
        return []
    flags = torch.stack([(local(g) != 0).any() for g in grads]).to(torch.int32)
    _all_reduce(flags, _shard_groups(grads[0]))
    return [bool(f) for f in flags.tolist()]


def column_reducer(grad: Tensor):
    """For :func:`memopt.functional.sgdsai.normalized_gradient` of a DTensor gradient sharded by rows (FSDP2's
    ``Shard(0)``): sums the column statistics over the shard group; the row count is the global one. ``None`` for
    a plain tensor."""
    groups = _shard_groups(grad)
    if not groups:
        return None
    if any(pl.is_shard() and pl.dim != 0 for pl in grad.placements):
        raise NotImplementedError(f"scale='factored' needs parameters sharded by rows (Shard(0), as FSDP2 does), "
                                  f"got placements {grad.placements}")
    rows = grad.shape[0]

    def reduce(col_ss: Tensor, _local_rows: int):
        return _all_reduce(col_ss.clone(), groups), rows

    return reduce


def rows_like(p: Tensor, shape: tuple, dtype: torch.dtype) -> Tensor:
    """Zeros of ``shape`` (``shape[0]`` = ``p``'s rows) as a DTensor sharded like the row-sharded ``p``: each rank
    holds the rows of its shard of ``p`` (8-bit block maxima follow their rows)."""
    from torch.distributed.tensor import DTensor

    if shape[0] != p.shape[0] or any(pl.is_shard() and pl.dim != 0 for pl in p.placements):
        raise NotImplementedError(f"state of shape {shape} for a parameter of shape {tuple(p.shape)} with "
                                  f"placements {p.placements}: only row-sharded (Shard(0)) state is supported")
    local_rows = p.to_local().shape[0]
    local = torch.zeros((local_rows, *shape[1:]), dtype=dtype, device=p.to_local().device)
    stride = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def sharded_like(p: Tensor, local_rows: Tensor) -> Tensor:
    """A DTensor of ``local_rows`` (this rank's rows of a state tensor of the row-sharded ``p``) with the global
    row count of ``p``: the form ``torch.distributed.checkpoint`` reshards. Shares the local tensor's storage."""
    from torch.distributed.tensor import DTensor

    shape = (p.shape[0], *local_rows.shape[1:])
    stride = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
    return DTensor.from_local(local_rows, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def agree_on_max(value: int, like: Tensor) -> int:
    """The largest ``value`` over the shard group of DTensor ``like`` (every rank must call it): ranks whose RNGs
    drew different seeds agree on one."""
    t = torch.tensor([value], dtype=torch.int64, device=local(like).device)
    import torch.distributed as dist

    return int(_all_reduce(t, _shard_groups(like), op=dist.ReduceOp.MAX).item())
