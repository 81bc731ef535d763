"""Activation memory: an estimate (Korthikanti et al. 2022, arXiv 2205.05198; docs/plan.md)."""

from __future__ import annotations

from dataclasses import dataclass

from memopt.loss import auto_chunk_tokens
from memopt.plan.model import ModelSummary

ATTENTION_KINDS = ("sdpa", "eager")

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

    def total_for(self, setup) -> int:
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


def fsdp_gathered_bytes(summary: ModelSummary, weights_bytes: int) -> int:
    """ESTIMATE of what FSDP2 full sharding (``fully_shard`` on each decoder layer and on the model, as
    examples/accelerate/fsdp2.yaml wraps it) holds unsharded on each rank at the peak of backward, beyond the
    rank's own shards: the root unit's parameters (embeddings, final norm, LM head: FSDP2 keeps the root gathered
    from the start of forward to the end of backward), two decoder layers' parameters (the one computing and the
    one prefetched) and one layer's unsharded gradients before their reduce-scatter. Parameters belong to a layer
    when their name holds a numeric module index (``model.layers.3.``); the root is every other parameter."""
    import re

    layers: dict = {}
    root = 0
    for p in summary.params:
        size = p.numel * (4 if p.fp32 else weights_bytes)
        index = re.search(r"\.(\d+)\.", p.name)
        if index is None:
            root += size
        else:
            layers[index.group(1)] = layers.get(index.group(1), 0) + size
    largest = max(layers.values(), default=0)
    return root + 3 * largest
