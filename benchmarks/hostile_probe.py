"""Replay every hostile case of issue 26 and print one table: 0 tracebacks, 0 silent, 0 loss, 0 leaks.

    python benchmarks/hostile_probe.py [--area AREA ...] [--json FILE]

Cases live in ``benchmarks/hostile/<area>.py`` (a ``CASES`` list each, see ``hostile/__init__.py``). Each
runs in its own scratch folder; a case that raises is counted as a ``traceback`` of the probe's own.
Exit 1 when any case is not ``ok``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile  # noqa: E402
from hostile import VERDICTS, Case, Outcome  # noqa: E402


def all_cases(areas: list[str] | None) -> list[Case]:
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(hostile.__path__), key=lambda m: m.name):
        if areas and info.name not in areas:
            continue
        cases.extend(importlib.import_module(f"hostile.{info.name}").CASES)
    return cases


def run_case(case: Case) -> tuple[Outcome, float]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"hostile-{case.area}-") as scratch:
        try:
            outcome = case.run(Path(scratch))
        except Exception as err:  # the probe itself failed: count it, never hide it
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            outcome = Outcome("traceback", f"probe error: {last[:150]}")
    return outcome, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--area", action="append", help="only these areas (module names under hostile/)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for case in all_cases(args.area):
        outcome, seconds = run_case(case)
        rows.append(
            {
                "area": case.area,
                "case": case.name,
                "verdict": outcome.verdict,
                "seconds": round(seconds, 1),
                "detail": outcome.detail,
            }
        )
        print(
            f"{case.area:<8} {outcome.verdict:<9} {seconds:6.1f}s  {case.name}  | {outcome.detail}",
            flush=True,
        )
    counts = Counter(row["verdict"] for row in rows)
    print()
    print("| verdict | cases |")
    print("|---|---:|")
    for verdict in VERDICTS:
        print(f"| {verdict} | {counts.get(verdict, 0)} |")
    print(f"| total | {len(rows)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if rows and counts.get("ok", 0) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
