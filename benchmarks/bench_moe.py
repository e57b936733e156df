"""One mixture-of-experts block: tokens/s of the quantized block against the dense bf16 block and
the pure-torch oracle, plus the emulator's traffic counters of the decode kernel (issue 21 item 5).

    python benchmarks/bench_moe.py --device cpu --json benchmarks/results/bench_moe_cpu.json

Shapes default to one Qwen3-30B-A3B MoE block: 128 experts, top-8, hidden 2048, expert
intermediate 768 (transformers' own ``Qwen3MoeSparseMoeBlock``, random weights). Rows:

- ``dense bf16``: the transformers block in bf16 (its router, its per-expert loop);
- ``marlin``: the same block after ``quantize_model`` (``MarlinRouter`` -> ``marlin.moe_route``,
  ``MarlinExperts`` -> ``marlin.moe_gemm`` + ``marlin.silu_mul``): Metal kernels on MPS, the
  pure-torch kernels on CPU/CUDA;
- ``oracle``: the same quantized tensors through the pure-torch kernels called directly (the
  Python functions in ``ops/moe.py`` / ``ops/moe_route.py``, whatever the device). On CPU it
  runs the same code as ``marlin`` (the CPU kernel *is* the oracle): there the pair measures
  the module's overhead, not a kernel.

Decode = ``--decode-tokens`` tokens (default 1), prefill = ``--prefill-tokens`` (512). Each
round times every method once in turn; medians over rounds, ratios from the same rounds.
``--counters`` runs one decode step's ``moe_gemm`` launches (gate_up and down) on the MSL
emulator under ``emulator.profile()`` and reports the weight bytes (packed codes, scales,
biases) the kernel reads against the minimum (the selected experts' bytes, each once), the
distinct bytes it touches against the minimum (those plus activations, ids and output once),
and all device reads (which also count every thread's re-reads of the activation row and the
argument structs, served by caches on a GPU). The counters count what the kernel code reads, not what a GPU cache
would make of it; no Apple timing is claimed anywhere here.

``--generate`` adds a whole-model section (``--skip-block`` runs only that): with
``--gen-model PATH`` a Mixtral upcycled from a trained Llama checkpoint (:func:`upcycle_llama`;
the committed run: pylm-s, 8 experts, top-2, and a text prompt), else a tiny random Qwen3-MoE
causal LM (``--gen-*`` shapes; experts N(0, 1/K) per projection so the MoE output matters as
much as the residual, lm_head N(0, (4/sqrt(H))^2)); ``generate()`` eager (static cache,
``disable_compile``, greedy, batch 1) of the dense bf16 model against copies whose experts only
are quantized (``include=("*.experts",)``: ``MarlinExperts`` + ``MarlinRouter``, attention and
lm_head dense) at each of ``--gen-formats``.
Rounds run one call of every model in turn after a warm-up round; tok/s medians over rounds,
ratios from the same rounds; ``agree`` is the fraction of new tokens equal to dense bf16's and
``first_diff`` the first position that differs (None: all equal); ``agree_fp32``/``first_diff_fp32``
the same against the model in float32 (a row ``dense fp32``): a random model's top-2 logits are
often within a few bf16 ulps, so bf16 rounding alone changes its greedy tokens, and the fp32
row shows how much.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metal_marlin_torch import QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch._files import write_atomic  # noqa: E402
from metal_marlin_torch.ops.moe import moe_gemm as oracle_moe_gemm  # noqa: E402
from metal_marlin_torch.ops.moe_route import moe_route as oracle_moe_route  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def build_block(experts: int, top_k: int, hidden: int, inter: int, device: str) -> torch.nn.Module:
    """transformers' Qwen3-MoE block in bf16 with random weights (router N(0, 1/H): logits of unit
    scale for unit inputs; experts N(0, 0.02^2))."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                      num_experts_per_tok=top_k, norm_topk_prob=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the experts on the way
    try:
        block = Qwen3MoeSparseMoeBlock(cfg)
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g) * hidden**-0.5)
        for p in (block.experts.gate_up_proj, block.experts.down_proj):
            for e in range(p.shape[0]):  # expert by expert: no fp32 tensor of the whole stack
                p[e].copy_(torch.randn(p[e].shape, generator=g) * 0.02)
    return block.to(device).eval()


