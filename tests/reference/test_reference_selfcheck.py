#!/usr/bin/env python3
"""test_reference_selfcheck.py: checks of the PyTorch reference dsv3_ref.py itself (no C).

(a) autograd gradients of the float64 total loss (ce + mtp + aux) against central finite
    differences on random coordinates of many tensors (router weights included), per variant;
(b) RoPE: adjacent-pair formula of dsv3-spec 4.2, relative-position invariance of q.k, equivalence
    with HF's de-interleave + rotate_half form; YaRN numbers of dsv3-spec 4.3/8 (inv_freq, low/high,
    softmax scale 0.187130; V3: low 10, high 23, scale 0.135234; fallback of 9.6);
(c) routing: hand-made cases for noaux_tc (top-2 group sums, -inf masking with negative scores),
    group_limited_greedy (group max), greedy, bias used for selection only;
(d) model level: zero router gives aux = number of MoE layers, batch rows are independent,
    causality, tied head, st_io round trip (F32 and BF16), and the CLI writes what the library computes.
Exit 0 pass, 1 fail.
"""
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsv3_ref as R  # noqa: E402
import st_io  # noqa: E402

ROOT = os.environ.get("NM_ROOT", os.path.normpath(os.path.join(HERE, "..", "..")))
CONFIGS = {
    "tiny": os.path.join(ROOT, "configs", "tiny.json"),
    "qnolora_softmax_mtp2": os.path.join(HERE, "configs", "qnolora_softmax_mtp2.json"),
    "yarn_tied": os.path.join(HERE, "configs", "yarn_tied.json"),
    "dense_pattern": os.path.join(HERE, "configs", "dense_pattern.json"),
}
FAILS = []


def check(cond, what):
    print("%s %s" % ("ok  " if cond else "FAIL", what))
    if not cond:
        FAILS.append(what)


def small(cfg):
    """Shrink a config for finite differences (keeps every structural feature)."""
    c = dict(cfg)
    c["vocab_size"] = min(c["vocab_size"], 96)
    if c["hidden_size"] > 64:
        c.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32)
        if c["q_lora_rank"]:
            c["q_lora_rank"] = 32
        c["kv_lora_rank"] = 32
    return c


# --- (a) finite differences -------------------------------------------------------------------

