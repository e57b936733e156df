"""``marlin import-mlx SRC OUT``: an MLX-quantized model directory as a metal_marlin checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-mlx", help="convert an MLX-quantized model (mlx-community layout), keeping its codes")
    p.add_argument("src", help="MLX model directory (config.json with 'quantization', safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import save_quantized  # noqa: PLC0415
    from ..io.atomic import check_output_dir  # noqa: PLC0415
    from ..io.hf import tokenizer_files  # noqa: PLC0415
    from ..io.mlx_import import import_mlx  # noqa: PLC0415

    check_output_dir(args.out, "OUT")
    result = import_mlx(args.src)
    print(result)
    for name, info in result.layers.items():
        if info.note:
            print(f"  {name}: {info.note}")
    out = save_quantized(result.model, args.out, extra_config={"method": "import-mlx"},
                         copy_files=tokenizer_files(args.src))
    print(f"wrote {Path(out).resolve()}")
    return 0