def oracle_forward(q: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized block through the pure-torch kernels, called directly (any device)."""
    h = x.reshape(-1, x.shape[-1])
    r = q.gate
    s = r.spec
    w, ids = oracle_moe_route(torch.nn.functional.linear(h, r.weight), None, s.top_k, s.mode, s.renormalize,
                              s.n_group, s.topk_group, s.scaling)
    ex = q.experts
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    rows = h.repeat_interleave(k, dim=0)

    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
        plan = ex.plans[name]
        return oracle_moe_gemm(inp, flat, getattr(ex, name), getattr(ex, f"{name}_scales"),
                               getattr(ex, f"{name}_biases"), getattr(ex, f"{name}_global_scale"), None,
                               plan.format, plan.group_size)

    gate, up = proj("gate_up_proj", rows).chunk(2, dim=-1)
    out = proj("down_proj", torch.nn.functional.silu(gate) * up)
    out = (out.float() * w.reshape(-1, 1)).view(-1, k, h.shape[-1]).sum(1)
    return out.to(x.dtype).reshape(x.shape)


def time_rounds(fns: dict[str, Any], x: torch.Tensor, rounds: int, device: str) -> dict[str, list[float]]:
    """Per method, the seconds of each round (the caller's accuracy pass was the warm-up)."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def counters(q: torch.nn.Module, hidden: int, top_k: int) -> dict[str, Any]:
    """Emulated decode launches of moe_gemm for one token: bytes read against the minimum."""
    from metal_marlin_torch import emulator

    ex = q.experts
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        _, w, ids = q.gate(x)
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    chosen = sorted(set(flat.tolist()))
    rows = x.repeat_interleave(k, dim=0)
    out: dict[str, Any] = {"selected_experts": len(chosen), "launches": []}
    inp = rows
    for name in ("gate_up_proj", "down_proj"):
        plan = ex.plans[name]
        tensors = [getattr(ex, name), getattr(ex, f"{name}_scales"), getattr(ex, f"{name}_biases"),
                   getattr(ex, f"{name}_global_scale")]
        with emulator.profile() as launches:
            y = torch.ops.marlin_emu.moe_gemm(inp, flat, *tensors, None, plan.format, plan.group_size)
        ref = torch.ops.marlin.moe_gemm(inp, flat, *tensors, None, plan.format, plan.group_size)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        # the minimum: each selected expert's packed weights / scales / biases once, the
        # activations, the ids and the output, each once
        expert_bytes = sum(t[0].numel() * t.element_size() for t in tensors if t is not None)
        minimum = len(chosen) * expert_bytes + inp.numel() * inp.element_size() \
            + flat.numel() * flat.element_size() + y.numel() * y.element_size()
        per_buffer: dict[str, dict[str, int]] = {}
        for p in launches:
            for b in p.buffers.values():
                acc = per_buffer.setdefault(b["name"], {"read": 0, "unique_read": 0, "written": 0})
                for key in acc:
                    acc[key] += b[key]
        weight_names = ("weight", "scales", "biases", "global_scale")
        weights_read = sum(v["read"] for n, v in per_buffer.items() if n in weight_names)
        unique = sum(v["unique_read"] + v["written"] for v in per_buffer.values())
        read = sum(p.device_bytes_read for p in launches)
        written = sum(p.device_bytes_written for p in launches)
        out["launches"].append({
            "projection": name, "kernels": [p.kernel for p in launches], "rows": inp.shape[0],
            "N": int(tensors[0].shape[1]), "K": int(inp.shape[1]),
            "weight_bytes_read": weights_read, "selected_expert_bytes": len(chosen) * expert_bytes,
            "weight_ratio_to_min": weights_read / (len(chosen) * expert_bytes),
            "unique_bytes": unique, "min_bytes": minimum, "unique_ratio_to_min": unique / minimum,
            "device_bytes_read": read, "device_bytes_written": written, "buffers": per_buffer,
            "coalescing64": statistics.fmean(p.coalescing64 for p in launches),
            "rel_err_vs_torch": err,
        })
        if name == "gate_up_proj":
            g, u = y.float().chunk(2, dim=-1)
            inp = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
    out["weight_bytes_per_token"] = sum(r["weight_bytes_read"] for r in out["launches"])
    out["min_weight_bytes_per_token"] = sum(r["selected_expert_bytes"] for r in out["launches"])
    out["unique_bytes_per_token"] = sum(r["unique_bytes"] for r in out["launches"])
    out["min_bytes_per_token"] = sum(r["min_bytes"] for r in out["launches"])
    return out


def build_moe_lm(args: argparse.Namespace, device: str) -> torch.nn.Module:
    """A tiny random Qwen3-MoE causal LM in bf16 (module docstring: its weights)."""
    import transformers

    h, i = args.gen_hidden, args.gen_inter
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=args.gen_vocab, hidden_size=h, intermediate_size=2 * h, moe_intermediate_size=i,
        num_hidden_layers=args.gen_layers, num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 128),
        head_dim=64, num_experts=args.gen_experts, num_experts_per_tok=args.gen_top_k, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=args.gen_prompt + args.gen_new + 8, norm_topk_prob=True,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 4 * h**-0.5)
        for layer in model.model.layers:
            ex = layer.mlp.experts
            ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * h**-0.5)
            ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * i**-0.5)
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g) * h**-0.5)
    return model.to(device=device, dtype=torch.bfloat16).eval()


