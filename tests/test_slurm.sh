#!/usr/bin/env bash
# test_slurm.sh: training under Slurm, as docs/parallelism.md says to start it. The test runs a
# one-node Slurm of its own (slurmctld, slurmd and munged from Debian's slurm-wlm and munge,
# every file and socket of theirs in a scratch directory, on free ports, stopped by PID at the
# end), then:
#   1. `srun --mpi=pmix -n 2 nanomegatron train` gives per-step metrics bit-identical to
#      `mpirun -np 2` of the same run (tests/test_dist_train.sh's dp2 case);
#   2. `SLURM_MPI_TYPE=pmix srun -n 2` (the flag's environment twin) does too;
#   3. plain `srun -n 2` (Slurm's default MpiDefault=none) fails, with MPI_Init_thread named;
#   4. `sbatch --wait` of the batch script in docs/parallelism.md (`srun --mpi=pmix` of 4 ranks
#      of configs/tiny-train.json, 2 steps here) runs on 4 ranks.
# Every launch runs under `timeout`; a failure names the step and prints the daemons' logs.
# The container case is the one it is written for: root, no systemd, no cgroups (so
# proctrack/linuxproc and task/none), one node named after `hostname -s`.
set -euo pipefail
: "${NM_BIN:?}" "${NM_ROOT:?}"
PY=${NM_PYTHON:-python3}
source "$NM_ROOT/tests/mpirun.sh"

# slurmd starts job steps as the submitting user; as anyone but root it can only run its own
# user's, and the controller would have to run as that user too. CI runs as root.
[[ $(id -u) == 0 ]] || { echo "SKIP: needs root (a private slurmd runs job steps as root here)"; exit 77; }
missing=()
for c in slurmctld slurmd srun sbatch sinfo scontrol squeue scancel munged mungekey munge unmunge timeout; do
  command -v "$c" >/dev/null || missing+=("$c")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "FAIL: ${missing[*]} not found: scripts/deps.sh installs slurm-wlm and munge" >&2
  exit 1
fi

# Inside someone else's Slurm job (a CI runner on a cluster), its SLURM_* variables would make
# srun look for that job on this test's controller.
while read -r v; do
  if [[ $v == SLURM_* ]]; then unset "$v"; fi
done < <(compgen -e)

tmp=$(mktemp -d)
s=$tmp/slurm                     # everything of the daemons': config, state, spool, logs, sockets
mkdir -p "$s/state" "$s/spool" "$s/tmp" "$s/ompi"
# munged wants every directory above its socket searchable by all (clients must reach it).
chmod 0755 "$tmp" "$s"
munged_pid='' ctld_pid='' slurmd_pid=''

show_logs() {
  local f
  # slurmctld and slurmd -D write their log to both the LogFile and stderr (*.out): one copy.
  for f in "$s"/munged.log "$s"/munged.out "$s"/slurmctld.log "$s"/slurmd.log; do
    [[ -e $f ]] || continue
    echo "---- ${f##*/} (last 40 lines)" >&2
    tail -n 40 "$f" >&2
  done
}
fail() { echo "FAIL: $*" >&2; show_logs; exit 1; }

# Stop by PID, in reverse order of start: jobs first (so no slurmstepd outlives the test), then
# slurmd, slurmctld, munged, each waited for.
stop() {
  local rc=$? pid deadline
  if [[ -n $ctld_pid ]] && kill -0 "$ctld_pid" 2>/dev/null; then
    scancel --quiet --user=root 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
  fi
  for pid in "$slurmd_pid" "$ctld_pid" "$munged_pid"; do
    [[ -n $pid ]] || continue
    kill "$pid" 2>/dev/null || continue
    deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
  exit $rc
}
trap stop EXIT
cd "$tmp"

# ---- munge: a key of our own, its socket in scratch (AuthInfo below points Slurm at it)
mungekey --create --keyfile="$s/munge.key" >/dev/null 2>&1 || fail "mungekey --create"
chmod 0400 "$s/munge.key"
munge_sock=$s/munge.socket
munged -F --socket="$munge_sock" --key-file="$s/munge.key" --pid-file="$s/munged.pid" \
  --log-file="$s/munged.log" --seed-file="$s/munged.seed" >"$s/munged.out" 2>&1 &
