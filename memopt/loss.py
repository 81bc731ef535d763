"""Chunked causal-LM loss: the training cross-entropy of a decoder-only model without the ``[tokens x vocab]`` logits.

For a small model the logits are the largest activation of a training step: SmolLM2-135M at batch 4 x 128 has
25.2M logits (a 49,152-token vocabulary), and transformers' loss holds them in bf16 and fp32, plus the fp32
log-softmax and its gradient -- about 460 MiB, more than the model's bf16 weights and 8-bit state together.
:func:`chunked_loss` makes the model's training forward compute the loss ``chunk_tokens`` positions at a time,
each chunk under activation checkpointing (its logits are recomputed in backward), so at most one chunk's
logits exist at any moment. The loss and every gradient are those of the model's own loss (same formula:
ignore_index, ``num_items_in_batch`` normalisation, ``shift_labels``; fp32 softmax), up to the summation order.
The cost is one extra head matmul per step (the recompute), as in fused linear-cross-entropy kernels.

Only the training forward changes (``model.training`` and labels given); evaluation and generation run the
model's own forward and return logits as usual. In training the output's ``logits`` is ``None``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from memopt.distributed import is_deepspeed_partitioned, is_dtensor

logger = logging.getLogger("memopt")

# CausalLM classes whose forward is exactly `logits = lm_head(decoder(...).last_hidden_state)` followed by
# transformers' ForCausalLMLoss (checked against each model's own loss by tests/test_loss.py). Models that
# post-process logits (gemma2/3 softcapping, cohere logit_scale, granite logits_scaling) are not in the list.
SUPPORTED_MODEL_TYPES = ("gemma", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3", "smollm3")

# auto chunk: this many logits per chunk (32 MiB in fp32), at least MIN_CHUNK_TOKENS positions
_AUTO_LOGITS_PER_CHUNK = 2**23
MIN_CHUNK_TOKENS = 16


def auto_chunk_tokens(vocab_size: int) -> int:
    """Default chunk length: ``2**23 // vocab_size`` positions (32 MiB of fp32 logits), at least 16."""
    return max(MIN_CHUNK_TOKENS, _AUTO_LOGITS_PER_CHUNK // int(vocab_size))


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    *,
    chunk_tokens: int,
    ignore_index: int = -100,
    num_items_in_batch: Union[None, int, torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets``, ``chunk_tokens`` positions at a time.

    Args:
        hidden: ``[..., hidden_size]`` activations fed to the head.
        head: the output projection (called as a module, so its hooks, LoRA adapters and quantized layers apply).
        targets: ``hidden.shape[:-1]`` token ids; ``ignore_index`` positions do not count.
        num_items_in_batch: divide the summed loss by this (transformers' gradient-accumulation normalisation);
            ``None``: the mean over counted positions (``nan`` when there are none, as ``F.cross_entropy``).

    Returns the scalar loss. Logits are computed in fp32 (``.float()`` of the head's output, as transformers).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden {tuple(hidden.shape[:-1])}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(flat.device)
    keep = t != ignore_index
    counted = int(keep.sum())
    if counted == 0:
        # nothing counts: a zero that still depends on the head and the hidden states, as the model's own loss
        # (backward gives zero gradients instead of failing; under DDP every parameter still gets one)
        total = head(flat[:1]).float().sum() * 0.0
    else:
        total = None
        # split, not slicing: one backward node gathers the chunks' hidden-state gradients at once
        for h_chunk, t_chunk in zip(flat[keep].split(chunk_tokens), t[keep].split(chunk_tokens)):
            part = checkpoint(_chunk_ce, h_chunk, t_chunk, head, use_reentrant=False)
            total = part if total is None else total + part
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / counted  # nan when nothing counts, as F.cross_entropy's mean


@dataclass(frozen=True)
class ChunkedLoss:
    """What :func:`chunked_loss` set up."""

    model_type: str
    vocab_size: int
    chunk_tokens: int

    def message(self) -> str:
        return (f"memopt: chunked loss on ({self.model_type}, vocab {self.vocab_size:,}): the training loss is "
                f"computed {self.chunk_tokens} positions at a time, at most "
                f"{self.chunk_tokens * self.vocab_size * 4 / 2**20:.1f} MiB of fp32 logits per chunk; "
                "outputs.logits is None in training")


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside ``model`` (a PEFT model is unwrapped)."""
    inner = model
    if hasattr(inner, "get_base_model") and callable(inner.get_base_model):
        inner = inner.get_base_model()
    return inner


def _refuse_sharded(lm: torch.nn.Module, head: torch.nn.Module) -> None:
    """FSDP2 / DeepSpeed ZeRO-3 gather a sharded head around the model's own calls only: refuse them (checked when
    enabled and at every training forward, since the model may be sharded after :func:`chunked_loss`)."""
    weight = getattr(head, "weight", None)
    fsdp = _fsdp_module_class()
    if (weight is not None and (is_dtensor(weight) or is_deepspeed_partitioned(weight))) or (
            fsdp is not None and any(isinstance(m, fsdp) for m in (lm, lm.model, head))):
        raise ValueError("chunked_loss: the model is sharded (FSDP2 / DeepSpeed ZeRO-3); calling its head chunk by "
                         "chunk outside the model's forward is not supported there: leave chunked_loss out")


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return None
    return FSDPModule


def chunked_loss(model: torch.nn.Module, chunk_tokens: Optional[int] = None) -> ChunkedLoss:
    """Make ``model``'s training forward compute its loss without materialising the logits (see module doc).

    Call it on the transformers CausalLM (or a PEFT model around one) before training; calling it again changes
    the chunk length. ``chunk_tokens=None``: :func:`auto_chunk_tokens` of the vocabulary. Undo with
    :func:`disable_chunked_loss`.

    Raises:
        ValueError: a model type not in ``SUPPORTED_MODEL_TYPES`` (its forward post-processes logits or is not
            checked), a custom ``loss_function``, a head that is not found, sharded (FSDP2 / DeepSpeed) head
            weights, or a bad ``chunk_tokens``.
    """
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"chunked_loss: model type {model_type!r} ({type(lm).__name__}) is not supported; "
                         f"supported: {SUPPORTED_MODEL_TYPES} (CausalLM models whose logits are the plain head "
                         "output and whose loss is transformers' ForCausalLMLoss)")
    from transformers.loss.loss_utils import LOSS_MAPPING

    if getattr(lm, "loss_function", None) is not LOSS_MAPPING["ForCausalLM"]:
        raise ValueError(f"chunked_loss: {type(lm).__name__} has a custom loss_function; only transformers' "
                         "ForCausalLMLoss is computed in chunks")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or not hasattr(lm, "model"):
        raise ValueError(f"chunked_loss: {type(lm).__name__} has no output embeddings / decoder (.model)")
    _refuse_sharded(lm, head)
    vocab = int(config.vocab_size)
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(vocab)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunked_loss: chunk_tokens must be a positive int, got {chunk_tokens!r}")

    current = lm.__dict__.get("forward")
    inner = current.inner if isinstance(current, _ChunkedForward) else current
    lm.forward = _ChunkedForward(lm, chunk_tokens, inner)
    info = ChunkedLoss(model_type, vocab, chunk_tokens)
    logger.warning(info.message())
    return info


class _ChunkedForward:
    """What :func:`chunked_loss` installs as ``model.forward``: an object, not a closure, so that a deep copy of the
    model (a reference model, an EMA copy) computes with the copy's weights and the model still pickles.

    ``inner``: a forward the instance already had (e.g. an accelerate wrapper), else None for the class's own.
    The head and the decoder are looked up at every call (a head replaced later, by PEFT or a vocabulary resize,
    is the one used).
    """

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int, inner=None):
        self.lm, self.chunk_tokens, self.inner = lm, chunk_tokens, inner
        self.warned = False

    def original(self):
        return self.inner if self.inner is not None else type(self.lm).forward.__get__(self.lm)

    @property
    def __signature__(self):  # the model's own: the Trainer reads it (kept columns, loss kwargs)
        return inspect.signature(self.original())

    def __call__(self, *args, **kwargs):
        lm, original = self.lm, self.original()
        if args:  # positional call (model(input_ids, ...)): the same call by keyword
            signature = inspect.signature(original)
            bound = signature.bind(*args, **kwargs)
            kwargs = {}
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    kwargs.update(value)
                else:
                    kwargs[name] = value
        labels = kwargs.get("labels")
        if not lm.training or not torch.is_grad_enabled():
            return original(**kwargs)
        if labels is None:
            if not self.warned:
                self.warned = True
                logger.warning("memopt: chunked_loss is on but a training forward came without labels: it computes "
                               "the full logits (the Trainer removes labels for label_smoothing_factor > 0 or a "
                               "compute_loss_func; generation in train mode does too)")
            return original(**kwargs)
        head = lm.get_output_embeddings()
        _refuse_sharded(lm, head)
        shift_labels = kwargs.get("shift_labels")
        kwargs.pop("labels", None)
        kwargs.pop("logits_to_keep", None)
        ignore_index = kwargs.get("ignore_index", -100)
        captured = {}

        def grab(module, inputs, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = lm.model.register_forward_hook(grab)
        try:
            # positions to keep: none -> the head runs on an empty [batch, 0, hidden] slice, no logits are made
            out = original(labels=None, logits_to_keep=torch.empty(0, dtype=torch.long), **kwargs)
        finally:
            handle.remove()
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        loss = chunked_cross_entropy(captured["hidden"], head, shift_labels, chunk_tokens=self.chunk_tokens,
                                     ignore_index=ignore_index, num_items_in_batch=kwargs.get("num_items_in_batch"))
        if isinstance(out, tuple):  # return_dict=False: (loss, *the rest); the empty logits are dropped
            return (loss, *out[1:])
        rest = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        return type(out)(loss=loss, logits=None, **rest)


def chunk_tokens_of(model: torch.nn.Module) -> Optional[int]:
    """The chunk length :func:`chunked_loss` set on ``model``, or None when it is not on."""
    forward = _causal_lm(model).__dict__.get("forward")
    return forward.chunk_tokens if isinstance(forward, _ChunkedForward) else None


def disable_chunked_loss(model: torch.nn.Module) -> None:
    """Restore the model's own forward (no-op when :func:`chunked_loss` was not applied)."""
    lm = _causal_lm(model)
    forward = lm.__dict__.get("forward")
    if isinstance(forward, _ChunkedForward):
        if forward.inner is None:
            del lm.__dict__["forward"]
        else:
            lm.forward = forward.inner


def parse_chunked_loss(value) -> Optional[int]:
    """``optim_args`` value of ``chunked_loss``: ``false`` -> None, ``true`` / ``auto`` -> 0 (auto), N -> N."""
    text = str(value).strip().lower()
    if text in ("false", "no", "off", ""):
        return None
    if text in ("true", "yes", "on", "auto"):
        return 0
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"optim_args key 'chunked_loss': {value!r} is not true, false, auto or a positive "
                         "number of tokens per chunk") from None
    if n < 1:
        raise ValueError(f"optim_args key 'chunked_loss': {value!r} must be a positive number of tokens")
    return n
