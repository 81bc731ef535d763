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
- optimizer state: torch AdamW, bitsandbytes AdamW 8-bit (as the Trainer builds it), memopt SGD-SaI (32-bit
  and 8-bit), FRUGAL and GaLore-style AdamW.

The activation part is an estimate (Korthikanti et al. 2022, arXiv 2205.05198; see
:func:`estimate_activations` and docs/plan.md). Nothing else (CUDA context, allocator fragmentation, the
optimizer step's temporaries) is modelled, except as the ``reserve`` subtracted from the device size.

Library only: functions return dataclasses; :func:`format_plan` is the one place that makes text.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

from memopt.loss import SUPPORTED_MODEL_TYPES, auto_chunk_tokens

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ACT_CKPT_MODES = ("off", "on", "both")
ATTENTION_KINDS = ("sdpa", "eager")
OPTIMIZERS = ("adamw", "bnb_adamw8bit", "sgdsai", "sgdsai_8bit", "frugal", "galore")

# bitsandbytes' and memopt's 8-bit layout: tensors under MIN_8BIT_SIZE elements keep fp32 state; the others hold
# uint8 codes + one fp32 absmax per BLOCKSIZE elements.
MIN_8BIT_SIZE = 4096
BLOCKSIZE = 256
# bitsandbytes keeps two 256-entry fp32 quantization maps (signed, unsigned), shared by every 8-bit tensor.
_BNB_QMAP_BYTES = 2 * 256 * 4
# torch AdamW (foreach / for-loop, not capturable): one fp32 ``step`` tensor per parameter tensor.
_TORCH_STEP_BYTES = 4

_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GiB = 2**30


# ------------------------------------------------------------------------------------------------ inputs
def parse_size(text: Union[str, int]) -> int:
    """Bytes in a size such as ``"24GB"`` (10^9), ``"24GiB"`` (2^30), ``"80 GB"``, ``"512MiB"`` or ``0``.

    A unit is required (``"24"`` is ambiguous between GB and GiB); ``0`` alone is accepted.

    Raises:
        ValueError: naming the string and the accepted forms.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([kmgt]i?b|b)?", s)
    if m is None or (m.group(2) is None and float(m.group(1)) != 0):
        raise ValueError(f"cannot read the size {text!r}: write a number and a unit, e.g. 24GB (10^9 bytes), "
                         "24GiB (2^30 bytes) or 512MiB")
    return int(round(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "b"]))


def load_config(source: str):
    """The transformers config of ``source``: a directory holding ``config.json`` (a model directory is fine:
    weights are never read), a path to a config JSON file, or a model name already in the local Hugging Face
    cache. Never downloads.

    Raises:
        ValueError: the path does not exist, holds no config, or the name is not cached (the message says what
            to pass instead).
    """
    from transformers import AutoConfig

    looks_like_path = os.sep in source or source.startswith(".") or source.endswith(".json")
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(f"{source!r} is a directory without config.json: pass the model directory that holds "
                             "config.json, or the path of the config file itself")
        return check_config(_read_config(AutoConfig, source))
    if os.path.isfile(source):
        return check_config(_read_config(AutoConfig, source))
    if looks_like_path and not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise ValueError(f"no such file or directory: {source!r} (pass a directory holding config.json, a config "
                         "JSON file, or a model name in the local Hugging Face cache)")
    try:
        return check_config(AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{source!r} is neither a local path nor a model in the local Hugging Face cache, and memopt plan never "
            "downloads. Pass a directory holding config.json or the config file (on a machine with network: "
            f"`hf download {source} config.json --local-dir DIR`, then `memopt plan DIR`). ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines and lines[-1].startswith(("ValueError", "TypeError")) else (
        lines[0] if lines else exc.__class__.__name__)


def _read_config(auto_config, path: str):
    # A config is data: code shipped beside it (auto_map) is never run, and nothing asks the user about it.
    try:
        return auto_config.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001  (transformers raises many kinds for a bad config; say it in one line)
        raise ValueError(f"cannot read a transformers config from {path!r}: {_first_line(exc)}") from None


# Sizes the planner multiplies: each must be a positive int when the config has it (layers may be 0 only in a
# text config nested in a multimodal one, which the planner does not special-case).
_POSITIVE_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                   "num_key_value_heads", "head_dim", "n_embd", "n_head", "n_layer", "d_model")


def check_config(config):
    """Refuse config values no model can have, with a one-line ``ValueError`` naming the field."""
    text = _text_config(config)
    for name in _POSITIVE_SIZES:
        value = getattr(text, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config field {name}={value!r} must be a positive integer")
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    if hidden and heads and not getattr(text, "head_dim", None) and hidden % heads:
        raise ValueError(f"config: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    kv = getattr(text, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ValueError(f"config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return config


def build_meta_model(config):
    """The model of ``config`` on the meta device (shapes only, no memory): a causal-LM head when transformers
    has one for this architecture, else the bare ``AutoModel``. Never runs code shipped with a config.

    Raises:
        ValueError: transformers cannot build a model from this config (the reason in one line).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            try:
                return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            except ValueError:
                return AutoModel.from_config(config, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot build a {type(config).__name__} model from this config: "
                             f"{_first_line(exc)}") from None


# ------------------------------------------------------------------------------------------------ model summary
@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor (a tied weight appears once).

    ``embedding``: the weight of an ``nn.Embedding`` (8-bit optimizers keep 32-bit state for it).
    ``input_embedding``: the input embedding, or the LM head tied to it (what frozen embeddings freeze).
    ``projectable``: selected by FRUGAL/GaLore's default targets (``memopt.targets.target_weights``).
    ``fp32``: always fp32 whatever the weights dtype (LoRA adapters, see :func:`lora_adapters`).
    """

    name: str
    shape: tuple
    embedding: bool = False
    input_embedding: bool = False
    projectable: bool = False
    fp32: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LinearInfo:
    """An ``nn.Linear`` module: where LoRA adapters can go. ``output``: the LM head (``all-linear`` skips it)."""

    name: str
    in_features: int
    out_features: int
    output: bool = False


@dataclass(frozen=True)
class ModelSummary:
    """What the planner needs from a model: its parameters, linears, buffers and transformer shape."""

    source: str
    architecture: str
    params: tuple
    linears: tuple
    buffer_numel: int
    hidden_size: Optional[int]
    num_layers: Optional[int]
    num_heads: Optional[int]
    vocab_size: Optional[int]
    tied_embeddings: bool
    intermediate_size: Optional[int] = None
    kv_hidden_size: Optional[int] = None  # num_key_value_heads * head_dim (GQA); hidden_size without GQA
    gated_mlp: bool = False  # Llama-style SwiGLU MLP (gate_proj / up_proj / down_proj) with RMSNorm
    model_type: Optional[str] = None  # config.model_type ("llama", ...)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first_attr(config, names: Sequence[str]) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def summarize_model(model, source: str = "") -> ModelSummary:
    """The :class:`ModelSummary` of a model on any device (meta included). Parameters that do not require grad
    are listed too: the planner decides what is trainable per set-up."""
    from torch import nn

    from memopt.targets import target_weights

    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_weight = getattr(inputs, "weight", None)
    tied = output is not None and input_weight is not None and output.weight is input_weight
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # the default targets only consider trainable weights
        p.requires_grad_(True)
    try:
        projectable = set(target_weights(model, None))
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    params = tuple(
        ParamInfo(name=name, shape=tuple(p.shape), embedding=id(p) in embedding_ids,
                  input_embedding=p is input_weight, projectable=id(p) in projectable)
        for name, p in model.named_parameters()  # shared (tied) parameters are yielded once
    )
    linears = tuple(
        LinearInfo(name=name, in_features=m.in_features, out_features=m.out_features, output=m is output)
        for name, m in model.named_modules() if isinstance(m, nn.Linear)
    )
    config = _text_config(getattr(model, "config", None))
    hidden = _first_attr(config, ("hidden_size", "n_embd", "d_model"))
    heads = _first_attr(config, ("num_attention_heads", "n_head", "num_heads"))
    kv_heads = _first_attr(config, ("num_key_value_heads",)) or heads
    head_dim = _first_attr(config, ("head_dim",)) or (hidden // heads if hidden and heads else None)
    leaf_names = {lin.name.rsplit(".", 1)[-1] for lin in linears}
    return ModelSummary(
        source=source,
        architecture=type(model).__name__,
        params=params,
        linears=linears,
        buffer_numel=sum(b.numel() for b in model.buffers()),
        hidden_size=hidden,
        num_layers=_first_attr(config, ("num_hidden_layers", "n_layer", "num_layers")),
        num_heads=heads,
        vocab_size=_first_attr(config, ("vocab_size",)),
        tied_embeddings=tied,
        intermediate_size=_first_attr(config, ("intermediate_size", "n_inner", "ffn_dim")),
        kv_hidden_size=kv_heads * head_dim if kv_heads and head_dim else None,
        gated_mlp={"gate_proj", "up_proj", "down_proj"} <= leaf_names,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
    )


def lora_adapters(summary: ModelSummary, rank: int, targets: Union[str, Sequence[str]] = ("q_proj", "v_proj")
                  ) -> tuple:
    """The LoRA adapter tensors peft would add: ``A`` (r × in) and ``B`` (out × r) per targeted ``nn.Linear``.

    ``targets``: ``"all-linear"`` (every linear but the LM head, peft's rule) or module names matched as peft
    matches a list (the full name, or a ``.``-separated suffix). Adapters are fp32: peft's default
    ``autocast_adapter_dtype=True`` upcasts them on bf16/fp16 base models.

    Raises:
        ValueError: ``rank`` < 1, or no linear matches (a typo must not plan an empty LoRA).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank={rank!r} must be a positive int")
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]

    def chosen(linear: LinearInfo) -> bool:
        if targets == "all-linear":
            return not linear.output
        return any(linear.name == t or linear.name.endswith("." + t) for t in targets)

    out = []
    for lin in summary.linears:
        if chosen(lin):
            out.append(ParamInfo(f"{lin.name}.lora_A", (rank, lin.in_features), fp32=True))
            out.append(ParamInfo(f"{lin.name}.lora_B", (lin.out_features, rank), fp32=True))
    if not out:
        raise ValueError(f"LoRA targets {targets!r} match no nn.Linear of {summary.architecture}; use module names "
                         "such as q_proj,v_proj or 'all-linear'")
    return tuple(out)


# ------------------------------------------------------------------------------------------------ state rules
def _elem_bytes(p: ParamInfo, weights_bytes: int) -> int:
    return 4 if p.fp32 else weights_bytes


# bitsandbytes' 4-bit layout (NF4, double quantisation): 4-bit codes packed two per byte; one block maximum per 64
# weights, itself quantised to uint8 in blocks of 256 maxima (one fp32 maximum each); per tensor, the 16-entry NF4
# map, the 256-entry map of the nested state (fp32) and one fp32 offset.
NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE = 64, 256
_NF4_PER_TENSOR_BYTES = 16 * 4 + 256 * 4 + 4


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight of ``numel`` elements stored by bitsandbytes as NF4 with double quantisation (the
    QLoRA recipe's ``BitsAndBytesConfig``), its quantisation state included (checked against bitsandbytes'
    objects in the tests)."""
    blocks = -(-numel // NF4_BLOCKSIZE)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NF4_NESTED_BLOCKSIZE) + _NF4_PER_TENSOR_BYTES


def quantized_4bit(summary: "ModelSummary") -> set:
    """Names of the weights a 4-bit load quantises: every ``nn.Linear`` weight except the LM head's (transformers
    keeps the output embedding in the weights dtype; a tied head is the input embedding, not a Linear weight)."""
    names = {p.name for p in summary.params}
    return {f"{lin.name}.weight" for lin in summary.linears if not lin.output and f"{lin.name}.weight" in names}


def _blockwise_8bit_bytes(numel: int, blocksize: int = BLOCKSIZE) -> int:
    """uint8 codes + one fp32 absmax per block."""
    return numel + 4 * -(-numel // blocksize)


def torch_adamw_state_bytes(params: Sequence[ParamInfo], weights_bytes: int) -> int:
    """``torch.optim.AdamW`` (foreach / for-loop): ``exp_avg`` + ``exp_avg_sq`` in the parameter dtype and a
    4-byte fp32 ``step`` tensor per tensor (the rule of ``memopt.adamw_state_bytes``)."""
    return sum(2 * p.numel * _elem_bytes(p, weights_bytes) + _TORCH_STEP_BYTES for p in params)


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


def sgdsai_state_bytes(params: Sequence[ParamInfo], weights_bytes: int, *, state_bits: int = 32,
                       state_dtype_bytes: Optional[int] = None, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """memopt ``SGDSaI`` (momentum ≠ 0): one momentum buffer per tensor.

    ``state_bits=32``: in ``state_dtype`` (default: the parameter's dtype, so bf16 weights get a bf16 buffer).
    ``state_bits=8``: uint8 codes + fp32 absmax per 256 elements for tensors of at least ``min_8bit_size``
    elements; smaller tensors and ``nn.Embedding`` weights (marked by ``memopt.keep_32bit_state``, as the
    Trainer integration does) keep an fp32 buffer. The g-SNR is a host float, not state.
    """
    total = 0
    for p in params:
        if state_bits == 8:
            eight = not p.embedding and p.numel >= min_8bit_size
            total += _blockwise_8bit_bytes(p.numel) if eight else 4 * p.numel
        else:
            total += p.numel * (state_dtype_bytes or _elem_bytes(p, weights_bytes))
    return total


def _projection_config(density: Optional[float], rank: Optional[int], selection: str):
    from memopt.functional.projection import ProjectionConfig

    return ProjectionConfig(selection=selection, density=density if rank is None else None, rank=rank)


def projection_state_bytes(params: Sequence[ParamInfo], *, density: Optional[float] = 0.25,
                           rank: Optional[int] = None, selection: str = "random", state_bits: int = 32,
                           inner: str = "adamw", min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """memopt ``FRUGAL`` / ``GaLoreAdamW`` with groups from ``memopt.targets.projection_groups`` (default targets).

    A projectable m×n weight holds the inner optimizer's moments in the subspace, fp32, ``projected_numel``
    elements each (r·max(m, n), r = round(ρ·min(m, n)) or ``rank`` clamped to min(m, n)), plus the basis
    (fp32 r·min(m, n)) or, for ``columns``/``rows``, int32 indices. Every other trainable tensor gets the inner
    optimizer on its whole gradient, fp32 moments whatever the parameter dtype. Two moments for ``inner="adamw"``,
    one for ``"sgdsai"``; ``step``/``iteration`` are host ints. With ``state_bits=8`` a moment of at least
    ``min_8bit_size`` elements of a non-embedding tensor with at least that many elements is blockwise 8-bit.
    """
    from memopt.functional.projection import _index_count, projected_numel, projection_rank

    moments = {"adamw": 2, "sgdsai": 1}[inner]
    config = _projection_config(density, rank, selection)
    total = 0
    for p in params:
        big = state_bits == 8 and not p.embedding and p.numel >= min_8bit_size
        if p.projectable and len(p.shape) == 2:
            k = projected_numel(p.shape, config)
            if selection in ("columns", "rows"):
                total += 4 * _index_count(p.shape[1 if selection == "columns" else 0], config)
            else:
                total += 4 * projection_rank(p.shape, config.rank, config.density) * min(p.shape)
        else:
            k = p.numel
        eight = big and k >= min_8bit_size
        total += moments * (_blockwise_8bit_bytes(k) if eight else 4 * k)
    return total


def state_bytes_for(optimizer: str, params: Sequence[ParamInfo], weights_bytes: int, *, density: float = 0.25,
                    galore_rank: int = 128) -> int:
    """Optimizer-state bytes of ``optimizer`` (one of :data:`OPTIMIZERS`) over the trainable ``params``."""
    if optimizer == "adamw":
        return torch_adamw_state_bytes(params, weights_bytes)
    if optimizer == "bnb_adamw8bit":
        return bnb_adamw8bit_state_bytes(params)
    if optimizer == "sgdsai":
        return sgdsai_state_bytes(params, weights_bytes)
    if optimizer == "sgdsai_8bit":
        return sgdsai_state_bytes(params, weights_bytes, state_bits=8)
    if optimizer == "frugal":
        return projection_state_bytes(params, density=density, selection="random")
    if optimizer == "galore":
        return projection_state_bytes(params, density=None, rank=galore_rank, selection="svd")
    raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")


# ------------------------------------------------------------------------------------------------ set-ups
@dataclass(frozen=True)
class Setup:
    """One way to train: an optimizer, optionally with gradient release, frozen input embeddings, the chunked
    loss (``memopt.chunked_loss``: one chunk of logits at a time) or LoRA."""

    label: str
    optimizer: str
    grad_release: bool = False
    freeze_embeddings: bool = False
    lora: bool = False
    chunked_loss: bool = False
    qlora: bool = False  # LoRA on a 4-bit (NF4) base: implies lora


def default_setups(lora_rank: int = 8, density: float = 0.25, galore_rank: int = 128) -> tuple:
    """The rows ``memopt plan`` prints, from the most to the least memory-hungry family."""
    return (
        Setup("AdamW (torch)", "adamw"),
        Setup("AdamW 8-bit (bnb, adamw_bnb_8bit)", "bnb_adamw8bit"),
        Setup("SGD-SaI", "sgdsai"),
        Setup("SGD-SaI 8-bit", "sgdsai_8bit"),
        Setup("SGD-SaI 8-bit + grad release", "sgdsai_8bit", grad_release=True),
        Setup("SGD-SaI 8-bit + grad release + frozen emb", "sgdsai_8bit", grad_release=True, freeze_embeddings=True),
        Setup("SGD-SaI 8-bit + release + frozen emb + chunked loss", "sgdsai_8bit", grad_release=True,
              freeze_embeddings=True, chunked_loss=True),
        Setup(f"FRUGAL rho={density:g} (AdamW inner)", "frugal"),
        Setup(f"GaLore-style AdamW r={galore_rank}", "galore"),
        Setup(f"LoRA r={lora_rank} + AdamW", "adamw", lora=True),
        Setup(f"LoRA r={lora_rank} + SGD-SaI", "sgdsai", lora=True),
        Setup(f"QLoRA r={lora_rank} (NF4) + AdamW", "adamw", lora=True, qlora=True),
        Setup(f"QLoRA r={lora_rank} (NF4) + SGD-SaI", "sgdsai", lora=True, qlora=True),
        Setup(f"QLoRA r={lora_rank} (NF4) + SGD-SaI 8-bit", "sgdsai_8bit", lora=True, qlora=True),
    )


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
    sizes = [(p.numel * _elem_bytes(p, weights_bytes), tied and p.input_embedding) for p in trainable]
    held = sum(size for size, tied in sizes if tied)
    others = [size for size, tied in sizes if not tied]
    return held + max(others, default=0) if held else max(others, default=0)


def exact_parts(summary: ModelSummary, setup: Setup, weights_dtype: str = "bf16", *, lora_rank: int = 8,
                lora_targets: Union[str, Sequence[str]] = ("q_proj", "v_proj"), density: float = 0.25,
                galore_rank: int = 128) -> ExactParts:
    """Weights, gradients and optimizer state of ``summary`` trained with ``setup``, counted exactly.

    Frozen embeddings: the input embedding (and a tied LM head, the same tensor) has no gradient and no state.
    Gradient release: one gradient alive at a time, the largest (plus a tied embedding's, see
    :func:`_released_grads_bytes`).
    """
    if weights_dtype not in DTYPE_BYTES:
        raise ValueError(f"weights_dtype={weights_dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    wb = DTYPE_BYTES[weights_dtype]
    base = list(summary.params)
    if setup.lora:
        adapters = lora_adapters(summary, lora_rank, lora_targets)
        trainable, params = list(adapters), base + list(adapters)
    else:
        trainable = [p for p in base if not (setup.freeze_embeddings and p.input_embedding)]
        params = base
    four_bit = quantized_4bit(summary) if setup.qlora else set()
    weights = sum(nf4_bytes(p.numel) if p.name in four_bit else p.numel * _elem_bytes(p, wb) for p in params) \
        + summary.buffer_numel * wb
    grads = _released_grads_bytes(trainable, wb, summary.tied_embeddings) if setup.grad_release else \
        sum(p.numel * _elem_bytes(p, wb) for p in trainable)
    state = state_bytes_for(setup.optimizer, trainable, wb, density=density, galore_rank=galore_rank)
    return ExactParts(sum(p.numel for p in trainable), weights, grads, state)


# ------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActivationEstimate:
    """Estimated activation bytes held for backward (an estimate, unlike :class:`ExactParts`).

    ``method``: ``"llama"`` (tensors a Llama-style layer saves, counted) or ``"korthikanti"`` (the paper's
    GPT formula, for other architectures)."""

    checkpointing: bool
    method: str
    layers_bytes: int
    logits_bytes: int

    chunk_logits_bytes: int = 0

    @property
    def total(self) -> int:
        return self.layers_bytes + self.logits_bytes

    def total_for(self, setup: "Setup") -> int:
        """Activations of a set-up: with the chunked loss only one chunk's logits are alive."""
        return self.layers_bytes + (self.chunk_logits_bytes if setup.chunked_loss else self.logits_bytes)


# Bytes per element of b·s·vocab alive at the loss's peak: transformers' ForCausalLMLoss upcasts the logits to
# fp32; during the backward of log-softmax its saved fp32 output, the incoming and the outgoing fp32 gradients
# coexist (the model-dtype logits are already freed: nothing saves them).
LOGITS_PEAK_BYTES = 12


def _rmsnorm_bytes(h: int, act: int) -> int:
    """Per token, one transformers ``*RMSNorm``: the fp32 input (saved by pow/mul), the normalised value cast
    back to the activation dtype (saved by the weight multiply) and the output (saved by the next linears)."""
    return 4 * h + 2 * act * h


def layer_bytes_per_token(summary: ModelSummary, seq_len: int, *, attention: str = "sdpa",
                          bytes_per_activation: int = 2) -> tuple[float, str]:
    """Activation bytes one decoder layer keeps per token for backward, and the method used.

    Llama-style layers (SwiGLU MLP, RMSNorm, RoPE: every config whose linears include gate/up/down_proj),
    counted the way Korthikanti et al. count GPT's, from the tensors autograd saves in transformers'
    implementation (a = bytes per activation, h hidden, h_kv = kv heads × head_dim, i intermediate):
    2 RMSNorms ``2·(4h + 2a·h)``; attention with SDPA/flash ``a·(3h + 2h_kv)`` (rotated q, k, v, the output,
    and its contiguous copy fed to o_proj); MLP ``4a·i`` (gate, SiLU, up, product). For bf16 Llama-2-7B this is
    47.5·h bytes (the paper's GPT constant is 34·h). Other architectures: the paper's ``34·h`` for 16-bit,
    scaled by a/2. Eager attention adds the paper's ``5·heads·s`` (scores, softmax, mask), scaled by a/2.
    """
    h, a, act = summary.hidden_size, summary.num_heads, bytes_per_activation
    eager = 5 * a * seq_len * act / 2 if attention == "eager" else 0
    if summary.gated_mlp and summary.intermediate_size and summary.kv_hidden_size:
        h_kv, i = summary.kv_hidden_size, summary.intermediate_size
        per_token = 2 * _rmsnorm_bytes(h, act) + act * (3 * h + 2 * h_kv) + 4 * act * i
        return per_token + eager, "llama"
    return 34 * h * act / 2 + eager, "korthikanti"


def estimate_activations(summary: ModelSummary, batch: int, seq_len: int, *, checkpointing: bool,
                         attention: str = "sdpa", bytes_per_activation: int = 2) -> ActivationEstimate:
    """Activation memory of a decoder stack after Korthikanti et al. 2022 (arXiv 2205.05198, §4), an estimate.

    Without recomputation: ``layers · s·b · per_layer`` (:func:`layer_bytes_per_token`: the paper's
    ``s·b·h·(34 + 5·a·s/h)`` for GPT-style layers, the same counting applied to Llama-style layers) plus the
    final norm. With full activation checkpointing each layer keeps only its input, ``a·s·b·h`` (the paper's
    ``2·s·b·h`` in 16-bit), and one layer's full activations are alive while it is recomputed. Logits:
    ``LOGITS_PEAK_BYTES · b·s·vocab`` (three fp32 copies at the loss backward). ``bytes_per_activation``: 2 for
    bf16/fp16 (or fp32 weights under autocast), 4 for plain fp32.

    Raises:
        ValueError: the config gives no hidden size / layer count / head count (not a transformer decoder).
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_KINDS}")
    h, n_layers, a = summary.hidden_size, summary.num_layers, summary.num_heads
    if not (h and n_layers and a):
        raise ValueError(f"{summary.architecture}'s config has no hidden_size / num_hidden_layers / "
                         "num_attention_heads: the activation estimate needs a transformer shape")
    tokens = batch * seq_len
    per_layer, method = layer_bytes_per_token(summary, seq_len, attention=attention,
                                              bytes_per_activation=bytes_per_activation)
    final_norm = _rmsnorm_bytes(h, bytes_per_activation) if method == "llama" else 0
    if checkpointing:
        per_token = n_layers * bytes_per_activation * h + per_layer + final_norm
    else:
        per_token = n_layers * per_layer + final_norm
    vocab = summary.vocab_size or 0
    logits = LOGITS_PEAK_BYTES * tokens * vocab
    chunk = LOGITS_PEAK_BYTES * min(tokens, auto_chunk_tokens(vocab)) * vocab if vocab else 0
    return ActivationEstimate(checkpointing, method, int(tokens * per_token), int(logits), int(chunk))


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

    def validate(self) -> None:
        for name in ("batch", "seq_len", "lora_rank", "galore_rank"):
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
    """One set-up: exact parts, and per checkpointing mode ("off"/"on") the predicted peak and whether it fits."""

    setup: str
    exact: ExactParts
    peak_bytes: dict = field(default_factory=dict)
    fits: dict = field(default_factory=dict)


@dataclass
class Plan:
    summary: ModelSummary
    options: PlanOptions
    activations: dict  # "off"/"on" -> ActivationEstimate
    rows: list

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
    optimizer's temporaries appear, and the gradients fill up during backward.
    """
    options.validate()
    if setups is None:
        setups = default_setups(options.lora_rank, options.density, options.galore_rank)
    activations = {
        mode: estimate_activations(summary, options.batch, options.seq_len, checkpointing=mode == "on",
                                   attention=options.attention, bytes_per_activation=DTYPE_BYTES[options.act_dtype])
        for mode in options.ckpt_modes
    }
    plan = Plan(summary, options, activations, [])
    for setup in setups:
        if setup.chunked_loss and summary.model_type not in SUPPORTED_MODEL_TYPES:
            continue  # memopt.chunked_loss refuses this model type: no row for it
        exact = exact_parts(summary, setup, options.weights_dtype, lora_rank=options.lora_rank,
                            lora_targets=options.lora_targets, density=options.density,
                            galore_rank=options.galore_rank)
        row = PlanRow(setup.label, exact)
        for mode, act in activations.items():
            row.peak_bytes[mode] = exact.total + act.total_for(setup)
            if plan.usable_bytes is not None:
                row.fits[mode] = row.peak_bytes[mode] <= plan.usable_bytes
        plan.rows.append(row)
    return plan


def plan_to_dict(plan: Plan) -> dict:
    """A JSON-ready dict of the plan (bytes as ints)."""
    summary = asdict(plan.summary)
    summary.pop("params")
    summary.pop("linears")
    summary["numel"] = plan.summary.numel
    return {
        "model": summary,
        "options": asdict(plan.options),
        "usable_bytes": plan.usable_bytes,
        "activations_estimate": {m: dict(asdict(a), total=a.total) for m, a in plan.activations.items()},
        "rows": [{"setup": r.setup, **asdict(r.exact), "exact_total_bytes": r.exact.total,
                  "peak_bytes": r.peak_bytes, "fits": r.fits} for r in plan.rows],
    }


def plan_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2)


