"""Loads the compiled Metal extension ``metal_marlin_torch._C`` when it was built (macOS arm64).

Imported by the ops registry before it registers the pure-torch MPS fallbacks, so that ops with
a Metal kernel keep it. On other platforms there is no ``_C`` and nothing happens. A ``_C`` that
exists but fails to load is logged as a warning with its error (the ops then run pure torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

log = logging.getLogger("metal_marlin_torch")

STATE: dict[str, object] = {"loaded": False, "error": None}


def load_extension() -> bool:
    """Import ``metal_marlin_torch._C`` once; True when it is loaded."""
    if STATE["loaded"] or STATE["error"] is not None:
        return bool(STATE["loaded"])
    if importlib.util.find_spec("metal_marlin_torch._C") is None:
        STATE["error"] = "not built (the extension is built only on macOS arm64)"
        return False
    try:
        importlib.import_module("metal_marlin_torch._C")
    except (ImportError, OSError) as e:
        STATE["error"] = f"{type(e).__name__}: {e}"
        log.warning("metal_marlin_torch: the Metal extension failed to load (%s); "
                    "MPS ops use the pure-torch kernels", STATE["error"])
        return False
    STATE["loaded"] = True
    return True
