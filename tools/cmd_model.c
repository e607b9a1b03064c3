// cmd_model.c: `nanomegatron init` (a freshly initialised Hugging Face model directory from a
// config.json) and `nanomegatron inspect --model DIR | --config C.json` (parameter counts by
// block, active parameters and training FLOPs per token; the last stdout line is one JSON
// object for scripts).
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "args.h"
#include "commands.h"
#include "core/check.h"
#include "core/fileio.h"
#include "io/hf_dir.h"
#include "model/config.h"
#include "model/flops.h"
#include "model/params.h"

// "671.03B", "72.1M", "9.5K"
static const char *human(char *buf, size_t n, double x) {
    if (x >= 1e9) snprintf(buf, n, "%.2fB", x / 1e9);
    else if (x >= 1e6) snprintf(buf, n, "%.2fM", x / 1e6);
    else if (x >= 1e3) snprintf(buf, n, "%.1fK", x / 1e3);
    else snprintf(buf, n, "%.0f", x);
    return buf;
}

// Physical memory in bytes (0 when unknown), to refuse allocations that cannot succeed with a
// message instead of an out-of-memory abort.
static double phys_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (double)pages * (double)page : 0.0;
}

// --- init ------------------------------------------------------------------------------------

// init writes config.json and model.safetensors into --out: into a directory that already
// holds something (above all a training run, whose checkpoints and trainer.json would then
// sit beside an unrelated fresh model) it would mix two models, so only a new or empty one.
static int check_out_dir(const char *out) {
    nm_error err;
    if (nm_dir_check_new(out, &err) == 0) return 0;
    char probe[4200];
    snprintf(probe, sizeof(probe), "%.4000s/trainer.json", out);
    int run = access(probe, F_OK) == 0;
    snprintf(probe, sizeof(probe), "%.4000s/latest", out);
    run |= access(probe, F_OK) == 0;
    if (run)
        fprintf(stderr, "init: --out %s is a training run directory (its checkpoints would sit beside an unrelated fresh "
                        "model); choose a new --out or remove %s\n", out, out);
    else
        fprintf(stderr, "init: --out %s; choose a new --out or remove %s\n", err.msg, out);
    return 1;
}

int nm_cmd_init(int argc, char **argv) {
    static const char *const vflags[] = {"config", "out", "seed", "dtype", NULL};
    nm_args a;
    if (nm_args_parse(&a, "init", argc, argv, vflags, NULL)) return 2;
    const char *cfg_path = nm_args_str(&a, "config", NULL), *out = nm_args_str(&a, "out", NULL);
    const char *dtype = nm_args_str(&a, "dtype", "fp32");
    int64_t seed;
    if (!cfg_path || !out) {
        fprintf(stderr, "usage: nanomegatron init --config C.json --out DIR [--seed S] [--dtype fp32|bf16]\n");
        return 2;
    }
    if (nm_args_i64_in(&a, "seed", 1234, 0, NM_ARGS_SEED_MAX, &seed)) return 2;
    if (strcmp(dtype, "fp32") != 0 && strcmp(dtype, "bf16") != 0) {
        fprintf(stderr, "init: --dtype must be fp32 or bf16, got '%s'\n", dtype);
        return 2;
    }
    if (check_out_dir(out)) return 1;
    nm_error err;
    nm_model_config cfg;
    if (nm_model_config_load(&cfg, cfg_path, &err)) {
        fprintf(stderr, "init: %s\n", err.msg);
        return 1;
    }
    nm_param_table t;
    if (nm_param_table_build(&t, &cfg, &err)) {
        fprintf(stderr, "init: %s\n", err.msg);
        nm_model_config_free(&cfg);
        return 1;
    }
    double bytes = (double)t.n_floats * 4.0, phys = phys_bytes();
    char hb[32], hp[32];
    int rc = 0;
    if (phys > 0 && bytes > 0.8 * phys) {
        fprintf(stderr, "init: %s: the fp32 parameters need %s bytes but this machine has %s bytes of memory\n",
                cfg_path, human(hb, sizeof(hb), bytes), human(hp, sizeof(hp), phys));
        rc = 1;
    } else {
        float *params = nm_aligned_alloc(t.n_floats * sizeof(float));  // (n_floats)
        nm_params_init(params, &t, &cfg, (uint64_t)seed);
        if (nm_hf_dir_save(out, &cfg, &t, params, !strcmp(dtype, "bf16"), &err)) {
            fprintf(stderr, "init: %s\n", err.msg);
            rc = 1;
        } else {
            char hm[32], ht[32];
            printf("init: %s params (+ %s MTP) from %s, seed %lld, %s -> %s/model.safetensors\n",
                   human(hm, sizeof(hm), (double)t.n_params_main), human(ht, sizeof(ht), (double)t.n_params_mtp),
                   cfg_path, (long long)seed, dtype, out);
        }
        nm_free(params);
    }
    nm_param_table_free(&t);
    nm_model_config_free(&cfg);
    return rc;
}

