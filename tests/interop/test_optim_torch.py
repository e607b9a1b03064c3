"""test_optim_torch.py: our AdamW + gradient clipping against torch.optim.AdamW and
torch.nn.utils.clip_grad_norm_ over 5 steps on random data.

`$NM_BUILD/test_optim --dump FILE` runs the C side (layout documented in tests/test_optim.c);
this script replays the same inputs in PyTorch: one decayed (weight_decay 0.1) and one
non-decayed parameter group, clip_grad_norm_(max_norm) before every step, a different lr at
every step. Skips (77) when torch or the binary is missing.
"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

try:
    import numpy as np
    import torch
except ImportError as e:  # pragma: no cover
    skip(f"{e}: scripts/deps.sh --with-venv installs torch")


def main():
    build = os.environ.get("NM_BUILD", ".")
    exe = os.path.join(build, "test_optim")
    if not os.path.exists(exe):
        skip(f"{exe} not built (cmake --build)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optim.bin")
        subprocess.run([exe, "--dump", path], check=True)
        raw = open(path, "rb").read()

    assert raw[:8] == b"NMOPTDMP", raw[:8]
    off = 8
    na, nb, steps = np.frombuffer(raw, "<i8", 3, off)
    off += 24
    beta1, beta2, eps, wd, max_norm = np.frombuffer(raw, "<f8", 5, off)
    off += 40
    lrs = np.frombuffer(raw, "<f8", steps, off)
    off += 8 * steps
    n = int(na + nb)

    def f32(count):
        nonlocal off
        a = np.frombuffer(raw, "<f4", count, off).copy()
        off += 4 * count
        return a

    p0 = f32(n)
    grads, c_norms = [], []
    for _ in range(steps):
        grads.append(f32(n))
        c_norms.append(np.frombuffer(raw, "<f8", 1, off)[0])
        off += 8
    c_p, c_m, c_v = f32(n), f32(n), f32(n)
    assert off == len(raw), (off, len(raw))

    torch.set_num_threads(1)
    a = torch.nn.Parameter(torch.from_numpy(p0[:na].copy()).reshape(40, 25))
    b = torch.nn.Parameter(torch.from_numpy(p0[na:].copy()))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": float(wd)}, {"params": [b], "weight_decay": 0.0}],
                            lr=float(lrs[0]), betas=(float(beta1), float(beta2)), eps=float(eps))
    clipped = 0
    for s in range(steps):
        a.grad = torch.from_numpy(grads[s][:na].copy()).reshape(40, 25)
        b.grad = torch.from_numpy(grads[s][na:].copy())
        t_norm = float(torch.nn.utils.clip_grad_norm_([a, b], float(max_norm)))
        clipped += t_norm > max_norm
        # torch's norm is a float32 reduction; ours is double: agree to float precision.
        assert abs(t_norm - c_norms[s]) <= 1e-6 * c_norms[s], (s, t_norm, c_norms[s])
        for g in opt.param_groups:
            g["lr"] = float(lrs[s])
        opt.step()
    assert 0 < clipped < steps, f"test data should clip some steps and not others ({clipped})"

    t_p = np.concatenate([a.detach().numpy().ravel(), b.detach().numpy()])
    st_a, st_b = opt.state[a], opt.state[b]
    t_m = np.concatenate([st_a["exp_avg"].numpy().ravel(), st_b["exp_avg"].numpy()])
    t_v = np.concatenate([st_a["exp_avg_sq"].numpy().ravel(), st_b["exp_avg_sq"].numpy()])

    # Same formula order in fp32; PyTorch's vectorised kernels fuse some multiply-adds and
    # compute the clip coefficient from a float32 norm, so expect a few ulps, not bits.
    # Parameters are O(0.5) and moved by ~lr per step: 5e-7 absolute is ~8 ulps of 0.5.
    def report(name, ours, theirs, atol, rtol):
        err = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
        bound = atol + rtol * np.abs(theirs)
        print(f"{name}: max abs err {err.max():.3e}, max err/bound {(err / bound).max():.3f}")
        return bool(np.all(err <= bound))

    ok = report("params", c_p, t_p, 5e-7, 1e-6)
    # exp_avg can cancel to ~0 from terms of ~0.05 (grads ~0.2 before clipping): its
    # absolute error is a few ulps of those terms (ulp(0.05) = 3.7e-9), hence 2e-8.
    ok &= report("exp_avg", c_m, t_m, 2e-8, 1e-5)
    ok &= report("exp_avg_sq", c_v, t_v, 1e-12, 1e-5)
    # A real check, not a tautology: the parameters did move by far more than the tolerance.
    moved = np.abs(c_p - p0).max()
    assert moved > 1e-2, moved
    print("test_optim_torch:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
