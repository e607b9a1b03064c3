"""Runs one test file of tests/python with pytest, against the installed nanomegatron package.

Exit 0 pass, 1 fail, 77 skip (no pytest or no package in this Python: `make test` installs
both into .venv). An installed package built from other sources than the tree's is a failure,
not a skip: it would test a stale library.
"""
import os
import sys


def main():
    if len(sys.argv) != 2:
        print("usage: run.py tests/python/test_X.py", file=sys.stderr)
        return 2
    try:
        import pytest
    except ImportError:
        print(f"skip: no pytest in {sys.executable} (make test puts Debian's python3-pytest in .venv)")
        return 77
    try:
        import nanomegatron
        from nanomegatron._source_hash import source_hash
    except ImportError as e:
        if "struct mirrors do not match" in str(e):
            print(f"FAIL: {e}", file=sys.stderr)
            return 1
        print(f"skip: the nanomegatron package is not installed in {sys.executable} ({e}); "
              f"scripts/deps.sh --with-venv installs it")
        return 77
    root = os.environ.get("NM_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.environ.get("NM_LIBRARY"):
        want, have = source_hash(root), nanomegatron.build_info().get("source_hash")
        if want != have:
            print(f"FAIL: the installed nanomegatron ({os.path.dirname(nanomegatron.__file__)}) was built from "
                  f"other sources than {root} (hash {have} != {want}): run scripts/deps.sh --with-venv",
                  file=sys.stderr)
            return 1
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", os.path.dirname(os.path.abspath(__file__)),
                      sys.argv[1]])
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
