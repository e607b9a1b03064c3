# skip.sh: the suite's two kinds of skip, for shell tests (test_util.h and nm_skip.py hold the
# same for C and Python). A skipped test exits 77, ctest's SKIP_RETURN_CODE.
#   nm_skip_machine REASON  a reason no setup fixes on this machine (the CPU lacks an ISA, no
#                           GPU): prints "SKIP(machine): REASON" and exits 77, in CI too
#   nm_skip REASON          anything else (a missing package, binary or file): prints
#                           "SKIP: REASON" and exits 77, but under CI=true prints a FAIL line and
#                           exits 1. CI is where the suite is meant to run whole: a dependency
#                           missing there is a setup bug to fix, and a skip would hide it.
# Source it (source "$NM_ROOT/tests/skip.sh"), or run it: bash tests/skip.sh [--machine] REASON.
# `make test` lists the skipped tests by name and, under CI=true, fails on a skip that does not
# say SKIP(machine) (tests/ctest_summary.py), whichever way the test exited 77.

# nm_in_ci: true when CI=true (or 1), as GitHub Actions and GitLab CI set it.
nm_in_ci() {
  case ${CI:-} in
    [Tt][Rr][Uu][Ee] | 1) return 0 ;;
    *) return 1 ;;
  esac
}

nm_skip_machine() {
  echo "SKIP(machine): $*"
  exit 77
}

nm_skip() {
  if nm_in_ci; then
    echo "FAIL: skipped under CI=true: $* (in CI only a machine reason may skip: install what is missing)" >&2
    exit 1
  fi
  echo "SKIP: $*"
  exit 77
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  if [ "${1:-}" = "--machine" ]; then
    shift
    nm_skip_machine "$@"
  fi
  nm_skip "$@"
fi
