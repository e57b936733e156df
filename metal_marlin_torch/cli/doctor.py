"""``marlin doctor``: what runs where on this machine, why, and what to do about each problem.

Prints torch and OS versions, whether MPS exists, the Metal extension (built, loaded, from where,
or why not), the MSL version, each kernel family's state on MPS (compiled, not yet compiled,
rejected with the compiler's first error line), which kernel each op uses on each device, whether
the MSL emulator can run here, and where the caches are. ``--json PATH`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="diagnose the Metal backend: versions, build, kernel families, fixes")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=run)


def collect() -> dict[str, Any]:
    """The doctor's findings: facts, and ``problems`` as (problem, what to do) pairs."""
    import torch  # noqa: PLC0415

    from .. import build, emulator  # noqa: PLC0415
    from ..backend import backend_info  # noqa: PLC0415

    info = backend_info()
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
        "macos": platform.mac_ver()[0] or None,
        "machine": platform.machine(),
        "mps_built": torch.backends.mps.is_built(),
        "mps_available": torch.backends.mps.is_available(),
        "metal_extension": info["metal_extension"],
        "metal_extension_error": info["metal_extension_error"],
        "metal_extension_path": info["metal_extension_path"],
        "metal_msl_version": info["metal_msl_version"],
        "extension_cache": str(build.cache_root()),
        "families": info["metal_families"],
        "kernels": info["kernels"],
        "emulator_compiler": emulator.compiler(),
        "emulator_cache": str(emulator.cache_root()),
    }
    problems: list[tuple[str, str]] = []
    if not build.macos_arm64():
        problems.append(("not Apple Silicon macOS: no Metal here, the ops run their pure-torch kernels",
                         "expected off a Mac; `marlin selftest` checks the Metal kernels through the emulator"
                         + ("" if facts["emulator_compiler"] else " (install clang-19 for it)")))
    elif not facts["mps_available"]:
        problems.append(("torch reports no MPS device", "use macOS 13+ on Apple Silicon and the macOS arm64 torch "
                         "wheel (`pip install torch`); then run `marlin doctor` again"))
    elif not facts["metal_extension"]:
        problems.append((f"Metal extension: {facts['metal_extension_error']}",
                         "fix what the message says, then `marlin build` (or `python -m metal_marlin_torch.build`); "
                         "until then MPS ops use the pure-torch kernels (correct, slower)"))
    for name, fam in facts["families"].items():
        if fam["state"] == "rejected":
            first = (fam["message"].strip().splitlines() or [""])[0]
            problems.append((f"kernel family '{name}' was rejected by the Metal compiler: {first}",
                             "its ops run the pure-torch kernels on MPS (correct, slower); please report it with "
                             "the output of `marlin selftest --json report.json`"))
        if fam["bf16"] == "torch" and fam["state"] != "torch":
            problems.append((f"kernel family '{name}': bf16 runs the pure-torch kernels (no `bfloat` before macOS 14)",
                             "use float16 activations, or macOS 14+"))
    facts["problems"] = [{"problem": p, "what_to_do": w} for p, w in problems]
    return facts


def run(args: argparse.Namespace) -> int:
    facts = collect()
    print(f"python {facts['python']}, torch {facts['torch']}, {facts['os']} ({facts['machine']})")
    print(f"MPS: built {facts['mps_built']}, available {facts['mps_available']}")
    if facts["metal_extension"]:
        print(f"Metal extension: loaded from {facts['metal_extension_path']}; MSL {facts['metal_msl_version']}")
    else:
        print(f"Metal extension: not loaded ({facts['metal_extension_error']})")
    print(f"extension cache: {facts['extension_cache']}")
    print("kernel families on MPS:")
    for name, fam in facts["families"].items():
        first = (fam["message"].strip().splitlines() or [""])[0]
        why = f" ({first})" if first else ""
        print(f"  {name:<14} {fam['state']:<17} bf16 {fam['bf16']:<6}{why}")
    print("kernel of each op:")
    devices = list(facts["kernels"])
    print("  " + f"{'op':<22}" + "".join(f"{d:<16}" for d in devices))
    for op in facts["kernels"]["cpu"]:
        print("  " + f"{op:<22}" + "".join(f"{facts['kernels'][d][op]:<16}" for d in devices))
    emu = facts["emulator_compiler"]
    print(f"MSL emulator: {'available (' + emu + ')' if emu else 'unavailable (needs clang-19)'}; "
          f"cache {facts['emulator_cache']}")
    if facts["problems"]:
        print("problems:")
        for p in facts["problems"]:
            print(f"  - {p['problem']}\n    what to do: {p['what_to_do']}")
    else:
        print("problems: none")
    if args.json:
        from .._files import write_atomic  # noqa: PLC0415

        write_atomic(Path(args.json), json.dumps(facts, indent=1, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
