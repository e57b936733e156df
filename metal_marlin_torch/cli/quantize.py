"""``marlin quantize SRC OUT``: quantize a local Hugging Face model into a checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from .. import formats as F
from ..io.checkpoint import DEFAULT_SHARD_BYTES
from ..nn.config import METHODS

MIN_SHARD_BYTES = 2**20


def shard_size(text: str) -> int:
    """``--max-shard-size``: bytes, or with a unit (``500MB``, ``2GB``, ``1GiB``); at least 1 MiB
    (smaller shards only multiply files)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise ValueError(f"--max-shard-size: expected bytes like 2000000000, 500MB or 2GiB, got {text!r}") from None
    if value < MIN_SHARD_BYTES:
        raise ValueError(f"--max-shard-size must be at least 1 MiB ({MIN_SHARD_BYTES} bytes), got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a local Hugging Face model directory")
    p.add_argument("src", help="model directory (config.json + safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--format", default="fp4", choices=sorted(F.FORMATS), help="weight format (default fp4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="group size: 32/64/128/256, -1 per-channel (default: 128, or the format's)")
    p.add_argument("--method", default="rtn", choices=METHODS, help="quantizer (default rtn)")
    p.add_argument("--bits", type=float, default=None, metavar="B",
                   help="bit budget: stored bits per weight of the quantized layers (e.g. 3.5); each layer's "
                        "format and group are chosen from measured sensitivity (needs calibration text, see "
                        "below; --format/--group-size are then ignored, --mixed rules pin their layers)")
    p.add_argument("--mixed", action="store_true",
                   help="mixed precision: attention and down_proj fp4, rest of the MLP nf3")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="module names to leave unquantized (repeatable; default lm_head and embeddings)")
    p.add_argument("--scales", default="fp16", choices=("fp16", "fp32"), help="scale dtype")
    p.add_argument("--max-shard-size", default=str(DEFAULT_SHARD_BYTES),
                   help="bytes per safetensors shard, e.g. 2000000000, 500MB or 2GiB; at least 1 MiB (in-memory "
                        "path; streaming keeps the source's sharding)")
    p.add_argument("--stream", dest="stream", action="store_true", default=None,
                   help="quantize shard by shard, never loading the model (default for sharded sources with "
                        "--method rtn); an interrupted run resumes when started again")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="load the whole model first")
    g = p.add_argument_group("GPTQ / MR-GPTQ (--method gptq | mr-gptq)")
    g.add_argument("--calibration", action="append", default=None, metavar="PATH",
                   help="calibration text: a file or a folder of text files (repeatable; default: a fixed "
                        "list of Python standard-library modules)")
    g.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    g.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--damp", type=float, default=0.01, help="relative Hessian damping (default 0.01)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false", help="keep the column order")
    g.add_argument("--no-scale-search", dest="scale_search", action="store_false",
                   help="use the format's plain absmax/min-max group parameters (faster, a little less accurate)")
    g.add_argument("--rotation-block", type=int, default=128,
                   help="mr-gptq: Hadamard block along K (default 128; cut to a power of two dividing K)")
    g.add_argument("--rotation-signs", action="store_true", help="mr-gptq: random +-1 signs before the rotation")
    g.add_argument("--device", default=None, help="compute device for GPTQ (cpu, cuda, mps; default: cuda if "
                   "available, else mps, else cpu)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for GPTQ on the CPU (default: the cores not already busy, from the load "
                        "average; OMP_NUM_THREADS, if set, is respected)")
    g.add_argument("--refine", nargs="?", const="block", default=None, choices=("block", "model"),
                   help="after the method, tune the scales and biases (codes fixed) against the dense model on the "
                        "calibration data (any --method; resumable): 'block' (the default of a bare --refine) "
                        "each block toward the dense block's output; 'model' all layers together toward the dense "
                        "model's next-token distribution (encoders: its last hidden state)")
    g.add_argument("--refine-steps", type=int, default=None, metavar="N",
                   help="--refine: Adam steps per block (default 64), or of the whole model (default 32)")
    g.add_argument("--autoround-steps", type=int, default=None, metavar="N",
                   help="--method autoround: signed-gradient steps of learned rounding per block (default 50)")
    g.add_argument("--autoround-init", default=None, choices=("gptq", "rtn"),
                   help="--method autoround: the codes it starts from (default gptq)")
    g.add_argument("--imatrix", action="store_true",
                   help="--method rtn: weight the scale search by the calibration inputs' importance "
                        "(diag X^T X, llama.cpp's imatrix); seconds, not minutes")
    g.add_argument("--rtn-search", action="store_true",
                   help="--method rtn: MSE-optimal group scales (the shrink search GPTQ uses); no calibration")
    g.add_argument("--work-dir", default=None,
                   help="folder for finished blocks: an interrupted GPTQ run resumes from it (default OUT.work)")
    p.set_defaults(func=run)


