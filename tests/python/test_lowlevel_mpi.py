"""The design's low-level loop under `mpirun -np 2`, written with create_dataloader, from `import
pretrain`: init_distributed -> create_model(cfg, ctx) -> create_optimizer -> forward_backward ->
optimizer_step, at dp2, ep2 and tp2, each with per-step losses and gradient norms equal to
`nanomegatron train` on one process with the same config (tests/dist/compare_runs.py's
tolerances; measured 1.9e-9 / 1.4e-9 / 3.9e-9 at dp2, 1.4e-9 / 1.4e-9 / 1.1e-8 at ep2,
1.1e-8 / 1.2e-8 / 3.6e-8 at tp2 for loss / CE / gradient norm). The Trainer equals the same CLI
run (test_mpi.py), so the three agree. Plus the refusals a caller can meet: a step applied with
too few micro-batches, a micro-batch of another shape, pipeline parallelism, sizes the world
does not divide."""
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
from pretrain import (NMError, TrainConfig, init_distributed, create_model, create_optimizer, forward_backward,
                      optimizer_step, create_dataloader)
cfg = TrainConfig.from_file(sys.argv[1])
layout, out = sys.argv[2], sys.argv[3]
ctx = init_distributed(tensor_parallel_size=2 if layout == "tp2" else 1,
                       expert_parallel_size=2 if layout == "ep2" else 1)
model = create_model(cfg.model, ctx, max_batch_size=cfg.micro_batch_size, max_seq_len=cfg.data.seq_len,
                     seed=cfg.seed, global_batch=cfg.batch_size)
optimizer = create_optimizer(model, lr=cfg.lr)
dataloader = create_dataloader(cfg.data, ctx, micro_batch=cfg.micro_batch_size, seed=cfg.seed,
                               steps=cfg.max_steps, global_batch=cfg.batch_size)
refusals = []
try:  # a step with none of its micro-batches
    optimizer_step(optimizer, model.grads)
except NMError as e:
    refusals.append(str(e))
try:  # a micro-batch of another shape
    forward_backward(model, [[1, 2, 3]])
except ValueError as e:
    refusals.append(str(e))
accum = cfg.batch_size // (cfg.micro_batch_size * ctx.dp)
batches = iter(dataloader)
rows = []
for step in range(cfg.max_steps):
    for _ in range(accum):
        loss, grads = forward_backward(model, next(batches))
    optimizer_step(optimizer, grads)
    m = optimizer.last_metrics
    rows.append({"step": m["step"], "loss": m["loss"], "ce_loss": m["ce_loss"], "grad_norm": m["grad_norm"],
                 "expert_load_max_over_mean": m["load_max_over_mean"]})
report = {"rank": ctx.rank, "tp": ctx.tp, "ep": ctx.ep, "dp": ctx.dp, "refusals": refusals}
with open(f"{out}.rank{ctx.rank}.json", "w") as f:
    json.dump(report, f)