munged_pid=$!
deadline=$((SECONDS + 20))
until [[ -S $munge_sock ]]; do
  kill -0 "$munged_pid" 2>/dev/null || fail "munged exited at start"
  ((SECONDS < deadline)) || fail "munged made no socket in 20 s"
  sleep 0.2
done
cred=$(munge -n -S "$munge_sock" 2>&1) || fail "munge could not make a credential: $cred"
decoded=$(unmunge -S "$munge_sock" <<<"$cred" 2>&1) || fail "unmunge: $decoded"

# ---- slurm.conf: one node, this host, free ports
node=$(hostname -s)
cpus=$(nproc)
read -r ctld_port slurmd_port < <("$PY" - <<'PY'
import socket
# Bound together, so the two differ; released just before the daemons take them.
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])
PY
)
[[ -n $ctld_port && -n $slurmd_port ]] || fail "no free ports"
export SLURM_CONF=$s/slurm.conf
cat >"$SLURM_CONF" <<EOF
ClusterName=nmtest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_sock
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool
TmpFS=$s/tmp
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd.pid
SlurmctldLogFile=$s/slurmctld.log
SlurmdLogFile=$s/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Containers: no cgroups, no systemd, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
# sbatch --wait polls every 2 s, growing to 8 and 32 s while that stays below MinJobAge/3:
# at 6 it stays at 2 s (the default 300 made a 20 s job wait 40 s for sbatch to notice).
MinJobAge=6
InactiveLimit=0
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=10 State=UP
EOF

slurmctld -D -c -f "$SLURM_CONF" >"$s/slurmctld.out" 2>&1 &
ctld_pid=$!
slurmd -D -f "$SLURM_CONF" -N "$node" >"$s/slurmd.out" 2>&1 &
slurmd_pid=$!
deadline=$((SECONDS + 60))
state=''
until [[ $state == idle ]]; do
  kill -0 "$ctld_pid" 2>/dev/null || fail "slurmctld exited at start"
  kill -0 "$slurmd_pid" 2>/dev/null || fail "slurmd exited at start"
  ((SECONDS < deadline)) || fail "node $node not idle within 60 s (state '$state')"
  sleep 0.5
  state=$(sinfo -h -n "$node" -o %t 2>/dev/null) || state=''
  if [[ $state == drain* || $state == inval* ]]; then
    fail "node $node came up $state: $(scontrol show node "$node" 2>&1)"
  fi
done
echo "slurm: node $node idle, $cpus CPUs, ports $ctld_port/$slurmd_port, after ${SECONDS} s"

# ---- the runs: test_dist_train.sh's dp2 case, 6 steps
cp "$NM_ROOT/tests/data/small-moe-model.json" model.json
cat >train.json <<'JSON'
{
  "model": "model.json",
  "data": {"synthetic": true, "synthetic_tokens": 65536},
  "seq_len": 32, "micro_batch": 1, "global_batch": 8, "steps": 6, "seed": 11, "threads": 1,
  "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
  "schedule": {"warmup_steps": 2},
  "log": {"log_every": 1, "eval_every": 0},
  "checkpoint": {"save_every": 0}
}
JSON
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
# Direct-launched ranks make OpenMPI's session directory themselves: keep it in scratch.
# Their shared-memory segments are named after the job id, and every private Slurm starts at
# job 1: keep those in scratch too, so two of these tests at once cannot meet in /dev/shm.
export OMPI_MCA_orte_tmpdir_base=$s/ompi OMPI_MCA_btl_vader_backing_directory=$s/ompi
train=("$NM_BIN" train --config train.json --quiet)

export -f nm_mpirun   # a function: `timeout` runs it in a child bash
t0=$SECONDS
timeout -k 10 120 bash -c 'nm_mpirun 2 "$@"' _ "${train[@]}" --out mpirun \
  >mpirun.out 2>&1 || { cat mpirun.out; fail "mpirun -np 2 (the reference) did not run"; }
echo "mpirun -np 2: the reference run ($((SECONDS - t0)) s)"

