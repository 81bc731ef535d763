"""The planner's inputs: sizes (``24GB``), transformers configs read as data, and the model on the meta device."""

from __future__ import annotations

import os
import re
from typing import Union

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GiB = 2**30


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
    from memopt.plan.model import _text_config

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
