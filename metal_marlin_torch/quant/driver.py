"""Layer-by-layer model quantization (GPTQ, MR-GPTQ, RTN + rotation) with resume.

The model's repeated blocks (decoder layers of a causal LM, encoder layers of BERT, ...) are
processed one at a time on the compute device, everything else staying where it is:

1. The calibration windows run through the model up to the first block, whose inputs
   (positional and keyword arguments: hidden states, masks, rotary embeddings) are captured.
2. For each block: move it to the device; quantize its linear layers *true-sequentially*:
   layers that read the same input tensor (q/k/v; gate/up) form a stage, stages run in
   execution order, and each stage's input Hessians are collected by running the block with
   the earlier stages already quantized; then run the quantized block to produce the next
   block's inputs; move it back.
3. After each block its quantized tensors go to ``work_dir/block_NNNNN.safetensors`` (written
   under a temporary name and renamed). A rerun with the same ``work_dir`` and settings loads
   finished blocks instead of quantizing them again: an interrupted run resumes where it stopped.

Selected linear layers outside the blocks (e.g. BERT's pooler, or ``lm_head`` if included) get
round-to-nearest: no calibration inputs reach them on this path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..dtypes import DTypeConfig, resolve
from ..io.atomic import atomic_path, write_json
from ..io.checkpoint import write_safetensors
from ..nn.config import LayerPlan
from ..nn.linear import MarlinLinear
from ..nn.quantize import replace_module
from .gptq import HessianAccumulator
from .hadamard import unrotate
from .mr_gptq import DEFAULT_ROTATION_BLOCK, Rotation, quantize_linear, rotation_for
from .refine import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, RefineOptions, refine_block

log = logging.getLogger("metal_marlin_torch")

RUN_FILE = "run.json"
GPTQ_KEYS = ("damp", "block_size", "act_order", "scale_search", "search_grid", "min_shrink")


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


class _Dequantized(nn.Module):
    """Stand-in for a finished :class:`MarlinLinear` while its block is still being processed:
    the dequantized weight with the rotation folded back, so calibration passes need not
    unpack codes on every call. It computes what ``marlin.gemm`` computes (fp32 accumulation,
    result in the input's dtype)."""

    def __init__(self, layer: MarlinLinear) -> None:
        super().__init__()
        w = layer.dequantized_weight(torch.float32)
        if layer.rotation_block:
            w = unrotate(w, layer.rotation_block, layer.rotation_signs)
        self.register_buffer("weight", w)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight, b).to(x.dtype)


def _swap_in_standins(block: nn.Module) -> dict[str, MarlinLinear]:
    """Replace the block's MarlinLinear layers by :class:`_Dequantized`; returns the originals."""
    finals = {n: m for n, m in block.named_modules() if isinstance(m, MarlinLinear)}
    for name, layer in finals.items():
        replace_module(block, name, _Dequantized(layer))
    return finals


def _restore(block: nn.Module, finals: dict[str, MarlinLinear]) -> None:
    for name, layer in finals.items():
        replace_module(block, name, layer)


