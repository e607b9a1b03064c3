#!/usr/bin/env python3
"""torch_peer.py: the PyTorch peer of `nanomegatron train` for bench/run.sh.

The same DeepSeek-V3 model, written the way a good PyTorch user would write it on CPU
(HF DeepseekV3 modelling, eager): MLA attention through batched matmuls with a causal mask
(torch 1.13 has no F.scaled_dot_product_attention; where it exists, --sdpa uses it), RoPE on
adjacent pairs with real arithmetic, MoE with sigmoid scores, noaux_tc group-limited top-k
and a bias for selection only, experts dispatched by sorting the token copies by expert and
looping over experts (HF DeepseekV3MoE.moe_infer), shared expert, the sequence-wise balance
loss, one MTP depth, the aux-loss-free bias update, AdamW (decay on matrices only) with
global-norm clipping, gradient accumulation micro_batch -> global_batch.

It loads the SAME initial weights (a Hugging Face directory written by `nanomegatron init`)
and runs the SAME batch shape (micro_batch x (seq_len+1) token windows, global_batch / micro
micro-batches per step) as the training config; tokens are random ids from a fixed seed (our
trainer reads its synthetic corpus; the FLOPs per step are identical, and routing is ruled
by the shared initial weights).

fp32 or bf16 (torch.autocast("cpu", dtype=torch.bfloat16): matmuls in bf16 through oneDNN,
master weights, norms, softmax, loss and optimizer in fp32).

Usage: torch_peer.py --model INIT_DIR --train-config configs/small-train.json
           [--threads N] [--steps N] [--warmup W] [--precision fp32|bf16]
Last line: JSON {"tokens_per_s": ..., "step_s": [...], "loss_first": ..., ...}.

Not a correctness oracle (that is tests/reference/dsv3_ref.py, float64): the routing ties,
the data and the summation orders differ from ours.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import st_io  # noqa: E402  (the project's numpy safetensors reader; no extra dependency)


# ---------------------------------------------------------------------------------------------
# weights


def load_weights(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    tensors = st_io.load(os.path.join(model_dir, "model.safetensors"))[0]
    L, M = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0) or 0
    skip = set()
    for k in range(M):  # MTP copies of the shared embedding / head: the shared tensors are used
        skip.add("model.layers.%d.embed_tokens.weight" % (L + k))
        skip.add("model.layers.%d.shared_head.head.weight" % (L + k))
    P = {}
    for name, arr in tensors.items():
        if name in skip:
            continue
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not name.endswith("e_score_correction_bias"):
            t.requires_grad_(True)
        P[name] = t
    return cfg, P


# ---------------------------------------------------------------------------------------------
# model


def rmsnorm(x, w, eps):
    # HF DeepseekV3RMSNorm: statistics in fp32, back to the activation dtype.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def rope(x, cos, sin):
    """x (..., T, [H,] Dr) rotated on adjacent pairs; cos/sin broadcast as (..., Dr/2)."""
    x2 = x.unflatten(-1, (-1, 2))
    x0, x1 = x2[..., 0], x2[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Peer:
    def __init__(self, cfg, P, T, use_sdpa):
        self.c, self.P = cfg, P
        self.L = cfg["num_hidden_layers"]
        self.M = cfg.get("num_nextn_predict_layers", 0) or 0
        self.H = cfg["num_attention_heads"]
        self.dn, self.dr, self.dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        self.rkv, self.rq = cfg["kv_lora_rank"], cfg.get("q_lora_rank") or 0
        self.E, self.K = cfg.get("n_routed_experts") or 0, cfg.get("num_experts_per_tok") or 1
        self.G, self.Gk = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
        self.eps = cfg["rms_norm_eps"]
        self.use_sdpa = use_sdpa and hasattr(F, "scaled_dot_product_attention")
        if cfg.get("rope_scaling"):
            raise SystemExit("torch_peer: rope_scaling (YaRN) not implemented in the peer")
        inv = cfg["rope_theta"] ** (-torch.arange(0, self.dr, 2, dtype=torch.float64) / self.dr)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().float(), ang.sin().float()          # (T, Dr/2)
        self.scale = (self.dn + self.dr) ** -0.5
        self.mask = torch.full((T, T), float("-inf")).triu(1)
        self.counts = {}                                                     # layer -> (E) expert loads

    def is_moe(self, i):
        return self.E > 0 and i >= self.c.get("first_k_dense_replace", 0) and i % self.c.get("moe_layer_freq", 1) == 0

    def attention(self, pre, a):
        P, B, T = self.P, a.shape[0], a.shape[1]
        H, dn, dr, dv = self.H, self.dn, self.dr, self.dv
        if self.rq:
            q = F.linear(rmsnorm(F.linear(a, P[pre + "q_a_proj.weight"]), P[pre + "q_a_layernorm.weight"], self.eps),
                         P[pre + "q_b_proj.weight"])
        else:
            q = F.linear(a, P[pre + "q_proj.weight"])
        q = q.view(B, T, H, dn + dr)
        kva = F.linear(a, P[pre + "kv_a_proj_with_mqa.weight"])
        ckv, k_pe = kva[..., :self.rkv], kva[..., self.rkv:]
        kv = F.linear(rmsnorm(ckv, P[pre + "kv_a_layernorm.weight"], self.eps), P[pre + "kv_b_proj.weight"])
        kv = kv.view(B, T, H, dn + dv)
        cos, sin = self.cos[:T].to(q.dtype), self.sin[:T].to(q.dtype)
        q_pe = rope(q[..., dn:], cos[:, None, :], sin[:, None, :])           # (B,T,H,dr)
        k_pe = rope(k_pe, cos, sin)                                          # (B,T,dr)
        qh = torch.cat((q[..., :dn], q_pe), -1).transpose(1, 2)              # (B,H,T,dqk)
        kh = torch.cat((kv[..., :dn], k_pe[:, :, None, :].expand(B, T, H, dr)), -1).transpose(1, 2)
        vh = kv[..., dn:].transpose(1, 2)                                    # (B,H,T,dv)
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
        else:
            s = torch.matmul(qh, kh.transpose(-1, -2)) * self.scale + self.mask[:T, :T]
            o = torch.matmul(torch.softmax(s.float(), dim=-1).to(vh.dtype), vh)
        o = o.transpose(1, 2).reshape(B, T, H * dv)
        return F.linear(o, P[pre + "o_proj.weight"])

    def moe(self, layer, pre, u):
        P, E, K = self.P, self.E, self.K
        B, T, D = u.shape
        x = u.reshape(B * T, D)
        s = torch.sigmoid(F.linear(x, P[pre + "gate.weight"]).float())      # (N,E) fp32 router
        with torch.no_grad():
            c = s + P[pre + "gate.e_score_correction_bias"]
            if self.G > 1 and self.Gk < self.G:
                gs = c.view(-1, self.G, E // self.G).topk(2, dim=-1).values.sum(-1)
                gi = gs.topk(self.Gk, dim=-1).indices
                keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gi, True)
                c = c.masked_fill(~keep.repeat_interleave(E // self.G, dim=1), float("-inf"))
            idx = c.topk(K, dim=-1).indices                                  # (N,K)
        w = s.gather(1, idx)
        if self.c.get("norm_topk_prob"):
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * self.c.get("routed_scaling_factor", 1.0)
        # HF moe_infer: sort the N*K token copies by expert, one GEMM chain per expert.
        flat = idx.view(-1)
        order = flat.argsort(stable=True)
        tok = order // K
        counts = torch.bincount(flat, minlength=E)
        self.counts[layer] = counts
        xs = x[tok]
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            ep = pre + "experts.%d." % e
            outs.append(mlp(xs[start:start + n], P[ep + "gate_proj.weight"], P[ep + "up_proj.weight"],
                            P[ep + "down_proj.weight"]))
            start += n
        ys = torch.cat(outs).float() * w.view(-1)[order, None]
        y = torch.zeros(B * T, D, dtype=torch.float32).index_add_(0, tok, ys)
        if self.c.get("n_shared_experts"):
            sp = pre + "shared_experts."
            y = y + mlp(x, P[sp + "gate_proj.weight"], P[sp + "up_proj.weight"], P[sp + "down_proj.weight"]).float()
        # sequence-wise balance loss (plain top-K, no bias, no group limit; f is a constant)
        with torch.no_grad():
            plain = s.topk(K, dim=-1).indices.view(B, T * K)
            f = torch.zeros(B, E).scatter_add_(1, plain, torch.ones(B, T * K)) * (E / (K * T))
        sb = s.view(B, T, E)
        aux = (f * (sb / sb.sum(-1, keepdim=True)).mean(1)).sum(-1).mean()
        return y.to(u.dtype).view(B, T, D), aux

    def layer(self, i, h, auxes):
        P, pre = self.P, "model.layers.%d." % i
        h = h + self.attention(pre + "self_attn.", rmsnorm(h, P[pre + "input_layernorm.weight"], self.eps))
        f = rmsnorm(h, P[pre + "post_attention_layernorm.weight"], self.eps)
        if self.is_moe(i):
            y, aux = self.moe(i, pre + "mlp.", f)
            auxes.append(aux)
            return h + y
        mp = pre + "mlp."
        return h + mlp(f, P[mp + "gate_proj.weight"], P[mp + "up_proj.weight"], P[mp + "down_proj.weight"])

    def loss(self, tokens, mtp_weight, aux_weight):
        P, V = self.P, self.c["vocab_size"]
        emb = P["model.embed_tokens.weight"]
        head = emb if self.c.get("tie_word_embeddings") else P["lm_head.weight"]
        auxes = []
        h = F.embedding(tokens, emb)
        for i in range(self.L):
            h = self.layer(i, h, auxes)
        h0 = rmsnorm(h, P["model.norm.weight"], self.eps)
        logits = F.linear(h0, head)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1))
        mtps, hprev, T = [], h0, tokens.shape[1]
        for k in range(1, self.M + 1):
            pre, n = "model.layers.%d." % (self.L + k - 1), T - k
            e = F.embedding(tokens[:, k:], emb)
            x = F.linear(torch.cat((rmsnorm(e, P[pre + "enorm.weight"], self.eps),
                                    rmsnorm(hprev[:, :n], P[pre + "hnorm.weight"], self.eps)), -1),
                         P[pre + "eh_proj.weight"])
            hk = self.layer(self.L + k - 1, x, auxes)
            lk = F.linear(rmsnorm(hk, P[pre + "shared_head.norm.weight"], self.eps), head)
            mtps.append(F.cross_entropy(lk[:, :n - 1].reshape(-1, V).float(), tokens[:, k + 1:].reshape(-1)))
            hprev = hk
        mtp = torch.stack(mtps).mean() if mtps else torch.zeros(())
        aux = torch.stack(auxes).sum() if auxes else torch.zeros(())
        return ce + mtp_weight * mtp + aux_weight * aux, ce


# ---------------------------------------------------------------------------------------------
# training loop


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF directory from `nanomegatron init`")
    ap.add_argument("--train-config", required=True, help="training config (batch shape, optimizer)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--sdpa", action="store_true", help="F.scaled_dot_product_attention (torch >= 2.1)")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    torch.set_num_interop_threads(1)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    with open(a.train_config) as f:
        tc = json.load(f)
    seq, micro, glob = tc["seq_len"], tc["micro_batch"], tc.get("global_batch", tc["micro_batch"])
    accum = max(1, glob // micro)
    opt_c = tc.get("optimizer", {})
    mtp_w = tc.get("mtp", {}).get("weight", 0.3)
    aux_w = tc.get("balance", {}).get("aux_weight", 1e-4)
    gamma = tc.get("balance", {}).get("bias_update_speed", 1e-3)
    clip = opt_c.get("clip_grad", 1.0)

    cfg, P = load_weights(a.model)
    T = seq + 1
    peer = Peer(cfg, P, T, a.sdpa)
    decay = [p for n, p in P.items() if p.requires_grad and p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in P.items() if p.requires_grad and not (p.dim() >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt_c.get("weight_decay", 0.1)},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opt_c.get("lr", 1e-3), betas=(opt_c.get("beta1", 0.9), opt_c.get("beta2", 0.95)),
                            eps=opt_c.get("eps", 1e-8), foreach=True)
    biases = {i: P["model.layers.%d.mlp.gate.e_score_correction_bias" % i]
              for i in range(peer.L + peer.M) if peer.is_moe(i)}
    gen = torch.Generator().manual_seed(a.seed)
    V = cfg["vocab_size"]

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loads = {i: torch.zeros(peer.E, dtype=torch.int64) for i in biases}
        total, ce_sum = 0.0, 0.0
        for _ in range(accum):
            tokens = torch.randint(0, V, (micro, T), generator=gen)
            if a.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, ce = peer.loss(tokens, mtp_w, aux_w)
            else:
                loss, ce = peer.loss(tokens, mtp_w, aux_w)
            (loss / accum).backward()
            total += loss.item() / accum
            ce_sum += ce.item() / accum
            for i in biases:
                loads[i] += peer.counts[i]
        torch.nn.utils.clip_grad_norm_([p for p in P.values() if p.requires_grad], clip)
        opt.step()
        with torch.no_grad():  # aux-loss-free balancing: b += gamma * sign(mean load - load)
            for i, b in biases.items():
                ld = loads[i].float()
                b += gamma * torch.sign(ld.mean() - ld)
        return time.perf_counter() - t0, total, ce_sum

    times, losses = [], []
    for s in range(a.warmup + a.steps):
        dt, loss, ce = step()
        losses.append(loss)
        if s >= a.warmup:
            times.append(dt)
        print("torch_peer step %d/%d: loss %.4f ce %.4f  %.2f s%s" % (s + 1, a.warmup + a.steps, loss, ce, dt,
              " (warm-up)" if s < a.warmup else ""), file=sys.stderr, flush=True)
    tokens_per_step = glob * seq
    print(json.dumps({"tokens_per_s": tokens_per_step * len(times) / sum(times),
                      "tokens_per_s_median": tokens_per_step / statistics.median(times),
                      "step_s": times, "loss_first": losses[0], "loss_last": losses[-1],
                      "precision": a.precision, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "tokens_per_step": tokens_per_step, "sdpa": peer.use_sdpa}))


if __name__ == "__main__":
    main()
