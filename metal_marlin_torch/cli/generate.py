"""``marlin generate MODEL "prompt"``: stream a quantized model's continuation, then its speed and memory.

``MODEL`` is a metal_marlin checkpoint (loaded with ``load_quantized``) or a Hugging Face model
directory, quantized on the fly (``--format``, default fp4; ``--no-quantize`` runs it dense).
The text streams to stdout as it is generated; the statistics (prefill time, decode tokens/s,
process RSS, model bytes, device memory) go to stderr so that stdout stays the text alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from .. import formats as F

DTYPES = ("auto", "fp32", "fp16", "bf16")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a quantized model, streaming tokens")
    p.add_argument("model", help="metal_marlin checkpoint or Hugging Face model directory")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--format", default=None, choices=sorted(F.FORMATS),
                   help="quantize a Hugging Face model on the fly to this format (default fp4)")
    p.add_argument("--group-size", type=int, default=None, help="group size for --format (default: the format's)")
    p.add_argument("--no-quantize", action="store_true", help="run a Hugging Face model unquantized (reference)")
    p.add_argument("--device", default="auto", help="auto (mps > cuda > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="activation dtype of the dense layers (auto: fp16 on mps, bf16 on cuda, fp32 on cpu)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    # sampling filters, chat template and KV cache (issue 23)
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (with --temperature)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min-p times the top token's probability (with --temperature)")
    p.add_argument("--chat", action="store_true",
                   help="PROMPT is a user message: format it with the tokenizer's chat template; print the reply")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--kv-cache", default="dynamic", choices=KV_CACHES,
                   help="KV cache storage: dynamic (transformers' own, default), bf16, fp16, fp8, or turboquantB "
                        "(B-bit rotated codebook, B in 4/5/6/8)")
    p.add_argument("--draft", default=None, metavar="DRAFT_MODEL",
                   help="speculative decoding: a smaller model (checkpoint or Hugging Face folder, quantized like "
                        "MODEL when it is not pre-quantized) proposes tokens that MODEL verifies "
                        "(transformers' generate(assistant_model=...)); greedy output is unchanged")
    p.set_defaults(func=run)


KV_CACHES = ("dynamic", "bf16", "fp16", "fp8", "turboquant4", "turboquant5", "turboquant6", "turboquant8")


def chat_inputs(tokenizer, prompt: str, system: str | None, device):
    """``input_ids``/``attention_mask`` of ``prompt`` as a user turn under the tokenizer's chat
    template, with the assistant's generation prompt; ValueError when there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the tokenizer has no chat template (chat_template in tokenizer_config.json "
                         "or chat_template.jinja); run without --chat to continue plain text")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to(device)


def kv_cache(model, name: str):
    """The ``past_key_values`` for ``--kv-cache name`` (None: transformers' default cache)."""
    if name == "dynamic":
        return None
    from ..kv.cache import make_cache  # noqa: PLC0415

    if name.startswith("turboquant"):
        return make_cache(model.config, method="turboquant", bits=int(name[len("turboquant"):]))
    return make_cache(model.config, method=name)


def pick_device(name: str = "auto"):
    """``auto``: MPS if available, else CUDA, else CPU; otherwise the named device (checked)."""
    import torch  # noqa: PLC0415

    if name == "auto":
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda[:N] or mps, got {name!r}") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda[:N] or mps, got {name!r}")
    return device


def pick_dtype(name: str, device):
    import torch  # noqa: PLC0415

    if name == "auto":
        return {"mps": torch.float16, "cuda": torch.bfloat16}.get(device.type, torch.float32)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cast_dense(model, dtype) -> None:
    """Cast the floating parameters of every layer except :class:`MarlinLinear` to ``dtype``.

    ``model.to(dtype)`` would also cast the quantized layers' scales (whose dtype is part of
    the checkpoint format) and the rotary ``inv_freq`` buffers (kept in fp32 on purpose).
    """
    from ..nn import MarlinLinear  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, MarlinLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def is_marlin_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "metal_marlin"


