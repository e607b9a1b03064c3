#!/usr/bin/env python3
"""train_ref.py: a float64 PyTorch training loop around dsv3_ref, the oracle of our trainer.

It reproduces one optimizer step of `nanomegatron train` from the documents, not from the C
code (dsv3-spec 6.1-6.4 and 11, design.md 9, train_config.h, optim.h):

  for each of accum = global_batch / micro_batch micro-batches (consecutive rows of the step's
  global batch):  loss_m = ce + mtp_weight * mtp + aux_weight * aux   (dsv3_ref.forward)
                  (loss_m / accum).backward()                          (gradients accumulate)
  reported loss  = mean of loss_m over the micro-batches
  grad_norm      = global L2 norm of every trainable gradient (router biases have none)
  clipping       = torch.nn.utils.clip_grad_norm_(max_norm) when clip_grad > 0
  AdamW          = torch.optim.AdamW(betas, eps), weight decay on the 2-D tensors only
                   (every matrix incl. embedding, head and router gate; not the norms), lr of
                   the step from the schedule; a parameter without gradient this step (an
                   expert no token chose) is stepped with a zero gradient, as in a flat
                   gradient buffer (Megatron, ours), not skipped as torch does for grad None
  bias update    = per MoE layer (MTP layers included), with n_i = (token, expert) selections
                   of expert i over the whole global batch, bias and group limit included:
                   b_i += gamma * sign(mean(n) - n_i). Done in float32 like the C side, whose
                   biases are fp32 and gamma a float: the biases are then the same numbers.

The loss weights are rounded to float32 first: the C trainer passes them as floats.

Library: steps = train(cfg, params, batches, hp)  with batches[s] = int64 array (global_batch, T)
         lr_at(step, hp): the learning-rate schedule (constant | cosine, linear warm-up)
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv3_ref  # noqa: E402


def f32(x):
    return float(np.float32(x))


DEFAULT_HP = {
    "micro_batch": 2, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0, "schedule": "constant", "steps": 20,
    "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip_grad": 1.0,
    "mtp_weight": 0.3, "aux_weight": 1e-4, "gamma": 1e-3,
}


def lr_at(step, hp):
    """train_config.h / schedule.h: linear warm-up from 0 over warmup_steps (step 1-based), then
    constant, or a half cosine from lr to min_lr over the remaining steps."""
    L, l, W = hp["lr"], hp["min_lr"], hp["warmup_steps"]
    if W > 0 and step <= W:
        return L * step / W
    if hp["schedule"] == "constant":
        return L
    if hp["schedule"] == "cosine":
        span = hp["steps"] - W
        if span <= 0:
            return l
        p = min(max((step - W) / span, 0.0), 1.0)
        return l + 0.5 * (L - l) * (1.0 + math.cos(math.pi * p))
    raise ValueError("schedule %r not replicated" % hp["schedule"])


def moe_bias_names(cfg):
    """Router bias names of the MoE layers in layer order, MTP layers last (= the order of
    dsv3_ref.forward's stats["counts"])."""
    L, M = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    return ["model.layers.%d.mlp.gate.e_score_correction_bias" % i
            for i in range(L + M) if dsv3_ref.is_moe_layer(cfg, i)]


def train(cfg, params, batches, hp, log=None, first_step=1, adam_state=None):
    """Trains params (dict name -> float64 tensor, modified in place) on batches, a list with
    one (global_batch, T) integer array per step, numbered from first_step (for the lr and
    AdamW's bias correction). adam_state (name -> (exp_avg, exp_avg_sq) arrays) continues
    from a checkpoint's moments after first_step - 1 updates; None: fresh moments.
    Returns one dict per step: loss, ce, mtp,
    aux (means over the micro-batches), grad_norm (before clipping), lr, counts (list of
    per-layer numpy arrays), load_max_over_mean (worst layer's max/mean count), margin and
    margin_plain (smallest gap between the k-th and (k+1)-th candidate seen in the step, in the
    routed selection incl. groups / in the plain top-K of the balance loss)."""
    hp = dict(DEFAULT_HP, **hp)
    trainable = [(n, p) for n, p in params.items() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() == 2]
    no_decay = [p for n, p in trainable if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"])
    if adam_state is not None:
        for n, p in trainable:
            m, v = adam_state[n]
            opt.state[p] = {"step": torch.tensor(float(first_step - 1)),
                            "exp_avg": torch.tensor(np.asarray(m, dtype=np.float64)),
                            "exp_avg_sq": torch.tensor(np.asarray(v, dtype=np.float64))}
    bias_names = moe_bias_names(cfg)
    mtp_w, aux_w = f32(hp["mtp_weight"]), f32(hp["aux_weight"])
    gamma = np.float32(hp["gamma"])
    out_steps = []
    for step, batch in enumerate(batches, start=first_step):
        batch = torch.as_tensor(np.asarray(batch), dtype=torch.int64)
        gb = batch.shape[0]
        mb = hp["micro_batch"]
        if gb % mb:
            raise ValueError("global batch %d is not a multiple of micro_batch %d" % (gb, mb))
        accum = gb // mb
        for p in params.values():
            p.grad = None
        sums = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "aux": 0.0}
        counts = None
        margin = margin_plain = float("inf")
        for k in range(accum):
            out = dsv3_ref.forward(cfg, params, batch[k * mb:(k + 1) * mb], mtp_w, aux_w)
            (out["loss"] / accum).backward()
            for key in sums:
                sums[key] += float(out[key]) / accum
            c = [x.numpy().astype(np.int64) for x in out["counts"]]
            counts = c if counts is None else [a + b for a, b in zip(counts, c)]
            margin = min(margin, out["margins"]["routed"])
            margin_plain = min(margin_plain, out["margins"]["plain"])
        # An expert no token chose this step has no autograd gradient (grad None), and
        # torch.optim.AdamW would skip it entirely. Our trainer (like Megatron, whose grads
        # live in one flat buffer) steps every parameter with its gradient, zero or not: the
        # moments decay, the momentum keeps moving it, weight decay applies. Same here.
        for _, p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for _, p in trainable]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if hp["clip_grad"] > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], hp["clip_grad"])
        lr = lr_at(step, hp)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        # Aux-loss-free balancing is noaux_tc's (DeepSeek's MoEGate has no bias otherwise).
        with torch.no_grad():
            for name, n in zip(bias_names if cfg["topk_method"] == "noaux_tc" else [], counts):
                mean = n.sum() / len(n)
                sign = np.sign(mean - n).astype(np.float32)
                b = params[name].detach().numpy().astype(np.float32)
                b = b + gamma * sign
                params[name].copy_(torch.from_numpy(b.astype(np.float64)))
        worst = max(float(n.max()) / (n.sum() / len(n)) for n in counts if n.sum() > 0)
        rec = dict(sums, grad_norm=norm, lr=lr, counts=counts, margin=margin, margin_plain=margin_plain,
                   load_max_over_mean=worst)
        out_steps.append(rec)
        if log:
            log(step, rec)
    return out_steps
