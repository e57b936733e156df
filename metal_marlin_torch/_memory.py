"""Hand memory that the C allocator keeps after ``free`` back to the operating system.

Quantizing a model layer by layer allocates float32 temporaries of every layer (the weight's
upcast, its groups, codes) between the allocations that stay (the packed weights). glibc keeps
the freed temporaries in its heap (the dynamic mmap threshold sends repeated large allocations
there after the first free), and the packed weights between them stop the heap from shrinking:
on pylm-s (24 MiB bf16, 42 layers, a second quantization in a warm process), RTN quantization
grew the process by 96 MiB, of which ``malloc_trim(0)`` returned 73 MiB. With it (and the row
blocks of ``formats.quantize``) ``marlin quantize``'s peak went from 108.5 to 49.3 MiB above the
import baseline (benchmarks/results/quantize_memory.md).
``malloc_trim`` also releases whole free pages inside the heap (glibc >= 2.8, ``madvise``), so
calling it after each layer bounds the growth to the live tensors plus one layer's temporaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim():  # noqa: ANN202  (a ctypes function or None)
    if not sys.platform.startswith("linux"):
        return None  # macOS's allocator returns large blocks itself; Windows is not a target
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        log.info("metal_marlin_torch: no malloc_trim in this C library; freed memory stays with the allocator")
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim(0)``); False where the C
    library has no such call (nothing to do, or nothing we can do)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