@dataclass
class DriverOptions:
    """Settings of :func:`quantize_layerwise` (also ``QuantConfig.method_options`` keys).

    Attributes:
        hessian: collect Hessians and run GPTQ (False: RTN, with ``rotate`` RTN + rotation).
        rotate: block Hadamard rotation of each layer's inputs (MR-GPTQ).
        rotation_block: requested rotation block (adapted per layer, see ``hadamard``).
        rotation_signs: random +-1 signs before the Hadamard transform (seeded by ``seed``).
        seed: seed of the signs.
        true_sequential: quantize stage by stage inside a block (else all layers of a block
            from the unquantized block's inputs in one pass).
        batch_size: calibration windows per forward pass.
        offload_inputs: keep captured block inputs on CPU between uses (saves device memory).
        gptq: options of :func:`~.gptq.gptq_quantize` (damp, block_size, act_order, ...).
        rtn: round to nearest instead of GPTQ. With ``hessian`` the inputs' second moments
            (``diag H``, llama.cpp's "importance matrix") weight the scale search; the
            ``gptq`` keys ``scale_search`` (default on), ``search_grid``, ``min_shrink`` apply.
        refine: after each block is quantized, tune its scales and biases (codes fixed) to
            the dense block's output (:mod:`.refine`).
        refine_steps, refine_lr, refine_batch: :class:`~.refine.RefineOptions`.
    """

    hessian: bool = True
    rotate: bool = False
    rotation_block: int = DEFAULT_ROTATION_BLOCK
    rotation_signs: bool = False
    seed: int = 0
    true_sequential: bool = True
    batch_size: int = 8
    offload_inputs: bool = False
    gptq: dict[str, Any] = field(default_factory=dict)
    rtn: bool = False
    refine: bool = False
    refine_steps: int = DEFAULT_STEPS
    refine_lr: float = DEFAULT_LR
    refine_batch: int = DEFAULT_BATCH

    def __post_init__(self) -> None:
        RefineOptions(self.refine_steps, self.refine_lr, self.refine_batch)  # validates them

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> DriverOptions:
        """Options for ``method`` (``rtn`` / ``gptq`` / ``mr-gptq``) from a flat dict; unknown keys
        are errors. ``rtn``: Hessians only with ``imatrix`` (importance-weighted RTN)."""
        opts = dict(options)
        if method == "rtn":
            opts["rtn"] = True
            opts["hessian"] = bool(opts.pop("imatrix", False))
        elif "imatrix" in opts:
            raise ValueError(f"method_options: 'imatrix' applies to method 'rtn', not {method!r}")
        gptq = {k: opts.pop(k) for k in GPTQ_KEYS if k in opts}
        known = set(cls.__dataclass_fields__) - {"gptq"}
        bad = set(opts) - known - {"n_samples", "seq_len", "calibration_seed", "sensitivity"}
        if bad:
            raise ValueError(f"method_options: unknown keys {sorted(bad)}; known: {sorted(known | set(GPTQ_KEYS))}")
        kw = {k: v for k, v in opts.items() if k in known}
        if method == "mr-gptq":
            kw.setdefault("rotate", True)
        return cls(gptq=gptq, **kw)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the ``nn.ModuleList`` holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
    if best is None or best[0] == 0:
        raise ValueError(f"quantize_layerwise: no nn.ModuleList of blocks found in {type(model).__name__}")
    return best[1], best[2]


