"""``marlin export-gguf CKPT OUT.gguf``: a metal_marlin Llama checkpoint as a GGUF file (exact layers only)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="write a Llama checkpoint as GGUF (int4 g32 -> Q4_0/Q4_1, symmetric "
                                           "int8 g32 -> Q8_0, mxfp4 -> MXFP4; other layers refused with the reason)")
    p.add_argument("src", help="metal_marlin checkpoint directory")
    p.add_argument("out", help="output .gguf file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import load_quantized  # noqa: PLC0415
    from ..io.export import export_gguf  # noqa: PLC0415

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"OUT: expected a file name, got the directory {out}")
    tokenizer, note = None, "no tokenizer in SRC"
    if any((Path(args.src) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer  # noqa: PLC0415

        tokenizer, note = AutoTokenizer.from_pretrained(args.src), "tokenizer"
    export_gguf(load_quantized(args.src), out, tokenizer=tokenizer)
    print(f"wrote {out.resolve()} (weights, hyper-parameters, {note})")
    return 0
