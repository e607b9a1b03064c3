#!/usr/bin/env python3
"""dsv3_ref.py: independent PyTorch reference of the DeepSeek-V3 model (forward + autograd).

Written from docs dsv3-spec.md (sections 3-6 and 11), not from the C code. float64 by default
(the oracle), float32 for the benchmark peer. Vectorised: no Python loop over tokens; the MoE
loops over experts only.

Library:  cfg, params = load_model(dir)
          out = forward(cfg, params, tokens, mtp_weight=0.3, aux_weight=1e-4)
          out: loss, ce, mtp, aux (0-d tensors), logits (B,T,V), mtp_logits (list), margins (dict)
CLI:      python3 dsv3_ref.py --model DIR --tokens T.bin --batch B [--mtp-weight W]
              [--aux-weight A] [--dtype float64|float32] [--threads N] [--repeat N] --out OUT.npz
          T.bin holds int32 tokens (B,T) row-major. OUT.npz holds logits, loss, ce, mtp, aux and
          the gradient of every parameter under "grad/<HF name>".
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Config

_DEFAULTS = {
    "q_lora_rank": None, "n_shared_experts": 0, "n_routed_experts": 0, "num_experts_per_tok": 1,
    "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "first_k_dense_replace": 0,
    "moe_layer_freq": 1, "num_nextn_predict_layers": 0, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": None, "tie_word_embeddings": False,
}


def load_config(path):
    with open(path) as f:
        raw = json.load(f)
    cfg = dict(_DEFAULTS)
    cfg.update({k: v for k, v in raw.items() if v is not None or k in ("q_lora_rank", "rope_scaling")})
    if not cfg.get("q_lora_rank"):
        cfg["q_lora_rank"] = 0
    if cfg.get("n_shared_experts") is None:
        cfg["n_shared_experts"] = 0
    if cfg.get("n_routed_experts") is None:
        cfg["n_routed_experts"] = 0
    return cfg


def is_moe_layer(cfg, idx):
    return (cfg["n_routed_experts"] > 0 and idx >= cfg["first_k_dense_replace"]
            and idx % cfg["moe_layer_freq"] == 0)


def mtp_copy_names(cfg):
    """Names of the tied MTP copies stored in files (ignored: the shared tensors are used)."""
    L, M = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    out = set()
    for k in range(M):
        out.add("model.layers.%d.embed_tokens.weight" % (L + k))
        out.add("model.layers.%d.shared_head.head.weight" % (L + k))
    return out


def param_shapes(cfg, with_copies=False):
    """The HF parameter table from spec section 2: name -> shape (MTP copies only if asked)."""
    D, V, H = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rq, rkv = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    E, Im, Ns = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["n_shared_experts"]
    L, M = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, D)
    for i in range(L + M):
        p = "model.layers.%d." % i
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if rq:
            out[a + "q_a_proj.weight"] = (rq, D)
            out[a + "q_a_layernorm.weight"] = (rq,)
            out[a + "q_b_proj.weight"] = (H * (dn + dr), rq)
        else:
            out[a + "q_proj.weight"] = (H * (dn + dr), D)
        out[a + "kv_a_proj_with_mqa.weight"] = (rkv + dr, D)
        out[a + "kv_a_layernorm.weight"] = (rkv,)
        out[a + "kv_b_proj.weight"] = (H * (dn + dv), rkv)
        out[a + "o_proj.weight"] = (D, H * dv)
        m = p + "mlp."
        if is_moe_layer(cfg, i):
            out[m + "gate.weight"] = (E, D)
            out[m + "gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                out[m + "experts.%d.gate_proj.weight" % e] = (Im, D)
                out[m + "experts.%d.up_proj.weight" % e] = (Im, D)
                out[m + "experts.%d.down_proj.weight" % e] = (D, Im)
            if Ns:
                out[m + "shared_experts.gate_proj.weight"] = (Ns * Im, D)
                out[m + "shared_experts.up_proj.weight"] = (Ns * Im, D)
                out[m + "shared_experts.down_proj.weight"] = (D, Ns * Im)
        else:
            I = cfg["intermediate_size"]
            out[m + "gate_proj.weight"] = (I, D)
            out[m + "up_proj.weight"] = (I, D)
            out[m + "down_proj.weight"] = (D, I)
        if i >= L:
            out[p + "enorm.weight"] = (D,)
            out[p + "hnorm.weight"] = (D,)
            out[p + "eh_proj.weight"] = (D, 2 * D)
            out[p + "shared_head.norm.weight"] = (D,)
            if with_copies:
                out[p + "embed_tokens.weight"] = (V, D)
                out[p + "shared_head.head.weight"] = (V, D)
    return out


def random_tensors(cfg, seed, matrix_gain=1.0, bias_std=0.05, norm_std=0.1):
    """Random weights for tests (numpy float32-representable float64): matrices
    N(0, gain^2/fan_in), embedding N(0,1), norms 1 + norm_std*N, router biases bias_std*N.
    Matrices are rounded to float32 so the C side (fp32) reads exactly the same values."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            a = bias_std * rng.standard_normal(shape)
        elif len(shape) == 1:
            a = 1.0 + norm_std * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            a = rng.standard_normal(shape)
        else:
            a = matrix_gain * rng.standard_normal(shape) / math.sqrt(shape[1])
        out[name] = a.astype(np.float32)
    return out