# ------------------------------------------------------------------------------------------------ text
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
    if o.gpu_mem is not None:
        lines.append(f"device {_device(o.gpu_mem)} - reserve {_gib(o.reserve)} GiB (CUDA context, allocator) = "
                     f"{_gib(plan.usable_bytes)} GiB usable")
    for mode, act in plan.activations.items():
        lines.append(f"activations, checkpointing {mode}: {_gib(act.total)} GiB (layers {_gib(act.layers_bytes)} + "
                     f"logits {_gib(act.logits_bytes)}; chunked loss: {_gib(act.chunk_logits_bytes)}) ESTIMATE "
                     f"({act.method} count after Korthikanti et al. 2022)")
    headers = ["setup", "trainable", "weights", "grads", "state", "W+G+S"]
    for mode in o.ckpt_modes:
        headers.append(f"peak ckpt {mode}")
        if o.gpu_mem is not None:
            headers.append("fits (room)")
    body = []
    for r in plan.rows:
        e = r.exact
        cells = [r.setup, _params(e.trainable_params), _gib(e.weights_bytes), _gib(e.grads_bytes),
                 _gib(e.state_bytes), _gib(e.total)]
        for mode in o.ckpt_modes:
            cells.append(_gib(r.peak_bytes[mode]))
            if o.gpu_mem is not None:
                room = (plan.usable_bytes - r.peak_bytes[mode]) / GiB
                cells.append(f"{'yes' if r.fits[mode] else 'no'} ({room:+.2f})")
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def line(cells):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines += ["", line(headers), "-+-".join("-" * w for w in widths), *(line(b) for b in body), ""]
    lines.append("GiB. weights, grads, state: exact (meta model + each optimizer's state rules); peak = W+G+S + "
                 "the activation ESTIMATE; room = usable - peak.")
    if o.gpu_mem is not None:
        for mode in o.ckpt_modes:
            ok = [r.setup for r in plan.rows if r.fits[mode]]
            lines.append(f"fits in {_device(o.gpu_mem)} ({_gib(plan.usable_bytes)} GiB usable) with checkpointing {mode}: "
                         + ("; ".join(ok) if ok else "none"))
    return "\n".join(lines)
