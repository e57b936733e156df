"""``marlin export-mlx CKPT OUT``: a metal_marlin checkpoint as an mlx-lm folder (exact layers only)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-mlx", help="write a checkpoint as an mlx-lm folder (affine int2/3/4/8 g32-128, "
                                          "mxfp4; other layers refused with the reason)")
    p.add_argument("src", help="metal_marlin checkpoint directory")
    p.add_argument("out", help="output folder (config.json, model.safetensors, tokenizer files)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import load_quantized  # noqa: PLC0415
    from ..io.atomic import check_output_dir  # noqa: PLC0415
    from ..io.export import export_mlx  # noqa: PLC0415

    check_output_dir(args.out, "OUT")
    out = export_mlx(load_quantized(args.src), args.out, source_dir=args.src)
    print(f"wrote {Path(out).resolve()}")
    return 0
