"""Integrations with the Hugging Face stack. Nothing here imports transformers until transformers is imported.

``import memopt`` calls :func:`install_transformers_hooks`: when transformers' own modules load (now or
later), memopt's optimizer names, Trainer handlers and memory-report callback are registered on them. Set
``MEMOPT_AUTO_REGISTER=0`` to opt out and call ``memopt.integrations.transformers.register()`` yourself, or use
the no-patch route ``optimizer_cls_and_kwargs``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Callable

from memopt._env import env_flag

_HOOKED_MODULES = ("transformers.training_args", "transformers.trainer_optimizer", "transformers.trainer")


def _run_hook(name: str, module) -> None:
    # Automatic registration must never break the user's `import transformers`: an unsupported version is
    # reported here, and the explicit `register()` raises the same error.
    try:
        from memopt.integrations import transformers as hf

        hf.patch_module(name, module)
    except Exception as exc:  # noqa: BLE001
        import warnings

        warnings.warn(f"memopt could not register its optimizers on {name}: {exc}", RuntimeWarning, stacklevel=2)


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, on_loaded: Callable):
        self._loader = loader
        self._on_loaded = on_loaded

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._on_loaded(module.__name__, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a hook right after one of transformers' modules has executed."""

    def __init__(self):
        self.pending = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, _run_hook)
        return spec


_finder = _PostImportFinder()


def install_transformers_hooks() -> None:
    """Register memopt on transformers' modules as they load (idempotent; no-op with MEMOPT_AUTO_REGISTER=0)."""
    if not env_flag("MEMOPT_AUTO_REGISTER", True):
        return
    for name in _HOOKED_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            _run_hook(name, module)
        else:
            _finder.pending.add(name)
    if _finder.pending and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def __getattr__(name: str):
    # ``memopt.integrations.transformers`` (and ``.trainer_callback``) load on first attribute access, so the
    # no-patch route works after a plain ``import memopt`` while ``import memopt`` itself stays transformers-free.
    if name in ("transformers", "trainer_callback", "checkpoints"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
