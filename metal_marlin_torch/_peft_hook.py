"""Register the peft LoRA layer for :class:`MarlinLinear` when (and only when) peft is imported.

peft is optional and takes seconds to import, so ``import metal_marlin_torch`` never imports
it. If it is already imported, :func:`~.nn.lora.register` runs at once; otherwise a one-shot
finder on ``sys.meta_path`` lets the normal import of ``peft`` proceed and runs ``register``
right after peft's top-level module has executed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any


def _register() -> None:
    from .nn.lora import register  # noqa: PLC0415

    register()


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real spec of ``peft`` so its loader registers ours."""

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None):  # noqa: ANN201
        if name != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; the real finders locate peft below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, real_exec = spec.loader, spec.loader.exec_module

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):  # noqa: ANN001, ANN202
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                real_exec(module)
                _register()

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Register now if peft is imported, else once it is (idempotent)."""
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
