"""``marlin eval MODEL``: quality of a (quantized) model against its unquantized original.

Causal LMs: perplexity on text files, and with ``--reference`` the mean / percentile KL
divergence of the next-token distributions and the top-1 agreement. Encoders
(``--sentences``): cosine between the model's and the reference's mean-pooled sentence
embeddings. MODEL is a metal_marlin checkpoint or a plain Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, KL divergence, top-1 agreement or embedding cosine of a model")
    p.add_argument("model", help="checkpoint or Hugging Face model directory")
    p.add_argument("--reference", default=None,
                   help="unquantized model directory to compare against (KL, top-1, cosine)")
    p.add_argument("--text", action="append", default=None, metavar="PATH",
                   help="evaluation text: a file or a folder (repeatable)")
    p.add_argument("--sentences", default=None, metavar="FILE",
                   help="encoder mode: one sentence per line; reports embedding cosine vs --reference")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation token budget (default 16384)")
    p.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run)


def load_any(path: str, device: str):
    """A metal_marlin checkpoint (config.json with quantization_config) or a plain HF model."""
    cfg = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    if cfg.get("quantization_config", {}).get("quant_method") == "metal_marlin":
        from ..io import load_quantized  # noqa: PLC0415

        return load_quantized(path, device=device)
    from ..io.hf import load_pretrained  # noqa: PLC0415

    return load_pretrained(path).to(device)


def _tokenizer(path: str | None):
    """The tokenizer saved in ``path``, or None when it has none."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    if path is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def load_tokenizer(reference: str | None, model: str):
    """The reference's tokenizer, else the model's; ValueError naming both when neither has one."""
    for path in (reference, model):
        tok = _tokenizer(path)
        if tok is not None:
            return tok
    where = f"--reference {reference} or MODEL {model}" if reference else f"MODEL {model}"
    raise ValueError(f"no tokenizer files (tokenizer.json, ...) in {where}")


def check_same_vocabulary(model, ref, args: argparse.Namespace) -> None:
    """ValueError when MODEL and ``--reference`` do not share a vocabulary (KL and top-1 compare
    distributions over the same token ids; embeddings need the same tokenization)."""
    def vocab(m) -> int | None:
        emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
        return None if emb is None else int(emb.weight.shape[0])

    a, b = vocab(model), vocab(ref)
    if a != b:
        raise ValueError(f"--reference {args.reference} has a vocabulary of {b} tokens, MODEL {args.model} one of "
                         f"{a}: they must be the same model's quantized and unquantized versions")
    mine, theirs = _tokenizer(args.model), _tokenizer(args.reference)
    if mine is not None and theirs is not None and mine.get_vocab() != theirs.get_vocab():
        raise ValueError(f"--reference {args.reference} has another tokenizer than MODEL {args.model} (same size, "
                         f"different tokens): they must be the same model's quantized and unquantized versions")


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from ..quant import metrics as M  # noqa: PLC0415
    from ..quant.calibration import read_text, text_files, tokenize  # noqa: PLC0415

    if (args.text is None) == (args.sentences is None):
        raise ValueError("marlin eval: give --text (causal LM) or --sentences (encoder), exactly one")
    if args.sentences is not None and args.reference is None:
        raise ValueError("marlin eval: --sentences needs --reference (cosine against the unquantized model)")
    from .generate import require_causal_lm  # noqa: PLC0415

    for path, flag in ((args.model, "MODEL"), (args.reference, "--reference")):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {path} is not a model directory: no config.json")
    model = load_any(args.model, args.device).float().eval()
    if args.text is not None:
        require_causal_lm(model, args.model, "eval --text (perplexity)")
    ref = load_any(args.reference, args.device).float().eval() if args.reference else None
    if ref is not None:
        check_same_vocabulary(model, ref, args)
    tok = load_tokenizer(args.reference, args.model)
    if args.sentences is not None:
        sentences = [s for s in Path(args.sentences).read_text().splitlines() if s.strip()]
        if not sentences:
            raise ValueError(f"marlin eval: {args.sentences} has no sentences")
        result = M.embedding_quality(M.sentence_embeddings(ref, tok, sentences),
                                     M.sentence_embeddings(model, tok, sentences))
        result["sentences"] = len(sentences)
    else:
        windows = M.eval_windows(tokenize(read_text(text_files(args.text)), tok), args.seq_len, args.tokens)
        with torch.no_grad():  # the reference runs batch by batch: memory does not grow with tokens x vocab
            result = M.evaluate_causal_lm(model, windows, batch_size=args.batch_size, ref_model=ref).to_dict()
    for key, value in result.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        from ..io.atomic import write_json  # noqa: PLC0415

        write_json(args.json, result)
    return 0
