"""``marlin info PATH``: what a checkpoint holds."""

from __future__ import annotations

import argparse
from collections import Counter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a metal_marlin checkpoint, or the installed backends")
    p.add_argument("path", nargs="?", help="checkpoint directory (omit to print backend_info())")
    p.add_argument("--verify", action="store_true",
                   help="check every tensor against the sha256 recorded when the checkpoint was written")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.path is None:
        from ..backend import backend_info  # noqa: PLC0415

        for key, value in backend_info().items():
            print(f"{key}: {value}")
        return 0
    from ..io import read_config, read_tensors  # noqa: PLC0415
    from ..io.checkpoint import verify_checkpoint  # noqa: PLC0415

    config = read_config(args.path)
    q = config["quantization_config"]
    tensors = read_tensors(args.path, "cpu", layers=q.get("layers", {}))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    layers = q.get("layers", {})
    print(f"checkpoint: {args.path}")
    print(f"architecture: {', '.join(config.get('architectures') or ['?'])}")
    print(f"format_version: {q['format_version']}  method: {q.get('method', 'rtn')}")
    print(f"tensors: {len(tensors)}  bytes: {total:,} ({total / 2**20:.2f} MiB)")
    print(f"quantized layers: {len(layers)}")
    for (fmt, group), count in sorted(Counter((v['format'], v['group_size']) for v in layers.values()).items()):
        print(f"  {fmt:>9} group {group:>4}: {count} layers")
    rotated = sum(1 for v in layers.values() if v.get("rotation_block"))
    if rotated:
        print(f"  rotated (Hadamard) layers: {rotated}")
    if args.verify:
        problems = verify_checkpoint(args.path)
        for line in problems:
            print(f"  FAILED {line}")
        if problems:
            from . import CommandError  # noqa: PLC0415

            raise CommandError(f"{args.path}: {len(problems)} of {len(tensors)} tensors failed verification "
                               f"(first: {problems[0]})")
        print(f"verified: all {len(tensors)} tensors match their recorded sha256")
    return 0
