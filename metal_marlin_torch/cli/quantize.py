"""``marlin quantize SRC OUT``: quantize a local Hugging Face model into a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import formats as F


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a local Hugging Face model directory")
    p.add_argument("src", help="model directory (config.json + safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--format", default="fp4", choices=sorted(F.FORMATS), help="weight format (default fp4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="group size: 32/64/128/256, -1 per-channel (default: 128, or the format's)")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq", "mr-gptq"), help="quantizer (default rtn)")
    p.add_argument("--mixed", action="store_true",
                   help="mixed precision: attention and down_proj fp4, rest of the MLP nf3")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="module names to leave unquantized (repeatable; default lm_head and embeddings)")
    p.add_argument("--scales", default="fp16", choices=("fp16", "fp32"), help="scale dtype")
    p.add_argument("--max-shard-size", type=int, default=2 * 2**30,
                   help="bytes per safetensors shard (in-memory path; streaming keeps the source's sharding)")
    p.add_argument("--stream", dest="stream", action="store_true", default=None,
                   help="quantize shard by shard, never loading the model (default for sharded sources with "
                        "--method rtn); an interrupted run resumes when started again")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="load the whole model first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from ..dtypes import DTypeConfig  # noqa: PLC0415
    from ..io import save_quantized  # noqa: PLC0415
    from ..io.hf import copy_tokenizer, load_pretrained  # noqa: PLC0415
    from ..nn import DEFAULT_EXCLUDE, MIXED_4_3_RULES, QuantConfig, quantize_model  # noqa: PLC0415

    config = QuantConfig(
        format=args.format, group_size=args.group_size, method=args.method,
        exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE,
        rules=MIXED_4_3_RULES if args.mixed else (),
        dtype_config=DTypeConfig(scales=args.scales),
    )
    if args.stream is None:
        from ..io.streaming import is_sharded  # noqa: PLC0415

        args.stream = args.method == "rtn" and is_sharded(args.src)
    if args.stream:
        return run_streaming(args, config)
    # the checkpoint's own dtype: tensors that stay unquantized (embeddings, norms) keep their size
    model = load_pretrained(args.src)
    summary = quantize_model(model, config)
    print(summary)
    out = save_quantized(model, args.out, max_shard_size=args.max_shard_size,
                         extra_config={"method": args.method, "config": config.to_dict()})
    copy_tokenizer(args.src, out)
    print(f"wrote {Path(out).resolve()}")
    return 0


def run_streaming(args: argparse.Namespace, config) -> int:
    """``marlin quantize --stream``: one shard in memory at a time (io/streaming.py)."""
    from ..io.streaming import quantize_checkpoint  # noqa: PLC0415

    summary = quantize_checkpoint(args.src, args.out, config)
    print(summary)
    print(f"wrote {Path(args.out).resolve()}")
    return 0
