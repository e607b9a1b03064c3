"""Runs one test file of tests/python with pytest, against the installed nanomegatron package.

Exit 0 pass, 1 fail, 77 skip (no pytest or no package in this Python: `make test` installs
both into .venv; under CI=true these are failures, tests/nm_skip.py). An installed package
built from other sources than the tree's is a failure, not a skip: it would test a stale
library.

pytest itself exits 0 when every test skipped, and that once read as a pass. Here a run that
collected nothing fails, and a run where every test skipped fails too, unless every reason is
a machine reason (pytest.skip("SKIP(machine): ...")), when it is a skip. Under CI=true any
test skipped for another reason fails the run, as nm_skip.skip does for a whole script.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from nm_skip import MACHINE, in_ci, skip  # noqa: E402


class Outcomes:
    """pytest plugin: each test's outcome, and the reason of each skip (collection skips too)."""

    def __init__(self):
        self.outcome = {}   # nodeid -> "passed" | "failed" | "skipped"
        self.reasons = {}   # nodeid -> skip reason

    def _skip(self, report):
        lr = report.longrepr
        reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
        self.outcome[report.nodeid] = "skipped"
        self.reasons[report.nodeid] = reason.removeprefix("Skipped: ")

    def pytest_collectreport(self, report):
        if report.skipped:   # a module skipped whole (pytest.importorskip at its top)
            self._skip(report)

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            self._skip(report)
        elif report.failed:
            self.outcome[report.nodeid] = "failed"
        elif report.when == "call":
            self.outcome.setdefault(report.nodeid, "passed")


def main():
    if len(sys.argv) != 2:
        print("usage: run.py tests/python/test_X.py", file=sys.stderr)
        return 2
    try:
        import pytest
    except ImportError:
        skip(f"no pytest in {sys.executable} (make test puts Debian's python3-pytest in .venv)")
    try:
        import nanomegatron
        from nanomegatron._source_hash import source_hash
    except ImportError as e:
        if "struct mirrors do not match" in str(e):
            print(f"FAIL: {e}", file=sys.stderr)
            return 1
        skip(f"the nanomegatron package is not installed in {sys.executable} ({e}); "
             f"scripts/deps.sh --with-venv installs it")
    root = os.environ.get("NM_ROOT") or os.path.dirname(os.path.dirname(HERE))
    if not os.environ.get("NM_LIBRARY"):
        want, have = source_hash(root), nanomegatron.build_info().get("source_hash")
        if want != have:
            print(f"FAIL: the installed nanomegatron ({os.path.dirname(nanomegatron.__file__)}) was built from "
                  f"other sources than {root} (hash {have} != {want}): run scripts/deps.sh --with-venv",
                  file=sys.stderr)
            return 1
    seen = Outcomes()
    rc = pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "--rootdir", HERE, sys.argv[1]], plugins=[seen])
    return verdict(rc, seen.outcome, seen.reasons, sys.argv[1])


def verdict(rc, outcome, reasons, name):
    """The exit code for pytest's rc and the tests' outcomes (see the module's docstring)."""
    if rc != 0 and rc != 5:
        return 1
    if not outcome:
        print(f"FAIL: {name}: pytest collected no tests (pytest exit {rc})", file=sys.stderr)
        return 1
    skipped = [n for n, o in outcome.items() if o == "skipped"]
    fixable = [n for n in skipped if not reasons[n].startswith(MACHINE)]
    for n in skipped:
        print(f"skipped {n}: {reasons[n]}")
    if len(skipped) == len(outcome):
        if fixable:
            print(f"FAIL: {name}: every test skipped ({len(skipped)}), so nothing was tested; the reasons are "
                  f"above", file=sys.stderr)
            return 1
        print(f"{MACHINE} {name}: every test skipped for a machine reason")
        return 77
    if fixable and in_ci():
        print(f"FAIL: {len(fixable)} test(s) skipped under CI=true for a reason that is not a machine reason "
              f"(install what is missing): {', '.join(fixable)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
