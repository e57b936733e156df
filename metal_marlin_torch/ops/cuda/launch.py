"""Triton launches of ``marlin::gemm``: the JIT's own path, and a per-layer *recorded* launch
that skips its per-call work.

Every kernel launch of the CUDA fast path goes through :func:`launch`. Normally that is
``kernel[grid](*args, **kwargs)``: Triton binds the arguments, computes a specialization key
from every integer and pointer (divisibility by 16, equality to 1), looks the compiled kernel
up and launches it: tens of microseconds of Python a call. A layer whose shapes do not change
between calls (``MarlinLinear`` on CUDA, :class:`.dispatch.LayerPlan`) records its launch
once with :func:`recording` and then replays it with :class:`Recorded`: the compiled kernel's
own launcher (``CompiledKernel.run``, the same call Triton's ``JITFunction.run`` ends with in
Triton >= 3.3) on a saved argument list in which only the activation, the output, the layer
bias and a TMA descriptor over the activation are replaced.

What keeps the replay correct: the compiled kernel is specialized on the arguments' values
(integers) and alignment (pointers). The integers of a recorded launch are fixed by the plan's
key (rows, dtype, bias or not) and the layer; the replaced tensors are checked to be
contiguous and 16-byte aligned, as the recorded ones were (:meth:`Recorded.matches`), and a
call that does not match takes Triton's own path.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

_recorder: list | None = None  # set while a plan records (recording())
_dry: list | None = None  # set while workspace needs are computed (dry_run())


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Record every launch made inside: ``(kernel, grid, args, kwargs, compiled)`` tuples."""
    global _recorder
    saved, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = saved


@contextlib.contextmanager
def dry_run() -> Iterator[list]:
    """Inside, :func:`launch` launches nothing (the dispatch's arithmetic runs, kernels do not):
    used to learn a layer's split-K workspace needs without running it."""
    global _dry
    saved, _dry = _dry, []
    try:
        yield _dry
    finally:
        _dry = saved


def is_dry() -> bool:
    return _dry is not None


def note_workspace(numel: int, tiles: int) -> None:
    """In a dry run: a launch would ask for this split-K workspace."""
    if _dry is not None:
        _dry.append(("workspace", numel, tiles))


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)``, recorded when a plan records, skipped in a dry run."""
    if _dry is not None:
        _dry.append(("launch", kernel, grid))
        return None
    compiled = kernel[grid](*args, **kwargs)
    if _recorder is not None:
        _recorder.append((kernel, grid, args, kwargs, compiled))
    return compiled


_SIGNATURES: dict[int, tuple[list[str], dict[str, Any]]] = {}


def _signature(kernel: Any) -> tuple[list[str], dict[str, Any]]:
    """Parameter names of a Triton kernel in order, and their defaults."""
    got = _SIGNATURES.get(id(kernel))
    if got is None:
        params = inspect.signature(kernel.fn).parameters
        got = ([p for p in params],
               {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty})
        _SIGNATURES[id(kernel)] = got
    return got


def _launch_hooks_set() -> bool:
    """Triton's launch enter / exit hooks (profilers) are set: they need its own path."""
    try:
        from triton import knobs
    except ImportError:  # no Triton, no hooks (tests replay mocked launches)
        return False
    return _hook_active(knobs.runtime.launch_enter_hook) or _hook_active(knobs.runtime.launch_exit_hook)


def _hook_active(hook: Any) -> bool:
    # Triton 3.6 keeps a HookChain there (never None): active when it holds calls
    return hook is not None and bool(getattr(hook, "calls", True))