// --- inspect ---------------------------------------------------------------------------------

enum { B_EMBED, B_ATTN, B_DENSE, B_ROUTED, B_SHARED, B_ROUTER, B_NORM, B_HEAD, B_MTP, B_COUNT };

static const char *const block_names[B_COUNT] = {
    "embedding", "attention (MLA)", "dense MLP", "MoE routed experts", "MoE shared experts",
    "MoE router (weight + bias)", "norms", "lm_head", "MTP blocks (unique)",
};
static const char *const block_keys[B_COUNT] = {
    "embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "head", "mtp",
};

static int classify(const nm_tensor_spec *r) {
    if (r->flags & NM_TENSOR_MTP) return B_MTP;
    if (r->flags & NM_TENSOR_NORM) return B_NORM;
    if (!strcmp(r->name, "model.embed_tokens.weight")) return B_EMBED;
    if (!strcmp(r->name, "lm_head.weight")) return B_HEAD;
    if (r->flags & NM_TENSOR_EXPERT) return B_ROUTED;
    if (strstr(r->name, ".self_attn.")) return B_ATTN;
    if (strstr(r->name, ".mlp.shared_experts.")) return B_SHARED;
    if (strstr(r->name, ".mlp.gate.")) return B_ROUTER;
    return B_DENSE;
}

