"""Build script: a compiled extension only on macOS arm64, pure Python everywhere else.

On macOS arm64 the Objective-C++ glue in ``csrc/metal`` plus the portable host code in
``csrc/ops`` are compiled into ``metal_marlin_torch._C``, which registers the Metal kernels
for MPS tensors under ``torch.ops.marlin``. On Linux (and any other platform) the package
is pure Python: the operators run through their pure-torch CPU/CUDA kernels.
"""

from __future__ import annotations

import platform
import sys

from setuptools import setup


def _macos_arm64() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _ext_modules():
    if not _macos_arm64():
        return [], {}
    from metal_build import metal_extension  # noqa: PLC0415  (only importable on macOS builds)

    return metal_extension()


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
