#!/usr/bin/env python3
"""test_train_reference.py: 20 steps of `nanomegatron train` against a float64 PyTorch
training loop (train_ref.py around dsv3_ref.py) from the same initial weights, on the same
batches, with the same hyper-parameters: per-step loss within 1e-4 relative.

What is shared: `nanomegatron init` writes the initial model; `nanomegatron prepare
--synthetic` the dataset; the training windows come from `nanomegatron inspect --samples`,
which prints the loader's stream (loader.h) for the trainer's seed, seq_len, split and
num_samples = steps * global_batch - step s uses samples [(s-1) gbs, s gbs), micro-batch k
the rows [k mb, (k+1) mb) of those. Everything else is independent: the PyTorch side builds
its own AdamW (torch.optim.AdamW with two parameter groups), clipping
(clip_grad_norm_), cosine schedule with warm-up, and the aux-loss-free bias update from the
step's expert-selection counts (dsv3-spec 6.1, 11), all from the documents.

Then, for a few steps s, one oracle step from our checkpoint of step s-1 (params, biases,
AdamW moments) must reproduce our checkpoint of step s, per tensor to 1e-5 relative L2.

Beyond the loss: ce / mtp / aux terms (1e-4), grad_norm (1e-3: it is sensitive to fp32
rounding of small gradients), the lr exactly, and the routing: the worst layer's max/mean
expert load and the router-bias range after the update must be the same numbers, i.e. the
same experts were selected and the biases moved the same way.

Precision: ours is fp32, the oracle fp64. Over the 20 AdamW steps the losses agree to
~2e-8. What could legitimately break that is a routing decision that flips on rounding (a
token whose k-th and (k+1)-th candidates are within fp32 noise), so the oracle's smallest
routing margins are printed per step and the init is chosen to keep them >= 1e-5 (see
GATE_GAIN); a failure on a step whose margin is < 1e-6 says so.

One semantic point found on the way (train_ref.py): an expert that no token chose in a step
has a zero gradient and is still stepped by AdamW (flat gradient buffer, as in Megatron),
where torch.optim.AdamW would skip a parameter whose .grad is None.

Run by ctest (NM_BIN, NM_PYTHON); standalone: NM_BIN=build/nanomegatron python3 this.py
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsv3_ref  # noqa: E402
import st_io  # noqa: E402
import train_ref  # noqa: E402

STEPS = 20
SEQ_LEN = 32
MICRO = 2
GLOBAL = 4
SEED = 99
TOL = 1e-4
ONE_STEP_CHECKS = (2, 11, 20)
INIT_SEED = 6
GATE_GAIN = 4.0

# The small model shared with tests/test_resume.sh and tests/test_train_guard.sh, with larger
# initial weights here (routing margins stay well above fp32 noise over 20 steps).
with open(os.path.join(os.environ.get("NM_ROOT", os.path.join(os.path.dirname(__file__), "..", "..")),
                       "tests", "data", "small-moe-model.json")) as _f:
    MODEL = json.load(_f)
MODEL["initializer_range"] = 0.05

# The hyper-parameters of both sides. lr 1e-3 (small) keeps the parameters, hence the routing
# margins, moving slowly; clipping at 1.0 (DeepSeek-V3's value) is active on every step here
# (gradient norms 2-3), so the clip coefficient is part of every update; aux_weight 1e-2 (100x
# the default) so that the balance loss visibly contributes to the routers' gradients; the
# cosine schedule with warm-up makes every step's lr different.
HP = {
    "micro_batch": MICRO, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 3, "schedule": "cosine", "steps": STEPS,
    "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip_grad": 1.0,
    "mtp_weight": 0.3, "aux_weight": 1e-2, "gamma": 1e-3,
}


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.stderr.write("command failed (%d): %s\n%s%s" % (r.returncode, " ".join(cmd), r.stdout, r.stderr))
        sys.exit(1)
    return r.stdout


def main():
    nm_bin = os.environ.get("NM_BIN")
    if not nm_bin or not os.path.exists(nm_bin):
        skip(f"NM_BIN ({nm_bin}) not set or missing: build it (make)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    tmp = tempfile.mkdtemp(prefix="nm_train_ref_")
    try:
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(MODEL, f, indent=1)
        train_cfg = {
            "model": None, "init_from": "init",
            "data": {"paths": [{"prefix": "data/syn", "weight": 1.0}], "split": "99,1"},
            "seq_len": SEQ_LEN, "micro_batch": MICRO, "global_batch": GLOBAL, "steps": STEPS, "seed": SEED,
            "optimizer": {"lr": HP["lr"], "min_lr": HP["min_lr"], "beta1": HP["beta1"], "beta2": HP["beta2"],
                          "eps": HP["eps"], "weight_decay": HP["weight_decay"], "clip_grad": HP["clip_grad"]},
            "schedule": {"type": HP["schedule"], "warmup_steps": HP["warmup_steps"]},
            "balance": {"bias_update_speed": HP["gamma"], "aux_weight": HP["aux_weight"]},
            "mtp": {"weight": HP["mtp_weight"], "weight_after": HP["mtp_weight"], "switch_step": 0},
            "checkpoint": {"save_every": 1, "keep_last": 0},
            "log": {"log_every": 1, "eval_every": 0},
        }
        with open(os.path.join(tmp, "train.json"), "w") as f:
            json.dump(train_cfg, f, indent=1)
        run([nm_bin, "init", "--config", "model.json", "--out", "init", "--seed", str(INIT_SEED)], cwd=tmp, env=env)
        # Router gates x GATE_GAIN (a power of two: exact in fp32), so that the expert scores
        # spread wider and the routing margins stay far above fp32 rounding: with this init
        # seed, data and gain the oracle's smallest gap between a selected and an unselected
        # candidate over the 20 steps is 6.6e-5 (routed) / 1.0e-5 (plain top-K of the
        # balance loss), while fp32 moves the scores by ~1e-7. (Without the gain, seed 5
        # came down to 2.5e-7; initializer_range 0.006 to 1e-8: a coin toss for fp32.)
        st_path = os.path.join(tmp, "init", "model.safetensors")
        tensors, meta = st_io.load(st_path)
        for name in tensors:
            if name.endswith("mlp.gate.weight"):
                tensors[name] = (tensors[name] * GATE_GAIN).astype(np.float32)
        st_io.save(st_path, tensors, metadata=meta)
        os.makedirs(os.path.join(tmp, "data"))
        run([nm_bin, "prepare", "--synthetic", "200000", "--out", "data/syn"], cwd=tmp, env=env)
        run([nm_bin, "train", "--config", "train.json", "--out", "run", "--quiet"], cwd=tmp, env=env)
        ours = [json.loads(line) for line in open(os.path.join(tmp, "run", "metrics.jsonl"))]
        assert [m["step"] for m in ours] == list(range(1, STEPS + 1)), "metrics steps %s" % [m["step"] for m in ours]

        # the trainer's windows: samples 0 .. STEPS*GLOBAL-1 of its train stream
        n = STEPS * GLOBAL
        text = run([nm_bin, "inspect", "--data", "data/syn", "--samples", str(n), "--seq-len", str(SEQ_LEN),
                    "--seed", str(SEED), "--num-samples", str(n), "--split", "99,1"], cwd=tmp, env=env)
        rows = [json.loads(line) for line in text.strip().split("\n")[-n:]]
        samples = np.array(rows, dtype=np.int64)
        assert samples.shape == (n, SEQ_LEN + 1), samples.shape
        batches = [samples[s * GLOBAL:(s + 1) * GLOBAL] for s in range(STEPS)]

        cfg, params = dsv3_ref.load_model(os.path.join(tmp, "init"))
        # sanity: the initial weights are the init directory's, incl. zero router biases
        assert all(float(params[b].abs().max()) == 0.0 for b in train_ref.moe_bias_names(cfg))

        print("step | ours loss         | torch loss        | rel diff | grad_norm rel | lr        | margins routed / plain")
        bad = []

        def log(step, rec):
            m = ours[step - 1]
            rel = abs(m["loss"] - rec["loss"]) / abs(rec["loss"])
            grel = abs(m["grad_norm"] - rec["grad_norm"]) / rec["grad_norm"]
            margin = min(rec["margin"], rec["margin_plain"])
            print("%4d | %.15f | %.15f | %.2e | %.2e      | %.3e | %.1e / %.1e" %
                  (step, m["loss"], rec["loss"], rel, grel, rec["lr"], rec["margin"], rec["margin_plain"]), flush=True)
            if step == 1 and rel > 1e-6:
                # same weights, same tokens: only fp32 rounding separates the first losses.
                bad.append("step 1: loss %.9g vs %.9g: the batches or the initial weights differ" %
                           (m["loss"], rec["loss"]))
            if rel > TOL:
                why = (" (the oracle saw a routing margin of %.1e this step: an fp32 rounding can flip a"
                       " top-k choice)" % margin) if margin < 1e-6 else ""
                bad.append("step %d: loss %.9g vs torch %.9g, relative %.2e > %g%s" %
                           (step, m["loss"], rec["loss"], rel, TOL, why))
            for key in ("ce_loss", "mtp_loss", "aux_loss"):
                r = rec[key.split("_")[0]]
                if abs(m[key] - r) > TOL * max(abs(r), 1e-3):
                    bad.append("step %d: %s %.9g vs torch %.9g" % (step, key, m[key], r))
            if grel > 1e-3:
                bad.append("step %d: grad_norm %.9g vs torch %.9g (rel %.2e)" % (step, m["grad_norm"], rec["grad_norm"], grel))
            if abs(m["lr"] - rec["lr"]) > 1e-15:
                bad.append("step %d: lr %.17g vs %.17g" % (step, m["lr"], rec["lr"]))
            if abs(m["expert_load_max_over_mean"] - rec["load_max_over_mean"]) > 1e-12:
                bad.append("step %d: expert load max/mean %.9g vs torch %.9g: different routing (margin %.1e)"
                           % (step, m["expert_load_max_over_mean"], rec["load_max_over_mean"], margin))
            # the bias range after the update is a function of the counts: same counts, same range
            bmin = min(float(params[b].min()) for b in train_ref.moe_bias_names(cfg))
            bmax = max(float(params[b].max()) for b in train_ref.moe_bias_names(cfg))
            if abs(m["bias_min"] - bmin) > 1e-9 or abs(m["bias_max"] - bmax) > 1e-9:
                bad.append("step %d: router bias range [%.6g, %.6g] vs torch [%.6g, %.6g] (different expert counts)"
                           % (step, m["bias_min"], m["bias_max"], bmin, bmax))

        steps = train_ref.train(cfg, params, batches, HP, log=log)
        first, last = steps[0]["loss"], steps[-1]["loss"]
        print("torch loss %.4f -> %.4f over %d steps" % (first, last, STEPS))
        if not last < first - 0.1:
            bad.append("the loss did not go down (%.4f -> %.4f): the test would prove little" % (first, last))
        clipped = sum(s["grad_norm"] > HP["clip_grad"] for s in steps)
        print("clipping active on %d of %d steps" % (clipped, STEPS))

        # One step at a time: from our checkpoint after step s-1 (parameters, router biases,
        # AdamW moments), one oracle step on batch s must give our checkpoint of step s. This
        # does not let differences accumulate, so it checks the update itself tightly:
        # per tensor 1e-5 relative L2 (an element whose gradient is ~eps = 1e-8 moves by up
        # to ~1e-2 lr on fp32 rounding, see test_accumulation.c; everything else ~1e-7).
        for s in ONE_STEP_CHECKS:
            prev = os.path.join(tmp, "run", "step_%06d" % (s - 1))
            _, p0 = dsv3_ref.load_model(prev)
            m0 = st_io.load(os.path.join(prev, "optim_m.safetensors"))[0]
            v0 = st_io.load(os.path.join(prev, "optim_v.safetensors"))[0]
            train_ref.train(cfg, p0, [batches[s - 1]], HP, first_step=s,
                            adam_state={n: (m0[n], v0[n]) for n in p0 if p0[n].requires_grad})
            _, p1 = dsv3_ref.load_model(os.path.join(tmp, "run", "step_%06d" % s))
            worst, wname = 0.0, None
            for n in p1:
                a, b = p0[n].detach().numpy(), p1[n].detach().numpy()
                e = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                if e > worst:
                    worst, wname = e, n
            print("one step %2d from our step %d state: worst tensor %s, relative L2 %.2e" % (s, s - 1, wname, worst))
            if worst > 1e-5:
                bad.append("one step %d from our checkpoint %d: %s differs by %.2e relative L2" % (s, s - 1, wname, worst))
        if bad:
            print("FAIL:\n  " + "\n  ".join(bad))
            sys.exit(1)
        print("PASS test_train_reference: %d steps within %g relative" % (STEPS, TOL))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
