"""The Trainer under `mpirun -np 2 python train.py`: init_distributed joins the library's
communicator, and the two ranks train data-parallel, then tensor-parallel (tp2), each with
per-step losses equal to `nanomegatron train` on one process (tests/dist/compare_runs.py's tolerances: 2e-5 relative
on loss / CE and on the gradient norm, expert load exactly; it says why)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import nanomegatron as nm

from conftest import ROOT, run_cli, small_model

SCRIPT = """
import json, sys
from nanomegatron import Trainer, TrainConfig, init_distributed
ctx = init_distributed()
config = TrainConfig.from_file(sys.argv[1])
with Trainer(config, run_dir=sys.argv[2]) as trainer:
    for step, metrics in trainer.train():
        pass
# Each rank reports in a file of its own: two ranks printing to one pipe interleave.
report = {"rank": ctx.rank, "world": ctx.world_size}
# Tensor parallelism at a world it divides: the same run, split over the two ranks.
import dataclasses
with Trainer(dataclasses.replace(config, tensor_parallel_size=2), run_dir=sys.argv[2] + "-tp") as trainer:
    for step, metrics in trainer.train():
        pass
    report["tp_steps"] = trainer.step_count
with open(f"{sys.argv[2]}-rank{ctx.rank}.json", "w") as f:
    json.dump(report, f)
"""


def test_trainer_under_mpirun_equals_one_process_cli(tmp_path, nm_bin):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin)")
    cfg = nm.TrainConfig(model=small_model(), data=nm.DataConfig(seq_len=32), batch_size=4, micro_batch_size=2,
                         lr=1e-3, warmup_steps=2, max_steps=6, log_every=1, threads=1)
    cfg.save(tmp_path / "train.json")
    run_cli(nm_bin, "train", "--config", str(tmp_path / "train.json"), "--out", str(tmp_path / "ref"))
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="none",
               OMPI_MCA_plm_rsh_agent="false", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_hwloc_base_binding_policy="none",
               # its own session directory: concurrent mpiruns (ctest -j) race on the shared one
               OMPI_MCA_orte_tmpdir_base=str(tmp_path))
    # mpirun's own --timeout aborts a hung job, ranks included (killing mpirun would leave them
    # running); subprocess's timeout is the backstop for a hung mpirun. The run takes ~6 s.
    p = subprocess.run(["mpirun", "--timeout", "60", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x",
                        "OMP_WAIT_POLICY=passive", sys.executable, str(tmp_path / "train.py"),
                        str(tmp_path / "train.json"), str(tmp_path / "py")],
                       capture_output=True, text=True, env=env, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    # Both ranks write to one pipe, so a line of one can land in the middle of the other's.
    reports = [json.load(open(f"{tmp_path / 'py'}-rank{r}.json")) for r in range(2)]
    assert [(d["rank"], d["world"]) for d in reports] == [(0, 2), (1, 2)], reports
    assert all(d.get("tp_steps") == 6 for d in reports), reports
    for run, label in (("py", "python dp2"), ("py-tp", "python tp2")):
        c = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "dist", "compare_runs.py"),
                            str(tmp_path / "ref" / "metrics.jsonl"), str(tmp_path / run / "metrics.jsonl"),
                            label], capture_output=True, text=True)
        assert c.returncode == 0, c.stdout + c.stderr


def test_tensor_parallel_is_refused_with_the_library_message(tmp_path):
    cfg = nm.TrainConfig(model=small_model(), data=nm.DataConfig(seq_len=32), batch_size=4, max_steps=2,
                         tensor_parallel_size=2)
    # At one process the layout check speaks first (2 does not divide a world of 1); under
    # mpirun -np 2 the script above trains it.
    with pytest.raises(nm.NMError, match="tensor_parallel_size 2"):
        nm.Trainer(cfg, run_dir=str(tmp_path / "run"))


SHARDED_SCRIPT = """
import json, sys
from nanomegatron import Trainer, TrainConfig, init_distributed
ctx = init_distributed()
config = TrainConfig.from_file(sys.argv[1])
report = {}
with Trainer(config, run_dir=sys.argv[2]) as trainer:
    trainer.step()
    params = trainer.model.params
    report["writeable"] = [bool(params[n].flags.writeable) for n in params]
    report["finite"] = all(bool((params[n] == params[n]).all()) for n in params)  # no NaN read
    try:
        params["lm_head.weight"][0, 0] = 1.0
        report["write"] = "allowed"
    except ValueError:
        report["write"] = "refused"
    trainer.step()  # reading the views does not stop the next step
    report["steps"] = trainer.step_count
with open(f"{sys.argv[2]}-rank{ctx.rank}.json", "w") as f:
    json.dump(report, f)
"""


def test_sharded_master_weights_read_only_under_mpirun(tmp_path):
    # bf16 at world 2: the distributed optimizer keeps the GEMM weights' fp32 values in each
    # rank's ranges only, so model.params is a read-only view, and reading it costs no step.
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin)")
    cfg = nm.TrainConfig(model=small_model(), data=nm.DataConfig(seq_len=32), batch_size=4, micro_batch_size=2,
                         lr=1e-3, warmup_steps=1, max_steps=4, log_every=1, threads=1, precision="bf16")
    cfg.save(tmp_path / "train.json")
    (tmp_path / "train.py").write_text(textwrap.dedent(SHARDED_SCRIPT))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="none",
               OMPI_MCA_plm_rsh_agent="false", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_hwloc_base_binding_policy="none", OMPI_MCA_orte_tmpdir_base=str(tmp_path))
    p = subprocess.run(["mpirun", "--timeout", "60", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x",
                        "OMP_WAIT_POLICY=passive", sys.executable, str(tmp_path / "train.py"),
                        str(tmp_path / "train.json"), str(tmp_path / "py")],
                       capture_output=True, text=True, env=env, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    for r in range(2):
        d = json.load(open(f"{tmp_path / 'py'}-rank{r}.json"))
        assert not any(d["writeable"]) and d["finite"] and d["write"] == "refused" and d["steps"] == 2, (r, d)


PAIRED_SCRIPT = """
import json, sys
import nanomegatron as nm
ctx = nm.init_distributed(expert_parallel_size=2)
model_config = nm.ModelConfig.from_hf(sys.argv[1])
try:
    nm.create_model(model_config, ctx, max_batch_size=1, max_seq_len=32, global_batch=4, moe_pair_micro_batches=True)
    result = "accepted"
except nm.NMError as e:
    result = str(e)
with open(f"{sys.argv[2]}-rank{ctx.rank}.json", "w") as f:
    json.dump(result, f)
"""


def test_paired_micro_batches_refused_for_a_callers_micro_batches(tmp_path):
    # create_model on 2 ranks hands the trainer one micro-batch at a time (external_data): there
    # is no next micro-batch to pair, and the library says so with the key.
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin)")
    small_model().save(tmp_path / "model.json")
    (tmp_path / "paired.py").write_text(textwrap.dedent(PAIRED_SCRIPT))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="none",
               OMPI_MCA_plm_rsh_agent="false", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_hwloc_base_binding_policy="none", OMPI_MCA_orte_tmpdir_base=str(tmp_path))
    p = subprocess.run(["mpirun", "--timeout", "60", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1",
                        sys.executable, str(tmp_path / "paired.py"), str(tmp_path / "model.json"),
                        str(tmp_path / "paired")], capture_output=True, text=True, env=env, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    for r in range(2):
        msg = json.load(open(f"{tmp_path / 'paired'}-rank{r}.json"))
        assert "moe_pair_micro_batches" in msg and "external_data" in msg, (r, msg)
