"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, each column's rounding
error compensated on the columns not yet quantized, weighted by the inverse input Hessian.

For a layer ``y = x W^T`` and calibration inputs ``X [T, K]`` the output error of a quantized
``W_hat`` is ``tr((W - W_hat) H (W - W_hat)^T)`` with ``H = X^T X / T``. GPTQ minimizes it greedily:
quantize column ``i``, then move the remaining columns by ``-(w_i - q_i) / [H^-1]_ii *
[H^-1]_{i, i:}``, using the upper Cholesky factor of ``H^-1`` (numerically stable) and lazy
block updates (columns in blocks of ``block_size``; the rest of W is updated once per block).

**Groups: static, act-order.** Each group's parameters (scale, bias) are computed once, from the
original (un-updated) weights of its ``G`` consecutive inputs, before any column is quantized
(MSE-optimal shrink search, :mod:`.scale_search`). Columns are then processed in descending
order of ``diag(H)`` ("act-order": the most important inputs are quantized first, while the
most error can still be compensated), each with the fixed parameters of the group it belongs to
in the original order. So the result is an ordinary checkpoint in the canonical layout: no
permutation is stored and inference needs no reordering (the "static groups" variant of
GPTQ; dynamic groups with act-order would make groups non-contiguous in K).

The codes and parameters are those of the format's ``encode``/``decode`` (docs/FORMAT.md), so
the kernels' dequantization of the packed result equals GPTQ's own reconstruction exactly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import formats as F
from ..formats import GroupParams, QuantizedTensor
from ..formats.base import safe_divisor
from ..formats.fp4 import _E2M1_DECODED, _E2M1Format, e2m1_encode, e2m1_round
from ..formats.integer import _Affine
from ..formats.nf import _NormalFloat
from ..formats.tables import device_table
from .scale_search import DEFAULT_GRID, DEFAULT_MIN_SHRINK, search_group_params

log = logging.getLogger("metal_marlin_torch")

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
MAX_DAMP_RETRIES = 6
MIN_RETRY_DAMP = 1e-4


