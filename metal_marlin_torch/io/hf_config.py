"""`MarlinConfig`: the ``quantization_config`` of transformers' ``from_pretrained`` for metal_marlin.

One object plays both roles transformers gives a quantization config:

- passed to ``from_pretrained(path, quantization_config=MarlinConfig(format="fp4"))`` it says how
  to quantize while loading (the fields of :class:`~metal_marlin_torch.QuantConfig`);
- serialized into ``config.json`` by ``save_pretrained`` it is exactly the ``quantization_config``
  entry of docs/FORMAT.md §6 (``quant_method: metal_marlin``, ``format_version``, ``layers``, ...),
  the same dict :func:`~metal_marlin_torch.save_quantized` writes, so either loader reads either
  writer's checkpoints.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import formats as F
from ..dtypes import DTypeConfig, resolve
from ..nn.config import DEFAULT_EXCLUDE, QuantConfig
from .checkpoint import FORMAT_VERSION, QUANT_METHOD


class MarlinConfig(QuantizationConfigMixin):
    """Quantization config of the ``metal_marlin`` method.

    Args:
        format: weight format (``fp4``, ``mxfp4``, ``nvfp4``, ``int8``/``6``/``5``/``4``/``3``/``2``,
            ``nf4``, ``nf3``, ``fp8_e4m3``, ``fp8_e5m2``).
        group_size: group length (32/64/128/256, -1 per-channel); None = the format's default.
        method: how the weights were quantized; quantize-on-load does ``rtn`` only (GPTQ needs
            calibration data: use :func:`~metal_marlin_torch.quantize_model`, then save).
        include / exclude / rules / experts: as in :class:`~metal_marlin_torch.QuantConfig`.
        dtype_config: :class:`~metal_marlin_torch.DTypeConfig` or its dict; None = process default.
        modules_to_not_convert: module names kept in full precision in addition to ``exclude``
            and transformers' defaults (output embeddings, tied weights).
        layers: the checkpoint's per-module table (filled when a model is loaded or saved).
        tied: tied-weight aliases of the checkpoint (``{name: source}``).
        format_version, quant_method: fixed by docs/FORMAT.md; other values raise ValueError.
        **extra: further keys of a checkpoint's ``quantization_config``, kept verbatim.
    """

    def __init__(
        self,
        format: str = "fp4",
        group_size: int | None = None,
        method: str = "rtn",
        include: list[str] | tuple[str, ...] | None = None,
        exclude: list[str] | tuple[str, ...] | None = None,
        rules: list | tuple = (),
        dtype_config: DTypeConfig | dict[str, str] | None = None,
        experts: bool = True,
        modules_to_not_convert: list[str] | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        tied: dict[str, str] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **extra: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"MarlinConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"MarlinConfig: format_version {format_version!r} is not supported (this version reads "
                f"{FORMAT_VERSION})"
            )
        if isinstance(dtype_config, dict):
            dtype_config = DTypeConfig.from_dict(dtype_config)
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.format = format
        self.group_size = group_size
        self.method = method
        self.include = None if include is None else list(include)
        self.exclude = list(DEFAULT_EXCLUDE if exclude is None else exclude)
        self.rules = [[pattern, dict(overrides)] for pattern, overrides in rules]
        self.dtype_config = dtype_config
        self.experts = bool(experts)
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.layers = dict(layers or {})
        self.tied = dict(tied or {})
        self.extra = extra
        self.quant_config()  # validates format, group size, method and rules
        for name, spec in self.layers.items():
            if not isinstance(spec, dict) or spec.get("format") not in F.FORMATS:
                got = spec.get("format") if isinstance(spec, dict) else spec
                raise ValueError(
                    f"MarlinConfig.layers[{name!r}]: unknown format {got!r}; expected one of {sorted(F.FORMATS)}"
                )

    def quant_config(self, extra_exclude: list[str] | tuple[str, ...] = ()) -> QuantConfig:
        """The equivalent :class:`QuantConfig` (``extra_exclude``: more module names to keep)."""
        more = [p for name in extra_exclude for p in (name, f"{name}.*")]
        return QuantConfig(
            format=self.format, group_size=self.group_size, method=self.method,
            include=None if self.include is None else tuple(self.include),
            exclude=tuple(self.exclude) + tuple(self.modules_to_not_convert or ()) + tuple(more),
            rules=tuple((p, o) for p, o in self.rules), dtype_config=self.dtype_config, experts=self.experts,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of ``config.json`` (docs/FORMAT.md §6)."""
        group = self.group_size if self.group_size is not None else F.default_group_size(self.format)
        out: dict[str, Any] = {
            "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "format": self.format,
            "group_size": group, "method": self.method, "dtype_config": resolve(self.dtype_config).to_dict(),
            "layers": {name: dict(spec) for name, spec in self.layers.items()},
            "include": self.include, "exclude": list(self.exclude), "rules": [[p, dict(o)] for p, o in self.rules],
            "experts": self.experts,
        }
        if self.modules_to_not_convert is not None:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        if self.tied:
            out["tied"] = dict(self.tied)
        out.update(self.extra)
        return out

    def __repr__(self) -> str:
        layers = f", {len(self.layers)} layers" if self.layers else ""
        return f"MarlinConfig(format={self.format!r}, group_size={self.group_size!r}, method={self.method!r}{layers})"
