"""Memory planner: predicted training memory of a model, per optimizer set-up, before any weight is loaded.

The model is built on the meta device from its transformers config (no weights, no download). Three parts of
the prediction are exact, counted from the meta model's parameters with the same rules the optimizers follow
(each rule is checked against a real optimizer step by ``tests/test_plan.py``):

- weights: every unique parameter (a tied LM head counts once) and buffer, in the chosen weights dtype;
  LoRA adapters in fp32 (peft's default ``autocast_adapter_dtype=True`` upcasts them on bf16/fp16 bases);
  QLoRA: every ``nn.Linear`` weight but the LM head as bitsandbytes NF4 with double quantisation
  (:func:`nf4_bytes`, what ``BitsAndBytesConfig(load_in_4bit=True)`` of the QLoRA recipe stores), the rest in the
  weights dtype;
- gradients: one per trainable parameter, in its dtype; with gradient release only the largest trainable
  tensor's gradient (one alive at a time: each is freed by its backward hook), plus a trainable tied
  embedding's, which autograd holds from the LM head until the end of backward;
- optimizer state: every registered memopt optimizer, through its own ``state_layout`` over the meta model's
  parameters (:mod:`memopt.plan.state`); torch AdamW and bitsandbytes AdamW 8-bit (as the Trainer builds it) by
  their rules.

The activation part is an estimate (Korthikanti et al. 2022, arXiv 2205.05198; see
:func:`estimate_activations` and docs/plan.md). Nothing else (CUDA context, allocator fragmentation, the
optimizer step's temporaries) is modelled, except as the ``reserve`` subtracted from the device size.

Library only: functions return dataclasses; :mod:`memopt.plan.report` is the one place that makes text. A row
per registered optimizer name (and per lean / LoRA set-up) shows the ``optim=`` name and ``optim_args`` it stands
for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from memopt.loss import SUPPORTED_MODEL_TYPES
from memopt.plan.activations import (ATTENTION_KINDS, LOGITS_PEAK_BYTES, ActivationEstimate,  # noqa: F401
                                     estimate_activations, fsdp_gathered_bytes, layer_bytes_per_token)
from memopt.plan.inputs import DTYPE_BYTES, GiB, build_meta_model, check_config, load_config, parse_size  # noqa: F401
from memopt.plan.model import (LinearInfo, ModelSummary, ParamInfo, lora_adapters, nf4_bytes,  # noqa: F401
                               quantized_4bit, summarize_model)
from memopt.plan.state import (BASELINES, RefusedOnShards, bnb_adamw8bit_state_bytes, elem_bytes,  # noqa: F401
                               memopt_state_bytes, shard_numel, shard_rows, torch_adamw_state_bytes)

ACT_CKPT_MODES = ("off", "on", "both")


# ------------------------------------------------------------------------------------------------ set-ups
@dataclass(frozen=True)
class Setup:
    """One way to train, as a user writes it: ``TrainingArguments(optim=optim, optim_args=optim_args)`` (a memopt
    name or a baseline: ``adamw_torch``, ``adamw_bnb_8bit``), on LoRA adapters (``lora``) over a 4-bit base
    (``qlora``) or the whole model. Gradient release, frozen embeddings and the chunked loss are read from
    ``optim_args``, as the Trainer route reads them."""

    label: str
    optim: str
    optim_args: str = ""
    lora: bool = False
    qlora: bool = False  # LoRA on a 4-bit (NF4) base: implies lora

    def _parsed(self) -> dict:
        if self.optim in BASELINES:
            if self.optim_args:
                raise ValueError(f"{self.optim} takes no optim_args in memopt plan")
            return {}
        from memopt.registry import get_optimizer_spec

        return get_optimizer_spec(self.optim).parse_optim_args(self.optim_args)

    @property
    def grad_release(self) -> bool:
        return bool(self._parsed().get("grad_release", False))

    @property
    def freeze_embeddings(self) -> bool:
        from memopt.freeze import parse_freeze_mode

        return parse_freeze_mode(self._parsed().get("freeze_embeddings", "false")) != "false"

    @property
    def chunked_loss(self) -> bool:
        from memopt.loss import parse_chunked_loss

        return parse_chunked_loss(self._parsed().get("chunked_loss", "false")) is not None


def default_setups(lora_rank: int = 8, density: float = 0.25, galore_rank: int = 128) -> tuple:
    """The rows ``memopt plan`` prints: the baselines, every registered memopt name (FRUGAL at ``density``,
    GaLore-style at ``galore_rank``), the lean full fine-tuning set-ups, and LoRA / QLoRA."""
    from memopt.registry import get_optimizer_spec, list_optimizers

    rows = [Setup("AdamW (torch)", "adamw_torch"), Setup("AdamW 8-bit (bnb, adamw_bnb_8bit)", "adamw_bnb_8bit")]
    for name in list_optimizers():
        label = get_optimizer_spec(name).label
        if name.startswith("frugal"):
            rows.append(Setup(label.replace("FRUGAL", f"FRUGAL rho={density:g}"), name, f"density={density:g}"))
        elif name.startswith("memopt_galore"):
            rows.append(Setup(f"{label} r={galore_rank}", name, f"rank={galore_rank}"))
        else:
            rows.append(Setup(label, name))
    release = "grad_release=true"
    rows += [
        Setup("SGD-SaI 8-bit + grad release", "sgdsai_8bit", release),
        Setup("SGD-SaI 8-bit + grad release + frozen emb", "sgdsai_8bit", f"{release},freeze_embeddings=true"),
        Setup("SGD-SaI 8-bit + release + frozen emb + chunked loss", "sgdsai_8bit",
              f"{release},freeze_embeddings=true,chunked_loss=true"),
        Setup(f"LoRA r={lora_rank} + AdamW", "adamw_torch", lora=True),
        Setup(f"LoRA r={lora_rank} + SGD-SaI", "sgdsai", lora=True),
        Setup(f"QLoRA r={lora_rank} (NF4) + AdamW", "adamw_torch", lora=True, qlora=True),
        Setup(f"QLoRA r={lora_rank} (NF4) + SGD-SaI", "sgdsai", lora=True, qlora=True),
        Setup(f"QLoRA r={lora_rank} (NF4) + SGD-SaI 8-bit", "sgdsai_8bit", lora=True, qlora=True),
    ]
    return tuple(rows)


@dataclass(frozen=True)
class ExactParts:
    """The exact part of a prediction, in bytes."""

    trainable_params: int
    weights_bytes: int
    grads_bytes: int
    state_bytes: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.state_bytes


def _released_grads_bytes(trainable: Sequence[ParamInfo], weights_bytes: int, tied: bool) -> int:
    """Gradients alive at once under gradient release: the largest trainable tensor's gradient (each is freed by
    its hook before the next one is complete), plus, when the input embedding is tied to the LM head and
    trainable, that tensor's gradient: autograd holds the LM head's contribution until the embedding's own arrives
    at the very end of backward, so it is alive while every other tensor is released."""
    sizes = [(p.numel * elem_bytes(p, weights_bytes), tied and p.input_embedding) for p in trainable]
    held = sum(size for size, tied in sizes if tied)
    others = [size for size, tied in sizes if not tied]
    return held + max(others, default=0) if held else max(others, default=0)


def _state_bytes(summary: ModelSummary, setup: Setup, trainable: Sequence[ParamInfo], weights_bytes: int,
                 gpus: int = 1) -> list[int]:
    """Optimizer-state bytes per rank of ``gpus`` (FSDP2 full sharding when more than one)."""
    if setup.optim == "adamw_torch":
        return [torch_adamw_state_bytes(trainable, weights_bytes, gpus=gpus, rank=r) for r in range(gpus)]
    if setup.optim == "adamw_bnb_8bit":
        if gpus > 1:
            raise RefusedOnShards("bitsandbytes' 8-bit state on FSDP2 shards is not modelled")
        return [bnb_adamw8bit_state_bytes(trainable)]
    import torch

    if setup.lora:  # adapters are not in the meta model: meta tensors of their shapes, fp32
        tensors = [torch.empty(p.shape, device="meta", dtype=torch.float32, requires_grad=True) for p in trainable]
        return memopt_state_bytes(setup.optim, setup.optim_args, summary.model, tensors, in_model=False, gpus=gpus)
    if summary.model is None:
        raise ValueError("this model summary holds no meta model: build it with summarize_model(model)")
    dtype = {4: torch.float32, 2: torch.bfloat16}[weights_bytes]
    names = {p.name for p in trainable}
    params = dict(summary.model.named_parameters())
    with _meta_dtype(summary.model, dtype):
        return memopt_state_bytes(setup.optim, setup.optim_args, summary.model, [params[n] for n in names],
                                  gpus=gpus)


@contextlib.contextmanager
def _meta_dtype(model, dtype):
    """The meta model's parameters in the planned weights dtype (state dtypes may follow it)."""
    saved = {p: p.data for p in model.parameters()}
    try:
        for p in model.parameters():
            p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in saved.items():
            p.data = data


