# bg_run.sh (sourced by test_signals.sh and test_run_lock.sh): a training run in the background
# and the waits around it. The caller sets LIMIT (seconds any one wait may take), defines
# fail(), and keeps the background run's pid in bg; sourcing installs the EXIT trap that kills
# that run's whole tree and removes the scratch directory $tmp.
kill_tree() {   # $1 and its descendants (timeout -> mpirun -> ranks), children first
    local c
    for c in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$c"; done
    kill -9 "$1" 2>/dev/null || true
}
cleanup() {
    if [ -n "$bg" ]; then kill_tree "$bg"; wait "$bg" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
n_steps() { if [ -f "$1/metrics.jsonl" ]; then wc -l < "$1/metrics.jsonl"; else echo 0; fi; }
# Waits until run dir $1 has logged >= $2 steps; fails if the run $bg ends first or it takes
# longer than LIMIT.
wait_steps() {
    local t0=$SECONDS
    while [ "$(n_steps "$1")" -lt "$2" ]; do
        kill -0 "$bg" 2>/dev/null || fail "$1: the run ended before step $2"
        [ $((SECONDS - t0)) -lt $LIMIT ] || fail "$1: no step $2 after $LIMIT s"
        sleep 0.01
    done
}
# The pid of $1's child (the trainer under `timeout`, the ranks' launcher under mpirun).
child_of() {
    local c
    for _ in $(seq 1 500); do
        c=$(pgrep -P "$1" | head -1) && [ -n "$c" ] && { echo "$c"; return 0; }
        sleep 0.01
    done
    fail "no child of $1"
}
