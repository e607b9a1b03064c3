#!/usr/bin/env bash
# Installs what nano-megatron needs on a Debian machine, only what is missing.
# As root it runs apt-get; otherwise it prints the exact apt-get line and fails.
# Then it makes .venv (system site packages, so Debian's python3-torch is used) with the
# PyPI interop oracles used by tests (tokenizers, safetensors), and installs the Python
# package (python/) into it.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config libopenblas-openmp-dev libcjson-dev libpcre2-dev
          python3 python3-venv python3-pip python3-numpy python3-torch clang libdnnl-dev
          libopenmpi-dev openmpi-bin python3-setuptools python3-wheel python3-pytest)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "deps: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "deps: missing Debian packages; run:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# Test oracles from PyPI, pinned, in a venv that sees Debian's torch.
if [ "${1:-}" = "--with-venv" ]; then
  if [ ! -x .venv/bin/python3 ] || ! .venv/bin/python3 -c 'import tokenizers, safetensors, torch' 2>/dev/null; then
    echo "deps: creating .venv (tokenizers, safetensors)"
    /usr/bin/python3 -m venv --system-site-packages .venv
    .venv/bin/pip install -q --disable-pip-version-check 'tokenizers==0.20.3' 'safetensors==0.4.5'
  fi
  # The Python package, reinstalled whenever its files or the C library's sources changed
  # (the hash it recorded at build time differs from the tree's): a changed library is never
  # tested stale. Its CMake build directory (build/python) persists, so a reinstall
  # recompiles only what changed. Debian's setuptools builds it (no build isolation: nothing
  # is fetched).
  want=$(/usr/bin/python3 python/nanomegatron/_source_hash.py .)
  have=$(.venv/bin/python3 -c 'import nanomegatron; print(nanomegatron.build_info().get("source_hash"))' 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    echo "deps: installing the Python package (python/) into .venv"
    NM_JOBS=$(nproc) .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps ./python
  fi
fi
