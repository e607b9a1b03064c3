"""Shared by test_export_hf.py and test_export_gguf.py: small DeepSeek-V3 configs that cover
what the exporters must handle, and helpers to run the CLI.

Each config is a complete HF config.json (every dimension explicit: transformers' defaults are
the 671B ones). The variants are chosen so that together they exercise q_lora_rank null,
softmax and greedy routing, group-limited routing, tied embeddings, YaRN rope scaling,
first_k_dense_replace > 1, moe_layer_freq 2, several / no shared experts, MTP and no MTP.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

import numpy as np

NM_BIN = os.environ.get("NM_BIN")


def need_bin():
    if not NM_BIN or not os.path.exists(NM_BIN):
        skip(f"NM_BIN ({NM_BIN}) not set or missing: build it (make)")


def seed_and_rng(name):
    seed = int(os.environ.get("NM_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
    print(f"{name}: seed {seed} (NM_TEST_SEED to reproduce)")
    return seed, np.random.default_rng(seed)


def base_config(vocab=300):
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_nextn_predict_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 48, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 256, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0,
        # Larger than DeepSeek's 0.006 so that a random model's logits are spread enough for
        # greedy decoding not to sit on near-ties.
        "initializer_range": 0.05,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
    }


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# name -> overrides of base_config. "hf_native": transformers' own DeepseekV3 computes it.
VARIANTS = {
    "v3_like": ({}, True),
    "lite_greedy_tied_yarn": ({"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                               "tie_word_embeddings": True, "rope_scaling": YARN, "n_shared_experts": 2,
                               "first_k_dense_replace": 2, "num_hidden_layers": 4, "num_nextn_predict_layers": 0}, True),
    "yarn_mscale_noaux": ({"rope_scaling": dict(YARN, mscale=1.0, mscale_all_dim=0.5), "n_group": 2,
                           "topk_group": 1, "num_nextn_predict_layers": 0}, True),
    "softmax_greedy": ({"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                        "norm_topk_prob": False, "routed_scaling_factor": 1.0}, False),
    "interleaved_no_shared": ({"moe_layer_freq": 2, "first_k_dense_replace": 0, "num_hidden_layers": 4,
                               "n_shared_experts": 0, "num_nextn_predict_layers": 0}, False),
}


def make_config(name, vocab=300):
    over, native = VARIANTS[name]
    c = base_config(vocab)
    c.update(over)
    return c, native


def run(args, check=True, **kw):
    p = subprocess.run([NM_BIN] + [str(a) for a in args], capture_output=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')}")
    return p


def init_model(tmp, name, config, seed):
    cpath = os.path.join(tmp, f"{name}.json")
    with open(cpath, "w") as f:
        json.dump(config, f)
    mdir = os.path.join(tmp, f"{name}_model")
    run(["init", "--config", cpath, "--out", mdir, "--seed", seed])
    return mdir


def our_logits(tmp, mdir, ids):
    """`nanomegatron forward --logits` on int32 ids (B, T) -> float32 (B, T, V)."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    tp, lp = os.path.join(tmp, "toks.bin"), os.path.join(tmp, "logits.bin")
    ids.tofile(tp)
    run(["forward", "--model", mdir, "--tokens", tp, "--batch", ids.shape[0], "--logits", lp])
    return np.fromfile(lp, dtype=np.float32).reshape(ids.shape[0], ids.shape[1], -1)


def _separating_bias(E, n_group, rng):
    """10 * a permutation of 0..E-1 whose groups' scores (noaux_tc: the sum of each group's
    two largest biased scores) all differ: two groups with equal bias sums would leave the
    group choice to the scores, which a rounding can flip. Sums of multiples of 10 that differ
    differ by >= 10, more than scores in [0, 1] can move them."""
    size = E // n_group
    for _ in range(10000):
        b = 10.0 * rng.permutation(E)
        g = np.sort(b.reshape(n_group, size), axis=1)[:, -2:].sum(axis=1)
        if len(set(g.tolist())) == n_group:
            return b.astype(np.float32)
    raise AssertionError(f"no bias permutation separates {n_group} groups of {size}")