def _to(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``obj`` (tensors in tuples, lists, dicts) on ``device``; floating tensors also cast to
    ``dtype`` when given."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def compute_dtype(block: nn.Module, device: torch.device) -> torch.dtype | None:
    """float32 when a half-precision block runs on a CPU, else None (keep the model's dtype).

    CPUs without bf16/fp16 matrix units (most x86, measured: a bf16 GEMM of pylm-s's MLP shape
    is 6x slower than fp32 on the AVX2 test machine) run half-precision matmuls through slow
    conversion paths; calibration forwards in fp32 are both faster and closer to the exact
    activations. The upcast of bf16/fp16 weights is exact, and so is the cast back."""
    if device.type != "cpu":
        return None
    halves = {torch.float16, torch.bfloat16}
    return torch.float32 if any(p.dtype in halves for p in block.parameters()) else None


def _upcast(block: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Cast the block's floating parameters and buffers to ``dtype``; their old dtypes by name."""
    old = {n: t.dtype for n, t in list(block.named_parameters()) + list(block.named_buffers())
           if t.is_floating_point()}
    for mod in block.modules():
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
        for key, b in mod._buffers.items():
            if b is not None and b.is_floating_point():
                mod._buffers[key] = b.to(dtype)
    return old


def _restore_dtypes(block: nn.Module, old: dict[str, torch.dtype], biases_only: bool = False) -> None:
    """Undo :func:`_upcast`: every parameter and buffer back to its recorded dtype, except the
    packed tensors and scales of quantized layers (only their ``bias`` follows the original
    linear's dtype, as :meth:`MarlinLinear.like` would have made it). ``biases_only``: only
    those biases (before a block is saved, while the rest still computes in float32)."""
    for name, mod in block.named_modules():
        marlin = isinstance(mod, MarlinLinear)
        if biases_only and not marlin:
            continue
        prefix = f"{name}." if name else ""
        for key, p in mod._parameters.items():
            dt = old.get(prefix + key)
            if p is None or dt is None or (marlin and key != "bias") or p.dtype == dt:
                continue
            p.data = p.data.to(dt)
        if marlin:
            continue
        for key, b in mod._buffers.items():
            dt = old.get(prefix + key)
            if b is not None and dt is not None and b.dtype != dt:
                mod._buffers[key] = b.to(dt)


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> None:
    """Move the parameters and buffers not inside ``blocks`` to ``device`` (blocks stay put)."""
    inside = {id(m) for m in blocks.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for p in mod._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for key, b in mod._buffers.items():
            if b is not None:
                mod._buffers[key] = b.to(device)


def capture_inputs(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
    device: torch.device | str, store: torch.device | str, dtype: torch.dtype | None = None,
) -> list[tuple[tuple, dict]]:
    """Run ``tokens [n, L]`` through ``model`` up to ``blocks[0]`` and keep its arguments per
    batch (floating ones cast to ``dtype`` when given)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):  # noqa: ARG001 (hook signature)
        captured.append((_to(args, store, dtype), _to(kwargs, store, dtype)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache is not None:
        cfg.use_cache = False
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(device)
            try:
                model(input_ids=batch)
            except _Stop:
                pass
            else:
                raise ValueError("quantize_layerwise: the model never called its first block")
    finally:
        handle.remove()
        if use_cache is not None:
            cfg.use_cache = use_cache
    return captured


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states among a block's captured arguments (see :func:`_replace_hidden`)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ValueError("quantize_layerwise: cannot find the hidden states among the block's arguments")


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise ValueError("quantize_layerwise: cannot find the hidden states among the block's arguments")


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]], device, store) -> list[torch.Tensor]:
    outs = []
    for args, kwargs in inputs:
        out = _hidden(block(*_to(args, device), **_to(kwargs, device)))
        outs.append(out.to(store))
    return outs


def _stages(block: nn.Module, names: list[str], sample: tuple[tuple, dict], device) -> list[list[str]]:
    """Group ``names`` (linear layers of ``block``) into stages of layers reading the same tensor."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name in names:
        def hook(module, args, output, name=name):  # noqa: ARG001
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))
        handles.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        block(*_to(sample[0], device), **_to(sample[1], device))
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last: torch.Tensor | None = None
    for name, x in seen:
        if stages and x is last:
            stages[-1].append(name)
        else:
            stages.append([name])
            last = x
    never = [n for n in names if all(n != s for s, _ in seen)]
    if never:
        raise ValueError(f"quantize_layerwise: layers {never} did not run in their block's forward pass")
    return stages


def _block_tensors(block: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, m in block.named_modules():
        if isinstance(m, MarlinLinear):
            for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if t is not None:
                    tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
            layers[name] = {"format": m.format, "group_size": m.group_size, "in": m.in_features,
                            "out": m.out_features, "bias": m.bias is not None,
                            "rotation_block": m.rotation_block}
    return tensors, layers


def save_block(path: Path, block: nn.Module) -> None:
    """Write the block's quantized layers to ``path`` atomically."""
    tensors, layers = _block_tensors(block)
    with atomic_path(path) as tmp:
        write_safetensors(tensors, tmp, metadata={"layers": json.dumps(layers)})


def load_block(path: Path, block: nn.Module, dtype_config: DTypeConfig, device) -> list[str]:
    """Replace the block's linears by the quantized layers saved in ``path``; returns their names."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        layers = json.loads(f.metadata()["layers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    for name, spec in layers.items():
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        # the bias keeps the dtype it was saved in, as quantize_linear gave it (the source's)
        layer = MarlinLinear(spec["in"], spec["out"], spec["bias"], spec["format"], spec["group_size"],
                             dtype_config, spec["rotation_block"], device=device,
                             bias_dtype=state["bias"].dtype if "bias" in state else None)
        layer.load_state_dict({k: v.to(device) for k, v in state.items()})
        replace_module(block, name, layer)
    return list(layers)


def _fingerprint(settings: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
    digest = hashlib.sha256(tokens.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {**settings, "calibration_sha256_16": digest, "calibration_shape": list(tokens.shape)}


def _check_run(work_dir: Path, run: dict[str, Any]) -> None:
    path = work_dir / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(run)):
            raise ValueError(
                f"work_dir {work_dir} holds a run with other settings or calibration data; "
                f"use a new work_dir (or delete it). saved: {old}, now: {run}"
            )
    else:
        write_json(path, run)


def quantize_layerwise(
    model: nn.Module,
    plans: dict[str, LayerPlan],
    tokens: torch.Tensor,
    options: DriverOptions | None = None,
    dtype_config: DTypeConfig | None = None,
    device: torch.device | str | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    layer_fn: Callable[..., MarlinLinear] = quantize_linear,
) -> dict[str, Any]:
    """Quantize the planned linear layers of ``model`` in place, block by block.

    Args:
        model: the model (its blocks are found by :func:`find_blocks`).
        plans: layer name -> :class:`LayerPlan` (from :func:`~metal_marlin_torch.nn.plan_layers`).
        tokens: calibration windows ``int64 [n, L]`` (:func:`~.calibration.load_calibration`).
        options: :class:`DriverOptions`.
        dtype_config: dtypes of the new layers.
        device: compute device (None: where the model's parameters are).
        work_dir: folder for finished blocks (resume); None = no persistence.
        progress: tqdm progress bar over blocks.
        layer_fn: the per-layer quantizer (tests substitute a counting wrapper).

    Returns:
        ``{"resumed_blocks": [...], "quantized_blocks": [...], "rtn_outside": [...]}``.
    """
    options = options or DriverOptions()
    dcfg = resolve(dtype_config)
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"quantize_layerwise: tokens must be int64 [n, L], got {tokens.dtype} {tuple(tokens.shape)}")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    store = torch.device("cpu") if options.offload_inputs else device
    prefix, blocks = find_blocks(model)
    per_block: list[dict[str, LayerPlan]] = [{} for _ in blocks]
    outside: dict[str, LayerPlan] = {}
    for name, plan in plans.items():
        head = f"{prefix}." if prefix else ""
        rest = name[len(head):] if name.startswith(head) else None
        idx, _, sub = (rest or "").partition(".")
        if rest is not None and idx.isdigit() and int(idx) < len(blocks) and sub:
            per_block[int(idx)][sub] = plan
        else:
            outside[name] = plan

    wd: Path | None = None
    if work_dir is not None:
        wd = Path(work_dir)
        wd.mkdir(parents=True, exist_ok=True)
        settings = {"plans": {k: [p.format, p.group_size] for k, p in sorted(plans.items())},
                    "options": {**options.__dict__}, "dtype_config": dcfg.to_dict(),
                    "n_blocks": len(blocks)}
        _check_run(wd, _fingerprint(settings, tokens))

    report: dict[str, Any] = {"resumed_blocks": [], "quantized_blocks": [], "rtn_outside": []}
    gptq_opts = dict(options.gptq)
    if options.rtn:
        gptq_opts["rtn"] = True
    model_was_training = model.training
    model.eval()
    _move_outside(model, blocks, device)
    cdt = compute_dtype(blocks[0], device)
    if cdt is not None:
        log.info("quantize_layerwise: calibration forwards in %s on %s (the model is half precision)", cdt, device)
    try:
        with torch.no_grad():
            inputs = capture_inputs(model, blocks, tokens, options.batch_size, device, store, cdt)
    finally:
        _move_outside(model, blocks, home)

    try:
        from tqdm.auto import tqdm
        bar = tqdm(range(len(blocks)), desc=f"quantizing {prefix}", disable=not progress)
    except ImportError:  # tqdm is a dependency; keep the driver usable without it anyway
        bar = range(len(blocks))
    # refine: the dense model's hidden states beside the quantized ones (the targets' inputs)
    dense_hidden = [_hidden_arg(a, k) for a, k in inputs] if options.refine else None
    refine_opts = RefineOptions(options.refine_steps, options.refine_lr, options.refine_batch)
    if options.refine:
        report["refine"] = {}
    for i in bar:
        block = blocks[i]
        block_home = next(block.parameters()).device
        block.to(device)
        old_dtypes = _upcast(block, cdt) if cdt is not None else {}
        path = wd / f"block_{i:05d}.safetensors" if wd is not None else None
        try:
            with torch.no_grad():
                targets = None
                if dense_hidden is not None:  # before any layer of the block is replaced
                    dense_in = [_replace_hidden(a, k, h) for (a, k), h in zip(inputs, dense_hidden, strict=True)]
                    targets = _run_block(block, dense_in, device, store)
                    del dense_in
                if path is not None and path.exists():
                    load_block(path, block, dcfg, device)
                    report["resumed_blocks"].append(i)
                elif per_block[i]:
                    _quantize_block(block, per_block[i], inputs, options, gptq_opts, dcfg, device, store,
                                    layer_fn)
                    if targets is not None:
                        report["refine"][i] = refine_block(
                            block, inputs, targets, refine_opts, device,
                            lambda blk, a, k: _hidden(blk(*_to(a, device), **_to(k, device))), _hidden_arg)
                    _restore_dtypes(block, old_dtypes, biases_only=True)
                    if path is not None:
                        save_block(path, block)
                    report["quantized_blocks"].append(i)
                if i + 1 < len(blocks):
                    finals = _swap_in_standins(block)
                    try:
                        outs = _run_block(block, inputs, device, store)
                    finally:
                        _restore(block, finals)
                    inputs = [_replace_hidden(a, k, o) for (a, k), o in zip(inputs, outs, strict=True)]
                    dense_hidden = targets
        finally:
            _restore_dtypes(block, old_dtypes)
        block.to(block_home)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name, plan in outside.items():
        linear = model.get_submodule(name)
        rot = rotation_for(linear.in_features, options.rotation_block, options.rotation_signs, options.seed) \
            if options.rotate else Rotation()
        replace_module(model, name, layer_fn(linear, plan, dcfg, None, rot, gptq_opts if options.rtn else None))
        report["rtn_outside"].append(name)
    if report["rtn_outside"]:
        log.info("quantize_layerwise: no calibration inputs reach %s; used round-to-nearest", report["rtn_outside"])
    model.train(model_was_training)
    return report


def _quantize_block(
    block: nn.Module, plans: dict[str, LayerPlan], inputs: list[tuple[tuple, dict]],
    options: DriverOptions, gptq_opts: dict[str, Any], dcfg: DTypeConfig, device, store,
    layer_fn: Callable[..., MarlinLinear],
) -> None:
    names = [n for n in plans if isinstance(block.get_submodule(n), nn.Linear)]
    if options.hessian and options.true_sequential:
        stages = _stages(block, names, inputs[0], device)
    else:
        stages = [names]
    finals: dict[str, MarlinLinear] = {}
    try:
        for stage in stages:
            _quantize_stage(block, stage, plans, inputs, options, gptq_opts, dcfg, device, layer_fn, finals)
    finally:
        _restore(block, finals)


def _stage_hessians(block: nn.Module, stage: list[str], inputs: list[tuple[tuple, dict]], device,
                    shared: bool) -> dict[str, torch.Tensor]:
    """Input Hessians of the stage's layers over all calibration batches.

    With ``shared`` (a true-sequential stage: its layers read one tensor, see :func:`_stages`)
    one Hessian serves every layer of the stage, and each forward pass stops as soon as the
    stage's input exists (a forward pre-hook on its first layer): the rest of the block would
    compute activations nobody reads. Otherwise each layer accumulates its own input over full
    passes."""
    if shared:
        acc = HessianAccumulator(block.get_submodule(stage[0]).in_features, device)

        def grab(module, args):  # noqa: ARG001 (hook signature)
            acc.add(args[0])
            raise _Stop

        handle = block.get_submodule(stage[0]).register_forward_pre_hook(grab)
        try:
            for args, kwargs in inputs:
                try:
                    block(*_to(args, device), **_to(kwargs, device))
                except _Stop:
                    continue
                raise ValueError(f"quantize_layerwise: layer {stage[0]!r} did not run in its block's forward pass")
        finally:
            handle.remove()
        h = acc.hessian()
        return {n: h for n in stage}
    accs = {n: HessianAccumulator(block.get_submodule(n).in_features, device) for n in stage}
    handles = [block.get_submodule(n).register_forward_hook(accs[n].hook()) for n in stage]
    try:
        for args, kwargs in inputs:
            block(*_to(args, device), **_to(kwargs, device))
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian() for n, a in accs.items()}


def _quantize_stage(
    block: nn.Module, stage: list[str], plans: dict[str, LayerPlan], inputs: list[tuple[tuple, dict]],
    options: DriverOptions, gptq_opts: dict[str, Any], dcfg: DTypeConfig, device,
    layer_fn: Callable[..., MarlinLinear], finals: dict[str, MarlinLinear],
) -> None:
    """Collect the stage's Hessians (earlier stages run as stand-ins), then quantize its layers."""
    hessians: dict[str, torch.Tensor] = {}
    if options.hessian:
        hessians = _stage_hessians(block, stage, inputs, device, shared=options.true_sequential)
    for name in stage:
        linear = block.get_submodule(name)
        rot = rotation_for(linear.in_features, options.rotation_block, options.rotation_signs, options.seed) \
            if options.rotate else Rotation()
        if rot.signs is not None:
            rot = Rotation(rot.block, rot.signs.to(device))
        layer = layer_fn(linear, plans[name], dcfg, hessians.get(name), rot, gptq_opts)
        finals[name] = layer
        replace_module(block, name, _Dequantized(layer))
    hessians.clear()
