"""memopt's environment variables, read in one way: a value memopt does not know is warned about once (as a
``RuntimeWarning`` and a log line) and the default is used, since a plugin's environment variable must not break
every run that imports it (docs/reliability.md)."""

from __future__ import annotations

import logging
import os
import warnings

logger = logging.getLogger("memopt")

_warned: set = set()
_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def env_choice(name: str, choices: tuple, default: str) -> str:
    """``name``'s value (stripped, lower case; empty or unset: ``default``) when it is one of ``choices``, else
    ``default`` with a warning once per value."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower() or default
    if value in choices:
        return value
    if (name, raw) not in _warned:
        _warned.add((name, raw))
        message = f"{name}={raw!r} is not one of {choices}; using {default!r}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)
    return default


def env_flag(name: str, default: bool) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off (any case); anything else warns once and gives
    ``default``."""
    return _FLAGS[env_choice(name, tuple(_FLAGS), "1" if default else "0")]