def load_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The model (on CPU) and a line saying how it was obtained."""
    import torch  # noqa: PLC0415

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    if is_marlin_checkpoint(path):
        if args.format or args.no_quantize:
            raise ValueError(f"{path} is already quantized; --format/--no-quantize apply to Hugging Face models")
        from ..io import load_quantized  # noqa: PLC0415

        return load_quantized(path), "pre-quantized checkpoint"
    from ..io.hf import load_pretrained  # noqa: PLC0415

    model = load_pretrained(path, dtype=torch.float32)
    if args.no_quantize:
        return model, "unquantized"
    from ..nn import QuantConfig, quantize_model  # noqa: PLC0415

    summary = quantize_model(model, QuantConfig(format=args.format or "fp4", group_size=args.group_size))
    return model, f"quantized on the fly: {summary}"


def load_draft(args: argparse.Namespace, device, dtype):
    """The ``--draft`` model on ``device``: loaded like MODEL (same --format/--group-size/
    --no-quantize when it is a Hugging Face folder); it must share MODEL's tokenizer vocabulary,
    which transformers' assisted generation checks itself."""
    import copy  # noqa: PLC0415

    draft_args = copy.copy(args)
    draft_args.model = args.draft
    if is_marlin_checkpoint(Path(args.draft)):
        draft_args.format, draft_args.no_quantize = None, False
    draft, how = load_model(draft_args)
    require_causal_lm(draft, args.draft, "generate --draft")
    cast_dense(draft, dtype)
    print(f"[draft {args.draft}: {how}]", file=sys.stderr)
    return draft.to(device).eval()


def require_causal_lm(model, path: str, command: str) -> None:
    """ValueError unless ``model`` generates text (a causal LM), naming what it is instead."""
    can = getattr(model, "can_generate", None)
    if not (callable(can) and can()):
        kind = "an encoder" if not getattr(getattr(model, "config", None), "is_decoder", False) else "not a causal LM"
        raise ValueError(f"MODEL {path} is a {type(model).__name__} ({kind}), not a causal language model; "
                         f"{command} needs one (for an encoder use marlin eval --sentences)")


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[tuple[str, int], int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def rss_bytes() -> tuple[int | None, int]:
    """(current RSS or None where /proc is absent, peak RSS) of this process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize(), peak
    except (OSError, ValueError, IndexError):
        return None, peak


def device_memory(device) -> str:
    import torch  # noqa: PLC0415

    if device.type == "cuda":
        return f", CUDA peak allocated {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB"
    if device.type == "mps":
        return f", MPS allocated {torch.mps.current_allocated_memory() / 2**20:.1f} MiB"
    return ""


def make_streamer(tokenizer):
    """A transformers ``TextStreamer`` to stdout that also records when each new token arrived."""
    from transformers import TextStreamer  # noqa: PLC0415

    class TimedStreamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True)
            self.times: list[float] = []
            self.start = time.perf_counter()

        def put(self, value) -> None:
            if not self.next_tokens_are_prompt:
                self.times.extend([time.perf_counter()] * value.numel())
            super().put(value)

    return TimedStreamer()


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    if not args.prompt.strip():
        raise ValueError("PROMPT is empty: give the text to continue, e.g. marlin generate MODEL \"def main():\"")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise ValueError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.draft is not None and args.kv_cache != "dynamic":
        raise ValueError(f"--draft runs with transformers' own KV cache; drop --kv-cache {args.kv_cache}")
    if (args.top_k is not None or args.min_p is not None) and args.temperature == 0:
        raise ValueError("--top-k/--min-p filter sampling: give --temperature > 0 (the default 0 is greedy)")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer in {args.model}: {err}") from None
    t0 = time.perf_counter()
    model, how = load_model(args)
    require_causal_lm(model, args.model, "generate")
    cast_dense(model, dtype)
    model = model.to(device).eval()
    load_s = time.perf_counter() - t0
    print(f"[{how}; {device}, {str(dtype).replace('torch.', '')}; loaded in {load_s:.1f} s]", file=sys.stderr)

    if args.chat:
        inputs = chat_inputs(tokenizer, args.prompt, args.system, device)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sample = args.temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample}
    if sample:
        torch.manual_seed(args.seed)
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
        kwargs.update({k: v for k, v in (("top_k", args.top_k), ("min_p", args.min_p)) if v is not None})
    if args.draft is not None:
        kwargs["assistant_model"] = load_draft(args, device, dtype)
    cache = kv_cache(model, args.kv_cache)
    if cache is not None:
        kwargs["cache"] = cache  # transformers 5.x: the past_key_values argument is deprecated
    streamer = make_streamer(tokenizer)
    if not args.chat:  # chat mode prints the reply alone
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **kwargs)
    n_new = out.shape[-1] - inputs["input_ids"].shape[-1]
    times = streamer.times
    prefill = times[0] - streamer.start if times else float("nan")
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    rss, peak = rss_bytes()
    rss_text = f"RSS {rss / 2**20:.1f} MiB, " if rss is not None else ""
    print(f"[{n_new} tokens; prompt {inputs['input_ids'].shape[-1]} tokens, first token after {prefill:.3f} s; "
          f"decode {decode:.2f} tokens/s]", file=sys.stderr)
    print(f"[memory: {rss_text}peak RSS {peak / 2**20:.1f} MiB, model {model_bytes(model) / 2**20:.2f} MiB"
          f"{device_memory(device)}]", file=sys.stderr)
    return 0
