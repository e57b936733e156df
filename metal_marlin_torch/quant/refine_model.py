"""Scales refined against the whole model (the idea of MLX's DWQ): after the method (GPTQ, RTN)
has quantized every layer, with every code fixed, tune *all* quantized layers' scales and biases
together so the quantized model's output matches the dense model's on the calibration tokens.

:mod:`.refine` does the same block by block against each dense block's output; a block's
output error is only a proxy for what a user sees. Here the objective is the model's output:

- causal LMs (the output has ``logits``): the KL divergence of the quantized model's next-token
  distribution from the dense model's, averaged over every calibration token;
- encoders and other models (no ``logits``): the relative squared error of the last hidden
  state, ``|h_q - h_d|^2 / |h_d|^2`` over every token (the block refinement's loss, applied to
  the model's output; mean-pooled sentence embeddings are a linear function of it, and a
  per-token target gives every token a gradient where a pooled cosine gives one per window).

Teacher (why the dense model need not stay in memory): before the method quantizes anything,
one dense forward pass over the calibration windows keeps, per token, the teacher's ``topk``
largest log-probabilities, their vocabulary ids and the log of the remaining mass (or, for
encoders, the last hidden state). The loss is then the exact KL between the two distributions
*coarsened* to those ``topk`` classes plus one "everything else" class: a lower bound of the full
KL that equals it when ``topk`` is the vocabulary, and the gradient still reaches every logit
through the student's softmax. Memory: ``tokens * topk * 8`` bytes, e.g. 128 windows of 512
tokens at ``topk=128``: 67 MB for any vocabulary (a 128k vocabulary's full logits would be
34 GB). pylm-s (vocab 4096) uses ``topk=256``; more changes its KL by less than 1e-4.

Parametrization: :class:`.refine._Refinable` (``s = s0 (1 + a)``, ``b = b0 + s0 c``, one Adam
learning rate for every layer), trained on the whole model at once; optionally the RMSNorm /
LayerNorm weights too (``norms``; MLX's DWQ tunes only the quantized parameters, and so does the
default here). Cosine-decayed Adam on ``batch`` windows per step.

Overfitting guard: ``holdout`` of the calibration windows (the last ones; the windows are drawn at
random offsets) are never trained on; the loss on them is measured every ``eval_every`` steps and
the parameters with the lowest held-out loss are the ones installed (the starting point included,
so refinement never makes the held-out loss worse). Two evaluations in a row without
improvement stop the run early.

Resume: with a ``work_dir`` the progress (trained parameters, Adam's state, the best parameters
so far, the step) goes to ``work_dir/refine_model.pt`` every ``save_every`` steps (written under
a temporary name and renamed). A rerun with the same quantized layers, calibration windows and
options continues from there and reaches the same parameters as an uninterrupted run (the batch
order and learning rate are functions of the step number); a finished run is loaded, not redone.
Another run's file (other settings) is an error naming the file, as the driver's ``run.json``.

Memory: the quantized model, its decoded codes at scale 1 in fp32 (``u``, 4 bytes per weight:
16x a 2-bit model's codes; one layer's at a time would need a custom backward), activations
of ``batch`` windows for the backward pass, and the teacher's ``topk`` table.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import formats as F
from .._files import write_atomic
from ..nn.linear import MarlinLinear
from ..nn.quantize import replace_module
from .refine import _install, _Refinable, refinable

log = logging.getLogger("metal_marlin_torch")

STATE_FILE = "refine_model.pt"

# ``QuantConfig.method_options`` keys of the whole-model stage -> ModelRefineOptions field
OPTION_KEYS = {"refine_steps": "steps", "refine_lr": "lr", "refine_batch": "batch",
               "refine_holdout": "holdout", "refine_eval_every": "eval_every",
               "refine_save_every": "save_every", "refine_topk": "topk", "refine_norms": "norms",
               "refine_patience": "patience"}


@dataclass
class ModelRefineOptions:
    """Settings of :func:`refine_model` (``method_options`` keys in :data:`OPTION_KEYS`).

    Attributes:
        steps: Adam steps (each one forward and backward pass of the model on ``batch`` windows).
        lr: Adam's learning rate on the relative parameters (module doc), cosine-decayed to 0.
        batch: calibration windows per step.
        holdout: fraction of the calibration windows held out for early stopping (0: none, the
            last step's parameters are installed; else at least one window).
        eval_every: steps between held-out evaluations (and early-stopping checks).
        save_every: steps between progress saves to ``work_dir`` (when given).
        topk: teacher classes kept per token (causal LMs; module doc).
        norms: also train the RMSNorm / LayerNorm weights.
        patience: held-out evaluations in a row without improvement that stop the run (0: never).
    """

    # chosen on pylm-s's held-out *calibration* windows (4.5-bit GPTQ budget): lr 2e-3 at batch 1
    # made them worse within 8 steps (Adam moves every scale by ~lr a step, noisy at one window);
    # 3e-4 at batch 2 improved them at every evaluation, flattening by step 24. 32 steps keep the
    # stage near 160 CPU s on pylm-s (2 cores), inside the 5-minute budget with GPTQ.
    steps: int = 32
    lr: float = 3e-4
    batch: int = 2
    holdout: float = 0.125
    eval_every: int = 8
    save_every: int = 8
    topk: int = 256
    norms: bool = False
    patience: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"refine (model): {name} must be an int >= 0, got {v!r}")
        for name in ("batch", "eval_every", "save_every", "topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"refine (model): {name} must be a positive int, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0.0 < float(self.lr) < 1.0:
            raise ValueError(f"refine (model): lr must be a number in (0, 1), got {self.lr!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) \
                or not 0.0 <= float(self.holdout) < 1.0:
            raise ValueError(f"refine (model): holdout must be a fraction in [0, 1), got {self.holdout!r}")
        if not isinstance(self.norms, bool):
            raise ValueError(f"refine (model): norms must be a bool, got {self.norms!r}")
        self.lr = float(self.lr)
        self.holdout = float(self.holdout)

    @classmethod
    def from_method_options(cls, options: dict[str, Any]) -> ModelRefineOptions:
        """The options among ``QuantConfig.method_options`` (keys :data:`OPTION_KEYS`)."""
        return cls(**{field: options[key] for key, field in OPTION_KEYS.items() if key in options})


# --- the teacher -------------------------------------------------------------------------------


def _output(out: Any) -> tuple[str, torch.Tensor]:
    """``("logits", logits)`` of a causal LM's output, else ``("hidden", last hidden state)``."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return "logits", logits
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"refine (model): the model's output has neither logits nor a hidden state tensor "
                        f"(got {type(out).__name__})")
    return "hidden", hidden


