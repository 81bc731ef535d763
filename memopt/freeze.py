"""Embedding freezing (docs/lean.md; Kumar et al. 2022, "How to fine-tune vision models with SGD", arXiv 2211.09359).

SGD-type optimizers trail AdamW in fine-tuning when the input embedding (token embedding, ViT patch embedding:
< 1% of the parameters here, 21% of SmolLM2-135M because of its 49k vocabulary) has much larger gradients than
the rest. Freezing it removes that gap and its gradient and optimizer state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("memopt")

FREEZE_MODES = ("true", "false", "untie")


@dataclass
class FrozenEmbeddings:
    """What :func:`freeze_embeddings` did."""

    names: list[str] = field(default_factory=list)  # parameter names frozen
    frozen_params: int = 0  # elements frozen
    tied_head: str = "none"  # "none" (no tied head), "frozen" (tied to the embedding, frozen with it), "untied"
    untied_params: int = 0  # elements of the new, trainable LM head (untie=True)


def _input_embedding_module(model: torch.nn.Module) -> torch.nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    module = None
    if callable(getter):
        try:
            module = getter()
        except NotImplementedError:
            module = None
    if module is None:
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        if len(embeddings) != 1:
            raise ValueError(
                f"freeze_embeddings: the model has no get_input_embeddings() and {len(embeddings)} nn.Embedding "
                "modules; freeze the input embedding yourself (param.requires_grad_(False))"
            )
        module = embeddings[0]
    return module


def _tied_head(model: torch.nn.Module, embedding: torch.nn.Module):
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(embedding, "weight", None)
    if head is not None and weight is not None and getattr(head, "weight", None) is weight:
        return head
    return None


def freeze_embeddings(model: torch.nn.Module, *, untie: bool = False) -> FrozenEmbeddings:
    """Freeze the input embedding of ``model`` (``requires_grad=False``): no gradient, no optimizer state.

    The input embedding is ``model.get_input_embeddings()`` (token embeddings; ViT-style patch embeddings, conv
    included), or the single ``nn.Embedding`` of a plain module. Every parameter of that module is frozen. Call
    it before the optimizer is built (the Trainer route, ``optim_args="freeze_embeddings=true"``, does).

    Tied LM head (``lm_head.weight is embed_tokens.weight``): it is the same tensor, so by default it is frozen
    too, and the log says so. ``untie=True`` instead gives the head its own trainable copy of the weight (more
    memory: the head's weights, gradient and state) and sets ``config.tie_word_embeddings = False`` so a saved
    model reloads untied. For a PEFT model the wrapped base model is used.

    Returns:
        a :class:`FrozenEmbeddings` report (names, number of frozen elements, what happened to a tied head).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = _input_embedding_module(base)
    report = FrozenEmbeddings()
    head = _tied_head(base, embedding)
    if head is not None and untie:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        config = getattr(base, "config", None)
        if config is not None:
            config.tie_word_embeddings = False
            text_config = getattr(config, "get_text_config", lambda: None)()
            if text_config is not None and text_config is not config:
                text_config.tie_word_embeddings = False
        report.tied_head, report.untied_params = "untied", head.weight.numel()
    elif head is not None:
        report.tied_head = "frozen"
    names = {id(p): n for n, p in model.named_parameters()}
    for p in embedding.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            report.names.append(names.get(id(p), "?"))
            report.frozen_params += p.numel()
    message = {
        "none": "",
        "frozen": " The LM head is tied to it and is frozen too (memopt.freeze_embeddings(model, untie=True) "
                  "keeps a trainable head).",
        "untied": f" The tied LM head was untied: a trainable copy of {report.untied_params:,} elements.",
    }[report.tied_head]
    logger.warning("memopt: froze the input embedding (%s): %s parameters, no gradient or optimizer state.%s",
                   ", ".join(report.names) or "already frozen", f"{report.frozen_params:,}", message)
    return report


def parse_freeze_mode(value) -> str:
    """``optim_args`` value of ``freeze_embeddings`` -> one of ``FREEZE_MODES``."""
    text = str(value).strip().lower()
    text = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}.get(text, text)
    if text not in FREEZE_MODES:
        raise ValueError(f"optim_args key 'freeze_embeddings': {value!r} is not one of {FREEZE_MODES}")
    return text