def gptq_options(args: argparse.Namespace) -> dict:
    """``QuantConfig.method_options`` from the GPTQ arguments."""
    opts = {"n_samples": args.calib_samples, "seq_len": args.calib_seq_len, "damp": args.damp,
            "act_order": args.act_order, "scale_search": args.scale_search}
    if args.method == "mr-gptq":
        opts.update(rotation_block=args.rotation_block, rotation_signs=args.rotation_signs)
    return opts


def default_device() -> str:
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def free_cores() -> int:
    """Cores not already busy: ``cpu_count - load average (1 min)``, rounded, at least 1."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        load = 0.0
    return max(1, round((os.cpu_count() or 1) - load))


def set_cpu_threads(threads: int | None) -> None:
    """torch's intra-op threads for a CPU GPTQ run: ``threads`` if given, else (unless
    ``OMP_NUM_THREADS`` is set) no more than :func:`free_cores`.

    Calibration forwards and the per-layer solve are many mid-sized ops, each a fork/join of
    the thread pool; a thread whose core is taken by another process stalls every join (measured
    on the shared 2-core test machine under load: a pylm-s forward cost 3.3 s of CPU on two
    threads against 1.8 s on one, and took twice the wall time)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
    elif os.environ.get("OMP_NUM_THREADS"):
        return
    else:
        threads = min(torch.get_num_threads(), free_cores())
    if threads != torch.get_num_threads():
        print(f"using {threads} CPU thread{'s' if threads > 1 else ''} (of {torch.get_num_threads()}; "
              f"--threads to choose)", file=sys.stderr)
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:

    from ..dtypes import DTypeConfig  # noqa: PLC0415
    from ..io import save_quantized  # noqa: PLC0415
    from ..io.atomic import check_output_dir  # noqa: PLC0415
    from ..io.hf import check_source, load_pretrained, tokenizer_files  # noqa: PLC0415
    from ..nn import DEFAULT_EXCLUDE, MIXED_4_3_RULES, QuantConfig, quantize_model  # noqa: PLC0415

    budget = args.bits is not None
    if args.method != "rtn" and (args.imatrix or args.rtn_search):
        raise ValueError(f"--imatrix and --rtn-search apply to --method rtn, got --method {args.method}")
    # calibration data: GPTQ, a budget's sensitivities, refinement, the importance matrix
    calibrated = args.method != "rtn" or budget or args.refine or args.imatrix
    options = gptq_options(args) if args.method != "rtn" else {}
    if args.method == "rtn" and calibrated:  # calibration windows of this length
        options = {"n_samples": args.calib_samples, "seq_len": args.calib_seq_len}
    if args.method == "rtn" and (args.imatrix or args.rtn_search or args.refine):
        options.update(scale_search=args.scale_search or args.rtn_search)
        if args.imatrix:
            options["imatrix"] = True
    if args.refine_steps is not None:
        if not args.refine:
            raise ValueError("--refine-steps needs --refine")
        options["refine_steps"] = args.refine_steps
    for key in ("autoround_steps", "autoround_init"):  # learned rounding (quant/autoround.py)
        if getattr(args, key) is not None:
            if args.method != "autoround":
                raise ValueError(f"--{key.replace('_', '-')} needs --method autoround, got --method {args.method}")
            options[key] = getattr(args, key)
    config = QuantConfig(
        format=args.format, group_size=args.group_size, method=args.method,
        exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE,
        rules=MIXED_4_3_RULES if args.mixed else (),
        dtype_config=DTypeConfig(scales=args.scales),
        method_options=options, bits_per_weight=args.bits,
        refine={"block": True, "model": "model"}.get(args.refine, False),  # a bare --refine: True, as before
    )
    # the cheap checks first: a bad path should not cost a quantization run
    max_shard_size = shard_size(args.max_shard_size)
    check_source(args.src, "SRC")
    check_output_dir(args.out, "OUT")
    if args.stream is None:
        from ..io.streaming import is_sharded  # noqa: PLC0415

        args.stream = not calibrated and is_sharded(args.src)
    if args.stream:
        if budget:
            raise ValueError("--stream quantizes shard by shard and cannot measure the sensitivities a --bits "
                             "budget needs; use --no-stream")
        if args.refine or args.imatrix or args.rtn_search:
            raise ValueError("--stream quantizes shard by shard with the formats' plain RTN: it cannot run --refine, "
                             "--imatrix or --rtn-search; use --no-stream")
        if args.method != "rtn":
            raise ValueError(f"--stream quantizes shard by shard and supports --method rtn only, got {args.method}")
        return run_streaming(args, config)
    # the checkpoint's own dtype: tensors that stay unquantized (embeddings, norms) keep their size
    model = load_pretrained(args.src)
    work_dir = args.work_dir or f"{Path(args.out)}.work"
    # skipped layers are listed below (print_skipped); quantize_model's own warnings would repeat them
    warnings.filterwarnings("ignore", message="metal_marlin_torch: leaving", category=UserWarning)
    try:
        if not calibrated:
            summary = quantize_model(model, config)
        else:
            from transformers import AutoTokenizer  # noqa: PLC0415

            tokenizer = AutoTokenizer.from_pretrained(args.src, local_files_only=True)
            device = args.device or default_device()
            threads = torch.get_num_threads()
            if str(device).startswith("cpu"):
                set_cpu_threads(args.threads)
            try:
                summary = quantize_model(model, config, calibration=args.calibration, tokenizer=tokenizer,
                                         device=device, work_dir=work_dir)
            finally:  # main() also runs in-process (tests, notebooks): leave torch as it was
                torch.set_num_threads(threads)
        print(summary)
        print_skipped(summary.skipped)
        extra = {"method": args.method, "config": config.to_dict()}
        if summary.budget is not None:  # the plan and achieved bits (layers also record their own setting)
            extra["budget"] = summary.budget.to_dict()
        out = save_quantized(model, args.out, max_shard_size=max_shard_size, extra_config=extra,
                             copy_files=tokenizer_files(args.src))
    except OSError as err:
        if not calibrated or not Path(work_dir).is_dir():
            raise
        from . import CommandError, describe  # noqa: PLC0415

        raise CommandError(f"{describe(err)[0]} (finished blocks are kept in {work_dir}: the same command "
                           f"resumes)") from err
    if calibrated and args.work_dir is None:
        import shutil  # noqa: PLC0415

        shutil.rmtree(f"{Path(args.out)}.work", ignore_errors=True)  # resume data, no longer needed
    print(f"wrote {Path(out).resolve()}")
    return 0


def print_skipped(skipped: dict[str, str]) -> None:
    """List the layers left unquantized, each with its reason (stderr: a warning)."""
    import sys  # noqa: PLC0415

    for name, reason in skipped.items():
        print(f"warning: {name} left unquantized: {reason}", file=sys.stderr)


def run_streaming(args: argparse.Namespace, config) -> int:
    """``marlin quantize --stream``: one shard in memory at a time (io/streaming.py)."""
    from ..io.streaming import quantize_checkpoint  # noqa: PLC0415

    try:
        summary = quantize_checkpoint(args.src, args.out, config)
    except OSError as err:
        from . import CommandError, describe  # noqa: PLC0415

        raise CommandError(f"{describe(err)[0]} (finished shards are kept in {args.out}: the same command "
                           f"resumes)") from err
    print(summary)
    print_skipped(summary.skipped)
    print(f"wrote {Path(args.out).resolve()}")
    return 0
