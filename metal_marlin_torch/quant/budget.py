"""Bit budgets: per-layer format and group chosen to minimize the model's error at a given
number of stored bits per weight (``QuantConfig(bits_per_weight=3.5)``).

Three steps:

1. **Sensitivity** (:func:`fisher_diagonals`): the diagonal of the Fisher information of each
   selected layer's weight, from calibration windows. For a model with ``logits`` the labels
   are *sampled from the model's own distribution*, so the Fisher is the expected Hessian of
   the KL divergence to the dense model: a weight error ``d`` costs about
   ``0.5 * sum(F * d**2)`` nats of mean KL per token. For other models (encoders) the loss is
   a random projection ``<r, h>`` of the main output with ``r ~ N(0, 1)``, whose squared
   gradient estimates ``J^T J``: the cost is then half the mean squared output change. Both
   are unbiased with several windows per backward pass (the per-token score has zero mean
   under the sampled labels, so cross terms vanish in expectation). One backward pass per
   batch, no per-candidate forward passes: the cheapest measure that weighs layers against
   each other in the model's own units (a layer's output error alone does not say how much
   the rest of the network amplifies it).
2. **Candidates** (:func:`layer_costs`): for every layer and every candidate (format, group)
   that fits its shape, the exact stored bits (codes, scales, biases, global scale and
   rotation signs, as the layer will hold them) and the predicted cost of the
   round-to-nearest quantized weight.
3. **Allocation** (:func:`allocate`): the multiple-choice knapsack (one candidate per layer,
   least total predicted cost, total bits within the budget) solved by dynamic programming.
   Layers pinned by ``QuantConfig.rules`` keep their setting and their bits count against
   the budget.

The method (RTN, GPTQ, MR-GPTQ) then quantizes each layer with its allocated setting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import formats as F
from ..dtypes import resolve
from ..nn.config import LayerPlan, QuantConfig
from .scale_search import search_group_params

log = logging.getLogger("metal_marlin_torch")

# Groups every kernel takes that a budget tries for each format.
CANDIDATE_GROUPS: tuple[int, ...] = (32, 64, 128)


def default_candidates() -> tuple[tuple[str, int], ...]:
    """``(format, group)`` pairs a budget tries by default: every *registered* affine integer
    and NormalFloat-codebook format (``formats.FORMATS``; a format added later, e.g. int5 or
    int6, joins automatically) at the groups of :data:`CANDIDATE_GROUPS`, ordered by bits.

    fp4/mxfp4/nvfp4 and the fp8 formats are left out: at equal bits nf4/int4 and int8 are
    ahead in the quality table (benchmarks/results/quality.md), so they would only add noise."""
    from ..formats.integer import _Affine  # noqa: PLC0415
    from ..formats.nf import _NormalFloat  # noqa: PLC0415

    fmts = sorted((f for f in F.FORMATS.values() if isinstance(f, (_Affine, _NormalFloat))),
                  key=lambda f: (f.bits, f.name))
    return tuple((f.name, g) for f in fmts for g in CANDIDATE_GROUPS if g in f.group_sizes)


DEFAULT_CANDIDATES: tuple[tuple[str, int], ...] = default_candidates()  # the formats registered at import
DEFAULT_FISHER_SAMPLES = 16  # calibration windows for the Fisher (a backward pass per batch)
FISHER_BATCH = 4


@dataclass
class Candidate:
    """One way to store one layer: its setting, stored bits and predicted cost (nats)."""

    format: str
    group_size: int
    bits: int
    cost: float


@dataclass
class BudgetPlan:
    """The allocation of :func:`plan_budget`.

    Attributes:
        target: requested bits per weight.
        achieved: stored bits per weight of the plan over the planned layers (<= target).
        plans: layer name -> :class:`LayerPlan`.
        pinned: names of the layers whose setting a rule fixed.
        cost: predicted cost (nats of mean KL per token, or half the mean squared output
            change for models without logits) of each layer at its chosen setting.
        weights: number of weights of each layer.
        experts: MoE experts module name -> projection -> :class:`LayerPlan`: each projection
            stack (``<module>.gate_up_proj``, ``<module>.down_proj``: one matrix per expert, one
            setting for all of them, as ``MarlinExperts`` holds it) is one planning unit;
            ``cost``, ``weights`` and ``pinned`` name it ``<module>.<projection>``.
    """

    target: float
    achieved: float
    plans: dict[str, LayerPlan] = field(default_factory=dict)
    pinned: list[str] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    experts: dict[str, dict[str, LayerPlan]] = field(default_factory=dict)

    def units(self) -> dict[str, LayerPlan]:
        """Every planned unit by name: the layers, then the experts' projection stacks."""
        return {**self.plans, **{f"{m}.{p}": pl for m, projs in self.experts.items() for p, pl in projs.items()}}

    def histogram(self) -> dict[str, int]:
        """``"format g{group}" -> number of units`` (layers and expert stacks) of the plan."""
        out: dict[str, int] = {}
        for p in self.units().values():
            key = f"{p.format} g{p.group_size}"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"bits_per_weight": self.target, "achieved_bits_per_weight": self.achieved,
                "predicted_cost": sum(self.cost.values()), "pinned": list(self.pinned),
                "plan": {n: [p.format, p.group_size] for n, p in self.units().items()},
                "experts": sorted(f"{m}.{p}" for m, projs in self.experts.items() for p in projs)}

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in self.histogram().items())
        stacks = sum(len(p) for p in self.experts.values())
        experts = f" and {stacks} expert stacks" if stacks else ""
        return (f"bit budget {self.target:g} bits/weight: {self.achieved:.4f} achieved over "
                f"{len(self.plans)} layers{experts} ({len(self.pinned)} pinned by rules); {parts}")


