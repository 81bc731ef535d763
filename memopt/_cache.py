"""The per-user cache directory memopt writes to: ``$MEMOPT_CACHE``, else ``~/.cache/memopt`` (the demo's converted
model, the fused CPU updates' compiled library)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MEMOPT_CACHE", Path.home() / ".cache" / "memopt"))
