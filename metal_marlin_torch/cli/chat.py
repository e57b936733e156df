"""``marlin chat MODEL``: a conversation in the terminal, like ``mlx_lm.chat`` / ``llama-cli -cnv``.

Each line read from stdin is a user message; the whole conversation so far is formatted with the
tokenizer's chat template and the reply is streamed to stdout, then kept in the history. ``/reset``
starts over (the system message stays), ``/exit`` or end of input quits. The model is loaded as
``marlin generate`` loads it (pre-quantized checkpoint, or a Hugging Face folder quantized on the
fly), greedy unless ``--temperature`` > 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import formats as F
from .generate import (
    DTYPES,
    cast_dense,
    load_model,
    make_streamer,
    pick_device,
    pick_dtype,
    require_causal_lm,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (the tokenizer's chat template; "
                                    "/reset, /exit)")
    p.add_argument("model", help="metal_marlin checkpoint or Hugging Face model directory")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--format", default=None, choices=sorted(F.FORMATS),
                   help="quantize a Hugging Face model on the fly to this format (default fp4)")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--no-quantize", action="store_true", help="run a Hugging Face model unquantized")
    p.add_argument("--device", default="auto", help="auto (mps > cuda > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer in {args.model}: {err}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{args.model}: the tokenizer has no chat template (chat_template in tokenizer_config.json "
                         "or chat_template.jinja); use marlin generate to continue plain text")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, how = load_model(args)
    require_causal_lm(model, args.model, "chat")
    cast_dense(model, dtype)
    model = model.to(device).eval()
    print(f"[{how}; {device}; type a message, /reset to start over, /exit or end of input to quit]", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    kwargs: dict[str, Any] = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for line in sys.stdin:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history.clear()
            print("[conversation reset]", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        inputs = tokenizer.apply_chat_template(system + history, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(device)
        streamer = make_streamer(tokenizer)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                 pad_token_id=pad, **kwargs)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        sys.stdout.flush()
    return 0
