"""Small file helpers shared by the build steps (emulator, CPU kernel, Metal extension) and
scripts: per-user cache folders and atomic writes (no partial files)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("metal_marlin_torch")


def cache_dir(kind: str, env: str) -> Path:
    """Where the ``kind`` build caches its outputs: ``$env`` when set, else
    ``~/.cache/metal_marlin_torch/<kind>``, else (home not writable) a per-user temp folder."""
    override = os.environ.get(env)
    if override:
        return Path(override)
    home = Path.home() / ".cache" / "metal_marlin_torch" / kind
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"metal_marlin_torch-{os.getuid()}" / kind
        log.info("metal_marlin_torch: %s is not writable; caching in %s", home, fallback)
        return fallback


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``path`` through a temporary name in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
