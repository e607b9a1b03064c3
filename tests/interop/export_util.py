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
import subprocess
import sys
import tempfile

import numpy as np

NM_BIN = os.environ.get("NM_BIN")


def need_bin():
    if not NM_BIN or not os.path.exists(NM_BIN):
        print("NM_BIN not set or missing: skipped")
        sys.exit(77)


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


def biased_copy(tmp, mdir, tag, rng, config_over=None):
    """A copy of the model directory whose e_score_correction_bias rows are 0, 10, 20, ... in a
    random order, with config_over applied to its config.json.

    For noaux_tc the bias then decides the expert and group choice alone (the scores are in
    [0, 1]). Our greedy and group_limited_greedy routers ignore the stored bias (DeepSeek-V2's
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
            st[k] = (10.0 * rng.permutation(len(st[k]))).astype(np.float32)
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