int nm_cmd_inspect_model(int argc, char **argv) {
    static const char *const vflags[] = {"model", "config", "seq-len", NULL};
    nm_args a;
    if (nm_args_parse(&a, "inspect", argc, argv, vflags, NULL)) return 2;
    const char *dir = nm_args_str(&a, "model", NULL), *cfg_path = nm_args_str(&a, "config", NULL);
    int64_t T;
    if ((!dir) == (!cfg_path)) {
        fprintf(stderr, "usage: nanomegatron inspect --model DIR | --config C.json [--seq-len T]\n");
        return 2;
    }
    if (nm_args_i64_in(&a, "seq-len", 4096, 1, 1 << 30, &T)) return 2;
    nm_error err;
    nm_model_config cfg;
    int rc = dir ? nm_hf_dir_load_config(dir, &cfg, &err) : nm_model_config_load(&cfg, cfg_path, &err);
    if (rc) {
        fprintf(stderr, "inspect: %s\n", err.msg);
        return 1;
    }
    nm_param_table t;
    if (nm_param_table_build(&t, &cfg, &err)) {
        fprintf(stderr, "inspect: %s\n", err.msg);
        nm_model_config_free(&cfg);
        return 1;
    }

    // With --model, validate the weights too: load them when they fit in memory, otherwise
    // check names, shapes and file integrity only.
    const char *weights = "none";
    int64_t nonfinite = -1;
    double sum = 0, abs_sum = 0;  // over the unique tensors, for cross-checks with other readers
    if (dir) {
        double bytes = (double)t.n_floats * 4.0, phys = phys_bytes();
        float *params = (phys == 0 || bytes < 0.5 * phys) ? nm_aligned_alloc(t.n_floats * sizeof(float)) : NULL;
        if (params ? nm_hf_dir_load_model(dir, &t, &cfg, 0, params, &err) : nm_hf_dir_load_params(dir, &t, NULL, &err)) {
            fprintf(stderr, "inspect: %s\n", err.msg);
            nm_free(params);
            nm_param_table_free(&t);
            nm_model_config_free(&cfg);
            return 1;
        }
        weights = params ? "loaded" : "checked";
        if (params) {
            nonfinite = 0;
            for (size_t i = 0; i < t.n_floats; i++) nonfinite += !isfinite(params[i]);
            for (int r = 0; r < t.n_rows; r++) {
                if (t.rows[r].flags & NM_TENSOR_TIED) continue;
                const float *x = params + t.rows[r].offset;
                for (int64_t i = 0; i < t.rows[r].numel; i++) sum += x[i], abs_sum += fabs(x[i]);
            }
        }
        nm_free(params);
    }

    int64_t per_block[B_COUNT] = {0};
    for (int r = 0; r < t.n_rows; r++) {
        if (t.rows[r].flags & NM_TENSOR_TIED) continue;
        per_block[classify(&t.rows[r])] += t.rows[r].numel;
    }
    int64_t n_moe = 0, n_dense = 0;
    for (int64_t l = 0; l < cfg.L; l++) n_moe += nm_layer_is_moe(&cfg, l), n_dense += !nm_layer_is_moe(&cfg, l);
    int64_t active = nm_model_params_active(&cfg), matmul = nm_model_matmul_params_active(&cfg);
    double flops = nm_model_flops_per_token(&cfg, T);
    double flops_attn = flops - 6.0 * (double)matmul;
    char h1[32], h2[32], h3[32];

    printf("model  %s%s\n", dir ? dir : cfg_path, dir ? "" : " (config only)");
    printf("  %lld layers (%lld dense, %lld MoE) + %lld MTP | D %lld | H %lld (Dn %lld, Dr %lld, Dv %lld) | "
           "q_lora %lld | kv_lora %lld | V %lld\n",
           (long long)cfg.L, (long long)n_dense, (long long)n_moe, (long long)cfg.M, (long long)cfg.D,
           (long long)cfg.H, (long long)cfg.Dn, (long long)cfg.Dr, (long long)cfg.Dv, (long long)cfg.Rq,
           (long long)cfg.Rkv, (long long)cfg.V);
    if (cfg.E > 0) {
        printf("  MoE: %lld routed experts (width %lld), top-%lld, %lld groups keep %lld, %lld shared, %s scores\n",
               (long long)cfg.E, (long long)cfg.Fe, (long long)cfg.K, (long long)cfg.G, (long long)cfg.Gk,
               (long long)cfg.n_shared, cfg.scoring == NM_SCORING_SIGMOID ? "sigmoid" : "softmax");
    }
    if (cfg.yarn) {
        printf("  YaRN factor %g (orig %lld): softmax scale %.6f, cos/sin factor %.6f\n", cfg.yarn_factor,
               (long long)cfg.yarn_orig_max_pos, cfg.softmax_scale, cfg.rope_attn_factor);
    }
    printf("\n  %-28s %16s %8s %16s %7s\n", "block", "per layer", "layers", "total", "share");
    for (int b = 0; b < B_COUNT; b++) {
        int64_t layers = b == B_ATTN ? cfg.L : b == B_DENSE ? n_dense
                       : (b == B_ROUTED || b == B_SHARED || b == B_ROUTER) ? n_moe : b == B_MTP ? cfg.M : 0;
        double share = 100.0 * (double)per_block[b] / (double)(b == B_MTP ? t.n_params_main + t.n_params_mtp
                                                                          : t.n_params_main);
        if (layers > 0) {
            printf("  %-28s %16lld %8lld %16lld %6.2f%%\n", block_names[b], (long long)(per_block[b] / layers),
                   (long long)layers, (long long)per_block[b], share);
        } else if (per_block[b] > 0 || b == B_EMBED) {
            printf("  %-28s %16s %8s %16lld %6.2f%%\n", block_names[b], "", "", (long long)per_block[b], share);
        }
    }
    printf("\n  total (main model)   %16lld  (%s)\n", (long long)t.n_params_main,
           human(h1, sizeof(h1), (double)t.n_params_main));
    printf("  MTP (unique)         %16lld  (%s)\n", (long long)t.n_params_mtp, human(h1, sizeof(h1), (double)t.n_params_mtp));
    printf("  active per token     %16lld  (%s; head counted; embedding lookup and MTP excluded)\n", (long long)active,
           human(h1, sizeof(h1), (double)active));
    printf("  training FLOPs/token %16.4g  at T = %lld: 6 x %s matmul weights + %s attention (%.1f%%)\n", flops,
           (long long)T, human(h2, sizeof(h2), (double)matmul), human(h3, sizeof(h3), flops_attn),
           100.0 * flops_attn / flops);
    if (dir) {
        if (nonfinite >= 0) printf("  weights              %s, %lld non-finite values\n", weights, (long long)nonfinite);
        else printf("  weights              %s (names, shapes, file integrity; too large to load here)\n", weights);
    }

    printf("{\"params_total\":%lld,\"params_mtp\":%lld,\"params_active\":%lld,\"params_matmul_active\":%lld,"
           "\"flops_per_token\":%.6e,\"seq_len\":%lld,\"n_layers\":%lld,\"n_dense_layers\":%lld,\"n_moe_layers\":%lld,"
           "\"n_mtp_layers\":%lld,\"n_tensors\":%d,\"n_floats\":%zu",
           (long long)t.n_params_main, (long long)t.n_params_mtp, (long long)active, (long long)matmul, flops,
           (long long)T, (long long)cfg.L, (long long)n_dense, (long long)n_moe, (long long)cfg.M, t.n_rows, t.n_floats);
    for (int b = 0; b < B_COUNT; b++) printf(",\"%s\":%lld", block_keys[b], (long long)per_block[b]);
    printf(",\"softmax_scale\":%.9g,\"weights\":\"%s\"", cfg.softmax_scale, weights);
    if (nonfinite >= 0) {
        printf(",\"nonfinite\":%lld,\"param_sum\":%.17g,\"param_abs_sum\":%.17g", (long long)nonfinite, sum, abs_sum);
    }
    printf("}\n");

    nm_param_table_free(&t);
    nm_model_config_free(&cfg);
    return 0;
}
