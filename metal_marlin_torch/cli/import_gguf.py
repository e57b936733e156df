"""``marlin import-gguf FILE OUT``: a GGUF model (llama.cpp) as a metal_marlin checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import formats as F


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-gguf",
                       help="convert a GGUF model: Q4_x/Q5_x/Q8_0/MXFP4, the K-quants (Q2_K-Q6_K), IQ1/IQ2/IQ3/IQ4 and "
                            "TQ1_0/TQ2_0 exactly (--compact: fewer bits, the error printed)")
    p.add_argument("src", help="the .gguf file")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--requantize", default=None, choices=sorted(F.FORMATS),
                   help="format for block types without an exact mapping "
                        "(default: int4 below 5 bits/weight, else int8)")
    p.add_argument("--group-size", type=int, default=32, help="group size of re-quantized tensors (default 32)")
    p.add_argument("--compact", action="store_true",
                   help="re-quantize the K-quants and IQ types (exact only with more bits per weight) to "
                        "--requantize instead, printing the added error per tensor")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import save_quantized  # noqa: PLC0415
    from ..io.atomic import check_output_dir  # noqa: PLC0415
    from ..io.gguf_import import import_gguf  # noqa: PLC0415

    check_output_dir(args.out, "OUT")
    model, result = import_gguf(args.src, requantize=args.requantize, group_size=args.group_size,
                                compact=args.compact)
    print(result.summary())
    if any(not r.exact for r in result.report.values()):
        print("re-quantized tensors (error relative to what the GGUF file means):")
        print(result.details())
    out = save_quantized(model, args.out, extra_config={"method": "import-gguf"})
    src = Path(args.src)
    try:
        from transformers import AutoTokenizer  # noqa: PLC0415

        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(out))
    except Exception as err:  # noqa: BLE001  (the weights are written; say why the tokenizer is not)
        print(f"note: no tokenizer written ({type(err).__name__}: {err})")
    print(f"wrote {Path(out).resolve()}")
    return 0