def _forward(model: nn.Module, tokens: torch.Tensor) -> tuple[str, torch.Tensor]:
    return _output(model(input_ids=tokens))


def _log_rest(top: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``top`` (log-probabilities, last dim), clamped so a
    table holding the whole vocabulary gives log(1e-30) instead of -inf (0 * -inf is NaN)."""
    inside = torch.logsumexp(top, dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(inside)).clamp_min(1e-30))


@dataclass
class Teacher:
    """The dense model's outputs on the calibration windows (module doc).

    Attributes:
        kind: ``"logits"`` (causal LM: ``logp [n, L, k]``, ``ids [n, L, k]``, ``rest [n, L]``)
            or ``"hidden"`` (``hidden [n, L, D]``).
    """

    kind: str
    logp: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def loss(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Mean loss of the student's output ``out`` on the windows ``idx`` (module doc)."""
        if self.kind == "hidden":
            t = self.hidden[idx].to(out.device)
            return (out.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
        logq = torch.log_softmax(out.float(), dim=-1)
        ids = self.ids[idx].to(out.device)
        logp = self.logp[idx].to(out.device)
        rest_p = self.rest[idx].to(out.device)
        q_top = logq.gather(-1, ids)
        q_rest = _log_rest(q_top)
        kl = (logp.exp() * (logp - q_top)).sum(-1) + rest_p.exp() * (rest_p - q_rest)
        return kl.mean()


def _upcast(model: nn.Module, device: torch.device) -> list[tuple[torch.Tensor, torch.dtype]]:
    """On a CPU, cast the model's fp16/bf16 parameters and buffers to fp32 in place (returns
    what to cast back): CPUs without half-precision matrix units run half matmuls through slow
    conversion paths (``driver.compute_dtype``), and fp32 gradients are the precise ones. Call
    it with the MarlinLinear layers swapped out (their fp16 scales are data, not compute)."""
    if device.type != "cpu":
        return []
    changed = []
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype in (torch.float16, torch.bfloat16):
            changed.append((t, t.dtype))
            t.data = t.data.float()
    return changed


def _cast_back(changed: list[tuple[torch.Tensor, torch.dtype]]) -> None:
    for t, dtype in changed:
        t.data = t.data.to(dtype)


def teacher_outputs(model: nn.Module, tokens: torch.Tensor, topk: int, batch: int = 1,
                    device: torch.device | str | None = None) -> Teacher:
    """One dense forward pass over ``tokens [n, L]`` (module doc) where the model is (``device``
    only decides whether a half-precision model is computed in fp32 on a CPU), ``batch``
    windows at a time; the outputs are kept on the CPU."""
    home = next(model.parameters()).device
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"teacher_outputs: tokens must be an int64 [n, L] tensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    logp: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    changed = _upcast(model, home)
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache is not None:
        cfg.use_cache = False
    try:
        _teacher_pass(model, tokens, topk, batch, home, logp, ids, rest, hidden)
    finally:
        _cast_back(changed)
        if use_cache is not None:
            cfg.use_cache = use_cache
    if hidden:
        return Teacher("hidden", hidden=torch.cat(hidden))
    return Teacher("logits", logp=torch.cat(logp), ids=torch.cat(ids), rest=torch.cat(rest))


def _teacher_pass(model: nn.Module, tokens: torch.Tensor, topk: int, batch: int, device: torch.device,
                  logp: list, ids: list, rest: list, hidden: list) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            kind, out = _forward(model, tokens[start:start + batch].to(device))
            if kind == "hidden":
                hidden.append(out.float().cpu())
                continue
            lp = torch.log_softmax(out.float(), dim=-1)
            top, top_ids = lp.topk(min(topk, lp.shape[-1]), dim=-1)
            logp.append(top.cpu())
            ids.append(top_ids.cpu())
            rest.append(_log_rest(top).cpu())
    model.train(was_training)


# --- training ----------------------------------------------------------------------------------


def _norm_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of the model's RMSNorm / LayerNorm modules (by class name: transformers'
    ``LlamaRMSNorm`` and friends are not ``nn.RMSNorm``)."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1 and "norm" in type(mod).__name__.lower():
            out[f"{name}.weight" if name else "weight"] = w
    return out


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _lr_at(step: int, options: ModelRefineOptions) -> float:
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(options.steps, 1)))


