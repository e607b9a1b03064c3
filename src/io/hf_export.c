// hf_export.c: implementation of hf_export.h.
//
// Reference: formats.md 2.4 (shard names, index with metadata.total_size), 2.5 (the files
// and config keys transformers needs), transformers 4.51 modeling_deepseek_v3.py (what the
// native class computes: DeepseekV3TopkRouter is sigmoid + noaux_tc, layers are MoE from
// first_k_dense_replace on).
#define _GNU_SOURCE
#include "io/hf_export.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = nm_malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int write_text(const char *dir, const char *name, const char *text, nm_error *err) {
    char *path = join(dir, name);
    int rc = nm_file_write_atomic(path, text, strlen(text), err);
    nm_free(path);
    return rc;
}

static int write_json(const char *dir, const char *name, cJSON *obj, nm_error *err) {
    char *text = cJSON_Print(obj);
    size_t n = strlen(text);
    char *with_nl = nm_malloc(n + 2);
    memcpy(with_nl, text, n);
    memcpy(with_nl + n, "\n", 2);
    free(text);
    int rc = write_text(dir, name, with_nl, err);
    nm_free(with_nl);
    return rc;
}

static void set_item(cJSON *obj, const char *key, cJSON *v) {
    if (cJSON_GetObjectItemCaseSensitive(obj, key)) cJSON_ReplaceItemInObjectCaseSensitive(obj, key, v);
    else cJSON_AddItemToObject(obj, key, v);
}

// --- config.json ------------------------------------------------------------------------------

// 1 when some main-model layer at or after first_k_dense_replace is dense: transformers'
// native class would make it MoE.
static int has_interleaved_dense(const nm_model_config *cfg) {
    for (int64_t l = cfg->first_k_dense; l < cfg->L; l++) {
        if (cfg->E > 0 && !nm_layer_is_moe(cfg, l)) return 1;
    }
    return 0;
}

static cJSON *export_config(const nm_model_config *cfg, nm_st_dtype dtype) {
    cJSON *root = cJSON_Parse(cfg->json_text);
    NM_CHECK(root != NULL, "the loaded config.json text no longer parses");
    cJSON *arch = cJSON_CreateArray();
    cJSON_AddItemToArray(arch, cJSON_CreateString("DeepseekV3ForCausalLM"));
    set_item(root, "architectures", arch);
    set_item(root, "model_type", cJSON_CreateString("deepseek_v3"));
    set_item(root, "torch_dtype", cJSON_CreateString(dtype == NM_ST_F32 ? "float32" : dtype == NM_ST_BF16 ? "bfloat16" : "float16"));
    // Our weights are never FP8 (quantization_config would make transformers try), and the
    // export is for native loading, so the remote-code map goes too.
    cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config");
    cJSON_DeleteItemFromObjectCaseSensitive(root, "auto_map");
    const char *src = cfg->source_path ? cfg->source_path : "config.json";
    int limited = cfg->G > 1 && cfg->Gk < cfg->G;
    if (cfg->E > 0 && !nm_routing_uses_bias(cfg) && !limited) {
        // Plain top-K over all experts is noaux_tc over one group: the same choice and weights.
        set_item(root, "topk_method", cJSON_CreateString("noaux_tc"));
        set_item(root, "n_group", cJSON_CreateNumber(1));
        set_item(root, "topk_group", cJSON_CreateNumber(1));
    }
    if (cfg->E > 0 && cfg->scoring == NM_SCORING_SOFTMAX) {
        fprintf(stderr, "warning: %s: scoring_func \"softmax\": transformers' native DeepseekV3ForCausalLM always uses "
                        "sigmoid scores, so its outputs will differ from this model's (DeepSeek's remote code and "
                        "nanomegatron read the key)\n", src);
    }
    if (cfg->E > 0 && cfg->topk_method == NM_TOPK_GROUP_LIMITED_GREEDY && limited) {
        fprintf(stderr, "warning: %s: topk_method \"group_limited_greedy\" with topk_group %lld < n_group %lld: "
                        "transformers' native DeepseekV3ForCausalLM ranks groups by their top-2 sum (noaux_tc), so its "
                        "expert choice can differ from this model's\n", src, (long long)cfg->Gk, (long long)cfg->G);
    }
    if (has_interleaved_dense(cfg)) {
        fprintf(stderr, "warning: %s: moe_layer_freq %lld leaves dense layers after first_k_dense_replace: "
                        "transformers' native DeepseekV3ForCausalLM makes every layer from first_k_dense_replace on MoE "
                        "and will not load this directory (DeepSeek's remote code and nanomegatron do)\n",
                src, (long long)cfg->moe_layer_freq);
    }
    return root;
}

