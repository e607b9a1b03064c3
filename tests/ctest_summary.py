#!/usr/bin/env python3
"""ctest_summary.py: after ctest, the skipped tests by name, and under CI=true a failure for
each that did not skip for a machine reason.

usage: ctest_summary.py JUNIT_XML   (the file of `ctest --output-junit`; `make test` runs this)

ctest lists skipped tests among "did not run" in the middle of its output, where they are
easy to miss. This prints one line at the end: "skipped: a, b, c" (or "skipped: none"), then
each skipped test's SKIP line. A test skips by exiting 77 (SKIP_RETURN_CODE) after printing
"SKIP(machine): <reason>" for a reason no setup fixes (the CPU lacks an ISA, no GPU) or
"SKIP: <reason>" for anything else (tests/skip.sh, tests/nm_skip.py, test_util.h). Under
CI=true only the first kind may skip: the helpers already fail the others, and this catches
any test that exits 77 by another road. Exit 1 then, else 0; ctest's own status is the
Makefile's to keep.
"""
import os
import sys
import xml.etree.ElementTree as ET

MACHINE = "SKIP(machine):"


def in_ci():
    return os.environ.get("CI", "").lower() in ("true", "1")


def skip_line(out):
    """The test's own SKIP line (the last one that names a reason), or its last output line."""
    lines = [ln.strip() for ln in (out or "").splitlines() if ln.strip()]
    tagged = [ln for ln in lines if "SKIP" in ln or "skip" in ln]
    return (tagged or lines or ["(no output)"])[-1]


def main():
    if len(sys.argv) != 2:
        print("usage: ctest_summary.py JUNIT_XML", file=sys.stderr)
        return 2
    path = sys.argv[1]
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"ctest_summary: cannot read ctest's JUnit file {path} ({e}): did ctest run with --output-junit?",
              file=sys.stderr)
        return 1
    skipped = []
    for case in root.iter("testcase"):
        if case.find("skipped") is not None or case.get("status") == "notrun":
            out = case.findtext("system-out") or ""
            skipped.append((case.get("name"), MACHINE in out, skip_line(out)))
    if not skipped:
        print("skipped: none")
        return 0
    print(f"skipped: {', '.join(name for name, _, _ in skipped)}")
    for name, machine, line in skipped:
        print(f"  {name}: {line}")
    fixable = [name for name, machine, _ in skipped if not machine]
    if fixable and in_ci():
        print(f"FAIL: under CI=true a skip must name a machine reason (SKIP(machine): ...); these skipped for "
              f"another: {', '.join(fixable)} (install what they say is missing)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
