"""`nanomegatron export --format gguf` run by llama.cpp (PyPI llama-cpp-python, built in the
venv) and read by PyPI's `gguf` package (an independent reader).

For fresh random models of every config in export_util.VARIANTS (q_lora null, softmax and
greedy routing, group limits, tied embeddings, YaRN with mscale != mscale_all_dim, leading
dense blocks, moe_layer_freq 2 with no shared experts, MTP and none):
1. gguf.GGUFReader: architecture deepseek2, the keys llama.cpp's deepseek2 loader reads with
   their values and GGUF types, tensor names / shapes / types, and the data of attn_k_b,
   attn_v_b and the stacked experts against the HF tensors rearranged in numpy from
   formats.md 3.6 (not from our C);
2. llama.cpp's logits on a random prompt equal our `forward` logits: f32 within
   1e-5 * max|logit| at every position (llama.cpp's KV cache set to f32; measured at most 7.1e-7).
   f16, bf16 and q8_0 files are compared at every position with our forward on the same
   weights rounded in numpy as the file stores them (export_util.round_like_gguf, from
   formats.md), within 2e-3, 2e-2 and 5e-2 (llama.cpp also rounds the activations; see
   TOL_ROUNDED). Against fp32 weights the rounding alone moved one position in ten seeds by
   up to 0.35 of max|logit| in our own forward, so that comparison is printed, not checked.
   The rounded files run on a copy of the model without a discrete choice to flip: for
   noaux_tc, router biases 0, 10, 20, ... that decide the choice alone
   (export_util.biased_copy); greedy methods ignore the bias, so there
   num_experts_per_tok = n_routed_experts (every expert chosen, the gating weights still from
   the scores). The f32 case keeps the real top-k choice;
2b. greedy routing with a nonzero stored bias (which our router ignores): the export's
   exp_probs_b is all zero (llama.cpp would add it for every method) and the f32 logits equal
   ours;
3. greedy generation with llama.cpp (f32 file) equals `nanomegatron sample --temperature 0`;
4. llama.cpp tokenizes like our tokenizer (a trained BPE and the byte tokenizer);
5. a run directory (with --step) exports; group_limited_greedy with a real group limit is
   refused with a message.

Needs numpy, gguf and llama_cpp (the .venv of scripts/deps.sh); exit 77 without.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_util as U  # noqa: E402

U.need_bin()
try:
    import numpy as np
    import gguf
    import llama_cpp
    from llama_cpp import Llama
    from safetensors.numpy import load_file
except Exception as e:
    skip(f"gguf / llama_cpp / safetensors not available ({e}): scripts/deps.sh --with-venv installs them")

SEED, rng = U.seed_and_rng("test_export_gguf")
print(f"llama-cpp-python {llama_cpp.__version__}")
failures = []
# Two fp32 implementations: over 15 seeds (75 comparisons) at most 7.1e-7 of max|logit| (was 1e-4).
TOL = {"fp32": 1e-5}
# llama.cpp rounds each matmul's activations to the weight type (f16: 11 significant bits,
# bf16: 8, q8_0: 8 per 32-block of the block's largest value), through 3-4 layers of
# attention and experts: measured over 63 seeds at most 8.6e-4, 9.5e-3 and 2.5e-2 of max|logit|;
# the bounds leave 2x.
TOL_ROUNDED = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}
GGML_TYPE = {"fp32": 0, "f16": 1, "q8_0": 8, "bf16": 30}


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        failures.append(msg)


def load_llama(path, n_ctx=128):
    # f32 KV cache: the default f16 one would round the latent keys and values.
    # Plain CPU buffers (model params use_extra_bufts = false, which llama-cpp-python's Llama does
    # not expose): with llama.cpp's extra buffer types (weight repacking; the AMX buffers on a CPU
    # with AMX) llama-cpp-python 0.3.36 aborts in ggml_backend_sched_split_graph
    # (GGML_ASSERT(*cur_backend_id != -1)) loading the f16 export of these tiny models on an
    # AMX machine (Sapphire Rapids), the same files pass everywhere without them. What is
    # compared is the logits of the file, which the plain buffers compute the same way.
    lib = llama_cpp.llama_cpp
    defaults = lib.llama_model_default_params

    def plain_buffers():
        p = defaults()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = plain_buffers
    try:
        return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2,
                     type_k=0, type_v=0, seed=0)
    finally:
        lib.llama_model_default_params = defaults


def llama_logits(llm, ids):
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        return None, None
    t = f.types[0]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode(), t
    if t == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data], t
    return f.parts[f.data[0]][0].item(), t


def expected_keys(c):
    """The keys llama.cpp's deepseek2 loader reads (formats.md 3.5), from the HF config."""
    U32, F32, B = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.BOOL
    L, E = c["num_hidden_layers"], c["n_routed_experts"]
    moe = [l >= c["first_k_dense_replace"] and l % c["moe_layer_freq"] == 0 for l in range(L)]
    lead = moe.index(True) if any(moe) else L
    n_sh = max(c["n_shared_experts"], 1)
    if not all(moe[lead:]):
        n_sh = max(n_sh, -(-c["intermediate_size"] // c["moe_intermediate_size"]))
    k = {
        "context_length": (c["max_position_embeddings"], U32), "embedding_length": (c["hidden_size"], U32),
        "block_count": (L, U32), "feed_forward_length": (c["intermediate_size"], U32),
        "leading_dense_block_count": (lead, U32), "attention.head_count": (c["num_attention_heads"], U32),
        "attention.head_count_kv": (1, U32),
        "attention.key_length": (c["kv_lora_rank"] + c["qk_rope_head_dim"], U32),
        "attention.value_length": (c["kv_lora_rank"], U32),
        "attention.key_length_mla": (c["qk_nope_head_dim"] + c["qk_rope_head_dim"], U32),
        "attention.value_length_mla": (c["v_head_dim"], U32),
        "attention.q_lora_rank": (c["q_lora_rank"] or 0, U32), "attention.kv_lora_rank": (c["kv_lora_rank"], U32),
        "attention.layer_norm_rms_epsilon": (c["rms_norm_eps"], F32),
        "rope.dimension_count": (c["qk_rope_head_dim"], U32), "rope.freq_base": (c["rope_theta"], F32),
        "expert_count": (E, U32), "expert_used_count": (c["num_experts_per_tok"], U32),
        "expert_shared_count": (n_sh, U32), "expert_feed_forward_length": (c["moe_intermediate_size"], U32),
        "expert_weights_scale": (c["routed_scaling_factor"], F32), "expert_weights_norm": (c["norm_topk_prob"], B),
        "expert_gating_func": (2 if c["scoring_func"] == "sigmoid" else 1, U32),
    }
    if c["n_group"] > 1 and c["topk_group"] < c["n_group"]:
        k["expert_group_count"] = (c["n_group"], U32)
        k["expert_group_used_count"] = (c["topk_group"], U32)
    if c["rope_scaling"]:
        rs = c["rope_scaling"]
        k["rope.scaling.type"] = ("yarn", gguf.GGUFValueType.STRING)
        k["rope.scaling.factor"] = (rs["factor"], F32)
        k["rope.scaling.original_context_length"] = (rs["original_max_position_embeddings"], U32)
    return k


def check_reader(path, c, st, dtype, name):
    r = gguf.GGUFReader(path)
    arch, _ = field(r, "general.architecture")
    check(arch == "deepseek2", f"{name}: general.architecture {arch}")
    bad = []
    for k, (want, wt) in expected_keys(c).items():
        got, gt = field(r, "deepseek2." + k)
        if gt != wt or (isinstance(want, float) and abs(got - want) > 1e-6 * max(1, abs(want))) or \
                (not isinstance(want, float) and got != want):
            bad.append(f"{k}: {got!r} ({gt}) want {want!r} ({wt})")
    check(not bad, f"{name}: deepseek2 keys and types {'; '.join(bad)}")
    toks, tt = field(r, "tokenizer.ggml.tokens")
    check(len(toks) == c["vocab_size"] and field(r, "tokenizer.ggml.model")[0] == "gpt2"
          and field(r, "tokenizer.ggml.token_type")[0] is not None and field(r, "tokenizer.ggml.merges")[0] is not None,
          f"{name}: tokenizer keys ({len(toks)} tokens)")
    T = {t.name: t for t in r.tensors}
    L, H = c["num_hidden_layers"], c["num_attention_heads"]
    Dn, Dv, C = c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    check(not any(n.startswith(f"blk.{L}.") for n in T), f"{name}: no MTP tensors")
    check(("output.weight" in T) != bool(c["tie_word_embeddings"]), f"{name}: output.weight iff untied")
    want_type = GGML_TYPE[dtype]
    types_ok = all(int(t.tensor_type) == (0 if (len(t.shape) == 1 or "norm" in t.name or "gate_inp" in t.name
                                                or t.name.endswith(".bias")) else
                                          (1 if dtype == "q8_0" and t.shape[0] % 32 else want_type))
                   for t in r.tensors)
    check(types_ok, f"{name}: tensor types for {dtype}")
    if st is None:
        return
    # Data rearrangements, from formats.md 3.6, checked on layer 0 and the last layer.
    for l in [0, L - 1]:
        kv_b = st[f"model.layers.{l}.self_attn.kv_b_proj.weight"].reshape(H, Dn + Dv, C)
        k_b = np.transpose(kv_b[:, :Dn, :], (0, 2, 1))          # [H, C, Dn]
        v_b = kv_b[:, Dn:, :]                                    # [H, Dv, C]
        gk = np.asarray(T[f"blk.{l}.attn_k_b.weight"].data).reshape(H, C, Dn)
        gv = np.asarray(T[f"blk.{l}.attn_v_b.weight"].data).reshape(H, Dv, C)
        check(np.array_equal(gk, k_b) and np.array_equal(gv, v_b), f"{name}: blk.{l} attn_k_b / attn_v_b data")
        if f"blk.{l}.ffn_up_exps.weight" in T and f"model.layers.{l}.mlp.experts.0.up_proj.weight" in st:
            up = np.stack([st[f"model.layers.{l}.mlp.experts.{e}.up_proj.weight"] for e in range(c["n_routed_experts"])])
            got = np.asarray(T[f"blk.{l}.ffn_up_exps.weight"].data).reshape(up.shape)
            check(np.array_equal(got, up), f"{name}: blk.{l} ffn_up_exps stacked in expert order")
    # exp_probs_b: the stored bias for noaux_tc; zeros otherwise (our router ignores it there).
    bad = []
    for l in range(L):
        if f"blk.{l}.exp_probs_b.bias" not in T:
            continue
        got = np.asarray(T[f"blk.{l}.exp_probs_b.bias"].data)
        stored = st.get(f"model.layers.{l}.mlp.gate.e_score_correction_bias")
        want = stored if stored is not None and c["topk_method"] == "noaux_tc" else np.zeros(c["n_routed_experts"])
        if not np.array_equal(got, want):
            bad.append(f"blk.{l} {got[:4]} want {want[:4]}")
    check(not bad, f"{name}: exp_probs_b {'= stored bias' if c['topk_method'] == 'noaux_tc' else 'all zero'}"
          f" {'; '.join(bad)}")
    q = np.asarray(T["token_embd.weight"].data).reshape(c["vocab_size"], c["hidden_size"])
    check(np.array_equal(q, st["model.embed_tokens.weight"]), f"{name}: token_embd data")


def greedy_llama(llm, prompt_ids, n):
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1])))
        out.append(nxt)
        llm.eval([nxt])
    return out