def upcycle_llama(path: str, experts: int, top_k: int, noise: float, device: str) -> torch.nn.Module:
    """A Mixtral (bf16) from a trained Llama checkpoint: attention, norms, embeddings and head as
    trained; every layer's MLP copied into ``experts`` experts, each with independent Gaussian
    noise of ``noise`` times the weights' RMS (so the experts differ and routing matters), and a
    router N(0, 1/H). Its MoE output stays close to the trained MLP's, so the model keeps a
    trained model's peaked next-token distributions (sparse upcycling, as Mixtral-style models
    are often initialized)."""
    import transformers

    from metal_marlin_torch.io.hf import load_pretrained

    llama = load_pretrained(path, dtype=torch.float32)
    c = llama.config
    cfg = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, num_local_experts=experts, num_experts_per_tok=top_k,
        tie_word_embeddings=False, rope_parameters=getattr(c, "rope_parameters", None), hidden_act=c.hidden_act)
    model = transformers.MixtralForCausalLM(cfg)
    state = {k: v for k, v in llama.state_dict().items() if ".mlp." not in k}
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            mlp = llama.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
            ex = layer.mlp.experts
            for p, w in ((ex.gate_up_proj, gate_up), (ex.down_proj, mlp.down_proj.weight)):
                rms = w.pow(2).mean().sqrt()
                p.copy_(w + noise * rms * torch.randn((experts, *w.shape), generator=g))
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g) * c.hidden_size**-0.5)
            missing -= {f"model.layers.{i}.mlp.{n}" for n in ("experts.gate_up_proj", "experts.down_proj",
                                                              "gate.weight")}
    if missing:
        raise ValueError(f"upcycle_llama: parameters not set from {path}: {sorted(missing)[:4]}")
    return model.to(device=device, dtype=torch.bfloat16).eval()


PROMPT = "Once upon a time, there was a little girl who lived in a village near the forest."


def generate_section(args: argparse.Namespace) -> dict[str, Any]:
    """Eager ``generate()`` of the dense MoE LM against its experts-quantized copies (module doc)."""
    if args.gen_model:
        dense = upcycle_llama(args.gen_model, args.gen_experts, args.gen_top_k, args.gen_noise, args.device)
    else:
        dense = build_moe_lm(args, args.device)
    # dense fp32: the same weights without bf16 rounding, the yardstick of how far bf16 alone moves
    # a random model's greedy tokens (its top-2 logits are often within a few bf16 ulps)
    models: dict[str, torch.nn.Module] = {"dense bf16": dense, "dense fp32": copy.deepcopy(dense).float()}
    for fmt in args.gen_formats.split(","):
        q = copy.deepcopy(dense)
        quantize_model(q, QuantConfig(format=fmt, group_size=args.gen_group_size, include=("*.experts",)))
        assert all(type(layer.mlp.experts).__name__ == "MarlinExperts" for layer in q.model.layers)
        models[f"marlin experts {fmt}/g{args.gen_group_size}"] = q
    tok_file = Path(args.gen_model or ".") / "tokenizer.json"
    if args.gen_model and tok_file.is_file():  # a real prompt for a trained model
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.gen_model)(PROMPT, return_tensors="pt")["input_ids"]
    else:
        vocab = dense.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.gen_prompt), generator=torch.Generator().manual_seed(3))
    ids = ids.to(args.device)
    kw = dict(max_new_tokens=args.gen_new, min_new_tokens=args.gen_new, do_sample=False,
              cache_implementation="static", pad_token_id=0, disable_compile=True)
    rates: dict[str, list[float]] = {m: [] for m in models}
    tokens: dict[str, list[int]] = {}
    with torch.no_grad():
        for r in range(1 + max(1, args.gen_rounds)):  # round 0 warms up
            for name, model in models.items():
                _sync(args.device)
                t0 = time.perf_counter()
                out = model.generate(ids, **kw)
                _sync(args.device)
                if r:
                    rates[name].append(args.gen_new / (time.perf_counter() - t0))
                tokens[name] = out[0, ids.shape[1]:].tolist()
    base = statistics.median(rates["dense bf16"])
    rows = []
    for name in models:
        med = statistics.median(rates[name])
        row = {"method": name, "tok_s": med, "x_dense": med / base, "rounds_tok_s": rates[name], "tokens": tokens[name]}
        for ref, suffix in (("dense bf16", ""), ("dense fp32", "_fp32")):
            same = [a == b for a, b in zip(tokens[name], tokens[ref], strict=True)]
            row[f"agree{suffix}"] = sum(same) / len(same)
            row[f"first_diff{suffix}"] = None if all(same) else same.index(False)
        rows.append(row)
    experts_bytes = {name: sum(t.numel() * t.element_size()
                               for layer in m.model.layers for t in [*layer.mlp.experts.parameters(),
                                                                      *layer.mlp.experts.buffers()])
                     for name, m in models.items()}
    c = dense.config
    return {"model": (f"Mixtral upcycled from {args.gen_model} (expert noise {args.gen_noise})" if args.gen_model
                      else "random Qwen3-MoE"),
            "shape": {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "experts": args.gen_experts,
                      "top_k": args.gen_top_k, "inter": dense.model.layers[0].mlp.experts.down_proj.shape[-1],
                      "vocab": c.vocab_size, "prompt": ids.shape[1], "new": args.gen_new, "rounds": args.gen_rounds},
            "experts_MiB": {n: b / 2**20 for n, b in experts_bytes.items()}, "rows": rows}


