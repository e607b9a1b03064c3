"""same_steps.py: two runs' metrics.jsonl equal bit for bit, step by step.

usage: same_steps.py REF/metrics.jsonl RUN/metrics.jsonl LABEL

Both files must hold steps 1..N once each (a resumed run's log has the steps it redid once,
not twice) with the same N, and every step's loss terms, gradient norm, learning rate and
skip flag must be the same text. The writer prints shortest round-trip decimals, so equal
text is equal doubles; the numbers are read as text (parse_float=str), never converted.
Unlike compare_runs.py (another layout against one process, within a tolerance), this is
for the same layout run twice: a kill and a resume must not change a single bit.
"""
import json
import sys

KEYS = ("loss", "ce_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "skipped")


def load(path, label):
    steps, rows = [], {}
    with open(path) as f:
        for line in f:
            d = json.loads(line, parse_float=str, parse_constant=str)
            steps.append(d["step"])
            rows[d["step"]] = d
    if steps != list(range(1, len(steps) + 1)):
        sys.exit(f"FAIL {label}: {path} logs steps {steps}, want 1..{len(steps)} once each")
    return rows


def main():
    label = sys.argv[3]
    ref, run = load(sys.argv[1], label), load(sys.argv[2], label)
    if len(ref) != len(run):
        sys.exit(f"FAIL {label}: {len(run)} steps logged, the reference has {len(ref)}")
    bad = 0
    for s in sorted(ref):
        for k in KEYS:
            if k not in ref[s]:
                sys.exit(f"FAIL {label}: the reference's step {s} has no {k}")
            a, b = ref[s][k], run[s].get(k, "<missing>")
            if a != b:
                print(f"{label}: step {s} {k} {b} vs reference {a}")
                bad += 1
    if bad:
        sys.exit(f"FAIL {label}: {bad} values differ from the reference")
    print(f"{label}: steps 1..{len(ref)} once each, {', '.join(KEYS)} equal as text: ok")


if __name__ == "__main__":
    main()