def _stream(device_index: int) -> int:
    """The current CUDA stream's handle, as Triton's launcher takes it."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


@dataclass
class Recorded:
    """One recorded launch, replayed through the compiled kernel's launcher.

    ``slots`` name the argument positions replaced per call: ``x`` (the activation
    ``[M, K]``), ``y`` (the output, allocated per call), ``bias`` (the layer bias),
    ``x_desc`` (a TMA descriptor over ``x``, rebuilt per call).
    """

    compiled: Any
    grid: tuple[int, int, int]
    args: list
    slots: dict[str, list[int]]
    y_shape: tuple[int, int]
    y_dtype: torch.dtype
    device_index: int
    x_desc_proto: Any = None
    # the static tensors as raw device addresses: Triton's launcher takes an int for a pointer
    # as is, where for a tensor it calls data_ptr() and asks the driver to validate the address
    # (cuPointerGetAttribute) on every launch; the plan keeps the tensors alive
    args_int: list = field(default_factory=list)
    int_ptrs: bool = True

    @classmethod
    def build(cls, record: tuple, x2: torch.Tensor, y: torch.Tensor,
              bias: torch.Tensor | None) -> Recorded | None:
        """From one :func:`recording` entry of a launch whose activation was ``x2`` and output
        ``y``; None where the launch cannot be replayed (arguments not found, hooks set)."""
        kernel, grid, args, kwargs, compiled = record
        if _launch_hooks_set():
            return None  # a profiler's hooks want Triton's own path
        if compiled is None or not hasattr(compiled, "run"):
            return None
        names, defaults = _signature(kernel)
        values = list(args) + [kwargs[n] if n in kwargs else defaults.get(n) for n in names[len(args):]]
        if len(values) != len(names):
            return None
        # every position that holds a per-call tensor (an unsplit launch passes its output as
        # the split-K workspace and counters too: all of them are replaced)
        slots: dict[str, list[int]] = {}
        proto = None
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                if v.data_ptr() == x2.data_ptr() and v.shape == x2.shape:
                    slots.setdefault("x", []).append(i)
                elif v.data_ptr() == y.data_ptr():
                    slots.setdefault("y", []).append(i)
                elif bias is not None and v.data_ptr() == bias.data_ptr():
                    slots.setdefault("bias", []).append(i)
            elif hasattr(v, "base") and hasattr(v, "block_shape"):  # a TMA descriptor
                if v.base.data_ptr() == x2.data_ptr():
                    slots.setdefault("x_desc", []).append(i)
                    proto = v
                elif v.base.data_ptr() in (y.data_ptr(), None if bias is None else bias.data_ptr()):
                    return None  # a descriptor over another per-call tensor: not replayable
        if "y" not in slots or ("x" not in slots and "x_desc" not in slots):
            return None
        if bias is not None and "bias" not in slots:
            return None
        for idx in slots.values():  # hold no per-call tensor (it may belong to a graph's pool)
            for i in idx:
                values[i] = None
        if proto is not None:
            proto = copy.copy(proto)
            proto.base = None
        g = tuple(grid) + (1,) * (3 - len(grid))
        args_int = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values]
        return cls(compiled, g, values, slots, tuple(y.shape), y.dtype, y.device.index, proto,
                   args_int)

    def matches(self, x2: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """``x2`` (and ``bias``) can take the recorded launch's places: contiguous, aligned."""
        return (x2.is_contiguous() and _aligned(x2)
                and (bias is None or (bias.is_contiguous() and _aligned(bias))))

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.empty(self.y_shape, dtype=self.y_dtype, device=x2.device)
        if self.int_ptrs:
            try:
                return self._launch(x2, bias, y, True)
            except (TypeError, ValueError, OverflowError):  # a launcher that wants tensors
                self.int_ptrs = False
        return self._launch(x2, bias, y, False)

    def _launch(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                ints: bool) -> torch.Tensor:
        args = (self.args_int if ints else self.args).copy()
        s = self.slots
        yv, xv = (y.data_ptr(), x2.data_ptr()) if ints else (y, x2)
        for i in s["y"]:
            args[i] = yv
        for i in s.get("x", ()):
            args[i] = xv
        if "x_desc" in s:
            proto = self.x_desc_proto
            desc = object.__new__(type(proto))  # a shallow copy (copy.copy is ~10x slower)
            desc.__dict__.update(proto.__dict__)
            desc.base = x2
            for i in s["x_desc"]:
                args[i] = desc
        if bias is not None:
            bv = bias.data_ptr() if ints else bias
            for i in s.get("bias", ()):
                args[i] = bv
        c = self.compiled
        c.run(self.grid[0], self.grid[1], self.grid[2], _stream(self.device_index), c.function,
              c.packed_metadata, None, None, None, *args)
        return y