def exact_parts(summary: ModelSummary, setup: Setup, weights_dtype: str = "bf16", *, lora_rank: int = 8,
                lora_targets: Union[str, Sequence[str]] = ("q_proj", "v_proj")) -> ExactParts:
    """Weights, gradients and optimizer state of ``summary`` trained with ``setup`` on one device, counted exactly.

    Frozen embeddings: the input embedding (and a tied LM head, the same tensor) has no gradient and no state.
    Gradient release: one gradient alive at a time, the largest (plus a tied embedding's, see
    :func:`_released_grads_bytes`).
    """
    return exact_parts_per_rank(summary, setup, weights_dtype, lora_rank=lora_rank, lora_targets=lora_targets)[0]


def exact_parts_per_rank(summary: ModelSummary, setup: Setup, weights_dtype: str = "bf16", *, gpus: int = 1,
                         lora_rank: int = 8, lora_targets: Union[str, Sequence[str]] = ("q_proj", "v_proj")
                         ) -> list[ExactParts]:
    """:func:`exact_parts` on each rank of ``gpus`` under FSDP2 full sharding (``fully_shard``): every parameter
    and gradient is split by rows (dim 0) as ``torch.chunk`` splits it (:func:`shard_rows`), buffers are on every
    rank, and each optimizer keeps its state by its own rules for sharded parameters.

    Raises:
        RefusedOnShards: with ``gpus > 1``, for a set-up that does not run (or is not modelled) on FSDP2 shards.
    """
    if weights_dtype not in DTYPE_BYTES:
        raise ValueError(f"weights_dtype={weights_dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    wb = DTYPE_BYTES[weights_dtype]
    base = list(summary.params)
    if setup.lora or setup.qlora:
        adapters = lora_adapters(summary, lora_rank, lora_targets)
        trainable, params = list(adapters), base + list(adapters)
    else:
        trainable = [p for p in base if not (setup.freeze_embeddings and p.input_embedding)]
        params = base
    if gpus > 1 and (setup.lora or setup.qlora):
        raise RefusedOnShards("LoRA and QLoRA set-ups are planned on one GPU only")
    if gpus > 1 and setup.grad_release:
        raise RefusedOnShards("gradient release is refused with more than one process (its hooks would run "
                              "before the reduce-scatter)")
    four_bit = quantized_4bit(summary) if setup.qlora else set()
    states = _state_bytes(summary, setup, trainable, wb, gpus)
    out = []
    for rank in range(gpus):
        weights = sum(nf4_bytes(p.numel) if p.name in four_bit else
                      shard_numel(p.shape, gpus, rank) * elem_bytes(p, wb) for p in params) + summary.buffer_numel * wb
        grads = _released_grads_bytes(trainable, wb, summary.tied_embeddings) if setup.grad_release else \
            sum(shard_numel(p.shape, gpus, rank) * elem_bytes(p, wb) for p in trainable)
        out.append(ExactParts(sum(p.numel for p in trainable), weights, grads, states[rank]))
    return out


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PlanOptions:
    """Inputs of :func:`make_plan` (the CLI's flags)."""

    batch: int = 1
    seq_len: int = 2048
    weights_dtype: str = "bf16"
    act_ckpt: str = "both"
    attention: str = "sdpa"
    act_dtype: str = "bf16"
    lora_rank: int = 8
    lora_targets: Union[str, tuple] = ("q_proj", "v_proj")
    density: float = 0.25
    galore_rank: int = 128
    gpu_mem: Optional[int] = None
    reserve: int = GiB
    gpus: int = 1  # FSDP2 full sharding over this many GPUs (one process per GPU)

    def validate(self) -> None:
        for name in ("batch", "seq_len", "lora_rank", "galore_rank", "gpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.weights_dtype not in DTYPE_BYTES:
            raise ValueError(f"weights_dtype={self.weights_dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.act_ckpt not in ACT_CKPT_MODES:
            raise ValueError(f"act_ckpt={self.act_ckpt!r} is not one of {ACT_CKPT_MODES}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_KINDS}")
        if self.act_dtype not in DTYPE_BYTES:
            raise ValueError(f"act_dtype={self.act_dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density={self.density!r} must be in (0, 1]")
        if self.gpu_mem is not None and self.gpu_mem <= 0:
            raise ValueError(f"gpu_mem={self.gpu_mem!r} must be positive")
        if self.reserve < 0:
            raise ValueError(f"reserve={self.reserve!r} must be >= 0")

    @property
    def ckpt_modes(self) -> tuple:
        return ("off", "on") if self.act_ckpt == "both" else (self.act_ckpt,)


@dataclass
class PlanRow:
    """One set-up: exact parts, and per checkpointing mode ("off"/"on") the predicted peak and whether it fits.

    On several GPUs ``per_rank`` holds each rank's exact parts and ``exact`` the largest rank's (the first ranks
    hold the larger shards), which the peak and the fit are judged on."""

    setup: str
    exact: ExactParts
    optim: str = ""
    optim_args: str = ""
    lora: bool = False
    peak_bytes: dict = field(default_factory=dict)
    fits: dict = field(default_factory=dict)
    per_rank: list = field(default_factory=list)


@dataclass
class Plan:
    summary: ModelSummary
    options: PlanOptions
    activations: dict  # "off"/"on" -> ActivationEstimate
    rows: list
    gathered_bytes: int = 0  # on several GPUs: FSDP2's unsharded parameters and gradients (fsdp_gathered_bytes)
    skipped: list = field(default_factory=list)  # (set-up label, why it has no row)

    @property
    def usable_bytes(self) -> Optional[int]:
        """Device bytes left for tensors (``gpu_mem - reserve``), or None without a device size."""
        if self.options.gpu_mem is None:
            return None
        return self.options.gpu_mem - self.options.reserve


def make_plan(summary: ModelSummary, options: PlanOptions = PlanOptions(), setups: Optional[Sequence[Setup]] = None
              ) -> Plan:
    """Predicted peak = weights + grads + optimizer state + activations, per set-up and checkpointing mode.

    Summing the four is the usual conservative peak: in a real step the activations are mostly freed before the
    optimizer's temporaries appear, and the gradients fill up during backward. On several GPUs (FSDP2 full
    sharding) each rank's parts are counted, activations are those of the per-GPU batch, and the estimate of the
    layers FSDP2 gathers (:func:`fsdp_gathered_bytes`) is added; set-ups that do not run on FSDP2 shards are
    listed in ``skipped`` with the reason.
    """
    options.validate()
    gpus = options.gpus
    if setups is None:
        setups = default_setups(options.lora_rank, options.density, options.galore_rank)
    activations = {
        mode: estimate_activations(summary, options.batch, options.seq_len, checkpointing=mode == "on",
                                   attention=options.attention, bytes_per_activation=DTYPE_BYTES[options.act_dtype])
        for mode in options.ckpt_modes
    }
    gathered = fsdp_gathered_bytes(summary, DTYPE_BYTES[options.weights_dtype]) if gpus > 1 else 0
    plan = Plan(summary, options, activations, [], gathered)
    for setup in setups:
        if setup.chunked_loss and summary.model_type not in SUPPORTED_MODEL_TYPES:
            continue  # memopt.chunked_loss refuses this model type: no row for it
        try:
            ranks = exact_parts_per_rank(summary, setup, options.weights_dtype, gpus=gpus,
                                         lora_rank=options.lora_rank, lora_targets=options.lora_targets)
        except RefusedOnShards as exc:
            plan.skipped.append((setup.label, str(exc)))
            continue
        exact = max(ranks, key=lambda parts: parts.total)
        row = PlanRow(setup.label, exact, setup.optim, setup.optim_args, setup.lora or setup.qlora,
                      per_rank=ranks if gpus > 1 else [])
        for mode, act in activations.items():
            row.peak_bytes[mode] = exact.total + act.total_for(setup) + gathered
            if plan.usable_bytes is not None:
                row.fits[mode] = row.peak_bytes[mode] <= plan.usable_bytes
        plan.rows.append(row)
    return plan


from memopt.plan.report import format_plan, plan_json, plan_to_dict  # noqa: E402,F401  (report imports Plan)
