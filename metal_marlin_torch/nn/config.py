"""`QuantConfig`: what :func:`quantize_model` does, in one small dataclass (torchao style)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from .. import formats as F
from ..dtypes import DTypeConfig

DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*.lm_head", "*embed*")

# Mixed precision of seeds/002: attention projections at 4 bits (FP4), the MLP at 3 bits (NF3)
# except down_proj, which feeds the residual stream directly and keeps 4 bits. First match wins.
MIXED_4_3_RULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("*.down_proj", {"format": "fp4"}),
    ("*.mlp.*", {"format": "nf3"}),
    ("*.self_attn.*", {"format": "fp4"}),
)

METHODS: tuple[str, ...] = ("rtn", "gptq", "mr-gptq", "autoround")
REFINE_MODES: tuple[str, ...] = ("block", "model")  # QuantConfig.refine besides False / True (= "block")


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized: format and group size after the rules are applied."""

    format: str
    group_size: int


@dataclass
class QuantConfig:
    """Configuration of :func:`~metal_marlin_torch.quantize_model`.

    Attributes:
        format: weight format (``fp4``, ``mxfp4``, ``nvfp4``, ``int8``/``6``/``5``/``4``/``3``/``2``,
            ``nf4``, ``nf3``, ``fp8_e4m3``, ``fp8_e5m2``).
        group_size: group length (32/64/128/256, -1 per-channel); None = the format's default.
        method: ``rtn`` (round to nearest), ``gptq``, ``mr-gptq`` or ``autoround`` (learned
            rounding from GPTQ's codes, ``quant/autoround.py``) (need calibration data).
        include: glob patterns of module names to convert (None = every ``nn.Linear``).
        exclude: glob patterns never converted (default: ``lm_head`` and embeddings).
        rules: ``(pattern, overrides)`` pairs; the first pattern matching a layer's name
            overrides ``format``/``group_size`` for it (mixed precision, e.g.
            :data:`MIXED_4_3_RULES`).
        dtype_config: dtypes (scales, activations); None = the process default.
        method_options: extra options of the method (e.g. GPTQ damping).
        experts: also convert fused mixture-of-experts modules (transformers 5's 3-D
            ``gate_up_proj``/``down_proj`` experts) to ``MarlinExperts``; False leaves them dense.
        bits_per_weight: a bit budget: stored bits per weight (codes, scales, biases) over the
            converted ``nn.Linear`` layers and MoE experts. Each layer (and each experts
            projection stack, ``<module>.gate_up_proj`` / ``<module>.down_proj``, one setting for
            all its experts) not pinned by ``rules`` then gets the
            format and group among ``candidates`` that minimize the model's predicted error
            under the budget (``quant/budget.py``; needs calibration text or tokens as GPTQ
            does). None: every layer gets ``format``/``group_size`` (or its rule).
        candidates: ``(format, group_size)`` pairs the budget chooses from; None =
            ``quant.budget.default_candidates()``: every registered integer and NormalFloat
            format (int2/3/4/8, nf3/nf4, ...) at groups 32, 64 and 128.
        budget_samples: calibration windows used to measure the sensitivities (a backward
            pass per 4 windows).
        refine: tune the quantized layers' scales and biases (codes fixed) against the dense
            model on the calibration data (needs calibration text or tokens). ``False``: off;
            ``True`` or ``"block"``: after the method quantizes a block, toward that block's
            dense output (``quant/refine.py``; ``method_options`` keys ``refine_steps``,
            ``refine_lr``, ``refine_batch``); ``"model"``: after every layer is quantized, all
            of them together toward the dense model's output (next-token KL for causal LMs,
            last hidden state for encoders; ``quant/refine_model.py``, whose ``method_options``
            keys are the same plus ``refine_holdout``, ``refine_eval_every``,
            ``refine_save_every``, ``refine_topk``, ``refine_norms``, ``refine_patience``).
    """

    format: str = "fp4"
    group_size: int | None = None
    method: str = "rtn"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    rules: tuple[tuple[str, dict[str, Any]], ...] = ()
    dtype_config: DTypeConfig | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    experts: bool = True
    bits_per_weight: float | None = None
    candidates: tuple[tuple[str, int], ...] | None = None
    budget_samples: int = 16
    refine: bool | str = False

    def __post_init__(self) -> None:
        fmt = F.get_format(self.format)
        if self.group_size is not None and self.group_size not in fmt.group_sizes:
            raise ValueError(
                f"QuantConfig.group_size: format {self.format!r} takes {fmt.group_sizes}, "
                f"got {self.group_size!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method must be one of {METHODS}, got {self.method!r}")
        self.include = None if self.include is None else tuple(self.include)
        self.exclude = tuple(self.exclude)
        self.rules = tuple((p, dict(o)) for p, o in self.rules)
        for pattern, overrides in self.rules:
            bad = set(overrides) - {"format", "group_size"}
            if bad:
                raise ValueError(
                    f"QuantConfig.rules[{pattern!r}]: only 'format' and 'group_size' can be "
                    f"overridden, got {sorted(bad)}"
                )
            self.plan_for("", overrides)  # validates the override's format/group
        if self.bits_per_weight is not None:
            bpw = self.bits_per_weight
            if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not 1.0 <= bpw <= 32.0:
                raise ValueError(f"QuantConfig.bits_per_weight must be a number in [1, 32] or None, got {bpw!r}")
            self.bits_per_weight = float(bpw)
        if self.candidates is not None:
            self.candidates = tuple((str(f), int(g)) for f, g in self.candidates)
            if not self.candidates:
                raise ValueError("QuantConfig.candidates must name at least one (format, group_size), got ()")
            for fmt_name, group in self.candidates:
                fmt = F.get_format(fmt_name)
                if group not in fmt.group_sizes:
                    raise ValueError(f"QuantConfig.candidates: format {fmt_name!r} takes group_size in "
                                     f"{fmt.group_sizes}, got {group!r}")
        if not isinstance(self.refine, bool) and self.refine not in REFINE_MODES:
            raise ValueError(f"QuantConfig.refine must be a bool or one of {REFINE_MODES}, got {self.refine!r}")
        if isinstance(self.budget_samples, bool) or not isinstance(self.budget_samples, int) \
                or self.budget_samples < 1:
            raise ValueError(f"QuantConfig.budget_samples must be a positive int, got {self.budget_samples!r}")

    def budget_candidates(self) -> tuple[tuple[str, int], ...]:
        """The ``(format, group_size)`` pairs a bit budget chooses from."""
        if self.candidates is not None:
            return self.candidates
        from ..quant.budget import default_candidates  # noqa: PLC0415 (quant sits above nn)

        return default_candidates()

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` is to be converted."""
        if any(fnmatchcase(name, p) for p in self.exclude):
            return False
        return self.include is None or any(fnmatchcase(name, p) for p in self.include)

    def pinned(self, name: str) -> bool:
        """Whether a rule fixes the setting of the layer called ``name`` (a bit budget leaves it)."""
        return any(fnmatchcase(name, p) for p, _ in self.rules)

    def plan(self, name: str) -> LayerPlan:
        """The format and group size for the layer called ``name``."""
        for pattern, overrides in self.rules:
            if fnmatchcase(name, pattern):
                return self.plan_for(name, overrides)
        return self.plan_for(name, {})

    def plan_for(self, name: str, overrides: dict[str, Any]) -> LayerPlan:
        """Apply ``overrides`` to the config's format and group size.

        Group size precedence: the override's, else the config's if the (possibly overridden)
        format takes it, else that format's default (e.g. 32 for mxfp4).
        """
        fmt_name = overrides.get("format", self.format)
        fmt = F.get_format(fmt_name)
        if "group_size" in overrides:
            group = overrides["group_size"]
            if group not in fmt.group_sizes:
                raise ValueError(
                    f"QuantConfig rule for {name!r}: format {fmt_name!r} takes "
                    f"group_size in {fmt.group_sizes}, got {group!r}"
                )
        elif self.group_size in fmt.group_sizes:
            group = self.group_size
        else:
            group = F.default_group_size(fmt_name)
        return LayerPlan(fmt_name, group)

    def with_(self, **changes: Any) -> QuantConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "group_size": self.group_size, "method": self.method,
            "include": list(self.include) if self.include is not None else None,
            "exclude": list(self.exclude), "rules": [[p, o] for p, o in self.rules],
            "method_options": dict(self.method_options), "experts": self.experts,
            "bits_per_weight": self.bits_per_weight,
            "candidates": None if self.candidates is None else [list(c) for c in self.candidates],
            "refine": self.refine,
        }
