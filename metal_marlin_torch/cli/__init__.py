"""The ``marlin`` command: ``marlin quantize | info | demo | doctor | selftest | build | ...``.

Each command is a module of this package with ``add_parser(subparsers)``, which registers its
sub-parser and sets ``func``; :data:`COMMANDS` lists them in help order.

Every fault ends the command with one line on stderr, ``marlin COMMAND: error: ...``, and a
non-zero exit code (2 for bad input and environment faults, 1 for anything unexpected); ``-v``
adds the traceback. Writers never leave partial output (:mod:`..io.atomic`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import traceback

COMMANDS: tuple[str, ...] = ("quantize", "info", "demo", "generate", "import-mlx", "import-gguf", "eval", "doctor",
                             "selftest", "build",
                             "export-mlx", "export-gguf", "serve",
                             "chat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marlin", description="Quantized LLM weights for PyTorch (Metal on Apple Silicon, torch on CPU/CUDA)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(sub)
    return parser


# errno values that mean "the disk is full" (EFBIG: the file size limit, RLIMIT_FSIZE or the
# file system's own, reached)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CommandError(Exception):
    """A fault a command explains itself: ``str(err)`` is the whole message."""


def describe(err: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception raised by a command."""
    if isinstance(err, CommandError | ValueError | TypeError | KeyError | FileNotFoundError):
        text = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
        return text.strip().splitlines()[0] if text.strip() else type(err).__name__, 2
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in DISK_FULL:
            return f"no space left to write{where}: {err.strerror or err}; free some space and run again", 2
        if isinstance(err, PermissionError) or err.errno == errno.EROFS:
            return f"cannot write{where}: {err.strerror or err}", 2
        return f"{err.strerror or err}{where}", 2
    if isinstance(err, MemoryError):
        return "out of memory", 2
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first} (run with -v for the traceback)", 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (every fault becomes one line; -v shows the traceback)
        if args.verbose:
            traceback.print_exc()
        text, code = describe(err)
        print(f"marlin {args.command}: error: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
