"""``marlin selftest``: every Metal op against its pure-torch kernel, on sizes reaching every kernel
variant; on MPS with the Metal extension, else through the MSL emulator. Writes a JSON report
(``--json``, default ``marlin_selftest.json``) and exits 1 when a case failed."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selftest", help="check every Metal kernel against the pure-torch ops; write a JSON report")
    p.add_argument("--quick", action="store_true",
                   help="one format per decoder kind and fewer dtypes (seconds instead of about a minute)")
    p.add_argument("--device", choices=["mps", "emulator"], help="default: mps when the extension is loaded")
    p.add_argument("--json", metavar="PATH", default="marlin_selftest.json", help="report path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import selftest  # noqa: PLC0415
    from ..emulator import EmulatorError  # noqa: PLC0415

    def show(c: selftest.CaseResult) -> None:
        if not c.ok:
            print(f"FAIL {c.op} [{c.family}] {c.params}: "
                  f"{c.error or f'max error {c.max_abs_err:.3g} ({c.allowed})'}")

    device = {"mps": "mps", "emulator": "cpu", None: None}[args.device]
    try:
        report = selftest.run(quick=args.quick, device=device, on_case=show)
    except EmulatorError as e:
        print(f"marlin selftest: no Metal extension here and the emulator cannot be built: {e}")
        return 2
    selftest.write(report, args.json)
    s = report.to_json()["summary"]
    print(f"{report.backend}: {s['passed']}/{s['cases']} cases passed in {report.seconds:.1f} s "
          f"({', '.join(f'{f} {n}' for f, n in s['by_family'].items())})")
    rejected = [f for f, st in report.families.items() if st.get("state") == "rejected"]
    if rejected:
        print(f"note: families that ran the pure-torch fallback: {', '.join(rejected)} "
              f"({s['ran_fallback']} cases verified the fallback, not a Metal kernel)")
    print(f"report: {args.json}")
    return 0 if not report.failed else 1