static cJSON *generation_config(const nm_model_config *cfg, const nm_export_vocab *vocab) {
    cJSON *g = cJSON_CreateObject();
    if (cfg->bos_id >= 0) cJSON_AddNumberToObject(g, "bos_token_id", (double)cfg->bos_id);
    // The tokenizer's end-of-document token is what generation must stop on; the config's
    // eos_token_id is a DeepSeek default that a small vocabulary may not even contain.
    int64_t eos = vocab->eod >= 0 ? vocab->eod : cfg->eos_id;
    if (eos >= 0) cJSON_AddNumberToObject(g, "eos_token_id", (double)eos);
    cJSON_AddBoolToObject(g, "do_sample", 0);
    return g;
}

static cJSON *tokenizer_config(const nm_model_config *cfg, const nm_export_vocab *vocab) {
    cJSON *c = cJSON_CreateObject();
    // PreTrainedTokenizerFast uses tokenizer.json as it is (LlamaTokenizerFast would rebuild
    // the post-processor and add a BOS our encoder never adds: formats.md 2.5).
    cJSON_AddStringToObject(c, "tokenizer_class", "PreTrainedTokenizerFast");
    cJSON_AddBoolToObject(c, "add_bos_token", 0);
    cJSON_AddBoolToObject(c, "add_eos_token", 0);
    cJSON_AddNullToObject(c, "bos_token");
    if (vocab->eod >= 0 && vocab->tokens[vocab->eod]) cJSON_AddStringToObject(c, "eos_token", vocab->tokens[vocab->eod]);
    else cJSON_AddNullToObject(c, "eos_token");
    cJSON_AddNullToObject(c, "pad_token");
    cJSON_AddNullToObject(c, "unk_token");
    cJSON_AddBoolToObject(c, "clean_up_tokenization_spaces", 0);
    cJSON_AddNumberToObject(c, "model_max_length", (double)cfg->max_pos);
    return c;
}

// --- tensors ----------------------------------------------------------------------------------

static int write_tensors(const char *dir, const nm_model_config *cfg, const nm_param_table *t, const float *params,
                         nm_st_dtype dtype, int64_t max_shard_bytes, nm_export_progress_fn progress, void *pctx,
                         nm_error *err) {
    int n = t->n_rows;
    nm_st_tensor *ts = nm_calloc((size_t)n + 1, sizeof(nm_st_tensor));
    // Only noaux_tc reads the stored bias; the other methods are exported as a noaux_tc router
    // (export_config) that would add it, so they get zeros to compute what we compute.
    float *zero_bias = !nm_routing_uses_bias(cfg) ? nm_calloc((size_t)cfg->E + 1, sizeof(float)) : NULL;
    int *shard = nm_calloc((size_t)n + 1, sizeof(int));
    int64_t total = 0, in_shard = 0;
    int n_shards = 1;
    for (int r = 0; r < n; r++) {
        const nm_tensor_spec *row = &t->rows[r];
        ts[r].name = row->name;
        ts[r].ndim = row->ndim;
        ts[r].shape[0] = row->shape[0];
        ts[r].shape[1] = row->shape[1];
        ts[r].data = params + row->offset;  // tied rows carry the owner's offset: written as copies
        if (zero_bias && (row->flags & NM_TENSOR_ROUTER_BIAS)) {
            NM_CHECK(row->numel <= cfg->E, "%s: %lld values, n_routed_experts %lld", row->name, (long long)row->numel,
                     (long long)cfg->E);
            ts[r].data = zero_bias;
        }
        // The aux-loss-free bias is kept in fp32 everywhere (dsv3-spec 9.10).
        ts[r].dtype = (row->flags & NM_TENSOR_ROUTER_BIAS) ? NM_ST_F32 : dtype;
        int64_t nb = row->numel * (ts[r].dtype == NM_ST_F32 ? 4 : 2);
        // Greedy packing in table order, as transformers' split_torch_state_dict_into_shards
        // does; a tensor larger than the limit gets a shard of its own.
        if (max_shard_bytes > 0 && in_shard > 0 && in_shard + nb > max_shard_bytes) {
            n_shards++;
            in_shard = 0;
        }
        shard[r] = n_shards - 1;
        in_shard += nb;
        total += nb;
    }
    int rc = 0;
    int64_t done = 0;
    cJSON *index = NULL, *map = NULL;
    if (n_shards > 1) {
        index = cJSON_CreateObject();
        cJSON *meta = cJSON_AddObjectToObject(index, "metadata");
        cJSON_AddNumberToObject(meta, "total_size", (double)total);
        map = cJSON_AddObjectToObject(index, "weight_map");
    }
    for (int s = 0, r0 = 0; s < n_shards && rc == 0; s++) {
        int r1 = r0;
        while (r1 < n && shard[r1] == s) r1++;
        char name[64];
        if (n_shards == 1) snprintf(name, sizeof(name), "model.safetensors");
        else snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        char *path = join(dir, name);
        rc = nm_safetensors_write(path, ts + r0, r1 - r0, err);
        nm_free(path);
        for (int r = r0; r < r1; r++) {
            done += t->rows[r].numel * (ts[r].dtype == NM_ST_F32 ? 4 : 2);
            if (map) cJSON_AddStringToObject(map, t->rows[r].name, name);
        }
        if (rc == 0 && progress) progress(pctx, done, total, name);
        r0 = r1;
    }
    if (rc == 0 && index) rc = write_json(dir, "model.safetensors.index.json", index, err);
    cJSON_Delete(index);
    nm_free(zero_bias);
    nm_free(shard);
    nm_free(ts);
    return rc;
}