def fd_check(name, cfg, seed):
    rng = np.random.default_rng(seed)
    params = R.params_from_numpy(cfg, R.random_tensors(cfg, seed))
    B, T = 2, 10
    tokens = torch.from_numpy(rng.integers(0, cfg["vocab_size"], size=(B, T)))
    mw, aw = 0.3, 0.1

    def loss():
        with torch.no_grad():
            return R.forward(cfg, params, tokens, mw, aw)["loss"].item()

    out, grads = R.run_with_grads(cfg, params, tokens, mw, aw)
    L, M = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    moe_l = [i for i in range(L + M) if R.is_moe_layer(cfg, i)]
    dense_l = [i for i in range(L + M) if not R.is_moe_layer(cfg, i)]
    picks = ["model.embed_tokens.weight", "model.norm.weight",
             "model.embed_tokens.weight" if cfg["tie_word_embeddings"] else "lm_head.weight"]
    for i in sorted({moe_l[0], moe_l[-1], L + M - 1, dense_l[0] if dense_l else moe_l[0]}):
        p = "model.layers.%d." % i
        a = p + "self_attn."
        picks += [p + "input_layernorm.weight", a + "kv_a_proj_with_mqa.weight", a + "kv_a_layernorm.weight",
                  a + "kv_b_proj.weight", a + "o_proj.weight", p + "post_attention_layernorm.weight"]
        picks += [a + "q_a_proj.weight", a + "q_b_proj.weight", a + "q_a_layernorm.weight"] if cfg["q_lora_rank"] \
            else [a + "q_proj.weight"]
        if R.is_moe_layer(cfg, i):
            picks += [p + "mlp.gate.weight", p + "mlp.experts.1.up_proj.weight",
                      p + "mlp.experts.%d.down_proj.weight" % (cfg["n_routed_experts"] - 1)]
            if cfg["n_shared_experts"]:
                picks.append(p + "mlp.shared_experts.gate_proj.weight")
        else:
            picks += [p + "mlp.gate_proj.weight", p + "mlp.down_proj.weight"]
        if i >= L:
            picks += [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight", p + "shared_head.norm.weight"]
    eps = 1e-6
    worst = 0.0
    n = 0
    for pname in dict.fromkeys(picks):
        t = params[pname]
        g = grads[pname]
        two = "kv_a_proj" in pname or "gate.weight" in pname
        for j in range(2 if two else 1):
            flat = int(rng.integers(0, t.numel()))
            if "kv_a_proj" in pname:  # one coordinate in the c_KV rows, one in the k_pe rows
                row = int(rng.integers(0, cfg["kv_lora_rank"])) if j == 0 else \
                    int(rng.integers(cfg["kv_lora_rank"], t.shape[0]))
                flat = row * t.shape[1] + int(rng.integers(0, t.shape[1]))
            with torch.no_grad():
                v = t.view(-1)
                old = v[flat].item()
                v[flat] = old + eps
                lp = loss()
                v[flat] = old - eps
                lm = loss()
                v[flat] = old
            fd = (lp - lm) / (2 * eps)
            ag = float(g.reshape(-1)[flat])
            err = abs(fd - ag) / max(abs(ag), 1e-3)
            n += 1
            if abs(fd - ag) > 1e-7 + 1e-5 * abs(ag):
                check(False, "fd %s %s[%d]: autograd %.9g fd %.9g" % (name, pname, flat, ag, fd))
            worst = max(worst, err)
    check(True, "fd %s: %d coordinates over %d tensors, worst |fd-ag|/max(|ag|,1e-3) %.2e (loss %.4f, aux %.4f)"
          % (name, n, len(dict.fromkeys(picks)), worst, out["loss"].item(), out["aux"].item()))


def fd_aux_only(cfg, seed):
    """The aux gradient on its own: d aux / d router weight = autograd (f held constant)."""
    params = R.params_from_numpy(cfg, R.random_tensors(cfg, seed))
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, cfg["vocab_size"], size=(2, 10)))
    L = cfg["num_hidden_layers"]
    moe_l = [i for i in range(L) if R.is_moe_layer(cfg, i)][0]
    name = "model.layers.%d.mlp.gate.weight" % moe_l
    out = R.forward(cfg, params, tokens, 0.0, 1.0)
    g = torch.autograd.grad(out["aux"], params[name])[0]
    t = params[name]
    eps = 1e-6
    bad = 0
    for _ in range(6):
        flat = int(rng.integers(0, t.numel()))
        with torch.no_grad():
            v = t.view(-1)
            old = v[flat].item()
            v[flat] = old + eps
            ap = R.forward(cfg, params, tokens, 0.0, 1.0)["aux"].item()
            v[flat] = old - eps
            am = R.forward(cfg, params, tokens, 0.0, 1.0)["aux"].item()
            v[flat] = old
        fd = (ap - am) / (2 * eps)
        if abs(fd - float(g.view(-1)[flat])) > 1e-8 + 1e-5 * abs(fd):
            bad += 1
    check(bad == 0 and float(g.abs().max()) > 0, "aux-only gradient of %s matches fd (|g|max %.3g)"
          % (name, float(g.abs().max())))


# --- (b) RoPE / YaRN ----------------------------------------------------------------------------

