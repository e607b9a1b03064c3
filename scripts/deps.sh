#!/usr/bin/env bash
# Installs what nano-megatron needs on a Debian machine, only what is missing.
# As root it runs apt-get; otherwise it prints the exact apt-get line and fails.
# Then it makes .venv (system site packages, so Debian's python3-torch is used) with the
# PyPI interop oracles used by tests (tokenizers, safetensors, torch, transformers, gguf, pyarrow,
# llama-cpp-python), and installs the Python package (python/) into it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Slurm and munge are for tests/test_slurm.sh, which starts a private slurmctld, slurmd and
# munged of its own: srun --mpi=pmix needs mpi_pmix.so (slurm-wlm-basic-plugins), which
# dlopens the unversioned libpmix.so (libpmix-dev). Installing them starts no daemon that gets
# in its way: Docker's policy-rc.d (where there is one) refuses every start; otherwise
# slurmctld and slurmd (systemd unit or init.d script) start only with an
# /etc/slurm/slurm.conf, which Debian does not ship, and a system munged has its own socket
# and key under /run/munge and /etc/munge.
packages=(build-essential cmake pkg-config libopenblas-openmp-dev libcjson-dev libpcre2-dev zlib1g-dev libzstd-dev zstd
          python3 python3-venv python3-pip python3-numpy python3-torch clang libdnnl-dev
          libopenmpi-dev openmpi-bin python3-setuptools python3-wheel python3-pytest
          slurm-wlm slurm-wlm-basic-plugins munge libpmix-dev)
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

# Test oracles from PyPI, pinned, in a venv that sees Debian's numpy. The export tests need
# transformers' native DeepseekV3 (q_lora_rank null works from 4.57; 4.5x imports
# torch.distributed.tensor, so Debian's torch 1.13 is too old: PyPI's torch 2.5.1 goes into the
# venv, ~3.3 GB with its CUDA libraries, ~4 min to download and install), PyPI's gguf as an
# independent GGUF reader, and llama.cpp via llama-cpp-python built from its sdist (CPU only,
# examples/tools/server/tests off: ~10-16 min on 2 cores. PyPI has no binary wheel of it, so pip
# builds the sdist once and keeps the wheel in its cache; a later fresh .venv on the same machine
# installs that wheel in seconds. No --no-binary: pip 23.0 ignores its wheel cache under it).
venv_ok() {
  .venv/bin/python3 -c 'import tokenizers, safetensors, torch, gguf, llama_cpp, pyarrow
from transformers import DeepseekV3ForCausalLM' 2>/dev/null
}
if [ "${1:-}" = "--with-venv" ]; then
  if [ ! -x .venv/bin/python3 ] || ! venv_ok; then
    echo "deps: making .venv (torch, transformers, tokenizers, safetensors, gguf, pyarrow, llama-cpp-python)"
    [ -x .venv/bin/python3 ] || /usr/bin/python3 -m venv --system-site-packages .venv
    pip=(.venv/bin/pip install -q --disable-pip-version-check)
    "${pip[@]}" 'torch==2.5.1' 'transformers==4.57.6' 'tokenizers==0.22.2' 'safetensors==0.4.5' 'gguf==0.19.0' \
      'pyarrow==18.1.0'
    CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
                -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \
      "${pip[@]}" 'llama-cpp-python==0.3.36'
    venv_ok || { echo "deps: .venv is still missing a test oracle" >&2; exit 1; }
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
