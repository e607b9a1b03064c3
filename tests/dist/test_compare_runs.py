"""test_compare_runs.py: tests/dist/compare_runs.py, the judge of every multi-process test,
fails where it must: an empty reference, a reference shorter than the run (or than --steps),
a step missing from the run, a loss off by more than the tolerance, a different expert load;
and passes an identical run and one within the tolerance."""
import json
import os
import subprocess
import sys
import tempfile

COMPARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_runs.py")


def metrics(path, steps, loss_scale=1.0, load=1.25):
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 5.0 / s * loss_scale, "ce_loss": 4.0 / s * loss_scale,
                                "grad_norm": 1.0 + s, "expert_load_max_over_mean": load}) + "\n")
    return path


def compare(ref, run, *extra):
    p = subprocess.run([sys.executable, COMPARE, ref, run, "case", *extra], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def main():
    fails = []

    def expect(name, got, want_rc, want_text):
        rc, out = got
        ok = (rc == 0) == (want_rc == 0) and want_text in out
        print(f"{name}: exit {rc} {'ok' if ok else 'WRONG'}: {out.strip().splitlines()[-1] if out.strip() else ''}")
        if not ok:
            fails.append(f"{name}: exit {rc} (want {'0' if want_rc == 0 else 'non-zero'}), output lacks "
                         f"{want_text!r}:\n{out}")

    with tempfile.TemporaryDirectory() as d:
        full = metrics(f"{d}/full.jsonl", range(1, 11))
        same = metrics(f"{d}/same.jsonl", range(1, 11))
        expect("identical runs", compare(full, same), 0, ": ok")
        expect("within tolerance", compare(full, metrics(f"{d}/near.jsonl", range(1, 11), 1 + 1e-7)), 0, ": ok")
        expect("empty reference", compare(metrics(f"{d}/empty.jsonl", []), same), 1, "has no steps")
        expect("shorter reference", compare(metrics(f"{d}/short.jsonl", range(1, 6)), same), 1,
               "fewer than the run")
        expect("reference shorter than --steps", compare(metrics(f"{d}/short2.jsonl", range(1, 3)), same,
                                                          "--steps", "3"), 1, "fewer than the 3 asked for")
        expect("--steps within the reference", compare(full, same, "--steps", "4"), 0, "4 steps")
        expect("step missing from the run", compare(full, metrics(f"{d}/cut.jsonl", range(1, 10))), 1,
               "step 10 missing")
        expect("loss off by 1e-3", compare(full, metrics(f"{d}/far.jsonl", range(1, 11), 1 + 1e-3)), 1, "rel")
        expect("another expert load", compare(full, metrics(f"{d}/load.jsonl", range(1, 11), load=1.5)), 1,
               "expert load")
    for f in fails:
        print("FAIL:", f, file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
