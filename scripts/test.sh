#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs the whole suite.
# Works on a fresh Debian/Ubuntu machine with Python 3.10+ (no GPU needed; CUDA-only tests
# skip with a stated reason). clang-19 compiles the Metal (MSL) emulator.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v clang-19 >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq clang-19 >/dev/null
fi
# torch 2.13.0 first: on the project's machines it resolves to a local CPU build; an unpinned
# torch would pull several GB of CUDA packages.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q -p no:cacheprovider "$@"