def _order(step: int, n: int) -> int:
    """The training window of position ``step`` (one seeded permutation per epoch): a function
    of the step alone, so a resumed run sees the same batches as an uninterrupted one."""
    epoch, pos = divmod(step, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(epoch))[pos])


class _Run:
    """The trained state of one refinement: parameters, optimizer, best-so-far, history."""

    def __init__(self, train: dict[str, _Refinable], norms: dict[str, nn.Parameter],
                 options: ModelRefineOptions) -> None:
        self.train = train
        self.norms = norms
        self.params = [p for m in train.values() for p in m.parameters()] + list(norms.values())
        self.opt = torch.optim.Adam(self.params, lr=options.lr)
        self.step = 0
        self.best_val = math.inf
        self.best_step = 0
        self.best: dict[str, torch.Tensor] = {}
        self.bad_evals = 0
        self.history: list[dict[str, float]] = []
        self.done = False

    def named(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.train.items():
            out[f"{name}.a"] = m.a
            if m.c is not None:
                out[f"{name}.c"] = m.c
        out.update({f"norm:{k}": v for k, v in self.norms.items()})
        return out

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.named().items()}

    def load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.named().items():
                v.copy_(values[k])

    def state(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        return {"fingerprint": fingerprint, "step": self.step, "params": self.snapshot(),
                "opt": self.opt.state_dict(), "best": self.best, "best_val": self.best_val,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "history": self.history,
                "done": self.done}

    def restore(self, state: dict[str, Any]) -> None:
        self.load(state["params"])
        self.opt.load_state_dict(state["opt"])
        for key in ("step", "best", "best_val", "best_step", "bad_evals", "history", "done"):
            setattr(self, key, state[key])


def _save(path: Path, run: _Run, fingerprint: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(run.state(fingerprint), buf)
    write_atomic(path, buf.getvalue())


def _mean_loss(model: nn.Module, teacher: Teacher, windows: list[int], tokens: torch.Tensor,
               batch: int, device: torch.device) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            idx = torch.tensor(windows[start:start + batch])
            _, out = _forward(model, tokens[idx].to(device))
            total += float(teacher.loss(out, idx)) * len(idx)
    return total / max(len(windows), 1)


def _train_step(model: nn.Module, run: _Run, teacher: Teacher, tokens: torch.Tensor,
                train_windows: list[int], options: ModelRefineOptions, device: torch.device) -> float:
    """One Adam step on ``options.batch`` training windows; returns the loss (NaN or Inf: the
    step is skipped, so the parameters stay finite)."""
    n = len(train_windows)
    idx = torch.tensor([train_windows[_order(run.step * options.batch + j, n)] for j in range(options.batch)])
    for group in run.opt.param_groups:
        group["lr"] = _lr_at(run.step, options)
    with torch.enable_grad():
        _, out = _forward(model, tokens[idx].to(device))
        loss = teacher.loss(out, idx)
        run.opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            if all(p.grad is None or torch.isfinite(p.grad).all() for p in run.params):
                run.opt.step()
            else:
                log.warning("refine (model): step %d has a non-finite gradient; skipped", run.step)
        else:
            log.warning("refine (model): step %d has a non-finite loss; skipped", run.step)
    run.step += 1
    return float(loss.detach())


def refine_model(model: nn.Module, tokens: torch.Tensor, teacher: Teacher, options: ModelRefineOptions,
                 work_dir: str | os.PathLike | None = None, progress: bool = True,
                 device: torch.device | str | None = None) -> dict[str, Any]:
    """Tune the scales and biases of every :class:`MarlinLinear` of ``model`` in place (codes
    unchanged; module doc) toward ``teacher`` (:func:`teacher_outputs` of the dense model on
    the same ``tokens``).

    Args:
        model: the quantized model (on ``device``; moved there if not).
        tokens: the calibration windows ``int64 [n, L]`` the teacher saw.
        teacher: :class:`Teacher`.
        options: :class:`ModelRefineOptions`.
        work_dir: folder for ``refine_model.pt`` (resume); None = no persistence.
        progress: tqdm progress bar over the steps.
        device: compute device (None: where the model is).

    Returns:
        ``{"steps", "train_before", "train_after", "heldout_before", "heldout_after",
        "best_step", "stopped_early", "resumed_from", "seconds", "layers", "windows", "history"}``:
        losses (KL for causal LMs, relative squared error otherwise) before and after on the
        held-out windows (None without ``holdout``) and on as many training windows (the first).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"refine_model: tokens must be an int64 [n, L] tensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    n = tokens.shape[0]
    n_val = math.ceil(n * options.holdout) if options.holdout > 0 else 0
    if n - n_val < 1:
        raise ValueError(f"refine_model: holdout {options.holdout} of {n} calibration windows leaves none to train "
                         "on; use more windows (n_samples) or a smaller refine_holdout")
    teacher_n = (teacher.hidden if teacher.kind == "hidden" else teacher.logp).shape[:2]
    if tuple(teacher_n) != tuple(tokens.shape):
        raise ValueError(f"refine_model: the teacher's outputs cover {tuple(teacher_n)} tokens, the calibration "
                         f"windows are {tuple(tokens.shape)}")
    t0 = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.to(device)
    train_windows, val_windows = list(range(n - n_val)), list(range(n - n_val, n))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MarlinLinear)}
    kept = [name for name, m in layers.items() if not refinable(F.get_format(m.format))]
    if kept:
        log.info("refine (model): %s keep their scales: they are not free floats", kept)
    train = {name: _Refinable(m) for name, m in layers.items() if name not in kept}
    if not train:
        raise ValueError("refine_model: the model has no quantized layer with trainable scales "
                         "(MarlinLinear with an integer or NormalFloat format)")
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    norms = _norm_params(model) if options.norms else {}
    for p in norms.values():
        p.requires_grad_(True)
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache is not None:
        cfg.use_cache = False
    was_training = model.training
    model.eval()  # dropout off: the teacher ran in eval mode
    for name, mod in train.items():
        replace_module(model, name, mod)
    changed = _upcast(model, device)  # the MarlinLinear layers are swapped out: their scales keep their dtype
    run = _Run(train, norms, options)
    fingerprint = {"options": asdict(options), "calibration": _digest(tokens), "shape": list(tokens.shape),
                   "layers": {name: [layers[name].format, layers[name].group_size, _digest(m.s0)]
                              for name, m in sorted(train.items())},
                   "norms": {k: _digest(v) for k, v in sorted(norms.items())}}
    fingerprint = json.loads(json.dumps(fingerprint))
    path = Path(work_dir) / STATE_FILE if work_dir is not None else None
    resumed_from = None
    try:
        batch = options.batch
        # the training loss is measured on as many training windows as are held out (the first
        # ones): the same cost and noise as the held-out loss, so the two compare (overfitting)
        probe = train_windows[:max(n_val, 1)]
        train_before = _mean_loss(model, teacher, probe, tokens, batch, device)
        val_before = _mean_loss(model, teacher, val_windows, tokens, batch, device) if n_val else None
        run.best, run.best_val = run.snapshot(), val_before if n_val else math.inf
        if path is not None and path.exists():
            state = torch.load(path, map_location=device, weights_only=True)
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"refine_model: {path} holds a refinement of other layers, calibration data or "
                                 "options; use a new work_dir (or delete the file)")
            run.restore(state)
            resumed_from = run.step
            log.info("refine (model): resuming from step %d of %d (%s)", run.step, options.steps, path)

        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=options.steps, initial=run.step, desc="refining scales (model)", disable=not progress)
        except ImportError:  # tqdm is a dependency; keep working without it anyway
            bar = None
        while not run.done and run.step < options.steps:
            loss = _train_step(model, run, teacher, tokens, train_windows, options, device)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
            last = run.step >= options.steps
            if n_val and (run.step % options.eval_every == 0 or last):
                val = _mean_loss(model, teacher, val_windows, tokens, batch, device)
                run.history.append({"step": run.step, "train_step_loss": loss, "heldout": val})
                if val < run.best_val:
                    run.best, run.best_val, run.best_step, run.bad_evals = run.snapshot(), val, run.step, 0
                else:
                    run.bad_evals += 1
                    if options.patience and run.bad_evals >= options.patience:
                        log.info("refine (model): held-out loss has not improved for %d evaluations; stopping "
                                 "at step %d (best step %d)", run.bad_evals, run.step, run.best_step)
                        run.done = True
            if last:
                run.done = True
            if path is not None and (run.done or run.step % options.save_every == 0):
                _save(path, run, fingerprint)
        if bar is not None:
            bar.close()
        if n_val:
            run.load(run.best)
        elif not all(torch.isfinite(v).all() for v in run.named().values()):  # cannot happen (skipped steps)
            raise RuntimeError("refine_model: non-finite parameters after training")
        train_after = _mean_loss(model, teacher, probe, tokens, batch, device)
        val_after = _mean_loss(model, teacher, val_windows, tokens, batch, device) if n_val else None
        with torch.no_grad():
            for name, mod in train.items():
                _install(layers[name], mod)
    finally:
        _cast_back(changed)
        for name, layer in layers.items():
            replace_module(model, name, layer)
        for p, r in frozen:
            p.requires_grad_(r)
        for p in norms.values():
            p.grad = None
        if use_cache is not None:
            cfg.use_cache = use_cache
        model.train(was_training)
        model.to(home)
    stopped = run.step < options.steps
    return {"steps": run.step, "train_before": train_before, "train_after": train_after,
            "heldout_before": val_before, "heldout_after": val_after,
            "best_step": run.best_step if n_val else run.step, "stopped_early": stopped,
            "resumed_from": resumed_from, "seconds": time.perf_counter() - t0, "layers": len(train),
            "windows": {"train": len(train_windows), "heldout": n_val}, "history": run.history}