def load_model(model_dir, dtype=torch.float64):
    """Returns (cfg, params): params maps HF name -> tensor (requires_grad except router biases).
    The MTP copies of embedding/head are dropped; with tie_word_embeddings lm_head.weight is
    dropped too (the head is model.embed_tokens.weight)."""
    cfg = load_config(os.path.join(model_dir, "config.json"))
    idx_path = os.path.join(model_dir, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(idx_path):
        with open(idx_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        for s in shards:
            tensors.update(st_io.load(os.path.join(model_dir, s))[0])
    else:
        tensors = st_io.load(os.path.join(model_dir, "model.safetensors"))[0]
    params = params_from_numpy(cfg, tensors, dtype)
    return cfg, params


def params_from_numpy(cfg, tensors, dtype=torch.float64):
    skip = mtp_copy_names(cfg)
    if cfg["tie_word_embeddings"]:
        skip.add("lm_head.weight")
    params = {}
    for name, arr in tensors.items():
        if name in skip:
            continue
        t = torch.tensor(np.asarray(arr, dtype=np.float64), dtype=dtype)
        if not name.endswith("e_score_correction_bias"):
            t.requires_grad_(True)
        params[name] = t
    return params


# ---------------------------------------------------------------------------------------------
# Building blocks

def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def yarn_mscale(s, c):
    return 1.0 if s <= 1 else 0.1 * c * math.log(s) + 1.0


def rope_params(cfg):
    """Returns (inv_freq as float64 numpy (Dr/2,), cos/sin multiplier, softmax scale, info dict)."""
    dr = cfg["qk_rope_head_dim"]
    dqk = cfg["qk_nope_head_dim"] + dr
    theta = float(cfg["rope_theta"])
    inv = theta ** (-np.arange(0, dr, 2, dtype=np.float64) / dr)
    attn_factor = 1.0
    scale = dqk ** -0.5
    info = {}
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "yarn":
            raise ValueError("rope_scaling type %r not supported by the reference" % kind)
        s = float(rs["factor"])
        L0 = float(rs["original_max_position_embeddings"])
        bf = float(rs.get("beta_fast", 32))
        bs = float(rs.get("beta_slow", 1))

        def corr_dim(r):
            return dr * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(theta))

        low = max(math.floor(corr_dim(bf)), 0)
        high = min(math.ceil(corr_dim(bs)), dr - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dr // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        inv = inv * (1 - ramp) + (inv / s) * ramp
        ms, msa = rs.get("mscale"), rs.get("mscale_all_dim")
        if ms and msa:  # dsv3-spec 9.6: both present (and non-zero) -> ratio; else vanilla YaRN factor
            attn_factor = yarn_mscale(s, ms) / yarn_mscale(s, msa)
        else:
            attn_factor = yarn_mscale(s, 1.0)
        if msa:
            scale = scale * yarn_mscale(s, msa) ** 2
        info = {"low": low, "high": high}
    return inv, attn_factor, scale, info


def rope_rotation(cfg, T, dtype):
    """Complex rotation factors attn_factor * e^{i p inv_freq_j}, shape (T, Dr/2), and the scale."""
    inv, attn_factor, scale, _ = rope_params(cfg)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    rot = torch.polar(torch.full(ang.shape, attn_factor, dtype=torch.float64), torch.tensor(ang))
    return rot.to(torch.complex128 if dtype == torch.float64 else torch.complex64), scale


def apply_rope(x, rot):
    """x (..., T, [H,] Dr) with channel pairs (2i, 2i+1) as complex numbers, rot (T, Dr/2).
    rot must broadcast against x viewed as (..., Dr/2): the caller reshapes it."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(x.shape)


def mla(cfg, P, pre, a, rot, scale):
    B, T, _ = a.shape
    H = cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rkv = cfg["kv_lora_rank"]
    eps = cfg["rms_norm_eps"]
    if cfg["q_lora_rank"]:
        cq = rmsnorm(a @ P[pre + "q_a_proj.weight"].T, P[pre + "q_a_layernorm.weight"], eps)
        q = cq @ P[pre + "q_b_proj.weight"].T
    else:
        q = a @ P[pre + "q_proj.weight"].T
    q = q.view(B, T, H, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    kva = a @ P[pre + "kv_a_proj_with_mqa.weight"].T
    ckv = rmsnorm(kva[..., :rkv], P[pre + "kv_a_layernorm.weight"], eps)
    k_pe = kva[..., rkv:]                                           # (B,T,dr), shared by heads
    kv = (ckv @ P[pre + "kv_b_proj.weight"].T).view(B, T, H, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    q_pe = apply_rope(q_pe, rot[:T, None, :])                       # (B,T,H,dr)
    k_pe = apply_rope(k_pe, rot[:T, :])                             # (B,T,dr)
    s = torch.einsum("bihd,bjhd->bhij", q_nope, k_nope) + torch.einsum("bihd,bjd->bhij", q_pe, k_pe)
    s = s * scale
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = s.masked_fill(causal, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhij,bjhd->bihd", p, v).reshape(B, T, H * dv)
    return o @ P[pre + "o_proj.weight"].T


def _topk_lowest_index(x, k):
    """Indices of the k largest values along the last dim, exact ties broken by lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def _margin(x, k):
    """Smallest gap between the k-th and (k+1)-th largest finite values (routing robustness)."""
    if x.shape[-1] <= k:
        return float("inf")
    v = torch.sort(x, dim=-1, descending=True).values
    gap = v[..., k - 1] - v[..., k]
    gap = gap[torch.isfinite(gap)]
    return float(gap.min()) if gap.numel() else float("inf")


def route(cfg, s, bias, margins=None):
    """Selected experts (N,K) from detached scores s (N,E): bias added for selection only,
    group limit per topk_method (masked groups are -inf), exact ties to the lower index."""
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    G, Gk = cfg["n_group"], cfg["topk_group"]
    margins = [] if margins is None else margins
    method = cfg["topk_method"]
    # The bias is for noaux_tc only. Checked against HF modeling_deepseek.py (MoEGate creates
    # e_score_correction_bias only when topk_method == "noaux_tc" and adds it in that branch
    # only; greedy / group_limited_greedy take topk of the plain scores) and DeepSeek-V3's
    # inference/model.py Gate (a bias only at V3's dim 7168, whose config is noaux_tc).
    use_bias = bias is not None and method == "noaux_tc"
    c = s + bias.detach().to(s.dtype) if use_bias else s.clone()
    if method in ("noaux_tc", "group_limited_greedy") and G > 1:
        cg = c.view(-1, G, E // G)
        if method == "noaux_tc":
            gscore = torch.sort(cg, dim=-1, descending=True).values[..., :2].sum(-1)
        else:
            gscore = cg.max(dim=-1).values
        gidx = _topk_lowest_index(gscore, Gk)
        keep = torch.zeros(gscore.shape, dtype=torch.bool).scatter_(1, gidx, True)
        margins.append(_margin(gscore, Gk))
        c = c.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    elif method not in ("noaux_tc", "group_limited_greedy", "greedy"):
        raise ValueError("topk_method %r" % method)
    margins.append(_margin(c, K))
    return _topk_lowest_index(c, K)


def moe(cfg, P, pre, u, stats):
    """u (B,T,D) -> (B,T,D); appends the layer's balance term and routing margins to stats."""
    B, T, D = u.shape
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    x = u.reshape(B * T, D)
    z = x @ P[pre + "gate.weight"].T                                # (N,E)
    if cfg["scoring_func"] == "sigmoid":
        s = torch.sigmoid(z)
    elif cfg["scoring_func"] == "softmax":
        s = torch.softmax(z, dim=-1)
    else:
        raise ValueError("scoring_func %r" % cfg["scoring_func"])
    sd = s.detach()
    idx = route(cfg, sd, P.get(pre + "gate.e_score_correction_bias"), stats["margins"])
    w = s.gather(1, idx)
    if cfg["norm_topk_prob"]:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg["routed_scaling_factor"]
    y = torch.zeros_like(x)
    for e in range(E):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        ep = pre + "experts.%d." % e
        ye = swiglu(x[tok], P[ep + "gate_proj.weight"], P[ep + "up_proj.weight"], P[ep + "down_proj.weight"])
        y.index_add_(0, tok, ye * w[tok, slot].unsqueeze(-1))
    if cfg["n_shared_experts"]:
        sp = pre + "shared_experts."
        y = y + swiglu(x, P[sp + "gate_proj.weight"], P[sp + "up_proj.weight"], P[sp + "down_proj.weight"])
    # Sequence-wise balance loss: plain top-K of s (no bias, no group limit); f is a constant.
    plain = _topk_lowest_index(sd, K).view(B, T, K)
    stats["margins_plain"].append(_margin(sd, K))
    counts = F.one_hot(plain, E).sum(dim=(1, 2)).to(s.dtype)        # (B,E)
    f = counts * (E / (K * T))
    sp_ = s.view(B, T, E)
    Pm = (sp_ / sp_.sum(-1, keepdim=True)).mean(1)                  # (B,E)
    stats["aux"].append((f * Pm).sum(-1).mean())
    stats["counts"].append(F.one_hot(idx, E).sum(dim=(0, 1)))
    return y.view(B, T, D)


def decoder_layer(cfg, P, idx, h, rot, scale, stats):
    pre = "model.layers.%d." % idx
    eps = cfg["rms_norm_eps"]
    h = h + mla(cfg, P, pre + "self_attn.", rmsnorm(h, P[pre + "input_layernorm.weight"], eps), rot, scale)
    f = rmsnorm(h, P[pre + "post_attention_layernorm.weight"], eps)
    if is_moe_layer(cfg, idx):
        return h + moe(cfg, P, pre + "mlp.", f, stats)
    mp = pre + "mlp."
    return h + swiglu(f, P[mp + "gate_proj.weight"], P[mp + "up_proj.weight"], P[mp + "down_proj.weight"])


def forward(cfg, params, tokens, mtp_weight=0.3, aux_weight=1e-4):
    """tokens: (B,T) int64. Returns dict(loss, ce, mtp, aux, logits, mtp_logits, margins)."""
    P = params
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    B, T = tokens.shape
    L, M = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    V = cfg["vocab_size"]
    if T < 2 + M:
        raise ValueError("T=%d too short for MTP depth %d" % (T, M))
    if int(tokens.min()) < 0 or int(tokens.max()) >= V:
        raise ValueError("token id outside [0, %d)" % V)
    eps = cfg["rms_norm_eps"]
    emb = P["model.embed_tokens.weight"]
    head = emb if cfg["tie_word_embeddings"] else P["lm_head.weight"]
    dtype = emb.dtype
    rot, scale = rope_rotation(cfg, T, dtype)
    stats = {"aux": [], "margins": [], "margins_plain": [], "counts": []}

    h = emb[tokens]
    for l in range(L):
        h = decoder_layer(cfg, P, l, h, rot, scale, stats)
    h0 = rmsnorm(h, P["model.norm.weight"], eps)
    logits = h0 @ head.T
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))

    mtp_losses, mtp_logits = [], []
    hprev = h0
    for k in range(1, M + 1):
        pre = "model.layers.%d." % (L + k - 1)
        n = T - k
        e = emb[tokens[:, k:k + n]]                                 # embedding of t[i+k]
        x = torch.cat([rmsnorm(e, P[pre + "enorm.weight"], eps),
                       rmsnorm(hprev[:, :n], P[pre + "hnorm.weight"], eps)], dim=-1)
        x = x @ P[pre + "eh_proj.weight"].T
        hk = decoder_layer(cfg, P, L + k - 1, x, rot, scale, stats)
        lk = rmsnorm(hk, P[pre + "shared_head.norm.weight"], eps) @ head.T
        mtp_logits.append(lk)
        mtp_losses.append(F.cross_entropy(lk[:, :n - 1].reshape(-1, V), tokens[:, k + 1:].reshape(-1)))
        hprev = hk
    zero = torch.zeros((), dtype=dtype)
    mtp = torch.stack(mtp_losses).mean() if mtp_losses else zero
    aux = torch.stack(stats["aux"]).sum() if stats["aux"] else zero
    loss = ce + mtp_weight * mtp + aux_weight * aux
    margins = {"routed": min(stats["margins"], default=float("inf")),
               "plain": min(stats["margins_plain"], default=float("inf"))}
    return {"loss": loss, "ce": ce, "mtp": mtp, "aux": aux, "logits": logits, "mtp_logits": mtp_logits,
            "margins": margins, "counts": stats["counts"]}


def run_with_grads(cfg, params, tokens, mtp_weight=0.3, aux_weight=1e-4):
    """Forward + backward. Returns (out dict with floats, grads dict name -> numpy float64)."""
    for p in params.values():
        p.grad = None
    out = forward(cfg, params, tokens, mtp_weight, aux_weight)
    out["loss"].backward()
    grads = {}
    for name, p in params.items():
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[name] = g.detach().double().numpy()
    return out, grads


# ---------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="int32 (B,T) row-major")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--aux-weight", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeat", type=int, default=1, help="forward+backward iterations (timing)")
    ap.add_argument("--no-grads", action="store_true", help="forward only")
    ap.add_argument("--out", help="OUT.npz: logits, losses, grad/<name>")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    cfg, params = load_model(a.model, dtype)
    raw = np.fromfile(a.tokens, dtype="<i4")
    if raw.size % a.batch:
        sys.exit("dsv3_ref: %d tokens do not split into batch %d" % (raw.size, a.batch))
    tokens = torch.from_numpy(raw.astype(np.int64).reshape(a.batch, -1))
    times = []
    for _ in range(max(1, a.repeat)):
        t0 = time.perf_counter()
        if a.no_grads:
            with torch.no_grad():
                out = forward(cfg, params, tokens, a.mtp_weight, a.aux_weight)
            grads = {}
        else:
            out, grads = run_with_grads(cfg, params, tokens, a.mtp_weight, a.aux_weight)
        times.append(time.perf_counter() - t0)
    if a.out:
        save = {"logits": out["logits"].detach().double().numpy()}
        for key in ("loss", "ce", "mtp", "aux"):
            save[key] = np.float64(out[key].item())
        for name, g in grads.items():
            save["grad/" + name] = g
        np.savez(a.out, **save)
    B, T = tokens.shape
    print(json.dumps({"loss": out["loss"].item(), "ce_loss": out["ce"].item(), "mtp_loss": out["mtp"].item(),
                      "aux_loss": out["aux"].item(), "tokens": B * T, "seconds": min(times),
                      "tokens_per_s": B * T / min(times), "dtype": a.dtype, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
