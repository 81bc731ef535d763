"""What the planner knows of a model: its parameters (shapes and roles), its linears, and its transformer shape,
read from a model on any device (the meta device included); LoRA adapters and 4-bit weights derived from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union


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
    # the meta-device model itself: memopt optimizers are built over its parameters to count their state
    model: Any = field(default=None, repr=False, compare=False)

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
        model=model,
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