class HessianAccumulator:
    """Running ``H = X^T X / T`` of a layer's inputs, in float32 on ``device``.

    ``add(x)`` takes inputs ``[..., K]`` of any float dtype (a forward hook's ``args[0]``).
    """

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"HessianAccumulator: k must be a positive int, got {k!r}")
        self.k = k
        self.sum = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.k:
            raise ValueError(f"HessianAccumulator.add: inputs must end in K={self.k}, got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.k).to(device=self.sum.device, dtype=torch.float32)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``X^T X / T``; ValueError when no input was seen."""
        if self.count == 0:
            raise ValueError("HessianAccumulator: no inputs were added (did the layer run?)")
        return self.sum / self.count

    def hook(self):
        """A forward hook ``fn(module, args, output)`` that adds the module's input."""
        def fn(module, args, output):  # noqa: ARG001 (hook signature)
            self.add(args[0])
        return fn


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    Attributes:
        qt: the packed layer (canonical layout, original column order).
        w_hat: ``float32 [N, K]`` GPTQ's reconstruction, equal to dequantizing ``qt``.
        damp: the relative damping finally used (raised automatically if Cholesky failed).
        loss: GPTQ's objective proxy ``sum_i (w_i - q_i)^2 / [U]_ii^2 / 2`` over all columns.
    """

    qt: QuantizedTensor
    w_hat: torch.Tensor
    damp: float
    loss: float


def damped_inverse_cholesky(
    h: torch.Tensor, damp: float, retries: int = MAX_DAMP_RETRIES
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` and the damp used.

    If ``H`` (plus damping) is not positive definite the damping is multiplied by 10 (at least
    ``MIN_RETRY_DAMP``) and retried, up to ``retries`` times (logged); then ValueError.
    """
    if not torch.isfinite(h).all():
        raise ValueError("gptq: the Hessian contains NaN or Inf (non-finite calibration activations?)")
    k = h.shape[0]
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    d = damp
    last = d
    for attempt in range(retries + 1):
        hd = h + (d * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            # H^-1 = L^-T L^-1 through one triangular solve. torch.cholesky_inverse (LAPACK potri)
            # is the textbook call, but measured on the 2-core test machine (MKL on AMD) it took
            # 3.6 s of CPU for K=1024 against 0.10 s for this, equal to 1e-6 relative.
            linv = torch.linalg.solve_triangular(lower, eye, upper=False)
            upper, info = torch.linalg.cholesky_ex(linv.T @ linv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    log.info("gptq: Cholesky needed damp=%g (asked %g)", d, damp)
                return upper, d
        last = d
        d = max(d * 10.0, MIN_RETRY_DAMP)
    raise ValueError(f"gptq: Hessian not positive definite even with damp={last:g} (relative)")


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run a layer's GPTQ (scale search, Cholesky, column loop) on one CPU thread.

    Its ops are small (a column of ``N`` values; the scale search's ``[N, K]`` elementwise
    passes; GEMMs of at most ``N x block x K``), and the intra-op thread pool's fork/join then
    costs more than the op, far more when other processes share the cores: measured on the
    2-core test machine under load 14, an fp32 division of 393k values took 8.2 ms of CPU on
    two threads against 0.2 ms on one, a ``bucketize`` of 1024 values 2.3 ms. The calibration
    forwards and the Hessian GEMMs (outside this) keep every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _column_params(params: GroupParams, g: int) -> GroupParams:
    """Group ``g``'s parameters shaped ``[N, 1]`` for encoding one column ``[N, 1, 1]``."""
    return GroupParams(
        params.scales[:, g:g + 1],
        None if params.biases is None else params.biases[:, g:g + 1],
        params.global_scale,
    )


class _ColumnCoder:
    """Codes and reconstruction of one column ``[N]`` with its group's fixed parameters.

    The column loop runs ~20k times for a small model and each call is a chain of tiny ops,
    so their number is the cost. ``fmt.encode``/``fmt.decode`` rebuild the same per-group
    float scales and divisors on every call; here they are built once per layer (``[n_groups,
    N]``, contiguous rows) and each column does only the elementwise work. The arithmetic is
    the formats' own, operation for operation, so codes and values are bitwise those of
    ``fmt.encode``/``fmt.decode`` (the test holds them equal); formats without a rule here
    take the generic path through ``fmt.encode``/``fmt.decode``.
    """

    def __init__(self, fmt: F.WeightFormat, params: GroupParams, n: int) -> None:
        self.fmt = fmt
        self.n = n
        self.kind = "generic"
        n_groups = params.scales.shape[1]
        if isinstance(fmt, _E2M1Format):
            eff = fmt._effective_scale(params)  # [N, n_groups] float32
            self.kind = "e2m1"
            self.mul = eff.T.contiguous()
            self.div = safe_divisor(eff).T.contiguous()
            self.table = device_table(_E2M1_DECODED, torch.float32, eff.device)
        elif isinstance(fmt, _NormalFloat):
            self.kind = "table"
            self.mul = params.scales.float().T.contiguous()
            self.div = safe_divisor(params.scales).T.contiguous()
            table = fmt._table(params.scales.device)
            self.table = table
            self.mids = (table[1:] + table[:-1]) / 2
        elif isinstance(fmt, _Affine):
            self.kind = "affine"
            self.mul = params.scales.float().T.contiguous()
            self.div = safe_divisor(params.scales).T.contiguous()
            self.bias = params.biases.float().T.contiguous()
            self.zero = (params.scales == 0).T.contiguous()
            self.any_zero = bool(self.zero.any())
            self.levels = fmt.levels
        else:
            self.cols = [_column_params(params, j) for j in range(n_groups)]

    def __call__(self, col: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes int64 [N], values float32 [N])`` of column ``col`` in group ``g``."""
        if self.kind == "e2m1":
            codes = e2m1_encode(col / self.div[g])
            return codes, self.table[codes] * self.mul[g]
        if self.kind == "table":  # nearest_index, inlined with the midpoints built once
            x = col / self.div[g]
            codes = torch.where(x < 0, torch.bucketize(x, self.mids, right=True),
                                torch.bucketize(x, self.mids, right=False))
            return codes, self.table[codes] * self.mul[g]
        if self.kind == "affine":
            q = torch.round((col - self.bias[g]) / self.div[g]).clamp_(0, self.levels)
            codes = q.masked_fill_(self.zero[g], 0.0).to(torch.int64)
            return codes, codes.float() * self.mul[g] + self.bias[g]
        p = self.cols[g]
        c = self.fmt.encode(col.view(self.n, 1, 1), p)
        return c.view(self.n), self.fmt.decode(c, p).view(self.n)

    @property
    def values_only(self) -> bool:
        """Whether :meth:`values` (and :meth:`codes_of` after the loop) serve this format."""
        return self.kind != "generic"

    def tables(self) -> list[torch.Tensor]:
        """The per-group parameter tables ``[n_groups, N]`` that :meth:`values` reads, in the
        order it takes their rows (for the CUDA graph loop, which gathers them per block)."""
        if self.kind == "affine":
            return [self.div, self.mul, self.bias, self.zero]
        return [self.div, self.mul]

    def values(self, col: torch.Tensor, g: int, out: torch.Tensor) -> None:
        """The reconstruction of column ``col`` in group ``g`` written to ``out``, without its
        codes: the column loop needs only the values, and the codes are recovered from all of
        them at once afterwards (:meth:`codes_of`). Fewer ops per column than :meth:`__call__`
        (on CUDA each op is a kernel launch, and the loop is launch bound): E2M1 takes its
        value from a table and ``copysign`` without building the code. Values equal
        ``__call__``'s except that a negative input rounded to magnitude 0 gives -0.0."""
        self.values_rows(col, [t[g] for t in self.tables()], out)

    def values_rows(self, col: torch.Tensor, rows: list[torch.Tensor], out: torch.Tensor) -> None:
        """:meth:`values` with the group's parameter rows given (``tables()``'s order)."""
        if self.kind == "e2m1":
            torch.mul(e2m1_round(col / rows[0]), rows[1], out=out)
        elif self.kind == "table":
            x = col / rows[0]
            codes = torch.where(x < 0, torch.bucketize(x, self.mids, right=True),
                                torch.bucketize(x, self.mids, right=False))
            torch.mul(self.table[codes], rows[1], out=out)
        else:  # affine
            div, mul, bias, zero = rows
            q = torch.round((col - bias) / div).clamp_(0, self.levels)
            if self.any_zero:
                q.masked_fill_(zero, 0.0)
            torch.mul(q, mul, out=out).add_(bias)

    def codes_of(self, w_hat: torch.Tensor) -> torch.Tensor:
        """Codes ``int64 [N, K]`` of a reconstruction ``w_hat`` built by :meth:`values`.

        Every value is a grid point times its group's scale (plus bias), so dividing by the
        scale lands within a rounding error of the grid point, far from the rounding midpoints:
        re-encoding gives back exactly the codes of the column loop (for an all-zero group,
        whose scale is 0, the code of 0; any code decodes to 0 there). The test checks that
        decoding these codes reproduces ``w_hat``."""
        n_groups = self.mul.shape[0]
        x = w_hat.view(self.n, n_groups, -1)
        if self.kind == "affine":
            q = torch.round((x - self.bias.T.unsqueeze(-1)) / self.div.T.unsqueeze(-1)).clamp_(0, self.levels)
            return q.masked_fill_(self.zero.T.unsqueeze(-1), 0.0).to(torch.int64).view(self.n, -1)
        x = x / self.div.T.unsqueeze(-1)
        if self.kind == "e2m1":
            return e2m1_encode(x).view(self.n, -1)
        codes = torch.where(x < 0, torch.bucketize(x, self.mids, right=True),
                            torch.bucketize(x, self.mids, right=False))
        return codes.view(self.n, -1)


USE_CUDA_GRAPHS = True
"""Run each full lazy block's column loop as a captured CUDA graph (see :class:`_GraphBlockLoop`);
False: eager, op by op (benchmarks compare the two)."""
_STATIC_LOOP_ON_CPU = False  # tests: run the graph loop's static-buffer code on CPU (no capture)


class _GraphBlockLoop:
    """The column loop of one lazy block on static buffers, captured once per layer as a CUDA
    graph and replayed for every full block.

    On a GPU the loop is bound by the host: each column is ~10 tiny kernels, each costing the
    CPU a Python call and a dispatch (~10 us) while the GPU idles. A graph replays the 10 x
    ``block_size`` launches of a block in one call. Everything that changes between blocks
    lives in the static buffers, refilled before each replay: the block's columns ``w1
    [B, N]``, its part ``u1`` of the Cholesky factor and its diagonal, and each column's group
    parameters gathered into ``[B, N]`` rows (the group of a column depends on the block under
    act-order). The ops are those of the eager loop; only the divisor of each error is a 0-d
    tensor instead of a Python float (CUDA divides by a host scalar as a multiply by its
    reciprocal, so results may differ from the eager loop's in the last bit)."""

    def __init__(self, coder: _ColumnCoder, n: int, b: int, u_dtype: torch.dtype, device: torch.device) -> None:
        self.coder = coder
        self.b = b
        self.w1 = torch.empty(b, n, device=device)
        self.q1 = torch.empty(b, n, device=device)
        self.err1 = torch.empty(b, n, device=device)
        self.u1 = torch.empty(b, b, dtype=u_dtype, device=device)
        self.diag = torch.empty(b, dtype=u_dtype, device=device)
        self.gidx = torch.empty(b, dtype=torch.int64, device=device)
        self.rows = [torch.empty(b, n, dtype=t.dtype, device=device) for t in coder.tables()]
        self.graph: torch.cuda.CUDAGraph | None = None

    def _columns(self) -> None:
        for t, r in zip(self.coder.tables(), self.rows, strict=True):
            torch.index_select(t, 0, self.gidx, out=r)
        for i in range(self.b):
            col = self.w1[i]
            self.coder.values_rows(col, [r[i] for r in self.rows], self.q1[i])
            e = torch.sub(col, self.q1[i], out=self.err1[i]).div_(self.diag[i])
            self.w1[i + 1:].addr_(self.u1[i, i + 1:], e, alpha=-1.0)

    def run(self, w1: torch.Tensor, u1: torch.Tensor, gidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the block ``w1 [B, N]`` (transposed columns); ``(q1, err1)``, views of
        static buffers valid until the next call."""
        self.w1.copy_(w1)
        self.u1.copy_(u1)
        self.diag.copy_(torch.diagonal(u1))
        self.gidx.copy_(gidx)
        if self.w1.device.type != "cuda":  # the tests run the same static loop on CPU, eagerly
            self._columns()
            return self.q1, self.err1
        if self.graph is None:
            # warm up on a side stream (CUDA graph rule: lazy init and allocator warm-up happen
            # outside capture), then capture; the warm-up's result is this block's
            side = torch.cuda.Stream(self.w1.device)
            side.wait_stream(torch.cuda.current_stream(self.w1.device))
            with torch.cuda.stream(side):
                self._columns()
            torch.cuda.current_stream(self.w1.device).wait_stream(side)
            q1, err1 = self.q1.clone(), self.err1.clone()
            self.w1.copy_(w1)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._columns()
            self.graph = graph
            return q1, err1
        self.graph.replay()
        return self.q1, self.err1


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    format: str,
    group_size: int = 128,
    scale_dtype: torch.dtype = torch.float16,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    act_order: bool = True,
    scale_search: bool = True,
    search_grid: int = DEFAULT_GRID,
    min_shrink: float = DEFAULT_MIN_SHRINK,
) -> GPTQResult:
    """GPTQ-quantize ``w [N, K]`` given the input Hessian ``hessian [K, K]``.

    Args:
        w: the layer's weight (any float dtype, any device; computed in float32 there).
        hessian: ``X^T X / T`` of the layer's inputs (:class:`HessianAccumulator`).
        format: a weight format name (every format of :mod:`metal_marlin_torch.formats`).
        group_size: as in docs/FORMAT.md (mxfp4: 32, nvfp4: 16).
        scale_dtype: scale storage dtype (formats with a fixed one ignore it).
        damp: relative damping, a fraction of ``mean(diag H)`` added to the diagonal.
        block_size: lazy-update block (columns).
        act_order: process columns by descending ``diag(H)`` (static groups either way).
        scale_search: MSE-optimal group parameters (weighted by ``diag H``) instead of the
            format's plain absmax / min-max rule.
        search_grid, min_shrink: the search's candidates (:func:`search_group_params`).
    """
    fmt = F.get_format(format)
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"gptq_quantize: w must be a 2-D float tensor [N, K], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(
            f"gptq_quantize: hessian must be [{k}, {k}] for w {tuple(w.shape)}, got {tuple(hessian.shape)}"
        )
    if not torch.isfinite(w).all():
        raise ValueError("gptq_quantize: w contains NaN or Inf")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size must be a positive int, got {block_size!r}")
    if not 0.0 <= damp < 1e3:
        raise ValueError(f"gptq_quantize: damp must be >= 0, got {damp!r}")
    g = fmt.check_group_size(group_size, k)
    sdt = fmt.scale_dtype(scale_dtype)
    with _one_thread(w.device):
        return _gptq_solve(fmt, w, hessian, g, group_size, sdt, damp, block_size, act_order, scale_search,
                           search_grid, min_shrink)


def _gptq_solve(
    fmt: F.WeightFormat, w: torch.Tensor, hessian: torch.Tensor, g: int, group_size: int, sdt: torch.dtype,
    damp: float, block_size: int, act_order: bool, scale_search: bool, search_grid: int, min_shrink: float,
) -> GPTQResult:
    """The body of :func:`gptq_quantize`, its arguments checked."""
    n, k = w.shape

    work = w.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=work.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0  # inputs that never fire: weight irrelevant, set to 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0

    groups = work.view(n, k // g, g)
    if scale_search:
        importance = torch.diagonal(h).clamp_min(0).view(1, k // g, g)
        params = search_group_params(fmt, groups, sdt, importance, search_grid, min_shrink)
    else:
        params = fmt.group_params(groups, sdt)
    coder = _ColumnCoder(fmt, params, n)

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        work = work[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k, device=work.device)
    group_of = (perm // g).tolist()

    u, used_damp = damped_inverse_cholesky(h, damp)
    del h
    fast = coder.values_only
    codes = None if fast else torch.empty(n, k, dtype=torch.int64, device=work.device)
    w_hat = torch.empty_like(work)
    losses = torch.zeros(n, dtype=torch.float32, device=work.device)
    graph_loop = None
    if fast and USE_CUDA_GRAPHS and (work.device.type == "cuda" or _STATIC_LOOP_ON_CPU) and k >= 2 * block_size:
        graph_loop = _GraphBlockLoop(coder, n, block_size, u.dtype, work.device)
        groups_perm = perm // g
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        # the block is processed transposed ([columns, N]) so each column is contiguous
        w1 = work[:, i1:i2].T.contiguous()
        u1 = u[i1:i2, i1:i2]
        if graph_loop is not None and i2 - i1 == block_size:
            q1, err1 = graph_loop.run(w1, u1, groups_perm[i1:i2])
        else:
            err1 = torch.empty_like(w1)
            q1 = torch.empty_like(w1)
            c1 = None if fast else torch.empty(i2 - i1, n, dtype=torch.int64, device=work.device)
            diag = torch.diagonal(u1).tolist()  # Python floats: no 0-d tensor op per column
            for i in range(i2 - i1):
                col = w1[i]
                q = q1[i]
                if fast:
                    coder.values(col, group_of[i1 + i], q)
                else:
                    c1[i], q1[i] = coder(col, group_of[i1 + i])
                e = torch.sub(col, q, out=err1[i]).div_(diag[i])
                w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)  # w1[j] -= U[i, j] * e for j > i
            if not fast:
                codes[:, i1:i2] = c1.T
        losses += err1.pow(2).sum(0) / 2
        w_hat[:, i1:i2] = q1.T
        if i2 < k:
            work[:, i2:].addmm_(err1.T, u[i1:i2, i2:], alpha=-1.0)

    inv = torch.argsort(perm)
    w_hat = w_hat[:, inv]
    codes = coder.codes_of(w_hat) if fast else codes[:, inv]
    qt = QuantizedTensor(
        weight=F.pack(codes, fmt.bits), scales=params.scales, biases=params.biases,
        global_scale=params.global_scale, format=fmt.name, group_size=group_size, shape=(n, k),
    )
    return GPTQResult(qt=qt, w_hat=w_hat, damp=used_damp, loss=float(losses.sum()))


def rtn_quantize(
    w: torch.Tensor, format: str, group_size: int = 128, scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Plain round-to-nearest (the formats' own quantizer), for comparisons."""
    return F.quantize(w, format, group_size, scale_dtype)