if ctx.rank == 0:
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\\n")
ctx.shutdown()
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process CLI run of the config (6 steps, constant learning rate)."""
    tmp = tmp_path_factory.mktemp("lowlevel")
    nm_bin = os.environ.get("NM_BIN") or os.path.join(ROOT, "build", "nanomegatron")
    cfg = nm.TrainConfig(model=small_model(), data=nm.DataConfig(seq_len=32), batch_size=4, micro_batch_size=2,
                         lr=1e-3, lr_schedule="constant", max_steps=6, log_every=1, threads=1)
    cfg.save(tmp / "train.json")
    run_cli(nm_bin, "train", "--config", str(tmp / "train.json"), "--out", str(tmp / "ref"))
    (tmp / "loop.py").write_text(textwrap.dedent(SCRIPT))
    return tmp


@pytest.mark.parametrize("layout, sizes", [("dp2", (1, 2, 1)), ("ep2", (1, 2, 2)), ("tp2", (2, 1, 1))])
def test_low_level_loop_under_mpirun_equals_one_process_cli(reference, layout, sizes):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin)")
    tmp = reference
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="none",
               OMPI_MCA_plm_rsh_agent="false", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_hwloc_base_binding_policy="none", OMPI_MCA_orte_tmpdir_base=str(tmp),
               NM_CPU_KERNELS="default")
    out = tmp / f"{layout}.jsonl"
    # mpirun's own --timeout aborts a hung job, ranks included; subprocess's is the backstop.
    p = subprocess.run(["mpirun", "--timeout", "60", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x",
                        "OMP_WAIT_POLICY=passive", sys.executable, str(tmp / "loop.py"), str(tmp / "train.json"),
                        layout, str(out)], capture_output=True, text=True, env=env, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    import json
    reports = [json.load(open(f"{out}.rank{r}.json")) for r in range(2)]
    tp, dp, ep = sizes
    assert all((d["tp"], d["dp"], d["ep"]) == (tp, dp, ep) for d in reports), reports
    for d in reports:
        assert len(d["refusals"]) == 2, d
        assert "micro-batches" in d["refusals"][0], d["refusals"][0]
        assert "every micro-batch of a multi-rank step" in d["refusals"][1], d["refusals"][1]
    c = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "dist", "compare_runs.py"),
                        str(tmp / "ref" / "metrics.jsonl"), str(out), f"low-level {layout}"],
                       capture_output=True, text=True)
    print(c.stdout)
    assert c.returncode == 0, c.stdout + c.stderr


def test_init_distributed_places_and_refuses():
    ctx = nm.init_distributed()
    assert (ctx.world_size, ctx.dp, ctx.tp, ctx.dp_rank) == (1, 1, 1, 0)
    with pytest.raises(nm.ConfigError, match="tensor_parallel_size 2"):
        nm.init_distributed(tensor_parallel_size=2)
    with pytest.raises(nm.ConfigError, match="expert_parallel_size 3"):
        nm.init_distributed(expert_parallel_size=3)


def test_one_process_model_refuses_multi_rank_options():
    with pytest.raises(TypeError, match="global_batch"):
        nm.create_model(small_model(), global_batch=8)


FAILING = """
import sys, time
from pretrain import init_distributed
ctx = init_distributed()
if ctx.rank == 1:
    raise RuntimeError("rank 1 cannot read its batch")
ctx.shutdown()   # rank 0 waits here for a rank that will never come
time.sleep(60)
"""


def test_a_rank_error_stops_every_rank(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin)")
    (tmp_path / "fail.py").write_text(textwrap.dedent(FAILING))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="none",
               OMPI_MCA_plm_rsh_agent="false", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_hwloc_base_binding_policy="none", OMPI_MCA_orte_tmpdir_base=str(tmp_path))
    import time
    t0 = time.monotonic()
    p = subprocess.run(["mpirun", "--timeout", "60", "--oversubscribe", "-np", "2", sys.executable,
                        str(tmp_path / "fail.py")], capture_output=True, text=True, env=env, timeout=90)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "rank 1 cannot read its batch" in out and "stopping every rank" in out, out
    # the job ends at the error, not at mpirun's 60 s timeout (measured ~1 s)
    assert took < 30, (took, out)


def test_create_dataloader_resumes_from_a_step():
    import numpy as np
    data = nm.DataConfig(seq_len=16)
    whole = [b.copy() for b in nm.create_dataloader(data, micro_batch=2, steps=10, num_batches=6)]
    later = [b.copy() for b in nm.create_dataloader(data, micro_batch=2, steps=10, start_step=4, num_batches=2)]
    assert all(b.dtype == np.int32 and b.shape == (2, 17) for b in whole)
    assert np.array_equal(later[0], whole[4]) and np.array_equal(later[1], whole[5])
    assert not np.array_equal(whole[0], whole[1])
