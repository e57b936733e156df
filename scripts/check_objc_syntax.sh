#!/usr/bin/env bash
# Compile the Objective-C++ Metal glue (csrc/metal/*.mm) with -fsyntax-only on Linux, against
# the real torch headers (ATen/mps/*) and the minimal Apple framework declarations in
# csrc/metal/syntax_stubs, so C++ and torch-API mistakes fail CI without a Mac. The generated
# shader header is produced the way metal_marlin_torch/build/ produces it for the real build.
# Usage: scripts/check_objc_syntax.sh [file.mm ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CXX="${METAL_MARLIN_EMU_CXX:-clang++-19}"
PY="${PYTHON:-python3}"
GEN="$(mktemp -d)"
trap 'rm -rf "$GEN"' EXIT
# _metal_sources.py imports no torch, only the stdlib helpers of _files.py: load it under an
# empty stand-in of its package (the real __init__ would import torch and the whole package).
"$PY" - "$ROOT" "$GEN" <<'PYEOF'
import importlib.util, pathlib, sys, types
root, gen = map(pathlib.Path, sys.argv[1:3])
pkg = types.ModuleType("metal_marlin_torch")
pkg.__path__ = [str(root / "metal_marlin_torch")]
sys.modules["metal_marlin_torch"] = pkg
name = "metal_marlin_torch._metal_sources"
spec = importlib.util.spec_from_file_location(name, root / "metal_marlin_torch" / "_metal_sources.py")
mod = sys.modules[name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.embed_shaders(gen, root)
PYEOF
mapfile -t TORCH_INC < <("$PY" -c "from torch.utils import cpp_extension as c; print('\n'.join(c.include_paths()))")
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
ABI="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
ARGS=(-fsyntax-only -x objective-c++ -std=c++20 -fobjc-arc -fblocks -fobjc-runtime=macosx-14.0
      -D_GLIBCXX_USE_CXX11_ABI="$ABI" -Wall -Wno-unused-parameter -Werror=return-type
      -isystem "$ROOT/csrc/metal/syntax_stubs" -I "$ROOT/csrc" -I "$ROOT" -I "$GEN" -isystem "$PY_INC")
for inc in "${TORCH_INC[@]}"; do ARGS+=(-isystem "$inc"); done
# Files to check: the arguments, each on its own; by default every csrc/metal/*.mm together
# in one translation unit (torch's headers are parsed once: CI has two cores).
if [ "$#" -gt 0 ]; then
  FILES=("$@")
else
  UNITY="$GEN/all_metal_glue.mm"
  for f in "$ROOT"/csrc/metal/*.mm; do echo "#include \"$f\""; done > "$UNITY"
  FILES=("$UNITY")
fi
pids=()
for f in "${FILES[@]}"; do
  ("$CXX" "${ARGS[@]}" "$f" > "$GEN/$(basename "$f").log" 2>&1) &
  pids+=($!)
done
status=0
for i in "${!FILES[@]}"; do
  f="${FILES[$i]}"
  if wait "${pids[$i]}"; then
    if [ "$#" -eq 0 ]; then
      for g in "$ROOT"/csrc/metal/*.mm; do echo "ok: ${g#$ROOT/}"; done
    else
      echo "ok: ${f#$ROOT/}"
    fi
  else
    cat "$GEN/$(basename "$f").log"
    echo "FAILED: ${f#$ROOT/}"
    status=1
  fi
done
exit $status
