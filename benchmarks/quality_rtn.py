"""Round-to-nearest quality of every weight format at group 128 on pylm-s.

Evaluation text: the held-out standard-library files of ``pylm_eval_files.txt``, tokenized,
cut into consecutive 512-token windows, the first ``--tokens`` tokens (default 16384 = 32
windows). Reports perplexity, mean KL divergence vs the unquantized model, top-1 agreement and
stored bits (and bytes) per weight. Writes ``benchmarks/results/quality_rtn.{json,md}``.

    PYTHONPATH=. python3 benchmarks/quality_rtn.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_common import (  # noqa: E402
    RESULTS,
    eval_files,
    load_pylm,
    machine,
    md_table,
    models_dir,
    quantized_copy,
    write_json,
    write_text,
)

from metal_marlin_torch import QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch.quant.calibration import read_text, tokenize  # noqa: E402
from metal_marlin_torch.quant.metrics import causal_lm_logprobs, eval_windows, evaluate_causal_lm  # noqa: E402

FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "int4", "fp4", "nf4", "mxfp4", "nvfp4", "int3", "nf3", "int2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--tokens", type=int, default=16384, help="evaluation token budget")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--out", default=str(RESULTS / "quality_rtn"))
    args = ap.parse_args()
    md = models_dir(args.models_dir)
    tok, base = load_pylm(md)
    windows = eval_windows(tokenize(read_text(eval_files(md)), tok), args.seq_len, args.tokens)
    ref = causal_lm_logprobs(base, windows)
    ref_q = evaluate_causal_lm(base, windows)
    rows = [{"format": "bf16 (unquantized)", "group_size": None, "bits_per_weight": 16.0,
             "bytes_per_weight": 2.0, **ref_q.to_dict()}]
    print(f"reference: ppl {ref_q.perplexity:.4f} on {ref_q.tokens} predicted tokens")
    for fmt in args.formats:
        spec = F.get_format(fmt)
        g = args.group_size if args.group_size in spec.group_sizes else F.default_group_size(fmt)
        cfg = QuantConfig(format=fmt, group_size=g)
        model, qtime, bpw = quantized_copy(base, lambda m, cfg=cfg: quantize_model(m, cfg), windows[:1, :128])
        q = evaluate_causal_lm(model, windows, ref)
        rows.append({"format": fmt, "group_size": g, "bits_per_weight": bpw, "bytes_per_weight": bpw / 8,
                     "quantize_s": qtime, **q.to_dict()})
        print(f"{fmt:9s} g{g:<4d} bpw {bpw:.3f} ppl {q.perplexity:.4f} KL {q.kl_mean:.5f} top1 {q.top1_agreement:.4f}")
    out = Path(args.out)
    result = {"model": "pylm-s", "method": "rtn", "eval": {
        "text": "pylm_eval_files.txt (held-out stdlib files)", "seq_len": args.seq_len,
        "windows": int(windows.shape[0]), "predicted_tokens": ref_q.tokens},
        "machine": machine(), "rows": rows}
    write_json(out.with_suffix(".json"), result)
    table = md_table(
        ["format", "group", "bits/weight", "bytes/weight", "perplexity", "mean KL (nats)", "KL p99", "top-1 agree"],
        [[r["format"], r["group_size"], r["bits_per_weight"], r["bytes_per_weight"], r["perplexity"],
          r.get("kl_mean"), (r.get("kl_percentiles") or {}).get("p99"), r.get("top1_agreement")] for r in rows])
    head = (f"# RTN quality on pylm-s (group {args.group_size}; mxfp4 32, nvfp4 16)\n\n"
            f"Evaluation: {int(windows.shape[0])} windows x {args.seq_len} tokens of the held-out stdlib "
            f"files ({ref_q.tokens} predicted tokens), fp32 activations, CPU; evaluated with the "
            f"dequantized weights (checked equal to the MarlinLinear forward on one window). "
            f"Written by `benchmarks/quality_rtn.py`.\n\n")
    write_text(out.with_suffix(".md"), head + table)
    print(table)


if __name__ == "__main__":
    main()
