"""``marlin build``: build the Metal extension now (same as ``python -m metal_marlin_torch.build``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build the Metal extension for the running torch (macOS arm64)")
    p.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import build  # noqa: PLC0415

    return build.run(args)
