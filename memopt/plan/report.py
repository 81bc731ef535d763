"""The plan as JSON and as text: the one place that makes text (every number comes from the dataclasses)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

from memopt.plan import Plan
from memopt.plan.inputs import GiB


def plan_to_dict(plan: Plan) -> dict:
    """A JSON-ready dict of the plan (bytes as ints)."""
    summary = {f.name: getattr(plan.summary, f.name) for f in fields(plan.summary)
               if f.name not in ("params", "linears", "model")}
    summary["numel"] = plan.summary.numel
    return {
        "model": summary,
        "options": asdict(plan.options),
        "usable_bytes": plan.usable_bytes,
        "activations_estimate": {m: dict(asdict(a), total=a.total) for m, a in plan.activations.items()},
        "fsdp_gathered_bytes_estimate": plan.gathered_bytes,
        "rows": [{"setup": r.setup, "optim": r.optim, "optim_args": r.optim_args, **asdict(r.exact),
                  "exact_total_bytes": r.exact.total, "peak_bytes": r.peak_bytes, "fits": r.fits,
                  **({"per_rank": [asdict(e) for e in r.per_rank]} if r.per_rank else {})}
                 for r in plan.rows],
        "skipped": [{"setup": label, "why": why} for label, why in plan.skipped],
    }


def plan_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _device(n: int) -> str:
    return f"{n / 10**9:g} GB ({n / GiB:.2f} GiB)"


def _params(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_plan(plan: Plan) -> str:
    """The plan as a text table (sizes in GiB) with a header that states every assumption."""
    s, o = plan.summary, plan.options
    tied = "tied" if s.tied_embeddings else "untied"
    lines = [
        f"memopt plan: {s.architecture} from {s.source or '?'} ({_params(s.numel)} params, {s.num_layers} layers, "
        f"hidden {s.hidden_size}, {s.num_heads} heads, vocab {s.vocab_size}, {tied} embeddings)",
        f"weights {o.weights_dtype}"
        + (" (no fp32 master copy; Trainer AMP with fp32 weights: --weights-dtype fp32)" if o.weights_dtype != "fp32"
           else " (fp32 weights, e.g. Trainer bf16=True AMP)")
        + f", activations {o.act_dtype}, batch {o.batch} x seq {o.seq_len}, {o.attention} attention",
    ]
    if o.gpus > 1:
        lines.append(f"FSDP2 full sharding over {o.gpus} GPUs: every number is per GPU, for the rank holding the most "
                     f"(parameters, gradients and state sharded by rows; buffers and activations of the per-GPU batch "
                     f"on each); FSDP2 gathers {_gib(plan.gathered_bytes)} GiB of unsharded layers ESTIMATE (root "
                     f"unit + 2 layers + 1 layer of gradients), added to the peak")
    if o.gpu_mem is not None:
        lines.append(f"device {_device(o.gpu_mem)} - reserve {_gib(o.reserve)} GiB (CUDA context, allocator) = "
                     f"{_gib(plan.usable_bytes)} GiB usable")
    for mode, act in plan.activations.items():
        lines.append(f"activations, checkpointing {mode}: {_gib(act.total)} GiB (layers {_gib(act.layers_bytes)} + "
                     f"logits {_gib(act.logits_bytes)}; chunked loss: {_gib(act.chunk_logits_bytes)}) ESTIMATE "
                     f"({act.method} count after Korthikanti et al. 2022)")
    headers = ["setup", "optim= (optim_args)", "trainable", "weights", "grads", "state", "W+G+S"]
    for mode in o.ckpt_modes:
        headers.append(f"peak ckpt {mode}")
        if o.gpu_mem is not None:
            headers.append("fits (room)")
    body = []
    for r in plan.rows:
        e = r.exact
        what = r.optim + (f" ({r.optim_args})" if r.optim_args else "") + (" + LoRA" if r.lora else "")
        cells = [r.setup, what, _params(e.trainable_params), _gib(e.weights_bytes), _gib(e.grads_bytes),
                 _gib(e.state_bytes), _gib(e.total)]
        for mode in o.ckpt_modes:
            cells.append(_gib(r.peak_bytes[mode]))
            if o.gpu_mem is not None:
                room = (plan.usable_bytes - r.peak_bytes[mode]) / GiB
                cells.append(f"{'yes' if r.fits[mode] else 'no'} ({room:+.2f})")
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def line(cells):
        return " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines += ["", line(headers), "-+-".join("-" * w for w in widths), *(line(b) for b in body), ""]
    lines.append("GiB. weights, grads, state: exact (meta model + each optimizer's state rules); peak = W+G+S + "
                 "the activation ESTIMATE" + (" + the FSDP2 gathered ESTIMATE" if o.gpus > 1 else "")
                 + "; room = usable - peak.")
    for label, why in plan.skipped:
        lines.append(f"no row on {o.gpus} GPUs: {label} ({why})")
    if o.gpu_mem is not None:
        for mode in o.ckpt_modes:
            ok = [r.setup for r in plan.rows if r.fits[mode]]
            lines.append(f"fits in {_device(o.gpu_mem)} ({_gib(plan.usable_bytes)} GiB usable) with checkpointing "
                         f"{mode}: "
                         + ("; ".join(ok) if ok else "none"))
    return "\n".join(lines)
