"""Shared fixtures: the CLI binary, a small model, fresh random seeds."""
import os
import shutil
import subprocess
import sys

import pytest

import nanomegatron as nm

ROOT = os.environ.get("NM_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import MACHINE  # noqa: E402


def skip_machine(reason):
    """pytest.skip for a reason no setup fixes on this machine (no GPU, the CPU lacks an ISA).
    run.py fails a run under CI=true on any other skip (a plain pytest.skip: a missing tool or
    package), and a run where every test skipped unless all skipped this way."""
    pytest.skip(f"{MACHINE} {reason}")


@pytest.fixture
def nm_bin():
    path = os.environ.get("NM_BIN") or os.path.join(ROOT, "build", "nanomegatron")
    if not os.path.exists(path):
        pytest.fail(f"the CLI {path} is missing (build it: make)")
    return path


def run_cli(nm_bin, *args, cwd=None):
    """Runs the CLI; returns stdout; a non-zero exit fails the test with its stderr."""
    p = subprocess.run([nm_bin, *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {p.returncode}:\n{p.stderr}")
    return p.stdout


def small_model(**over):
    """~0.3M parameters: 2 layers (1 dense, 1 MoE of 8 experts, top-2), one MTP depth."""
    kw = dict(hidden_size=64, num_layers=2, num_attention_heads=2, num_experts=8, num_active_experts=2,
              mla_q_lora_rank=32, mla_kv_lora_rank=16, mla_qk_nope_dim=16, mla_qk_rope_dim=8, mla_v_head_dim=16,
              intermediate_size=128, moe_intermediate_size=32, n_group=2, topk_group=1, vocab_size=320)
    kw.update(over)
    return nm.ModelConfig(**kw)
