"""Build helpers for the macOS arm64 extension (filled in by the Metal foundation work)."""

from __future__ import annotations


def metal_extension():
    """Return ``(ext_modules, cmdclass)`` for ``metal_marlin_torch._C``.

    Raises until the Objective-C++ glue exists, so a macOS build never silently produces a
    package without its Metal kernels.
    """
    raise RuntimeError(
        "metal_marlin_torch: the Metal extension sources (csrc/metal) are not present in this tree"
    )
