"""Write files under a temporary name and rename when complete: no partial files.

Single files go through :func:`atomic_path` (a hidden sibling, renamed over the target).
Whole output directories (a checkpoint: shards, index, ``config.json``, tokenizer) go through
:func:`staged_dir`: everything is written into a hidden sibling directory, which becomes the
output only when every file is complete, so a full disk, a permission error or a kill leaves
either the old output or the new one, never a mix or a half-written shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``shutil.copyfile`` through :func:`atomic_path` (no half-copied file on a full disk)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def check_output_dir(path: str | os.PathLike, who: str) -> Path:
    """``path`` as an output directory: ValueError if it exists and is not a directory, or if a
    parent is a file; PermissionError (naming the folder) if its folder cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{who}: output {path} exists and is not a directory")
    parent = path.parent
    for p in [parent, *parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{who}: output {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(f"{who}: cannot write in {p}: permission denied")
            break
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_stages(out: Path) -> None:
    """Delete staging folders of ``out`` left by processes that no longer run (killed)."""
    if not out.parent.is_dir():
        return
    for stage in out.parent.glob(f".{out.name}.partial-*"):
        pid = stage.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, who: str) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``out``; when the block succeeds, its files
    become ``out``'s, else it is deleted and ``out`` is left as it was.

    A new ``out`` is one rename. An existing ``out`` (saving over an earlier checkpoint) gets
    each file renamed in, ``config.json`` last (a folder whose ``config.json`` is new is
    complete); files of the old checkpoint that the new one lacks are the caller's to remove.
    """
    out = check_output_dir(out, who)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        try:
            yield stage
        except OSError as err:  # name the output the user asked for, not the hidden staging folder
            name = str(err.filename or "")
            if name.startswith(str(stage)):
                raise OSError(err.errno, err.strerror, str(out) + name[len(str(stage)):]) from err
            raise
        if not out.exists():
            os.rename(stage, out)
        else:
            files = sorted(stage.iterdir(), key=lambda p: p.name == "config.json")
            for f in files:
                os.replace(f, out / f.name)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
