"""Build script: pure Python on every platform; nothing here imports torch.

pip's default build isolation installs only setuptools and wheel, so a build step that needs
torch cannot run here. The Metal extension is instead built at first use on macOS arm64 against
the torch that is running (metal_marlin_torch/build/, cached; `python -m metal_marlin_torch.build`
builds it ahead of time). For that, an installed (non-editable) package carries its C++/Objective-C++
and Metal sources: build_py copies csrc/ and shaders/ into metal_marlin_torch/_sources/ (an
editable install or a checkout uses the repository's own copies).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# What the first-use build (and the emulator) compiles; the Linux-only syntax stubs stay out.
SOURCE_DIRS = ("csrc", "shaders")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "syntax_stubs")


class BuildPyWithSources(build_py):
    """build_py, plus the kernel and host sources under metal_marlin_torch/_sources/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the package finds the repository's sources itself
            return
        dest = Path(self.build_lib) / "metal_marlin_torch" / "_sources"
        for d in SOURCE_DIRS:
            if (dest / d).exists():
                shutil.rmtree(dest / d)
            shutil.copytree(ROOT / d, dest / d, ignore=IGNORE)


setup(cmdclass={"build_py": BuildPyWithSources})
