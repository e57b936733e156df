"""Loads the Metal extension (macOS arm64), and reports what each kernel family does.

Imported by the ops registry before it registers the pure-torch MPS kernels, so that ops with a
Metal kernel keep it. The extension is built at first use against the running torch
(:mod:`metal_marlin_torch.build`); on other platforms, without MPS, or without a compiler nothing
is loaded and the MPS ops run their pure-torch kernels, said once in the log and in
``backend_info()``.

Per kernel family (csrc/ops/families.h) the glue compiles one Metal library on first use; a
family the compiler rejects runs its ops through the pure-torch kernels (csrc/ops/registration.h
falls back to ``marlin_torch::<op>``). :func:`note_fallback` (called by those kernels) logs each
rejected family once at WARNING with the compiler's message, and a bf16 fallback (no ``bfloat``
on this OS) once at INFO; :func:`family_status` reports them all.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("metal_marlin_torch")

STATE: dict[str, object] = {"loaded": False, "error": None, "path": None, "built_now": False}
_logged: set[tuple[str, str, str]] = set()
_lock = threading.Lock()


def load_extension() -> bool:
    """Build (first use, cached) and load the Metal extension once; True when it is loaded."""
    if STATE["loaded"] or STATE["error"] is not None:
        return bool(STATE["loaded"])
    from . import build  # noqa: PLC0415

    if not build.macos_arm64():
        STATE["error"] = "not macOS arm64: the Metal extension exists only there"
        return False
    if not torch.backends.mps.is_available():
        STATE["error"] = "MPS is not available in this torch/OS: nothing to run Metal kernels on"
        return False
    try:
        res = build.ensure_built()
    except Exception as e:  # noqa: BLE001 (a build failure must not break the import: MPS falls back)
        STATE["error"] = f"building the Metal extension failed: {type(e).__name__}: {str(e)[-2000:]}"
        log.warning("metal_marlin_torch: %s; MPS ops use the pure-torch kernels (`marlin doctor` shows more)",
                    STATE["error"])
        return False
    if res.path is None:
        STATE["error"] = f"not built: {res.problem}"
        log.warning("metal_marlin_torch: the Metal extension is %s; MPS ops use the pure-torch kernels",
                    STATE["error"])
        return False
    try:
        torch.ops.load_library(str(res.path))
    except OSError as e:
        STATE["error"] = f"loading {res.path} failed: {e}"
        log.warning("metal_marlin_torch: %s; MPS ops use the pure-torch kernels", STATE["error"])
        return False
    STATE.update(loaded=True, path=str(res.path), built_now=res.built_now)
    return True


def parse_family_rows(rows: list[str]) -> dict[str, dict[str, str]]:
    """``FamilyTable::describe()`` rows ("name\\tstate\\tbf16\\tmessage") -> name -> fields."""
    out = {}
    for row in rows:
        name, state, bf16, message = (row.split("\t", 3) + ["", "", ""])[:4]
        out[name] = {"state": state, "bf16": bf16, "message": message}
    return out


def family_rows(namespace: str) -> list[str] | None:
    """The family rows of the glue in torch.ops.<namespace> (marlin_metal: the Metal
    extension; marlin_emu: the emulator), or None when that library is not loaded."""
    try:
        return list(getattr(torch.ops, namespace)._families())
    except (AttributeError, RuntimeError):
        return None


def family_status() -> dict[str, dict[str, str]]:
    """Family -> {state, bf16, message} of the loaded Metal extension (empty when none)."""
    rows = family_rows("marlin_metal") if STATE["loaded"] else None
    return parse_family_rows(rows or [])


def note_fallback(op: str, device_type: str) -> None:
    """Called by the pure-torch kernels the glue falls back to: logs each newly rejected family once
    at WARNING (with the compiler's message) and each family's first bf16 fallback once at INFO."""
    namespace = "marlin_metal" if device_type == "mps" else "marlin_emu"
    rows = family_rows(namespace)
    if rows is None:
        return
    with _lock:
        for name, st in parse_family_rows(rows).items():
            if st["state"] == "rejected" and (namespace, name, "rejected") not in _logged:
                _logged.add((namespace, name, "rejected"))
                first = (st["message"].strip().splitlines() or ["(no message)"])[0]
                log.warning("metal_marlin_torch: the Metal compiler rejected kernel family '%s' (%s); its ops "
                            "(here %s) run the pure-torch kernels on %s. Compiler message:\n%s",
                            name, first, op, device_type, st["message"])
            if st["bf16"] == "fallback" and (namespace, name, "bf16") not in _logged:
                _logged.add((namespace, name, "bf16"))
                log.info("metal_marlin_torch: no bfloat on this OS: bf16 '%s' kernels run the pure-torch "
                         "kernels on %s", name, device_type)