# same_steps NAME: NAME's per-step losses, gradient norm, expert load and byte counters equal
# the mpirun run's exactly (same ranks, same reduction order: nothing may differ but timings).
same_steps() {
  "$PY" - mpirun/metrics.jsonl "$1/metrics.jsonl" "$1" <<'PY' || fail "$1 differs from mpirun -np 2"
import json, sys
def load(p):
    with open(p) as f:
        return [json.loads(l) for l in f]
ref, run, label = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
keys = ["step", "loss", "ce_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens",
        "expert_load_max_over_mean", "bias_min", "bias_max", "skipped"]
keys += [k for k in ref[0] if k.startswith("comm_") and k.endswith("_bytes")]
assert len(ref) == 6, ("mpirun steps", len(ref))
assert ref[0]["comm_dp_reduce_scatter_bytes"] > 0, "the mpirun reference ran as one process"
bad = [(a["step"], k, a[k], b.get(k)) for a, b in zip(ref, run) for k in keys if a[k] != b.get(k)]
if len(run) != len(ref) or bad:
    print(f"{label}: {len(run)} steps vs {len(ref)}; first differences {bad[:5]}")
    sys.exit(1)
print(f"{label}: {len(ref)} steps, {len(keys)} fields each, bit-identical to mpirun -np 2: ok", end="")
PY
  echo " ($((SECONDS - t0)) s)"
}

t0=$SECONDS
timeout -k 10 120 srun --mpi=pmix -n 2 "${train[@]}" --out srun >srun.out 2>&1 \
  || { cat srun.out; fail "srun --mpi=pmix -n 2 did not run"; }
same_steps srun

t0=$SECONDS
SLURM_MPI_TYPE=pmix timeout -k 10 120 srun -n 2 "${train[@]}" --out srun_env >srun_env.out 2>&1 \
  || { cat srun_env.out; fail "SLURM_MPI_TYPE=pmix srun -n 2 did not run"; }
same_steps srun_env

# Without PMIx the ranks cannot find each other: Debian's OpenMPI has no PMI-2 to fall back on.
rc=0
t0=$SECONDS
timeout -k 10 60 srun -n 2 "${train[@]}" --out srun_none >srun_none.out 2>&1 || rc=$?
[[ $rc != 0 && $rc != 124 && $rc != 137 ]] || { cat srun_none.out; fail "srun -n 2 without --mpi=pmix: exit $rc, expected a failure"; }
none_log=$(cat srun_none.out)
[[ $none_log == *MPI_Init_thread* ]] || { cat srun_none.out; fail "srun -n 2 without --mpi=pmix failed without naming MPI_Init_thread"; }
echo "srun without --mpi=pmix: exit $rc, MPI_Init_thread failed: ok ($((SECONDS - t0)) s)"

# The batch script of docs/parallelism.md (4 ranks of tiny-train.json), 2 steps of it. On fewer
# than 4 CPUs the allocation needs --overcommit (the node is sized by nproc).
cat >job.sh <<EOF
#!/bin/bash
#SBATCH -n 4
srun --mpi=pmix $NM_BIN train --config $NM_ROOT/configs/tiny-train.json --out dp4 \\
    --set threads=1 --set micro_batch=4 --set steps=2
EOF
# Direct-launched ranks do not know they outnumber the CPUs (mpirun --oversubscribe tells
# them): without yielding, their busy-polling made these 2 steps several times slower (161
# instead of 958 tokens/s at step 1 on 2 CPUs).
overcommit=()
((cpus >= 4)) || overcommit=(--overcommit --export=ALL,OMPI_MCA_mpi_yield_when_idle=1)
t0=$SECONDS
timeout -k 10 180 sbatch --wait "${overcommit[@]}" --time=5 --output=sbatch.out job.sh >sbatch_submit.out 2>&1 \
  || { cat sbatch_submit.out sbatch.out 2>/dev/null; fail "sbatch --wait job.sh (srun --mpi=pmix -n 4 inside) did not run"; }
job_log=$(cat sbatch.out)
[[ $job_log == *"layout 4 ranks: tp1 x pp1 x dp4"* ]] || { cat sbatch.out; fail "sbatch job: no 4-rank layout line"; }
steps=$("$PY" -c 'import sys; print(len(open(sys.argv[1]).readlines()))' dp4/metrics.jsonl) \
  || fail "sbatch job wrote no dp4/metrics.jsonl"
[[ $steps == 2 ]] || fail "sbatch job: $steps steps in dp4/metrics.jsonl, expected 2"
echo "sbatch --wait of the docs' batch script: 4 ranks, 2 steps: ok ($((SECONDS - t0)) s)"

echo "test_slurm: ok (${SECONDS} s)"
