"""``marlin export-gguf CKPT OUT.gguf``: a metal_marlin Llama checkpoint as a GGUF file (exact layers only)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="write a Llama checkpoint as GGUF (int4 -> Q4_0/Q4_1, int5 -> "
                                           "Q5_0/Q5_1, symmetric int6 -> Q6_K/Q8_0, symmetric int8 -> Q8_0, groups "
                                           "of 32 or multiples; mxfp4 -> MXFP4; other layers refused with the reason "
                                           "unless --requantize)")
    p.add_argument("src", help="metal_marlin checkpoint directory")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--requantize", choices=("Q8_0",), default=None,
                   help="write layers no GGUF type holds exactly (e.g. affine int6) re-quantized to this type "
                        "from their dense weights; each such layer's error is printed")
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
    result = export_gguf(load_quantized(args.src), out, tokenizer=tokenizer, requantize=args.requantize)
    print(f"wrote {out.resolve()} (weights, hyper-parameters, {note})")
    print(result.summary())
    for name, r in result.layers.items():
        if not r.exact:
            print(f"  {name}: {r.source} -> {r.ggml_type}: relative RMS error {r.rel_rms_error:.5f}, "
                  f"max abs {r.max_abs_error:.4g}")
    return 0
