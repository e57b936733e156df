"""Layer-by-layer model quantization (GPTQ, MR-GPTQ, RTN + rotation) with resume.

The model's repeated blocks (decoder layers of a causal LM, encoder layers of BERT, ...) are
processed one at a time on the compute device, everything else staying where it is:

1. The calibration windows run through the model up to the first block, whose inputs
   (positional and keyword arguments: hidden states, masks, rotary embeddings) are captured.
2. For each block: move it to the device; quantize its linear layers *true-sequentially*:
   layers that read the same input tensor (q/k/v; gate/up) form a stage, stages run in
   execution order, and each stage's input Hessians are collected by running the block with
   the earlier stages already quantized; then run the quantized block to produce the next
   block's inputs; move it back. Outputs of submodules whose layers are all quantized are
   kept per batch and replayed in the block's later passes (:class:`_Replay`, within
   ``DriverOptions.replay_mib``), so each linear runs once per block instead of up to four
   times (bitwise the same result).
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
from ..nn.experts import MarlinExperts
from ..nn.linear import MarlinLinear
from ..nn.quantize import replace_module
from .autoround import DEFAULT_BATCH as AR_BATCH
from .autoround import DEFAULT_LR as AR_LR
from .autoround import DEFAULT_STEPS as AR_STEPS
from .autoround import AutoRoundOptions, autoround_block
from .experts import DEFAULT_MIN_TOKENS, quantize_experts
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


class _ReplayState:
    """What the :class:`_Replay` wrappers of one block share: the calibration batch being run,
    whether new outputs may still be kept (not in a block's last pass), and the memory left."""

    def __init__(self, budget_bytes: int) -> None:
        self.batch = -1
        self.storing = True
        self.left = budget_bytes


def _tensors_only(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    if isinstance(out, (tuple, list)):
        return all(o is None or _tensors_only(o) for o in out)
    return False


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    return sum(_nbytes(o) for o in out if o is not None)


def _clone(out: Any, device=None) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(device, copy=True) if device is not None else out.clone()
    return type(out)(None if o is None else _clone(o, device) for o in out)


class _Replay(nn.Module):
    """A finished submodule of the block being quantized, whose output per calibration batch is
    kept the first time it is computed and returned in later passes instead of recomputing it.

    True-sequential GPTQ runs the block once per stage (each stage's Hessian needs the earlier
    stages quantized) and once more for the next block's inputs: on a decoder layer about 2.2x
    the arithmetic of one forward, the cost that dominated ``marlin quantize --method gptq``
    on a CPU. A submodule is wrapped once every planned linear inside it is quantized (its
    stand-in fixed): its weights no longer change, and neither do its inputs, because stages
    run in execution order, so everything computed before it is finished too (or never
    quantized), and the block's own inputs are fixed while it is processed. Its outputs are
    therefore bitwise those a recomputation would give. Only plain tensor outputs (or tuples
    of them) are kept, within the memory budget; copies go in and out, so a caller's in-place
    change cannot alter what is kept. E.g. in a Llama layer the attention (q/k/v/o and the
    attention itself) runs twice instead of four times, and every linear once per block."""

    def __init__(self, inner: nn.Module, state: _ReplayState, store: torch.device | str) -> None:
        super().__init__()
        self.inner = inner
        self.state = state
        self.store = store
        self.kept: dict[int, Any] = {}
        self.refused = False  # an output that cannot be kept: stop trying

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        hit = self.kept.get(st.batch)
        if hit is not None:
            return _clone(hit, args[0].device if args and isinstance(args[0], torch.Tensor) else None)
        out = self.inner(*args, **kwargs)
        if st.storing and not self.refused and st.batch >= 0:
            if not _tensors_only(out):
                self.refused = True
            else:
                size = _nbytes(out)
                if size <= st.left:
                    self.kept[st.batch] = _clone(out, self.store)
                    st.left -= size
        return out

    def drop(self) -> None:
        """Forget the kept outputs (an enclosing wrapper has them all), returning their memory."""
        self.state.left += sum(_nbytes(o) for o in self.kept.values())
        self.kept.clear()
        self.refused = True


class _Replays:
    """The :class:`_Replay` wrappers of one block: added before each pass around submodules
    that have become finished, pruned after it, removed when the block is done."""

    def __init__(self, block: nn.Module, planned: list[str], budget_bytes: int, store) -> None:
        self.block = block
        self.planned = planned
        self.state = _ReplayState(budget_bytes)
        self.store = store
        self.wrapped: dict[str, _Replay] = {}  # in the order added (deepest first per round)
        self.enabled = budget_bytes > 0

    def before_pass(self, finished: set[str], n_batches: int, last: bool) -> None:
        """Wrap every submodule (not the block) all of whose planned linears are ``finished``."""
        self.state.storing = not last
        if not self.enabled:
            return
        names = [n for n, _ in self.block.named_modules(remove_duplicate=False) if n]
        eligible = []
        for name in names:
            if name in self.wrapped or any(name.startswith(w + ".") for w in self.wrapped):
                continue
            inside = [p for p in self.planned if p == name or p.startswith(name + ".")]
            if inside and all(p in finished for p in inside):
                eligible.append(name)
        for name in sorted(eligible, key=lambda n: -n.count(".")):  # children before parents
            mod = self.block.get_submodule(name)
            wrapper = _Replay(mod, self.state, self.store)
            replace_module(self.block, name, wrapper)
            self.wrapped[name] = wrapper
        self._prune(n_batches)

    def _prune(self, n_batches: int) -> None:
        full = [n for n, w in self.wrapped.items() if len(w.kept) == n_batches]
        for name, w in self.wrapped.items():
            if any(name.startswith(f + ".") for f in full):
                w.drop()

    def batch(self, b: int) -> None:
        self.state.batch = b

    def remove(self) -> None:
        """Put the original submodules back (parents first) and free everything kept."""
        for name in reversed(list(self.wrapped)):
            w = self.wrapped[name]
            w.drop()
            replace_module(self.block, name, w.inner)
        self.wrapped.clear()
        self.state.batch = -1


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
        expert_min_tokens: an expert routed fewer calibration rows than this is quantized by
            RTN (and reported) instead of GPTQ (:mod:`.experts`).
        replay_mib: memory (MiB, where the block inputs are kept) for outputs of finished
            submodules replayed in later calibration passes of the same block (see
            :class:`_Replay`); 0 recomputes them. Does not change results.
        gptq: options of :func:`~.gptq.gptq_quantize` (damp, block_size, act_order, ...).
        rtn: round to nearest instead of GPTQ. With ``hessian`` the inputs' second moments
            (``diag H``, llama.cpp's "importance matrix") weight the scale search; the
            ``gptq`` keys ``scale_search`` (default on), ``search_grid``, ``min_shrink`` apply.
        refine: after each block is quantized, tune its scales and biases (codes fixed) to
            the dense block's output (:mod:`.refine`).
        refine_steps, refine_lr, refine_batch: :class:`~.refine.RefineOptions`.
        autoround: after each block is quantized (the base method's codes as the start), learn
            its rounding, scales and biases against the dense block's output
            (:mod:`.autoround`; method ``autoround``).
        autoround_steps, autoround_lr, autoround_batch, autoround_scales, autoround_init, autoround_loss:
            :class:`~.autoround.AutoRoundOptions` (``init``: ``gptq`` or ``rtn`` base codes).
    """

    hessian: bool = True
    rotate: bool = False
    rotation_block: int = DEFAULT_ROTATION_BLOCK
    rotation_signs: bool = False
    seed: int = 0
    true_sequential: bool = True
    batch_size: int = 8
    offload_inputs: bool = False
    expert_min_tokens: int = DEFAULT_MIN_TOKENS
    replay_mib: int = 2048
    gptq: dict[str, Any] = field(default_factory=dict)
    rtn: bool = False
    refine: bool = False
    refine_steps: int = DEFAULT_STEPS
    refine_lr: float = DEFAULT_LR
    refine_batch: int = DEFAULT_BATCH
    autoround: bool = False
    autoround_steps: int = AR_STEPS
    autoround_lr: float | None = AR_LR
    autoround_batch: int = AR_BATCH
    autoround_scales: bool = True
    autoround_init: str = "gptq"
    autoround_loss: str = "mse"

    def __post_init__(self) -> None:
        RefineOptions(self.refine_steps, self.refine_lr, self.refine_batch)  # validates them
        self.autoround_options()  # validates them

    def autoround_options(self) -> AutoRoundOptions:
        """The :class:`~.autoround.AutoRoundOptions` of these settings."""
        return AutoRoundOptions(self.autoround_steps, self.autoround_lr, self.autoround_batch,
                                self.autoround_scales, self.autoround_init, self.autoround_loss)

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
        if method == "autoround":  # learned rounding from GPTQ's codes or from searched RTN's
            opts["autoround"] = True
            if opts.get("autoround_init", "gptq") == "rtn":
                opts["rtn"] = True
                opts["hessian"] = False
        elif any(k.startswith("autoround") for k in opts):
            raise ValueError(f"method_options: {sorted(k for k in opts if k.startswith('autoround'))} "
                             f"apply to method 'autoround', not {method!r}")
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
        # MarlinExperts reuse the fused experts' tensor names (gate_up_proj, down_proj, *_bias)
        marlin = isinstance(mod, (MarlinLinear, MarlinExperts))
        if biases_only and not marlin:
            continue
        prefix = f"{name}." if name else ""
        for key, p in mod._parameters.items():
            dt = old.get(prefix + key)
            if p is None or dt is None or (marlin and key != "bias" and not key.endswith("_proj_bias")) \
                    or p.dtype == dt:
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


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]], device, store,
               replays: _Replays | None = None) -> list[torch.Tensor]:
    outs = []
    for b, (args, kwargs) in enumerate(inputs):
        if replays is not None:
            replays.batch(b)
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
        elif isinstance(m, MarlinExperts):
            for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if t is not None:
                    tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
            layers[name] = m.layer_spec()
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
        if spec.get("kind") == "experts":
            layer = MarlinExperts.like(block.get_submodule(name), MarlinExperts.plans_from_spec(spec),
                                       dtype_config, device=device)
            for key, t in state.items():  # assigned: the module's own bias dtype is the saved one
                if isinstance(getattr(layer, key), nn.Parameter):
                    setattr(layer, key, nn.Parameter(t.to(device), requires_grad=False))
                else:
                    setattr(layer, key, t.to(device))
            replace_module(block, name, layer)
            continue
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
    expert_plans: dict[str, dict[str, LayerPlan]] | None = None,
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
        expert_plans: fused experts modules to quantize (name -> projection -> plan, from
            :func:`~metal_marlin_torch.nn.plan_experts`): per-expert Hessians (:mod:`.experts`).
            Those inside the blocks become ``MarlinExperts``; the others are left for the caller.

    Returns:
        ``{"resumed_blocks": [...], "quantized_blocks": [...], "rtn_outside": [...],
        "experts": {name: {"tokens": [rows per expert], "rtn": {projection: {expert: rows}}}}}``
        (``experts``: the GPTQ-quantized experts modules; ``rtn`` lists the experts that saw
        fewer than ``options.expert_min_tokens`` rows and got round-to-nearest).
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
    per_block_experts: list[dict[str, dict[str, LayerPlan]]] = [{} for _ in blocks]

    def locate(name: str) -> tuple[int, str] | None:
        head = f"{prefix}." if prefix else ""
        rest = name[len(head):] if name.startswith(head) else None
        idx, _, sub = (rest or "").partition(".")
        if rest is not None and idx.isdigit() and int(idx) < len(blocks) and sub:
            return int(idx), sub
        return None

    for name, plan in plans.items():
        where = locate(name)
        if where is not None:
            per_block[where[0]][where[1]] = plan
        else:
            outside[name] = plan
    for name, projections in (expert_plans or {}).items():
        where = locate(name)
        if where is not None:
            per_block_experts[where[0]][where[1]] = projections

    wd: Path | None = None
    if work_dir is not None:
        wd = Path(work_dir)
        wd.mkdir(parents=True, exist_ok=True)
        settings = {"plans": {k: [p.format, p.group_size] for k, p in sorted(plans.items())},
                    "options": {k: v for k, v in options.__dict__.items() if k != "replay_mib"},
                    "dtype_config": dcfg.to_dict(),
                    "n_blocks": len(blocks)}
        if expert_plans:
            settings["experts"] = {k: {p: [pl.format, pl.group_size] for p, pl in sorted(v.items())}
                                   for k, v in sorted(expert_plans.items())}
        _check_run(wd, _fingerprint(settings, tokens))

    report: dict[str, Any] = {"resumed_blocks": [], "quantized_blocks": [], "rtn_outside": [], "experts": {}}
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
    dense_hidden = [_hidden_arg(a, k) for a, k in inputs] if options.refine or options.autoround else None
    refine_opts = RefineOptions(options.refine_steps, options.refine_lr, options.refine_batch)
    if options.refine:
        report["refine"] = {}
    if options.autoround:
        report["autoround"] = {}
    for i in bar:
        block = blocks[i]
        block_home = next(block.parameters()).device
        block.to(device)
        old_dtypes = _upcast(block, cdt) if cdt is not None else {}
        path = wd / f"block_{i:05d}.safetensors" if wd is not None else None
        outs = None
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
                elif per_block[i] or per_block_experts[i]:
                    # the dense weights learned rounding starts from (one block's worth)
                    dense_w = {n: block.get_submodule(n).weight.detach().clone() for n in per_block[i]
                               if isinstance(block.get_submodule(n), nn.Linear)} if options.autoround else {}
                    # refined scales change the block's outputs: then recompute them below
                    outs, experts_report = _quantize_block(
                        block, per_block[i], inputs, options, gptq_opts, dcfg, device, store, layer_fn,
                        per_block_experts[i], need_outputs=i + 1 < len(blocks) and targets is None)
                    head = f"{prefix}.{i}." if prefix else f"{i}."
                    report["experts"].update({head + k: v for k, v in experts_report.items()})
                    if targets is not None and options.autoround:
                        report["autoround"][i] = autoround_block(
                            block, dense_w, inputs, targets, options.autoround_options(),
                            lambda blk, a, k: _hidden(blk(*_to(a, device), **_to(k, device))), _hidden_arg)
                        del dense_w
                    if targets is not None and options.refine:
                        report["refine"][i] = refine_block(
                            block, inputs, targets, refine_opts, device,
                            lambda blk, a, k: _hidden(blk(*_to(a, device), **_to(k, device))), _hidden_arg)
                    _restore_dtypes(block, old_dtypes, biases_only=True)
                    if path is not None:
                        save_block(path, block)
                    report["quantized_blocks"].append(i)
                if i + 1 < len(blocks):
                    if outs is None:  # resumed, or nothing planned in this block
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
    fallbacks = {n: r["rtn"] for n, r in report["experts"].items() if any(r["rtn"].values())}
    if fallbacks:
        log.warning("quantize_layerwise: experts with fewer than %d calibration rows got round-to-nearest "
                    "(module: projection: {expert: rows}): %s", options.expert_min_tokens, fallbacks)
    if report["rtn_outside"]:
        log.info("quantize_layerwise: no calibration inputs reach %s; used round-to-nearest", report["rtn_outside"])
    model.train(model_was_training)
    return report


def _quantize_block(
    block: nn.Module, plans: dict[str, LayerPlan], inputs: list[tuple[tuple, dict]],
    options: DriverOptions, gptq_opts: dict[str, Any], dcfg: DTypeConfig, device, store,
    layer_fn: Callable[..., MarlinLinear], expert_plans: dict[str, dict[str, LayerPlan]] | None = None,
    need_outputs: bool = False,
) -> tuple[list[torch.Tensor] | None, dict[str, Any]]:
    """Quantize the block's planned linears stage by stage, then its planned experts modules
    (their Hessians from the block with every linear already quantized); with ``need_outputs``
    also run the quantized block (stand-ins) over ``inputs`` and return its outputs (the next
    block's inputs) with the experts' reports by name. Outputs of finished submodules are
    replayed across the linear stages (:class:`_Replay`); the experts pass and the final run
    after it recompute (the experts change what any submodule holding them returns).
    """
    names = [n for n in plans if isinstance(block.get_submodule(n), nn.Linear)]
    if options.hessian and options.true_sequential:
        stages = _stages(block, names, inputs[0], device)
    else:
        stages = [names]
    finals: dict[str, MarlinLinear] = {}
    reports: dict[str, Any] = {}
    # the experts modules count as planned, so no submodule holding one is replayed
    replays = _Replays(block, names + list(expert_plans or {}), max(0, int(options.replay_mib)) << 20, store)
    outs = None
    try:
        for stage in stages:
            replays.before_pass(set(finals), len(inputs), last=False)
            _quantize_stage(block, stage, plans, inputs, options, gptq_opts, dcfg, device, layer_fn, finals,
                            replays)
        if expert_plans:
            replays.remove()  # the experts pass runs the block without batch indices
            for name, projections in expert_plans.items():
                def run(args: tuple, kwargs: dict) -> Any:
                    return block(*_to(args, device), **_to(kwargs, device))
                hessian = options.hessian
                q, reports[name] = quantize_experts(
                    block, name, projections, inputs, run, dcfg, gptq_opts, layer_fn,
                    options.expert_min_tokens if hessian else 2**62)  # no Hessians: every expert RTN
                if options.rotate:
                    reports[name]["note"] = "experts get no input rotation (moe_gemm has none): plain GPTQ"
                replace_module(block, name, q)
        if need_outputs:
            if expert_plans:
                outs = _run_block(block, inputs, device, store)
            else:
                replays.before_pass(set(finals), len(inputs), last=True)
                outs = _run_block(block, inputs, device, store, replays)
    finally:
        replays.remove()
        _restore(block, finals)
    return outs, reports


def _stage_hessians(block: nn.Module, stage: list[str], inputs: list[tuple[tuple, dict]], device,
                    shared: bool, replays: _Replays | None = None) -> dict[str, torch.Tensor]:
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
            for b, (args, kwargs) in enumerate(inputs):
                if replays is not None:
                    replays.batch(b)
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
        for b, (args, kwargs) in enumerate(inputs):
            if replays is not None:
                replays.batch(b)
            block(*_to(args, device), **_to(kwargs, device))
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian() for n, a in accs.items()}


def _quantize_stage(
    block: nn.Module, stage: list[str], plans: dict[str, LayerPlan], inputs: list[tuple[tuple, dict]],
    options: DriverOptions, gptq_opts: dict[str, Any], dcfg: DTypeConfig, device,
    layer_fn: Callable[..., MarlinLinear], finals: dict[str, MarlinLinear], replays: _Replays | None = None,
) -> None:
    """Collect the stage's Hessians (earlier stages run as stand-ins), then quantize its layers."""
    hessians: dict[str, torch.Tensor] = {}
    if options.hessian:
        hessians = _stage_hessians(block, stage, inputs, device, shared=options.true_sequential,
                                   replays=replays)
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