with tempfile.TemporaryDirectory() as tmp:
    for vi, name in enumerate(U.VARIANTS):
        cfg, _ = U.make_config(name, vocab=257)  # = the byte tokenizer, so sample can decode every id
        mdir = U.init_model(tmp, name, cfg, int(rng.integers(1, 1 << 30)))
        st = load_file(os.path.join(mdir, "model.safetensors"))
        T = 32
        ids = rng.integers(0, 257, size=(1, T)).astype(np.int32)
        biased, bst = U.biased_copy(tmp, mdir, name, rng)
        if cfg["topk_method"] == "noaux_tc":
            exact, exact_st, fixed, fixed_cfg = mdir, st, biased, cfg
        else:
            # The f32 export starts from the biased copy (2b); our router ignores the bias.
            exact, exact_st = biased, bst
            all_k = {"num_experts_per_tok": cfg["n_routed_experts"]}
            fixed, _ = U.biased_copy(tmp, mdir, name + "_all", rng, all_k)
            fixed_cfg = dict(cfg, **all_k)
        ours_by_model = {exact: U.our_logits(tmp, exact, ids)[0], fixed: U.our_logits(tmp, fixed, ids)[0]}
        if exact is biased:
            check(np.array_equal(ours_by_model[exact], U.our_logits(tmp, mdir, ids)[0]),
                  f"{name}: our {cfg['topk_method']} logits do not depend on the stored bias")
        for dtype in (["fp32", "f16", "bf16", "q8_0"] if vi < 2 else ["fp32", "q8_0"]):
            model = exact if dtype == "fp32" else fixed
            ours = ours_by_model[model]
            out = os.path.join(tmp, f"{name}_{dtype}.gguf")
            p = U.run(["export", "--model", model, "--out", out, "--format", "gguf", "--dtype", dtype])
            check_reader(out, cfg if dtype == "fp32" else fixed_cfg, exact_st if dtype == "fp32" else None, dtype,
                         f"{name} {dtype}")
            llm = load_llama(out)
            lc = llama_logits(llm, ids[0])
            per_pos = np.abs(lc - ours).max(axis=1) / np.abs(ours).max()
            if dtype == "fp32":
                e = float(per_pos.max())
                check(e <= TOL[dtype], f"{name} {dtype}: llama.cpp logits vs ours rel err {e:.2e} (tol {TOL[dtype]:g})")
            else:
                # Against our forward on the same weights rounded in numpy as the file stores
                # them (export_util.round_like_gguf): what is left is llama.cpp rounding the
                # activations to the weight type before each matmul.
                rq = U.our_logits(tmp, U.rounded_copy(tmp, model, name, dtype), ids)[0]
                per_pos_r = np.abs(lc - rq).max(axis=1) / np.abs(rq).max()
                e = float(per_pos_r.max())
                check(e <= TOL_ROUNDED[dtype],
                      f"{name} {dtype}: llama.cpp logits vs ours on the rounded weights rel err max {e:.2e} "
                      f"(tol {TOL_ROUNDED[dtype]:g}); vs ours on fp32 weights median {np.median(per_pos):.2e} "
                      f"max {per_pos.max():.2e}")
            if dtype == "fp32":
                prompt = "the cat sat"
                pids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
                gen = greedy_llama(llm, pids, 24)
                s = U.run(["sample", "--model", model, "--prompt", prompt, "--tokens", 24, "--temperature", 0]).stdout
                # special=True: sample prints <|endoftext|> (id 256) as its text; llama.cpp's
                # default detokenize drops it, which failed whenever greedy decoding reached it.
                want = prompt.encode() + llm.detokenize(gen, special=True) + b"\n"
                check(s == want, f"{name}: llama.cpp greedy == sample --temperature 0 ({gen[:8]}...)")
            del llm

    # Tokenizers in llama.cpp.
    cfg, _ = U.make_config("v3_like")
    mdir = U.init_model(tmp, "tok", cfg, int(rng.integers(1, 1 << 30)))
    trained = U.train_tokenizer(tmp, rng, 290)
    for tok in [trained, "bytes"]:
        out = os.path.join(tmp, f"tok_{os.path.basename(tok)}.gguf")
        U.run(["export", "--model", mdir, "--out", out, "--format", "gguf", "--tokenizer", tok])
        llm = Llama(model_path=out, n_ctx=64, verbose=False, vocab_only=True)
        want = U.our_encode(tok, U.TEXTS)
        got = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in U.TEXTS]
        check(got == want, f"llama.cpp tokenizes like our {os.path.basename(tok)} tokenizer")
        if got != want:
            for t, g, w in zip(U.TEXTS, got, want):
                if g != w:
                    print(f"     {t!r}: llama.cpp {g} ours {w}")
        del llm

    # A run directory with --step.
    run_dir = os.path.join(tmp, "run")
    tc = os.path.join(tmp, "train.json")
    with open(os.path.join(os.environ.get("NM_ROOT", "."), "configs", "tiny-train.json")) as f:
        train_cfg = json.load(f)
    with open(os.path.join(tmp, "model_cfg.json"), "w") as f:
        json.dump(U.make_config("v3_like")[0], f)
    train_cfg["model"] = os.path.join(tmp, "model_cfg.json")
    with open(tc, "w") as f:
        json.dump(train_cfg, f)
    U.run(["train", "--config", tc, "--out", run_dir, "--steps", 2, "--save-every", 1, "--quiet"])
    out = os.path.join(tmp, "run.gguf")
    U.run(["export", "--model", run_dir, "--step", 1, "--out", out, "--format", "gguf"])
    llm = load_llama(out)
    ids = rng.integers(0, 257, size=(1, 12)).astype(np.int32)
    e = float(np.abs(llama_logits(llm, ids[0]) - U.our_logits(tmp, os.path.join(run_dir, "step_000001"), ids)[0]).max())
    check(e <= 1e-4 * 10, f"run dir --step 1: llama.cpp logits match (abs err {e:.2e})")
    del llm
    p = U.run(["export", "--model", run_dir, "--step", 7, "--out", out + "x", "--format", "gguf"], check=False)
    check(p.returncode == 1 and b"--step 7" in p.stderr, "missing --step refused")

    # Refusal: a group rule llama.cpp does not have.
    cfg, _ = U.make_config("v3_like")
    cfg["topk_method"] = "group_limited_greedy"
    mdir = U.init_model(tmp, "glg", cfg, 5)
    p = U.run(["export", "--model", mdir, "--out", os.path.join(tmp, "glg.gguf"), "--format", "gguf"], check=False)
    check(p.returncode == 1 and b"group_limited_greedy" in p.stderr and not os.path.exists(os.path.join(tmp, "glg.gguf")),
          "group_limited_greedy with a group limit refused")

print(f"{len(failures)} failed" if failures else "all passed")
sys.exit(1 if failures else 0)
