"""nm_skip.py: the suite's two kinds of skip, for Python tests (tests/skip.sh says why; C tests:
test_util.h). A skipped test exits 77, ctest's SKIP_RETURN_CODE.

  skip_machine(reason)  a reason no setup fixes on this machine (the CPU lacks an ISA, no GPU):
                        prints "SKIP(machine): reason" and exits 77, in CI too
  skip(reason)          anything else (a missing package, binary or file): prints "SKIP: reason"
                        and exits 77, but under CI=true prints a FAIL line and exits 1
  skip_part(reason)     one optional part of a test cannot run (a cross-check needing a newer
                        library): prints "SKIP(part): reason" and returns; under CI=true exits 1

Tests under tests/reference and tests/interop import it with their parent directory on
sys.path: sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).
"""
import os
import sys

MACHINE = "SKIP(machine):"


def in_ci():
    """True when CI=true (or 1), as GitHub Actions and GitLab CI set it."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def skip_machine(reason):
    print(f"{MACHINE} {reason}", flush=True)
    sys.exit(77)


def skip(reason):
    if in_ci():
        print(f"FAIL: skipped under CI=true: {reason} (in CI only a machine reason may skip: install what is "
              f"missing)", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"SKIP: {reason}", flush=True)
    sys.exit(77)


def skip_part(reason):
    if in_ci():
        print(f"FAIL: part of the test skipped under CI=true: {reason} (install what is missing)", file=sys.stderr,
              flush=True)
        sys.exit(1)
    print(f"SKIP(part): {reason}", flush=True)