def biased_copy(tmp, mdir, tag, rng, config_over=None):
    """A copy of the model directory whose e_score_correction_bias rows are 0, 10, 20, ... in a
    random order, with config_over applied to its config.json.

    For noaux_tc the bias then decides the expert and group choice alone (the scores are in
    [0, 1], and no two groups tie: _separating_bias). Our greedy and group_limited_greedy routers ignore the stored bias (DeepSeek-V2's
    rules have none), so there it checks that an export does too: a nonzero stored bias must not reach a format whose router
    adds it."""
    from safetensors.numpy import load_file, save_file
    out = os.path.join(tmp, f"{tag}_biased")
    os.makedirs(out)
    with open(os.path.join(mdir, "config.json")) as f:
        c = json.load(f)
    c.update(config_over or {})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f)
    st = load_file(os.path.join(mdir, "model.safetensors"))
    n = 0
    for k in st:
        if k.endswith("e_score_correction_bias"):
            st[k] = _separating_bias(len(st[k]), c.get("n_group", 1) or 1, rng)
            n += 1
    assert n > 0, f"{mdir}: no e_score_correction_bias rows"
    save_file(st, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out, st


def our_encode(tokenizer, texts):
    """Our tokenizer's ids for each text (one process, --jsonl)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
        path = f.name
    try:
        out = run(["tokenizer", "encode", "--tokenizer", tokenizer, "--input", path, "--jsonl"]).stdout.decode()
    finally:
        os.unlink(path)
    return [json.loads(line) for line in out.strip().splitlines()]


TEXTS = ["hello world", "  two  spaces and\ttabs\n\nnew lines  ", "numbers 12345 and 3.14159!",
         "unicode: caf\u00e9 na\u00efve \u00fcber \u4e2d\u6587 \U0001f600", "punctuation... (yes) [no] {maybe}",
         "don't you'll we've I'm they're", ""]


def train_tokenizer(tmp, rng, vocab):
    words = ["the", "cat", "sat", "on", "mat", "hello", "world", "token", "izer", "export", "llama", "deep", "seek"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), 4000)) + "\n" + " 123 4567 89\n" * 50
    src = os.path.join(tmp, "corpus.txt")
    with open(src, "w") as f:
        f.write(text)
    out = os.path.join(tmp, "tokenizer.json")
    run(["tokenizer", "train", "--input", src, "--vocab-size", vocab, "--out", out])
    return out


def _round_bf16(x):
    """fp32 -> bf16 -> fp32, round to nearest even (ggml_compute_fp32_to_bf16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def _round_q8_0(x):
    """Q8_0 along the last axis (formats.md: blocks of 32, d = amax / 127 stored as f16,
    q = round(x / d)), dequantised back to fp32."""
    shape = x.shape
    b = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127.0
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    q = np.clip(np.trunc(b * inv + np.copysign(0.5, b)), -127, 127)  # roundf: half away from zero
    return (q * d.astype(np.float16).astype(np.float32)).astype(np.float32).reshape(shape)


def round_like_gguf(st, cfg, dtype):
    """The HF tensors as a GGUF export of `dtype` stores them, rounded back to fp32 in numpy
    (from formats.md, not from our C): 2-D weights rounded along their input dimension (GGUF's
    ne0), q8_0 only where ne0 is a multiple of 32 (f16 otherwise); norms, the router weight
    and biases stay f32. kv_b_proj is rounded in the attn_k_b / attn_v_b layouts the file holds
    (k_b is transposed, so its blocks run along qk_nope_head_dim)."""
    def rnd(x):
        if dtype == "f16" or (dtype == "q8_0" and x.shape[-1] % 32):
            return x.astype(np.float16).astype(np.float32)
        return _round_bf16(x) if dtype == "bf16" else _round_q8_0(x)
    H, Dn, Dv, C = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    out = {}
    for k, v in st.items():
        if v.ndim != 2 or "norm" in k or k.endswith("mlp.gate.weight"):
            out[k] = v
        elif k.endswith("kv_b_proj.weight"):
            kv = v.reshape(H, Dn + Dv, C)
            k_b = rnd(np.ascontiguousarray(np.transpose(kv[:, :Dn, :], (0, 2, 1))))   # [H, C, Dn]
            v_b = rnd(np.ascontiguousarray(kv[:, Dn:, :]))                           # [H, Dv, C]
            out[k] = np.concatenate([np.transpose(k_b, (0, 2, 1)), v_b], axis=1).reshape(v.shape)
        else:
            out[k] = rnd(v)
    return out


def rounded_copy(tmp, mdir, tag, dtype):
    """A copy of the model directory with its weights rounded as a GGUF of `dtype` stores them."""
    from safetensors.numpy import load_file, save_file
    out = os.path.join(tmp, f"{tag}_{dtype}_rounded")
    os.makedirs(out)
    shutil.copy(os.path.join(mdir, "config.json"), os.path.join(out, "config.json"))
    with open(os.path.join(mdir, "config.json")) as f:
        cfg = json.load(f)
    st = round_like_gguf(load_file(os.path.join(mdir, "model.safetensors")), cfg, dtype)
    save_file(st, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out
