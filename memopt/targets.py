"""Which weights projection methods act on, with the Trainer's ``optim_target_modules`` semantics.

- ``None``: the attention and MLP linears (module names ending in the usual projection names).
- ``"all-linear"``: every ``nn.Linear`` except the output (LM-head) layer.
- a string: a regex that must match the whole module name (``re.fullmatch``).
- a list: entries matching the name exactly, as a substring, or as a full-match regex.
Only ``nn.Linear`` weights (2-D) are ever selected; biases and 1-D parameters never are.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Union

from torch import nn

logger = logging.getLogger("memopt")

DEFAULT_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "query", "key",
                        "value", "fc1", "fc2", "c_attn", "c_proj", "c_fc", "w1", "w2", "w3")


def module_matches(name: str, targets: Union[None, str, list]) -> bool:
    if targets is None:
        return name.rsplit(".", 1)[-1] in DEFAULT_LINEAR_NAMES
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(t in name for t in targets) or any(re.fullmatch(t, name) for t in targets)


def target_weights(model: nn.Module, targets: Union[None, str, list] = None, *,
                   include_output: bool = False) -> dict[int, str]:
    """``{id(weight): parameter name}`` of the selected ``nn.Linear`` weights that require grad. The output
    (LM-head) layer is excluded unless ``include_output`` and it is not tied to the input embedding."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if include_output and output is not None:
        inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if inputs is None or output.weight is not inputs.weight:
            output = None
    selected: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output and module.weight.requires_grad \
                and module_matches(name, targets):
            selected[id(module.weight)] = f"{name}.weight" if name else "weight"
    return selected


def projection_groups(model: nn.Module, targets: Union[None, str, list], weight_decay: float,
                      decay_names: Optional[set] = None, *, include_output: bool = False) -> list[dict]:
    """Parameter groups for a projection method: projectable weights (``project=True``) and the rest, each
    split into decay / no-decay as the Trainer would (``decay_names``; default: every 2-D parameter decays).

    Raises:
        ValueError: when the selection matches no weight (a typo in ``optim_target_modules`` must not
            silently turn the method into plain AdamW).
    """
    chosen = target_weights(model, targets, include_output=include_output)
    if not chosen:
        if hasattr(model, "peft_config"):
            # LoRA adapters are already rank-r: projecting an 8 x 576 matrix saves nothing. Documented behaviour:
            # every trainable parameter gets the method's unprojected inner optimizer.
            logger.warning("memopt: no trainable nn.Linear matches optim_target_modules=%r in this PEFT model; "
                           "the adapters get the unprojected inner optimizer", targets)
        else:
            raise ValueError(f"optim_target_modules={targets!r} selects no nn.Linear weight of this model")
    groups = {(proj, decay): [] for proj in (True, False) for decay in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = name in decay_names if decay_names is not None else p.dim() >= 2
        groups[(id(p) in chosen, decay)].append(p)
    return [{"params": ps, "project": proj, "weight_decay": weight_decay if decay else 0.0}
            for (proj, decay), ps in groups.items() if ps]