def _machine(device: str) -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            # a shared machine's load at the end of the run (timings are only as good as this)
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def print_generate(gen: dict[str, Any], machine: dict[str, Any]) -> None:
    s = gen["shape"]
    print(f"generate(): {gen['model']}, {s['layers']} layers, H={s['hidden']}, E={s['experts']} top-{s['top_k']}, "
          f"I={s['inter']}, vocab {s['vocab']}; prompt {s['prompt']}, {s['new']} new tokens, eager, bf16, "
          f"{s['rounds']} rounds on {machine['device']} ({machine['processor']}, {machine['threads']} threads)")
    print("agree / first diff: new tokens equal to dense bf16's (and to dense fp32's); '-': all equal")
    print(f"{'method':28} {'tok/s':>8} {'x dense':>8} {'experts MiB':>11} {'agree bf16':>10} {'1st diff':>8} "
          f"{'agree fp32':>10} {'1st diff':>8}")
    for r in gen["rows"]:
        def diff(v: int | None) -> str:
            return "-" if v is None else str(v)
        print(f"{r['method']:28} {r['tok_s']:8.2f} {r['x_dense']:8.2f} {gen['experts_MiB'][r['method']]:11.2f} "
              f"{r['agree']:10.3f} {diff(r['first_diff']):>8} {r['agree_fp32']:10.3f} {diff(r['first_diff_fp32']):>8}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=1)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-rounds", type=int, default=5)
    ap.add_argument("--prefill-rounds", type=int, default=2)
    ap.add_argument("--counters", action="store_true", help="emulated decode moe_gemm traffic counters")
    ap.add_argument("--json", default=None)
    ap.add_argument("--generate", action="store_true", help="add the whole-model generate() section")
    ap.add_argument("--skip-block", action="store_true", help="only the generate() section")
    ap.add_argument("--gen-model", default="", help="a Llama checkpoint to upcycle into a Mixtral (else random)")
    ap.add_argument("--gen-noise", type=float, default=0.02, help="upcycling: expert noise relative to weight RMS")
    ap.add_argument("--gen-layers", type=int, default=4)
    ap.add_argument("--gen-hidden", type=int, default=256)
    ap.add_argument("--gen-experts", type=int, default=16)
    ap.add_argument("--gen-top-k", type=int, default=2)
    ap.add_argument("--gen-inter", type=int, default=128)
    ap.add_argument("--gen-vocab", type=int, default=2048)
    ap.add_argument("--gen-prompt", type=int, default=16)
    ap.add_argument("--gen-new", type=int, default=32)
    ap.add_argument("--gen-rounds", type=int, default=3)
    ap.add_argument("--gen-formats", default="int8,int4")
    ap.add_argument("--gen-group-size", type=int, default=64)
    args = ap.parse_args(argv)
    if args.skip_block:
        result = {"machine": None, "generate": generate_section(args)}
        result["machine"] = _machine(args.device)
        print_generate(result["generate"], result["machine"])
        if args.json:
            write_atomic(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
        return result

    torch.manual_seed(0)
    dense = build_block(args.experts, args.top_k, args.hidden, args.inter, args.device)
    q = copy.deepcopy(dense)
    summary = quantize_model(q, QuantConfig(format=args.format, group_size=args.group_size))
    fns = {"dense bf16": dense, "marlin": q, "oracle": lambda x: oracle_forward(q, x)}
    rows = []
    for phase, tokens, rounds in (("decode", args.decode_tokens, args.decode_rounds),
                                  ("prefill", args.prefill_tokens, args.prefill_rounds)):
        x = torch.randn(1, tokens, args.hidden, generator=torch.Generator().manual_seed(tokens))
        x = x.to(device=args.device, dtype=torch.bfloat16)
        with torch.no_grad():  # also the warm-up of every method (first-call allocations, compiles)
            want = dense(x).float()
            agree = {n: ((fn(x).float() - want).norm() / want.norm()).item() for n, fn in fns.items()}
            _sync(args.device)
        times = time_rounds(fns, x, rounds, args.device)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"[{phase}: {tokens} tokens, {rounds} rounds done]", flush=True)
        for name in fns:
            rows.append({
                "phase": phase, "method": name, "tokens": tokens, "rounds": rounds,
                "ms": med[name] * 1e3, "tok_s": tokens / med[name],
                "speedup_vs_dense": med["dense bf16"] / med[name],
                "speedup_vs_oracle": med["oracle"] / med[name],
                "rel_err_vs_dense": agree[name],
            })
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.experts.parameters())
    q_bytes = sum(t.numel() * t.element_size() for t in q.experts.buffers() if t is not None)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    # a shared machine's load at the end of the run (timings are only as good as this)
                    "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "shape": {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden, "inter": args.inter,
                  "format": args.format, "group_size": args.group_size},
        "experts_MiB": {"dense_bf16": dense_bytes / 2**20, "quantized": q_bytes / 2**20},
        "routers": summary.routers,
        "rows": rows,
        "note": ("CPU: 'marlin' and 'oracle' run the same pure-torch kernels (the CPU kernel is the oracle). "
                 "No Apple GPU timing is claimed." if args.device != "mps" else "MPS: Metal kernels"),
    }
    if args.counters:
        result["decode_counters"] = counters(q, args.hidden, args.top_k)
    if args.generate:
        result["generate"] = generate_section(args)
        result["machine"] = _machine(args.device)

    print(f"MoE block E={args.experts} top-{args.top_k} H={args.hidden} I={args.inter} {args.format}/g"
          f"{args.group_size} on {args.device} ({result['machine']['processor']}, {torch.get_num_threads()} threads)")
    print(f"{'phase':8} {'method':11} {'tokens':>6} {'ms':>10} {'tok/s':>10} {'x dense':>8} {'x oracle':>8} "
          f"{'rel err':>8}")
    for r in rows:
        print(f"{r['phase']:8} {r['method']:11} {r['tokens']:6d} {r['ms']:10.2f} {r['tok_s']:10.1f} "
              f"{r['speedup_vs_dense']:8.2f} {r['speedup_vs_oracle']:8.2f} {r['rel_err_vs_dense']:8.4f}")
    if args.counters:
        c = result["decode_counters"]
        print(f"decode counters (emulator, one token, {c['selected_experts']} experts selected):")
        for r in c["launches"]:
            print(f"  {r['projection']:12} {','.join(r['kernels'])}: weights read {r['weight_bytes_read']:,} B vs "
                  f"{r['selected_expert_bytes']:,} B of the selected experts ({r['weight_ratio_to_min']:.3f}x); "
                  f"distinct bytes {r['unique_bytes']:,} vs minimum {r['min_bytes']:,} "
                  f"({r['unique_ratio_to_min']:.3f}x); all reads incl. re-reads of x/args "
                  f"{r['device_bytes_read']:,} B; rel err vs torch {r['rel_err_vs_torch']:.1e}")
        print(f"  per token: weights {c['weight_bytes_per_token']:,} B read vs {c['min_weight_bytes_per_token']:,} B "
              f"minimum; distinct {c['unique_bytes_per_token']:,} B vs {c['min_bytes_per_token']:,} B")
    if args.generate:
        print_generate(result["generate"], result["machine"])
    if args.json:
        write_atomic(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
