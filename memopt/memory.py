"""What each device holds during training, counted exactly, and the saving against an AdamW baseline.

Pure torch: the Trainer callback in ``memopt.integrations.transformers`` and any hand-written loop use the same
functions. Bytes are counted from tensors (``numel * element_size`` of the local shard), never estimated.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Optional

import torch
from torch import Tensor


def _local(t: Tensor) -> Tensor:
    # DTensor (FSDP2): count the shard this rank holds.
    return t.to_local() if hasattr(t, "to_local") else t


def _leaves(t: Tensor):
    """The plain tensors holding a tensor's data: a wrapper subclass (torchao's 8-bit optimizer state,
    DTensor) is counted by its inner tensors, not by its logical shape and dtype."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__") and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def _quant_state_tensors(state) -> Iterable[Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (absmax, code, offset, and a nested state's), duck-typed."""
    if state is None:
        return
    for value in vars(state).values():
        if isinstance(value, Tensor):
            yield value
        elif hasattr(value, "absmax"):  # the nested (double-quantisation) state
            yield from _quant_state_tensors(value)


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor occupies as stored: a wrapper subclass by its inner tensors, a bitsandbytes 4-bit weight
    (``Params4bit``) by its packed data plus its quantisation state (block maxima, map, nested state)."""
    data = sum(leaf.numel() * leaf.element_size() for leaf in _leaves(_local(t)))
    return data + sum(q.numel() * q.element_size() for q in _quant_state_tensors(getattr(t, "quant_state", None)))


def _walk_tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk_tensors(v)


def _unwrap(optimizer):
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`.
    while hasattr(optimizer, "optimizer") and (
        type(optimizer).__name__ == "AcceleratedOptimizer" or not hasattr(optimizer, "state")
    ):
        optimizer = optimizer.optimizer
    return optimizer


def state_bytes_by_kind(optimizer) -> dict[str, int]:
    """Optimizer-state bytes per state key (e.g. ``{"momentum_buffer": 538_000_000, "step": 1_192}``).

    Counts every tensor in ``optimizer.state``, nested containers included. Python numbers kept in the state
    (SGD-SaI's per-tensor g-SNR is a host float) live in host memory, not on the device, and are listed
    under ``"host_scalars"`` as 8 bytes each, outside :func:`state_bytes`.
    """
    optimizer = _unwrap(optimizer)
    out: dict[str, int] = {}
    seen: set = set()  # a tensor shared by several params' state (e.g. a quantization map) counts once
    for st in optimizer.state.values():
        for key, value in st.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out["host_scalars"] = out.get("host_scalars", 0) + 8
                continue
            n = 0
            for t in _walk_tensors(value):
                for leaf in _leaves(_local(t)):
                    ident = (leaf.device, leaf.data_ptr(), leaf.numel(), leaf.dtype) if leaf.numel() else id(leaf)
                    if ident not in seen:
                        seen.add(ident)
                        n += leaf.numel() * leaf.element_size()
            if n:
                out[str(key)] = out.get(str(key), 0) + n
    return out


def state_bytes(optimizer) -> int:
    """Exact bytes of every tensor held in ``optimizer.state`` (device memory of this rank)."""
    return sum(v for k, v in state_bytes_by_kind(optimizer).items() if k != "host_scalars")


def adamw_state_bytes(params: Iterable[Tensor]) -> int:
    """State bytes ``torch.optim.AdamW`` (foreach, not fused/capturable) would hold for these trainable params.

    Rule (torch's, checked by a test against a real AdamW): ``exp_avg`` and ``exp_avg_sq`` in the parameter's
    dtype (8 B/param for fp32, 4 for bf16) plus a 4-byte fp32 ``step`` tensor per parameter tensor.
    """
    total = 0
    for p in params:
        if p.requires_grad:
            total += 2 * tensor_bytes(p) + 4
    return total


def peak_memory(device: Optional[torch.device] = None) -> tuple[str, int]:
    """``("cuda_max_allocated", bytes)`` on a CUDA device, else ``("cpu_peak_rss", bytes)`` of this process."""
    if device is not None and torch.device(device).type == "cuda":
        return "cuda_max_allocated", int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "cpu_peak_rss", int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class DeviceMemory:
    """One row of the report: what one rank/device holds."""

    rank: int
    device: str
    optimizer: str
    params_trainable_bytes: int
    params_frozen_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int
    adamw_state_bytes: int
    state_saving_bytes: int
    peak_kind: str
    peak_bytes: int
    update_path: str = "-"  # tensors updated per path in the last step, e.g. "triton:270 torch:2"

    def as_log(self, prefix: str = "memory/") -> dict[str, Any]:
        """Flat numeric metrics for Trainer logs (tensorboard / W&B pick them up)."""
        skip = {"rank", "device", "optimizer", "peak_kind", "update_path"}
        out = {f"{prefix}{f.name}": getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out[f"{prefix}{self.peak_kind}_bytes"] = out.pop(f"{prefix}peak_bytes")
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(model: torch.nn.Module, optimizer=None, *, rank: int = 0, grads_bytes: Optional[int] = None,
            device: Optional[torch.device] = None) -> DeviceMemory:
    """Snapshot of one rank. ``grads_bytes`` overrides the live count (grads are freed after the step)."""
    params = list(model.parameters())  # shared (tied) parameters appear once
    trainable = sum(tensor_bytes(p) for p in params if p.requires_grad)
    frozen = sum(tensor_bytes(p) for p in params if not p.requires_grad)
    live_grads = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
    if device is None:
        device = _local(params[0]).device if params else torch.device("cpu")
    device = torch.device(device)
    opt_bytes = state_bytes(optimizer) if optimizer is not None else 0
    baseline = adamw_state_bytes(params)
    kind, peak = peak_memory(device)
    inner = _unwrap(optimizer) if optimizer is not None else None
    if getattr(inner, "gradient_release", False):  # freed inside backward: one gradient alive at a time
        live_grads = max(live_grads, inner.max_released_grad_bytes)
    return DeviceMemory(
        rank=rank,
        device="cpu" if device.type == "cpu" else str(device),  # one CPU for every process: no index
        optimizer=type(inner).__name__ if inner is not None else "-",
        params_trainable_bytes=trainable,
        params_frozen_bytes=frozen,
        grads_bytes=live_grads if grads_bytes is None else grads_bytes,
        optimizer_state_bytes=opt_bytes,
        adamw_state_bytes=baseline,
        state_saving_bytes=baseline - opt_bytes,
        peak_kind=kind,
        peak_bytes=peak,
        update_path=" ".join(f"{k}:{v}" for k, v in getattr(inner, "update_paths", {}).items()) or "-",
    )


def gather_rows(row: DeviceMemory) -> list[DeviceMemory]:
    """Every rank's row, on every rank (torch.distributed when initialised, else just this one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [row]
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row.as_dict())
    return [DeviceMemory(**r) for r in rows]


def _fmt(n: int) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


def format_table(rows: list[DeviceMemory]) -> str:
    """A table a person can read: one row per rank/device."""
    headers = ["rank", "device", "optimizer", "path", "params trainable", "params frozen", "grads", "optim state",
               "AdamW state", "saving", "peak"]
    body = []
    for r in rows:
        saving = f"{_fmt(r.state_saving_bytes)}"
        if r.adamw_state_bytes:
            saving += f" ({100.0 * r.state_saving_bytes / r.adamw_state_bytes:.0f}%)"
        body.append([str(r.rank), r.device, r.optimizer, r.update_path, _fmt(r.params_trainable_bytes),
                     _fmt(r.params_frozen_bytes), _fmt(r.grads_bytes), _fmt(r.optimizer_state_bytes),
                     _fmt(r.adamw_state_bytes), saving, f"{_fmt(r.peak_bytes)} ({r.peak_kind})"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    line = lambda cells: " | ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    sep = "-+-".join("-" * w for w in widths)
    return "\n".join(["memopt memory report (optimizer state vs a torch AdamW baseline on the same trainable "
                      "params)", line(headers), sep, *(line(b) for b in body)])


def plot_rows(rows: list[DeviceMemory], path: str) -> bool:
    """Write the report as a picture (PNG): per rank, stacked bars of weights, gradients and optimizer state
    (exact counts) for this optimizer and, beside them, with a torch AdamW state instead; the measured peak of
    each rank is written above its bars. Needs matplotlib; returns False (nothing written) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    top = max(r.params_trainable_bytes + r.params_frozen_bytes + r.grads_bytes
              + max(r.optimizer_state_bytes, r.adamw_state_bytes) for r in rows)
    unit, size = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= s), ("B", 1))
    fig, ax = plt.subplots(figsize=(4.0 + 2.4 * len(rows), 4.6))
    colours = {"weights": "tab:blue", "gradients": "tab:orange", "optimizer state": "tab:green"}
    ticks, x = [], 0.0
    for r in rows:
        weights = r.params_trainable_bytes + r.params_frozen_bytes
        for name, state in ((r.optimizer, r.optimizer_state_bytes), ("AdamW (torch)", r.adamw_state_bytes)):
            bottom = 0.0
            for part, value in (("weights", weights), ("gradients", r.grads_bytes), ("optimizer state", state)):
                ax.bar(x, value / size, bottom=bottom, color=colours[part], width=0.8, label=part if x == 0 else None)
                bottom += value / size
            ax.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=8)
            ticks.append((x, f"{name}\nrank {r.rank} ({r.device})"))
            x += 1.0
        rest = max(0, r.peak_bytes - weights - r.grads_bytes - r.optimizer_state_bytes)
        ax.text(x - 1.5, top / size * 1.1, f"peak {_fmt(r.peak_bytes)} ({r.peak_kind})\nactivations + other: "
                f"{_fmt(rest)}", ha="center", fontsize=7)
        x += 0.6
    ax.set_ylim(0, top / size * 1.3)
    ax.set_xticks([p for p, _ in ticks], [t for _, t in ticks], fontsize=8)
    ax.set_ylabel(unit)
    saving = sum(r.state_saving_bytes for r in rows)
    ax.set_title(f"memopt memory report: weights + gradients + optimizer state\n"
                 f"optimizer state {_fmt(sum(r.optimizer_state_bytes for r in rows))} vs AdamW "
                 f"{_fmt(sum(r.adamw_state_bytes for r in rows))} (saving {_fmt(saving)})", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