def _main_output(out: Any) -> tuple[torch.Tensor, bool]:
    """``(tensor, is_logits)``: the model's logits, else its main hidden output."""
    if getattr(out, "logits", None) is not None:
        return out.logits, True
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state, False
    if isinstance(out, (tuple, list)):
        return out[0], False
    if isinstance(out, torch.Tensor):
        return out, False
    raise ValueError(f"fisher_diagonals: cannot find the output tensor of the model (got {type(out).__name__})")


@dataclass
class _Unit:
    """A planning unit: an ``nn.Linear`` (``param`` its weight ``[N, K]``) or one projection
    stack of a fused experts module (``param`` the 3-D ``[E, N, K]``, ``[E, K, N]`` when the
    model stores it transposed)."""

    module: nn.Module
    param: torch.Tensor
    experts: Any = None  # ExpertsShape of the experts module, None for a Linear
    proj: str = ""

    def oriented(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` shaped like ``param`` as ``[N, K]`` / ``[E, N, K]``."""
        return t.transpose(1, 2) if self.experts is not None and self.experts.is_transposed else t

    def nk(self) -> tuple[int, int, int]:
        """``(E, N, K)``: experts (1 for a Linear), out and in features of one matrix."""
        if self.experts is None:
            return 1, *self.param.shape
        n, k = self.experts.projections()[self.proj]
        return self.experts.num_experts, n, k


def _unit(model: nn.Module, name: str) -> _Unit:
    """The unit called ``name``: a Linear's module name, or ``<experts module>.<projection>``."""
    from ..nn.experts import experts_shape  # noqa: PLC0415

    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), torch.Tensor):
        return _Unit(module, module.weight)
    parent, _, proj = name.rpartition(".")
    experts = model.get_submodule(parent)
    shape = experts_shape(experts)
    if shape is None or proj not in shape.projections():
        raise ValueError(f"bit budget: {name!r} is neither a Linear layer nor a projection of a fused experts module")
    return _Unit(experts, getattr(experts, proj), shape, proj)


class _ExpertsHessians:
    """Input Hessians of an experts module's projection stacks, shared by its experts: the
    routed rows of every expert together (``sum_e X_e^T X_e / sum_e T_e``; for ``down_proj``
    the experts' hidden activations from their dense up projections). One ``K x K`` matrix per
    stack, as for a Linear layer, where per-expert Hessians of every block at once would need
    ``E`` times the memory; GPTQ itself (:mod:`.experts`) still uses each expert's own."""

    def __init__(self, experts: nn.Module, projs: Iterable[str]) -> None:
        from ..nn.experts import experts_shape  # noqa: PLC0415

        self.experts = experts
        self.shape = experts_shape(experts)
        dims = {self.shape.up_name: self.shape.hidden_dim, "down_proj": self.shape.intermediate_dim}
        device = experts.down_proj.device
        self.sums = {p: torch.zeros(dims[p], dims[p], dtype=torch.float32, device=device) for p in projs}
        self.rows = dict.fromkeys(self.sums, 0)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:  # noqa: ARG002 (hook signature)
        from .experts import _routed, expert_hidden  # noqa: PLC0415

        with torch.no_grad():
            x, ids = _routed(args, kwargs)
            for e in torch.unique(ids).tolist():
                if not 0 <= e < self.shape.num_experts:  # transformers' expert-parallel sentinel
                    continue
                rows = x[(ids == e).any(-1)].detach().float()
                for proj, acc in self.sums.items():
                    r = rows if proj == self.shape.up_name else expert_hidden(self.experts, e, rows)
                    acc.addmm_(r.T, r)
                    self.rows[proj] += r.shape[0]

    def hessians(self) -> dict[str, torch.Tensor]:
        return {p: acc / max(self.rows[p], 1) for p, acc in self.sums.items()}


def fisher_diagonals(
    model: nn.Module, names: Iterable[str], tokens: torch.Tensor, batch_size: int = FISHER_BATCH,
    seed: int = 0, hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``float32 [N, K]`` per output token of the weights of the ``nn.Linear``
    layers called ``names``, from calibration windows ``tokens int64 [n, L]`` (module doc).
    A name ``<experts module>.<projection>`` is a fused MoE projection stack: its Fisher is
    ``[E, N, K]`` (each expert's matrix; experts no calibration token reaches get zeros).

    The model's parameters are left as they were (``requires_grad`` restored, gradients
    cleared); its mode is set to eval for the passes and restored. ``hessians``: a dict that
    receives each layer's input Hessian ``X^T X / T`` from the same passes (for
    :func:`gptq_column_factors`; an expert stack's is shared by its experts, :class:`_ExpertsHessians`)."""
    names = list(names)
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"fisher_diagonals: tokens must be int64 [n, L], got {tokens.dtype} {tuple(tokens.shape)}")
    units = {n: _unit(model, n) for n in names}
    params = list(model.parameters())
    old_grad = [p.requires_grad for p in params]
    was_training = model.training
    fisher = {n: torch.zeros(u.param.shape, dtype=torch.float32, device=u.param.device) for n, u in units.items()}
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    n_tokens = 0
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    accs: dict[str, Any] = {}
    stacks: dict[int, tuple[_ExpertsHessians, list[str]]] = {}
    handles = []
    if hessians is not None:
        from .gptq import HessianAccumulator  # noqa: PLC0415

        for n, u in units.items():
            if u.experts is None:
                accs[n] = HessianAccumulator(u.module.in_features, u.param.device)
                handles.append(u.module.register_forward_hook(accs[n].hook()))
        for n, u in units.items():
            if u.experts is not None:
                stacks.setdefault(id(u.module), (u.module, []))[1].append(n)
        for key, (module, unit_names) in list(stacks.items()):
            acc = _ExpertsHessians(module, [units[n].proj for n in unit_names])
            handles.append(module.register_forward_pre_hook(acc.hook, with_kwargs=True))
            stacks[key] = (acc, unit_names)
    try:
        for p in params:
            p.requires_grad_(False)
        for u in units.values():
            u.param.requires_grad_(True)
        if use_cache is not None:
            cfg.use_cache = False
        model.eval()
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(device)
            out, is_logits = _main_output(model(input_ids=batch))
            out = out.float()
            if is_logits:
                # logits: labels drawn from the model's own distribution (true Fisher of the KL)
                logp = torch.log_softmax(out, dim=-1)
                probs = logp.detach().exp().reshape(-1, out.shape[-1]).cpu()
                labels = torch.multinomial(probs, 1, generator=gen).to(device)
                loss = -logp.reshape(-1, out.shape[-1]).gather(1, labels).sum()
                n_tokens += labels.numel()
            else:
                r = torch.randn(out.shape, generator=gen).to(device)
                loss = (out * r).sum()
                n_tokens += out[..., 0].numel()
            # allow_unused: a layer the main output does not depend on (BERT's pooler beside
            # last_hidden_state) gets zero sensitivity, hence the cheapest setting
            grads = torch.autograd.grad(loss, [u.param for u in units.values()], allow_unused=True)
            for n, g in zip(units, grads, strict=True):
                if g is not None:
                    fisher[n] += g.float().square()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, old_grad, strict=True):
            p.requires_grad_(r)
        if use_cache is not None:
            cfg.use_cache = use_cache
        model.train(was_training)
    if hessians is not None:
        hessians.update({n: a.hessian() for n, a in accs.items()})
        for acc, unit_names in stacks.values():
            shared = acc.hessians()
            hessians.update({n: shared[units[n].proj] for n in unit_names})
    return {n: units[n].oriented(f / max(n_tokens, 1)) for n, f in fisher.items()}


def gptq_column_factors(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """Per input column ``k``, how much less a rounding error costs after GPTQ than before:
    ``(1 / U_kk^2) / H_kk`` with ``U`` the upper Cholesky factor of ``H^-1`` in GPTQ's column
    order (float32 ``[K]``, in ``(0, 1]`` up to damping).

    GPTQ's output error is ``sum_k e_k^2 / U_kk^2`` for the errors ``e_k`` of the columns as
    rounded (its loss, :class:`~.gptq.GPTQResult`); without compensation an error costs
    ``H_kk e_k^2`` (the diagonal that the Fisher already holds). ``1 / U_kk^2`` is the
    precision of input ``k`` given the columns GPTQ still can move, so the ratio is small for
    inputs the others predict well (where GPTQ gains most) and 1 for independent ones.
    Multiplying the Fisher's columns by it makes a candidate's predicted cost that of the
    method actually used, as long as GPTQ's column errors are about as large as RTN's."""
    from .gptq import damped_inverse_cholesky  # noqa: PLC0415

    h = hessian.float().clone()
    diag = torch.diagonal(h).clone()
    dead = diag == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else torch.arange(h.shape[0], device=h.device)
    u, _ = damped_inverse_cholesky(h[perm][:, perm], damp)
    eff = torch.empty_like(diag)
    eff[perm] = 1.0 / torch.diagonal(u).square()
    ratio = eff / torch.diagonal(h)
    return torch.where(dead, torch.zeros_like(ratio), ratio.clamp(0.0, 1.0))


def stored_bits(fmt: str, group_size: int, n: int, k: int, scale_dtype: torch.dtype,
                rotation_signs: bool = False) -> int:
    """Exact stored bits of an ``[n, k]`` layer in ``fmt``/``group_size``: packed codes, scales,
    biases, global scale, and (``rotation_signs``) the float32 signs of an MR-GPTQ rotation."""
    spec = F.get_format(fmt)
    g = spec.check_group_size(group_size, k)
    bits = n * F.packed_words(k, spec.bits) * 32
    scale_bytes = torch.empty((), dtype=spec.scale_dtype(scale_dtype)).element_size()
    bits += n * (k // g) * scale_bytes * 8 * (2 if spec.has_biases else 1)
    if spec.has_global_scale:
        bits += 32
    if rotation_signs:
        bits += 32 * k
    return bits


def layer_costs(
    weight: torch.Tensor, fisher: torch.Tensor, candidates: Iterable[tuple[str, int]],
    scale_dtype: torch.dtype, rotation_signs: bool = False, search: bool = False,
) -> list[Candidate]:
    """Every candidate that fits ``weight [N, K]``, with its stored bits and predicted cost
    ``0.5 * sum(fisher * (W - Q(W))**2)``: ``Q`` the formats' plain RTN, or with ``search``
    RTN with the group parameters of least ``fisher``-weighted error (the shrink search GPTQ
    and searched / imatrix RTN use, :mod:`.scale_search`)."""
    n, k = weight.shape
    w = weight.detach().float()
    out = []
    for fmt, group in candidates:
        spec = F.get_format(fmt)
        try:
            spec.check_group_size(group, k)
        except ValueError:
            continue
        g = F.resolve_group_size(group, k)
        groups = w.reshape(n, k // g, g)
        if search:
            params = search_group_params(spec, groups, spec.scale_dtype(scale_dtype), fisher.view(n, k // g, g))
        else:
            params = spec.group_params(groups, spec.scale_dtype(scale_dtype))  # RTN, without packing
        w_hat = spec.decode(spec.encode(groups, params), params).reshape(n, k)
        cost = 0.5 * float((fisher * (w - w_hat).square()).sum())
        out.append(Candidate(fmt, group, stored_bits(fmt, group, n, k, scale_dtype, rotation_signs), cost))
    return out


MAX_UNITS = 20000  # resolution of the knapsack: at most this many bit units per budget


def allocate(options: dict[str, list[Candidate]], budget_bits: float) -> dict[str, Candidate]:
    """Choose one candidate per layer: the least total cost with total bits <= ``budget_bits``.

    A multiple-choice knapsack solved by dynamic programming over bit units: the unit is the
    greatest common divisor of all candidates' bits (then the answer is exact), or coarser
    when that would need more than :data:`MAX_UNITS` units, with every candidate's bits
    rounded *up* to whole units so the plan can never exceed the budget; a final pass spends
    what the rounding left on the single changes that lower the cost most and still fit.
    Raises ``ValueError`` when even the cheapest choices exceed the budget."""
    import math

    import numpy as np

    empty = [n for n, c in options.items() if not c]
    if empty:
        raise ValueError(f"allocate: layers {empty[:4]} have no candidate setting that fits their shape")
    cheapest = sum(min(c.bits for c in cands) for cands in options.values())
    if cheapest > budget_bits:
        raise ValueError(f"allocate: the cheapest settings need {cheapest} bits, more than the budget "
                         f"{budget_bits:.0f}")
    names = list(options)
    unit = 0
    for cands in options.values():
        for c in cands:
            unit = math.gcd(unit, int(c.bits))
    unit = max(unit, math.ceil(budget_bits / MAX_UNITS))
    cap = int(budget_bits // unit)
    best = np.zeros(cap + 1)  # best[u]: least cost of the layers so far within u units
    picks = []
    for name in names:
        cands = options[name]
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int32)
        for j, c in enumerate(cands):
            w = -(-int(c.bits) // unit)  # rounded up: the plan stays within the budget
            if w > cap:
                continue
            trial = np.full(cap + 1, np.inf)
            trial[w:] = best[:cap + 1 - w] + c.cost
            better = trial < new
            new[better] = trial[better]
            arg[better] = j
        best = new
        picks.append(arg)
    if not np.isfinite(best[cap]):  # rounding up made the cheapest plan too large: take it anyway
        choice = {n: min(options[n], key=lambda c: (c.bits, c.cost)) for n in names}
    else:
        choice = {}
        u = cap
        for name, arg in zip(reversed(names), reversed(picks), strict=True):
            c = options[name][int(arg[u])]
            choice[name] = c
            u -= -(-int(c.bits) // unit)
    used = sum(c.bits for c in choice.values())
    while True:  # fill pass: the single change with the largest cost drop that fits
        top: tuple[float, str, Candidate] | None = None
        for name, cands in options.items():
            cur = choice[name]
            for c in cands:
                if c.cost < cur.cost and used - cur.bits + c.bits <= budget_bits:
                    gain = cur.cost - c.cost
                    if top is None or gain > top[0]:
                        top = (gain, name, c)
        if top is None:
            break
        _, name, c = top
        used += c.bits - choice[name].bits
        choice[name] = c
    return {n: choice[n] for n in names}


def sensitivity_kind(config: QuantConfig) -> str:
    """How a budget predicts each candidate's error, following the method that will quantize:
    ``"rtn"`` (the formats' plain RTN), ``"search"`` (RTN with the scale search: searched or
    importance-weighted RTN, GPTQ without a Hessian) or ``"gptq"`` (GPTQ's compensation,
    :func:`gptq_column_factors`). ``method_options["sensitivity"]`` overrides it."""
    opts = config.method_options
    if "sensitivity" in opts:
        kind = opts["sensitivity"]
        if kind not in ("rtn", "search", "gptq"):
            raise ValueError(f"method_options['sensitivity'] must be 'rtn', 'search' or 'gptq', got {kind!r}")
        return kind
    if config.method == "autoround" and opts.get("autoround_init", "gptq") == "rtn":
        return "search"  # learned rounding from searched RTN's codes
    if config.method == "rtn":
        return "search" if (opts.get("scale_search") or opts.get("imatrix")) else "rtn"
    if not opts.get("hessian", True):
        return "search" if opts.get("scale_search", True) else "rtn"
    return "gptq"


def plan_budget(
    model: nn.Module, plans: dict[str, LayerPlan], config: QuantConfig, *,
    calibration: Any = None, tokenizer: Any = None, experts: dict[str, dict[str, LayerPlan]] | None = None,
    **_: Any,
) -> BudgetPlan:
    """Per-layer settings for ``config.bits_per_weight`` over the layers of ``plans`` (those
    :func:`~metal_marlin_torch.nn.quantize.plan_layers` selected) and the projection stacks of
    the fused MoE modules of ``experts`` (:func:`~metal_marlin_torch.nn.experts.plan_experts`:
    module -> projection -> plan): each stack, all its experts' matrices, is one unit with one
    setting, its Fisher summed over the experts, its bits those of every expert. Units matched
    by a rule of ``config.rules`` (a stack by ``<module>.<projection>``) keep their planned
    setting; the others get the allocation.

    ``calibration``/``tokenizer``: as for GPTQ (:func:`~.calibration.load_calibration`; None:
    the default standard-library text, which needs ``tokenizer``)."""
    from .calibration import DEFAULT_SEED, DEFAULT_SEQ_LEN, load_calibration

    target = float(config.bits_per_weight)
    opts = config.method_options
    sdt = resolve(config.dtype_config).torch_scales
    signs = config.method == "mr-gptq" and bool(opts.get("rotation_signs", False))
    n_fisher = min(int(opts.get("n_samples", DEFAULT_FISHER_SAMPLES)), config.budget_samples)
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        tokens = calibration[:n_fisher].to(torch.int64)
    else:
        tokens = load_calibration(calibration, tokenizer, n_samples=n_fisher,
                                  seq_len=int(opts.get("seq_len", DEFAULT_SEQ_LEN)),
                                  seed=int(opts.get("calibration_seed", DEFAULT_SEED)))
    experts = experts or {}
    unit_plans = {**plans, **{f"{m}.{p}": pl for m, projs in experts.items() for p, pl in projs.items()}}
    units = {n: _unit(model, n) for n in unit_plans}

    def bits_of(n: str, fmt: str, group: int) -> int:
        # an expert stack: E matrices, each with its own scales (and nvfp4 global scale); MoE
        # layers take no rotation (moe_gemm has none), so no signs
        e, rows, k = units[n].nk()
        return e * stored_bits(fmt, group, rows, k, sdt, signs and units[n].experts is None)

    pinned = [n for n in unit_plans if config.pinned(n)]
    free = [n for n in unit_plans if n not in pinned]
    weights = {n: units[n].param.numel() for n in unit_plans}
    total = sum(weights.values())
    budget_bits = target * total
    fixed_bits = sum(bits_of(n, unit_plans[n].format, unit_plans[n].group_size) for n in pinned)
    result = BudgetPlan(target, 0.0, pinned=pinned, weights=weights)
    sens = sensitivity_kind(config)
    hessians: dict[str, torch.Tensor] | None = {} if sens == "gptq" else None
    fisher = fisher_diagonals(model, free, tokens, hessians=hessians) if free else {}
    options: dict[str, list[Candidate]] = {}
    for n in free:
        f = fisher.pop(n)
        if hessians is not None:
            f = f * gptq_column_factors(hessians.pop(n), float(opts.get("damp", 0.01)),
                                        bool(opts.get("act_order", True))).to(f.device)
        w = units[n].oriented(units[n].param.detach())
        k = w.shape[-1]
        # an expert stack's matrices are rows of one [E*N, K] matrix: groups run along K per row
        options[n] = layer_costs(w.reshape(-1, k), f.reshape(-1, k), config.budget_candidates(), sdt,
                                 signs and units[n].experts is None, search=sens != "rtn")
        for c in options[n]:
            c.bits = bits_of(n, c.format, c.group_size)
    if fixed_bits > budget_bits:
        raise ValueError(f"QuantConfig.bits_per_weight={target:g}: the layers pinned by rules alone need "
                         f"{fixed_bits / total:.4f} bits per weight of the quantized layers")
    try:
        choice = allocate(options, budget_bits - fixed_bits) if free else {}
    except ValueError as err:
        cheapest = (fixed_bits + sum(min(c.bits for c in o) for o in options.values() if o)) / total
        raise ValueError(f"QuantConfig.bits_per_weight={target:g} is below the cheapest plan of the candidate "
                         f"settings ({cheapest:.4f} bits/weight): {err}") from None
    used = fixed_bits
    for n, plan in unit_plans.items():
        if n in choice:
            c = choice[n]
            plan = LayerPlan(c.format, c.group_size)
            result.cost[n] = c.cost
            used += c.bits
        if units[n].experts is None:
            result.plans[n] = plan
        else:
            module, _, proj = n.rpartition(".")
            result.experts.setdefault(module, {})[proj] = plan
    result.achieved = used / total
    log.info("metal_marlin_torch: %s", result)
    return result