def rope_checks():
    cfg = R.load_config(CONFIGS["tiny"])
    dr = cfg["qk_rope_head_dim"]
    T = 12
    rot, scale = R.rope_rotation(cfg, T, torch.float64)
    inv, af, _, _ = R.rope_params(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, dr, generator=g, dtype=torch.float64)
    y = R.apply_rope(x, rot).numpy()
    xn = x.numpy()
    ref = np.empty_like(xn)
    for p in range(T):
        for i in range(dr // 2):
            c, s = math.cos(p * inv[i]), math.sin(p * inv[i])
            ref[p, 2 * i] = xn[p, 2 * i] * c - xn[p, 2 * i + 1] * s
            ref[p, 2 * i + 1] = xn[p, 2 * i] * s + xn[p, 2 * i + 1] * c
    check(np.abs(y - ref).max() < 1e-13, "RoPE = adjacent-pair formula of dsv3-spec 4.2")
    check(abs(scale - 48 ** -0.5) < 1e-15 and af == 1.0, "plain RoPE: scale 48^-1/2 = %.6f" % scale)
    # q.k depends only on the position difference.
    q = torch.randn(dr, generator=g, dtype=torch.float64)
    k = torch.randn(dr, generator=g, dtype=torch.float64)
    qs = R.apply_rope(q.expand(T, dr), rot)
    ks = R.apply_rope(k.expand(T, dr), rot)
    d = [(float(qs[p] @ ks[p - 3])) for p in range(3, T)]
    check(max(d) - min(d) < 1e-12, "RoPE: <q_p, k_{p-3}> invariant over p (spread %.1e)" % (max(d) - min(d)))
    # HF form: de-interleave then rotate_half with duplicated cos/sin; same dot products.
    perm = np.r_[np.arange(0, dr, 2), np.arange(1, dr, 2)]
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = torch.tensor(np.concatenate([np.cos(ang)] * 2, 1))
    sin = torch.tensor(np.concatenate([np.sin(ang)] * 2, 1))

    def hf(v):
        v = v[:, perm]
        rh = torch.cat([-v[:, dr // 2:], v[:, :dr // 2]], 1)
        return v * cos + rh * sin
    qh, kh = hf(q.expand(T, dr)), hf(k.expand(T, dr))
    check(torch.allclose(qh @ kh.T, qs @ ks.T, atol=1e-12), "RoPE: HF interleave form gives the same q.k")
    check(torch.allclose(qh, qs[:, perm], atol=1e-13), "RoPE: HF result = ours in de-interleaved order")

    plain = [1, 0.316228, 0.1, 0.0316228, 0.01, 0.00316228, 0.001, 0.000316228]
    check(np.allclose(inv, plain, rtol=1e-5), "plain inv_freq = dsv3-spec 8 list")
    ycfg = R.load_config(CONFIGS["yarn_tied"])
    inv, af, scale, info = R.rope_params(ycfg)
    yarn = [1, 0.316228, 0.08125, 0.0197642, 0.004375, 0.000790569, 0.00025, 7.90569e-05]
    check(info == {"low": 1, "high": 5}, "YaRN low/high = 1/5 (%s)" % info)
    check(np.allclose(inv, yarn, rtol=1e-5), "YaRN inv_freq = dsv3-spec 8 list")
    check(af == 1.0 and abs(scale - 0.187130) < 5e-7, "YaRN cos/sin factor 1, softmax scale %.6f" % scale)
    v3 = dict(ycfg, qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling={
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    _, af, scale, info = R.rope_params(v3)
    check(info == {"low": 10, "high": 23} and af == 1.0 and abs(scale - 0.135234) < 5e-7,
          "YaRN V3: low 10 high 23 scale %.6f" % scale)
    fb = dict(ycfg, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    _, af, scale, _ = R.rope_params(fb)
    check(abs(af - (0.1 * math.log(4) + 1)) < 1e-15 and abs(scale - 48 ** -0.5) < 1e-15,
          "YaRN without mscale keys: cos/sin x %.6f, plain softmax scale (dsv3-spec 9.6)" % af)
    # The attention factor multiplies the rotation.
    rot2, _ = R.rope_rotation(fb, 4, torch.float64)
    check(torch.allclose(rot2.abs(), torch.full((4, 8), af, dtype=torch.float64)), "cos/sin carry the factor")


# --- (c) routing ----------------------------------------------------------------------------------

def routing_checks():
    cfg = {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
           "topk_method": "noaux_tc"}
    # groups: (0,1) (2,3) (4,5) (6,7)
    s = torch.tensor([[0.90, 0.00, 0.50, 0.45, 0.60, 0.30, 0.10, 0.10]], dtype=torch.float64)
    b = torch.zeros(8, dtype=torch.float64)
    # group top-2 sums: .90 .95 .90 .20 -> keep groups 1 and (tie .90: lower) 0 -> experts 0, 2
    idx = sorted(R.route(cfg, s, b)[0].tolist())
    check(idx == [0, 2], "noaux_tc: groups by top-2 sum -> %s" % idx)
    idx = sorted(R.route(dict(cfg, topk_method="group_limited_greedy"), s, b)[0].tolist())
    check(idx == [0, 4], "group_limited_greedy: groups by max -> %s" % idx)   # max: .9 .5 .6 .1
    idx = sorted(R.route(dict(cfg, topk_method="greedy"), s, b)[0].tolist())
    check(idx == [0, 4], "greedy: plain top-2 -> %s" % idx)
    # Bias changes selection: +0.5 on expert 7 lifts group 3 (sum .70 -> still low) and expert 7.
    b2 = torch.tensor([0, 0, 0, 0, 0, 0, 0.4, 0.5], dtype=torch.float64)
    idx = sorted(R.route(cfg, s, b2)[0].tolist())       # sums .90 .95 .90 1.10 -> groups 3, 1
    check(idx == [2, 7], "noaux_tc: bias decides groups and experts -> %s" % idx)
    # All biased scores negative: masked groups must be -inf, not 0 (dsv3-spec 9.2).
    b3 = torch.full((8,), -2.0, dtype=torch.float64)
    b3[6:] = -1.0  # group 3 best by far
    s3 = torch.tensor([[0.1, 0.2, 0.3, 0.35, 0.9, 0.95, 0.05, 0.06]], dtype=torch.float64)
    # c: -1.9 -1.8 -1.7 -1.65 -1.1 -1.05 -0.95 -0.94 -> sums: -3.7 -3.35 -2.15 -1.89 -> keep 3, 2
    idx = sorted(R.route(cfg, s3, b3)[0].tolist())
    check(idx == [6, 7], "noaux_tc: negative biased scores with -inf masking -> %s" % idx)
    # Weights are the unbiased scores, normalised then scaled.
    mcfg = R.load_config(CONFIGS["tiny"])
    mcfg.update(vocab_size=32, hidden_size=16, moe_intermediate_size=8, intermediate_size=8,
                num_hidden_layers=2, num_nextn_predict_layers=0, q_lora_rank=8, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=16)
    P = R.params_from_numpy(mcfg, R.random_tensors(mcfg, 7, bias_std=0.3))
    pre = "model.layers.1.mlp."
    u = torch.randn(1, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # Expert e returns one-hot-like signatures: compare the MoE output with a per-token loop.
    stats = {"aux": [], "margins": [], "margins_plain": [], "counts": []}
    with torch.no_grad():
        y = R.moe(mcfg, P, pre, u, stats)
        ref = torch.zeros(5, 16, dtype=torch.float64)
        for t in range(5):
            x = u[0, t]
            sc = torch.sigmoid(P[pre + "gate.weight"] @ x)
            sel = R.route(mcfg, sc[None], P[pre + "gate.e_score_correction_bias"])[0]
            w = sc[sel] / sc[sel].sum() * mcfg["routed_scaling_factor"]
            for k, e in enumerate(sel.tolist()):
                ep = pre + "experts.%d." % e
                ref[t] += w[k] * R.swiglu(x, P[ep + "gate_proj.weight"], P[ep + "up_proj.weight"],
                                          P[ep + "down_proj.weight"])
            sp = pre + "shared_experts."
            ref[t] += R.swiglu(x, P[sp + "gate_proj.weight"], P[sp + "up_proj.weight"], P[sp + "down_proj.weight"])
        plain_sel = [set(torch.topk(torch.sigmoid(P[pre + "gate.weight"] @ u[0, t]), 4).indices.tolist())
                     for t in range(5)]
        biased_sel = [set(R.route(mcfg, torch.sigmoid(P[pre + "gate.weight"] @ u[0, t])[None],
                                  P[pre + "gate.e_score_correction_bias"])[0].tolist()) for t in range(5)]
    check(torch.allclose(y[0], ref, atol=1e-12), "MoE dispatch = per-token loop (unbiased weights, norm, scale)")
    check(plain_sel != biased_sel, "bias/group limit changes the selection in this case (test is meaningful)")


# --- (d) model level ------------------------------------------------------------------------------

def model_checks():
    cfg = R.load_config(CONFIGS["qnolora_softmax_mtp2"])
    t = R.random_tensors(cfg, 21)
    P = R.params_from_numpy(cfg, t)
    g = np.random.default_rng(2)
    tokens = torch.from_numpy(g.integers(0, cfg["vocab_size"], size=(3, 12)))
    with torch.no_grad():
        out = R.forward(cfg, P, tokens, 0.3, 0.01)
        rows = [R.forward(cfg, P, tokens[b:b + 1], 0.3, 0.01) for b in range(3)]
        check(all(torch.allclose(out["logits"][b], rows[b]["logits"][0], atol=1e-12) for b in range(3)),
              "batch rows are independent")
        check(abs(out["aux"].item() - np.mean([r["aux"].item() for r in rows])) < 1e-12,
              "aux = mean over sequences (summed over layers)")
        t2 = tokens.clone()
        t2[:, 7] = (t2[:, 7] + 1) % cfg["vocab_size"]
        o2 = R.forward(cfg, P, t2, 0.3, 0.01)
        # (not bitwise: the expert batches change size, so BLAS may round differently)
        check(torch.allclose(out["logits"][:, :7], o2["logits"][:, :7], rtol=0, atol=1e-12)
              and not torch.allclose(out["logits"][:, 7:], o2["logits"][:, 7:]), "causal: token 7 affects t >= 7 only")
        # MTP depth k at position i sees tokens up to i+k only.
        check(torch.allclose(out["mtp_logits"][0][:, :6], o2["mtp_logits"][0][:, :6], rtol=0, atol=1e-12)
              and torch.allclose(out["mtp_logits"][1][:, :5], o2["mtp_logits"][1][:, :5], rtol=0, atol=1e-12)
              and not torch.allclose(out["mtp_logits"][0][:, 6], o2["mtp_logits"][0][:, 6]),
              "MTP causal: depth k position i uses tokens <= i+k")
        check(len(out["mtp_logits"]) == 2 and out["mtp_logits"][1].shape[1] == 10, "MTP depth 2 shapes")
        # Zero routers: sigmoid/softmax ties -> plain top-K = experts 0..K-1, each layer term = 1.
        for name in P:
            if name.endswith("mlp.gate.weight"):
                P[name].zero_()
        n_moe = sum(R.is_moe_layer(cfg, i) for i in range(cfg["num_hidden_layers"] + 2))
        out0 = R.forward(cfg, P, tokens, 0.3, 0.01)
        check(abs(out0["aux"].item() - n_moe) < 1e-12, "zero router: aux = %d MoE layers (%.12f)"
              % (n_moe, out0["aux"].item()))

    ycfg = R.load_config(CONFIGS["yarn_tied"])
    with tempfile.TemporaryDirectory(prefix="nm_refself_") as tmp:
        t = R.random_tensors(ycfg, 5)
        check("lm_head.weight" not in t, "tied config: no lm_head.weight in the table")
        t["model.layers.3.embed_tokens.weight"] = t["model.embed_tokens.weight"]
        t["model.layers.3.shared_head.head.weight"] = t["model.embed_tokens.weight"]
        with open(CONFIGS["yarn_tied"]) as f, open(os.path.join(tmp, "config.json"), "w") as o:
            o.write(f.read())
        st_io.save(os.path.join(tmp, "model.safetensors"), t)
        c2, P2 = R.load_model(tmp)
        check(all(np.array_equal(P2[n].detach().numpy(), t[n]) for n in P2)
              and "model.layers.3.embed_tokens.weight" not in P2, "st_io F32 round trip; MTP copies dropped")
        st_io.save(os.path.join(tmp, "bf.safetensors"), {"x": np.array([1.0, -2.5, 3.14159, 1e-3], np.float32)},
                   dtype="BF16")
        xb = st_io.load(os.path.join(tmp, "bf.safetensors"))[0]["x"]
        check(np.allclose(xb, [1.0, -2.5, 3.140625, 9.994507e-04], rtol=1e-6), "st_io BF16 round trip %s" % xb)
        tokens = np.random.default_rng(3).integers(0, ycfg["vocab_size"], size=(2, 9)).astype("<i4")
        tokens.tofile(os.path.join(tmp, "t.bin"))
        r = subprocess.run([sys.executable, os.path.join(HERE, "dsv3_ref.py"), "--model", tmp, "--tokens",
                            os.path.join(tmp, "t.bin"), "--batch", "2", "--aux-weight", "0.01",
                            "--out", os.path.join(tmp, "o.npz"), "--threads", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        check(r.returncode == 0, "CLI runs (%s)" % r.stderr.strip()[-200:])
        if r.returncode == 0:
            z = np.load(os.path.join(tmp, "o.npz"))
            out, grads = R.run_with_grads(c2, P2, torch.from_numpy(tokens.astype(np.int64)), 0.3, 0.01)
            ok = np.allclose(z["logits"], out["logits"].detach().numpy(), atol=1e-12) and \
                abs(float(z["loss"]) - out["loss"].item()) < 1e-12 and \
                all(np.allclose(z["grad/" + n], grads[n], atol=1e-12) for n in grads) and \
                "grad/lm_head.weight" not in z and \
                not any(k.endswith("e_score_correction_bias") for k in z.files)
            check(ok, "CLI npz = library (logits, loss, %d grads, no bias/lm_head grads)" % len(grads))


def main():
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and shares the machine
    rope_checks()
    routing_checks()
    model_checks()
    for i, (name, path) in enumerate(CONFIGS.items()):
        cfg = small(R.load_config(path))
        fd_check(name, cfg, 100 + i)
    fd_aux_only(small(R.load_config(CONFIGS["tiny"])), 9)
    if FAILS:
        print("FAILED: %d checks" % len(FAILS))
        return 1
    print("OK: reference self-checks pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