// --- the directory ------------------------------------------------------------------------------

static int dir_is_absent_or_empty(const char *path, int *absent) {
    DIR *d = opendir(path);
    if (!d) {
        *absent = errno == ENOENT;
        return *absent;
    }
    *absent = 0;
    int empty = 1;
    for (struct dirent *e; empty && (e = readdir(d));) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
    }
    closedir(d);
    return empty;
}

static void remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = join(dir, e->d_name);
        unlink(p);
        nm_free(p);
    }
    closedir(d);
    rmdir(dir);
}

static int export_dir(const char *out_dir, const nm_model_config *cfg, const nm_param_table *t, const float *params,
                      const nm_export_vocab *vocab, nm_st_dtype dtype, int64_t max_shard_bytes,
                      nm_export_progress_fn progress, void *progress_ctx, nm_error *err);

int nm_hf_export(const char *out_dir, const nm_model_config *cfg, const nm_param_table *t, const float *params,
                 const nm_export_vocab *vocab, nm_st_dtype dtype, int64_t max_shard_bytes,
                 nm_export_progress_fn progress, void *progress_ctx, nm_error *err) {
    // "out/" must name out itself, so that the temporary directory is its sibling.
    char *dir = nm_strdup(out_dir);
    for (size_t n = strlen(dir); n > 1 && dir[n - 1] == '/'; n--) dir[n - 1] = 0;
    int rc = export_dir(dir, cfg, t, params, vocab, dtype, max_shard_bytes, progress, progress_ctx, err);
    nm_free(dir);
    return rc;
}

static int export_dir(const char *out_dir, const nm_model_config *cfg, const nm_param_table *t, const float *params,
                      const nm_export_vocab *vocab, nm_st_dtype dtype, int64_t max_shard_bytes,
                      nm_export_progress_fn progress, void *progress_ctx, nm_error *err) {
    if (dtype != NM_ST_F32 && dtype != NM_ST_BF16 && dtype != NM_ST_F16) {
        return nm_error_set(err, "%s: an HF export is fp32, bf16 or f16", out_dir);
    }
    if (vocab->n > cfg->V) {
        return nm_error_set(err, "the tokenizer has %lld tokens but the model's vocab_size is %lld", (long long)vocab->n,
                            (long long)cfg->V);
    }
    int absent;
    if (!dir_is_absent_or_empty(out_dir, &absent)) {
        return nm_error_set(err, "%s: exists and is not an empty directory; export into a new directory", out_dir);
    }
    size_t n = strlen(out_dir) + 32;
    char *tmp = nm_malloc(n);
    snprintf(tmp, n, "%s.tmp.%ld", out_dir, (long)getpid());
    remove_tree(tmp);
    int rc = nm_mkdir_p(tmp, err);
    if (rc == 0) {
        cJSON *c = export_config(cfg, dtype);
        rc = write_json(tmp, "config.json", c, err);
        cJSON_Delete(c);
    }
    if (rc == 0) {
        cJSON *g = generation_config(cfg, vocab);
        rc = write_json(tmp, "generation_config.json", g, err);
        cJSON_Delete(g);
    }
    if (rc == 0) rc = write_text(tmp, "tokenizer.json", vocab->tokenizer_json, err);
    if (rc == 0 && vocab->tokenizer_config_json) {
        rc = write_text(tmp, "tokenizer_config.json", vocab->tokenizer_config_json, err);
    } else if (rc == 0) {
        cJSON *c = tokenizer_config(cfg, vocab);
        rc = write_json(tmp, "tokenizer_config.json", c, err);
        cJSON_Delete(c);
    }
    if (rc == 0) rc = write_tensors(tmp, cfg, t, params, dtype, max_shard_bytes, progress, progress_ctx, err);
    if (rc == 0) rc = nm_fsync_dir(tmp, err);
    // rename(2) replaces an empty directory atomically; an absent one is simply created.
    if (rc == 0 && rename(tmp, out_dir) != 0) {
        rc = nm_error_set(err, "%s: rename from %s failed: %s", out_dir, tmp, strerror(errno));
    }
    if (rc == 0) {
        char *parent = nm_strdup(out_dir);
        char *slash = strrchr(parent, '/');
        if (slash && slash != parent) *slash = 0;
        else if (slash) slash[1] = 0;
        else strcpy(parent, ".");
        rc = nm_fsync_dir(parent, err);
        nm_free(parent);
    } else {
        remove_tree(tmp);
    }
    nm_free(tmp);
    return rc;
}
