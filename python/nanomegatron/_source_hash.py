"""The hash of everything the installed package is built from (the C library's sources and
build files, and the package's own files), so scripts/deps.sh can tell a stale install from a
current one cheaply: `python3 python/nanomegatron/_source_hash.py REPO_ROOT` prints it, and
setup.py records it in the package (_build_info.json) when it builds.
"""
import hashlib
import os
import sys

_TREES = (("src", (".c", ".h", ".cu", ".cuh")), ("include", (".h",)), ("python/nanomegatron", (".py",)))
_FILES = ("CMakeLists.txt", "python/setup.py", "python/pyproject.toml")


def source_hash(root):
    paths = [f for f in _FILES if os.path.exists(os.path.join(root, f))]
    for tree, exts in _TREES:
        for d, dirs, files in os.walk(os.path.join(root, tree)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            for f in files:
                if f.endswith(exts):
                    paths.append(os.path.relpath(os.path.join(d, f), root))
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.encode() + b"\0")
        with open(os.path.join(root, p), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


if __name__ == "__main__":
    print(source_hash(sys.argv[1] if len(sys.argv) > 1 else "."))
