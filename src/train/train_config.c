// train_config.c: the training config parser (see train_config.h for keys and rules).
//
// One table (`keys`) describes every key: its dotted name, type, field, default and
// accepted range. Parsing the file, applying --set overrides, checking ranges, printing the
// defaults and serialising back to JSON are all loops over that table, so a new key is one
// line here plus its field in the struct.
#include "core/strdist.h"
#include "train/train_config.h"

#include <assert.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "comm/comm.h"
#include "core/fileio.h"
#include "io/hf_dir.h"
#include "ops/ops.h"

// Enum fields are read and written through int pointers.
static_assert(sizeof(nm_precision) == sizeof(int), "enum size");
static_assert(sizeof(nm_lr_schedule_type) == sizeof(int), "enum size");
static_assert(sizeof(nm_wsd_decay) == sizeof(int), "enum size");

// --- the key table -----------------------------------------------------------------------------

typedef enum key_type {
    K_INT,                      // int64_t
    K_FLOAT,                    // double
    K_BOOL,                     // int (0/1; data.synthetic also -1 = "decide from paths")
    K_ENUM,                     // int, one of enum_names
    K_PATH,                     // char *, resolved; NULL allowed when K_NULLABLE
    K_STRING,                   // char *
    K_SOURCES,                  // data.paths: nm_data_source array
} key_type;

enum {
    K_NULLABLE = 1u << 0,       // null / unset is a valid value
    K_BYTES_OK = 1u << 1,       // the literal "bytes" is not a path (tokenizer)
};

typedef struct key_spec {
    const char *name;           // dotted: "optimizer.lr"
    key_type type;
    size_t off;                 // field offset in nm_train_config
    double dflt;                // numbers, bools, enum index
    const char *dflt_s;         // strings and paths (NULL: unset)
    double lo, hi;              // accepted range of numbers
    int lo_open;                // lo itself excluded
    const char *const *enum_names; // NULL-terminated, K_ENUM only
    unsigned flags;
    const char *help;
} key_spec;

#define OFF(f) offsetof(nm_train_config, f)
#define BIG 9007199254740992.0  // 2^53: largest integer a JSON number (double) holds exactly

static const char *const precision_names[] = {"fp32", "bf16", "fp8", NULL};
static const char *const schedule_names[] = {"constant", "cosine", "wsd", "wsd-cosine", NULL};
static const char *const decay_names[] = {"linear", "1-sqrt", NULL};
static const char *const moment_dtype_names[] = {"fp32", "bf16", NULL};
// Megatron's data_parallel_sharding_strategy values that exist here: optim (ZeRO-1), optim_grads (ZeRO-2)
static const char *const sharding_names[] = {"optim", "optim_grads", NULL};

// clang-format off
static const key_spec keys[] = {
    {"model", K_PATH, OFF(model), 0, NULL, 0, 0, 0, NULL, K_NULLABLE, "HF config.json of a fresh model"},
    {"init_from", K_PATH, OFF(init_from), 0, NULL, 0, 0, 0, NULL, K_NULLABLE, "HF model directory to start from"},
    {"tokenizer", K_PATH, OFF(tokenizer), 0, "bytes", 0, 0, 0, NULL, K_BYTES_OK, "\"bytes\" or tokenizer.json"},
    {"data.synthetic", K_BOOL, OFF(data_synthetic), -1, NULL, 0, 1, 0, NULL, 0, "generated corpus (default: when no paths)"},
    {"data.synthetic_tokens", K_INT, OFF(data_synthetic_tokens), 2097152, NULL, 1, BIG, 0, NULL, 0, "size of the generated corpus"},
    {"data.paths", K_SOURCES, OFF(data_paths), 0, NULL, 0, 0, 0, NULL, 0, "[{\"prefix\": P, \"weight\": w}, ...]"},
    {"data.split", K_STRING, OFF(data_split), 0, "99,1", 0, 0, 0, NULL, 0, "train,valid[,test] weights"},
    {"data.cache_dir", K_STRING, OFF(data_cache_dir), 0, "", 0, 0, 0, NULL, 0,
     "where the datasets' index mappings are built once and memory-mapped by every rank (.npy, Megatron's "
     "arrays); \"\": RUN_DIR/index_cache (datasets on disk only; the built-in corpus is not cached)"},
    {"data.cache_per_node", K_BOOL, OFF(data_cache_per_node), 0, NULL, 0, 1, 0, NULL, 0,
     "the first rank of each node builds the index mappings (data.cache_dir on node-local disks); false: rank 0, "
     "for a file system every rank shares"},
    {"seq_len", K_INT, OFF(seq_len), 256, NULL, 2, 1 << 24, 0, NULL, 0, "tokens per training window"},
    {"micro_batch", K_INT, OFF(micro_batch), 8, NULL, 1, 1 << 24, 0, NULL, 0, "rows per forward/backward"},
    {"global_batch", K_INT, OFF(global_batch), 0, NULL, 0, 1 << 30, 0, NULL, 0, "rows per optimizer step (0: micro_batch)"},
    {"steps", K_INT, OFF(steps), 1000, NULL, 1, BIG, 0, NULL, 0, "optimizer steps"},
    {"precision", K_ENUM, OFF(precision), 0, NULL, 0, 0, 0, precision_names, 0, "compute precision"},
    {"backend", K_STRING, OFF(backend), 0, "cpu", 0, 0, 0, NULL, 0,
     "ops backend: cpu, ref (scalar C reference, slow), or cuda (builds with the CUDA toolkit; needs a GPU); the environment variable NM_BACKEND overrides it"},
    {"communicator", K_STRING, OFF(communicator), 0, "auto", 0, 0, 0, NULL, 0,
     "collectives between ranks: auto (mpi under mpirun/srun, else single), single, mpi, or nccl (GPU buffers; "
     "builds with NCCL, a GPU per rank); the environment variable NM_COMM overrides it"},
    {"seed", K_INT, OFF(seed), 1234, NULL, 0, BIG, 0, NULL, 0, "seed of every random stream"},
    {"threads", K_INT, OFF(threads), 0, NULL, 0, 4096, 0, NULL, 0, "OpenMP threads (0: default)"},
    {"tensor_parallel_size", K_INT, OFF(tensor_parallel_size), 1, NULL, 1, 1 << 20, 0, NULL, 0,
     "tensor-parallel ranks (Megatron --tensor-model-parallel-size)"},
    {"pipeline_parallel_size", K_INT, OFF(pipeline_parallel_size), 1, NULL, 1, 1 << 20, 0, NULL, 0,
     "pipeline stages (Megatron --pipeline-model-parallel-size)"},
    {"pipeline_model_parallel_layout", K_STRING, OFF(pipeline_layout), 0, "", 0, 0, 0, NULL, 0,
     "layers per stage, Megatron's form: \"Et|tt|tmL\" (E embedding, t layer, m MTP, L loss; '|' between stages); \"\": even split"},
    {"virtual_pipeline_model_parallel_size", K_INT, OFF(virtual_pipeline_size), 0, NULL, 0, 32, 0, NULL, 0,
     "model chunks per pipeline rank, the interleaved 1F1B schedule (Megatron "
     "--num-virtual-stages-per-pipeline-rank); 0: the layout's stages / pipeline_parallel_size, or 1"},
    {"expert_parallel_size", K_INT, OFF(expert_parallel_size), 1, NULL, 1, 1 << 20, 0, NULL, 0,
     "ranks the routed experts are sharded over (Megatron --expert-model-parallel-size)"},
    {"exit_interval", K_INT, OFF(exit_interval), 0, NULL, 0, BIG, 0, NULL, 0,
     "stop at a step divisible by this, schedule unchanged (Megatron --exit-interval); 0: off"},
    {"moe_receive_capacity", K_FLOAT, OFF(moe_receive_capacity), 2.0, NULL, 0, 1e6, 1, NULL, 0,
     "under expert parallelism, the rows a rank's experts receive per round of the dropless all-to-all, as a "
     "multiple of the mean (routed tokens x top_k); a busier rank takes more rounds, no token is dropped"},
    {"recompute_granularity", K_STRING, OFF(recompute_granularity), 0, "", 0, 0, 0, NULL, 0,
     "Megatron's --recompute-granularity: full recomputes every block's forward in its backward (as "
     "--recompute; recompute_modules are then moot), selective the recompute_modules; \"\": selective when "
     "recompute_modules names any, else none"},
    {"recompute_modules", K_STRING, OFF(recompute_modules), 0, "", 0, 0, 0, NULL, 0,
     "selective recomputation (Megatron's recompute_modules, comma-separated): mla_up_proj recomputes the MLA "
     "up-projections' outputs in the backward instead of keeping them (DeepSeek-V3's choice), moe_act the routed "
     "experts' SwiGLU, layernorm the blocks' two RMSNorm outputs; --recompute recomputes everything"},
    {"bucket_mb", K_INT, OFF(bucket_mb), 40, NULL, 1, 1 << 20, 0, NULL, 0,
     "gradient reduce-scatter bucket size, MiB of fp32 gradients"},
    {"make_vocab_size_divisible_by", K_INT, OFF(make_vocab_size_divisible_by), 128, NULL, 1, 1 << 20, 0, NULL, 0,
     "under tensor parallelism the vocabulary is padded to a multiple of this x TP (Megatron's key); padding rows "
     "never reach a checkpoint or a loss"},
    {"sequence_parallel", K_BOOL, OFF(sequence_parallel), 1, NULL, 0, 1, 0, NULL, 0,
     "under tensor parallelism, norms, residuals and the router on 1/TP of the tokens (Megatron --sequence-parallel)"},
    {"moe_shared_expert_overlap", K_BOOL, OFF(moe_shared_expert_overlap), 0, NULL, 0, 1, 0, NULL, 0,
     "under expert parallelism, run the shared experts while each MoE block's expert all-to-all is in flight "
     "(Megatron --moe-shared-expert-overlap); results unchanged"},
    {"overlap_moe_expert_parallel_comm", K_BOOL, OFF(overlap_moe_expert_parallel_comm), 0, NULL, 0, 1, 0, NULL, 0,
     "under expert parallelism, run each MoE block's expert exchange in two parts, one part's dispatch and combine "
     "in flight while the other's experts compute (Megatron --overlap-moe-expert-parallel-comm; here within a "
     "micro-batch); one more receive-capacity buffer"},
    {"moe_pair_micro_batches", K_BOOL, OFF(moe_pair_micro_batches), 0, NULL, 0, 1, 0, NULL, 0,
     "under expert parallelism, run each micro-batch's forward beside the previous one's backward, each one's "
     "expert all-to-alls in flight while the other computes (DeepSeek-V3's DualPipe overlap; Megatron-Core's "
     "combined 1F1B); results unchanged; a second activation set"},
    {"overlap_grad_reduce", K_BOOL, OFF(overlap_grad_reduce), 0, NULL, 0, 1, 0, NULL, 0,
     "start each bucket's reduce-scatter once the backward has finished its layers (Megatron --overlap-grad-reduce)"},
    {"data_parallel_sharding_strategy", K_ENUM, OFF(data_parallel_sharding_strategy), 0, NULL, 0, 0, 0, sharding_names, 0,
     "what data parallelism shards (Megatron's key): optim, the optimizer state (ZeRO-1); optim_grads, the gradients "
     "too (ZeRO-2: each micro-batch's gradients reduce-scattered bucket by bucket as its backward finishes them and "
     "their memory released)"},
    {"optimizer.lr", K_FLOAT, OFF(optimizer.lr), 3e-4, NULL, 0, 10, 1, NULL, 0, "peak learning rate"},
    {"optimizer.min_lr", K_FLOAT, OFF(optimizer.min_lr), 3e-5, NULL, 0, 10, 0, NULL, 0, "final learning rate"},
    {"optimizer.beta1", K_FLOAT, OFF(optimizer.beta1), 0.9, NULL, 0, 0.999999, 0, NULL, 0, "AdamW beta1"},
    {"optimizer.beta2", K_FLOAT, OFF(optimizer.beta2), 0.95, NULL, 0, 0.999999, 0, NULL, 0, "AdamW beta2"},
    {"optimizer.eps", K_FLOAT, OFF(optimizer.eps), 1e-8, NULL, 0, 1, 1, NULL, 0, "AdamW eps"},
    {"optimizer.weight_decay", K_FLOAT, OFF(optimizer.weight_decay), 0.1, NULL, 0, 10, 0, NULL, 0, "decoupled, matrices only"},
    {"optimizer.clip_grad", K_FLOAT, OFF(optimizer.clip_grad), 1.0, NULL, 0, 1e30, 0, NULL, 0, "max global grad norm (0: off)"},
    {"optimizer.exp_avg_dtype", K_ENUM, OFF(optimizer.exp_avg_dtype), 0, NULL, 0, 0, 0, moment_dtype_names, 0,
     "storage of AdamW's first moment (Megatron --exp-avg-dtype; DeepSeek-V3 keeps it in bf16)"},
    {"optimizer.exp_avg_sq_dtype", K_ENUM, OFF(optimizer.exp_avg_sq_dtype), 0, NULL, 0, 0, 0, moment_dtype_names, 0,
     "storage of AdamW's second moment (Megatron --exp-avg-sq-dtype)"},
    {"schedule.type", K_ENUM, OFF(schedule.type), NM_LR_COSINE, NULL, 0, 0, 0, schedule_names, 0, "learning-rate shape"},
    {"schedule.warmup_steps", K_INT, OFF(schedule.warmup_steps), 0, NULL, 0, BIG, 0, NULL, 0, "linear warm-up from 0"},
    {"schedule.decay_start", K_INT, OFF(schedule.decay_start), 0, NULL, 0, BIG, 0, NULL, 0, "wsd-cosine: last step at lr"},
    {"schedule.decay_steps", K_INT, OFF(schedule.decay_steps), 0, NULL, 0, BIG, 0, NULL, 0, "wsd-cosine: cosine length"},
    {"schedule.decay_fraction", K_FLOAT, OFF(schedule.decay_fraction), 0.2, NULL, 0, 1, 1, NULL, 0, "wsd: decaying fraction"},
    {"schedule.decay_shape", K_ENUM, OFF(schedule.decay_shape), NM_WSD_LINEAR, NULL, 0, 0, 0, decay_names, 0, "wsd: decay shape"},
    {"balance.bias_update_speed", K_FLOAT, OFF(balance.bias_update_speed), 0.001, NULL, 0, 1, 0, NULL, 0, "gamma"},
    {"balance.bias_update_stop_step", K_INT, OFF(balance.bias_update_stop_step), 0, NULL, 0, BIG, 0, NULL, 0, "gamma = 0 after (0: never)"},
    {"balance.aux_weight", K_FLOAT, OFF(balance.aux_weight), 1e-4, NULL, 0, 1e3, 0, NULL, 0, "sequence-wise balance loss weight"},
    {"mtp.weight", K_FLOAT, OFF(mtp.weight), 0.3, NULL, 0, 1e3, 0, NULL, 0, "MTP loss weight lambda"},
    {"mtp.weight_after", K_FLOAT, OFF(mtp.weight_after), 0.1, NULL, 0, 1e3, 0, NULL, 0, "lambda after switch_step"},
    {"mtp.switch_step", K_INT, OFF(mtp.switch_step), 0, NULL, 0, BIG, 0, NULL, 0, "0: never switch"},
    {"checkpoint.save_every", K_INT, OFF(checkpoint.save_every), 0, NULL, 0, BIG, 0, NULL, 0, "0: only at the end"},
    {"checkpoint.keep_last", K_INT, OFF(checkpoint.keep_last), 3, NULL, 0, BIG, 0, NULL, 0, "0: keep all"},
    {"log.log_every", K_INT, OFF(log.log_every), 10, NULL, 1, BIG, 0, NULL, 0, "progress / TensorBoard cadence"},
    {"log.eval_every", K_INT, OFF(log.eval_every), 0, NULL, 0, BIG, 0, NULL, 0, "0: no evaluation"},
    {"log.eval_batches", K_INT, OFF(log.eval_batches), 10, NULL, 1, BIG, 0, NULL, 0, "micro-batches per evaluation"},
};
// clang-format on
#define N_KEYS ((int)(sizeof(keys) / sizeof(keys[0])))

static const char *const sections[] = {"data", "optimizer", "schedule", "balance", "mtp", "checkpoint", "log", NULL};

static int find_key(const char *name) {
    for (int i = 0; i < N_KEYS; i++) {
        if (!strcmp(keys[i].name, name)) return i;
    }
    return -1;
}

static int is_section(const char *name) {
    for (int i = 0; sections[i]; i++) {
        if (!strcmp(sections[i], name)) return 1;
    }
    return 0;
}

static int unknown_key(nm_error *err, const char *where, const char *name) {
    int best = -1, best_d = 4;
    for (int i = 0; i < N_KEYS; i++) {
        int dist = nm_edit_distance(name, keys[i].name);
        // A key given without its section ("lr" for "optimizer.lr") is a common slip too.
        const char *dot = strrchr(keys[i].name, '.');
        if (dot && !strcmp(dot + 1, name)) dist = 1;
        if (dist < best_d) {
            best_d = dist;
            best = i;
        }
    }
    if (best >= 0) return nm_error_set(err, "%s: unknown key '%s' (did you mean '%s'?)", where, name, keys[best].name);
    return nm_error_set(err, "%s: unknown key '%s'", where, name);
}

// --- paths ---------------------------------------------------------------------------------------

// base + "/" + rel, then "." and "x/.." removed lexically (no file system access: the file
// need not exist yet, and symlinks are the user's business).
static char *resolve_path(const char *base, const char *rel) {
    size_t n = strlen(rel) + (base ? strlen(base) : 0) + 2;
    char *joined = nm_malloc(n);
    if (rel[0] == '/' || !base || !base[0]) snprintf(joined, n, "%s", rel);
    else snprintf(joined, n, "%s/%s", base, rel);

    int absolute = joined[0] == '/';
    char **parts = nm_malloc(n * sizeof(char *));
    int np = 0;
    for (char *save = NULL, *tok = strtok_r(joined, "/", &save); tok; tok = strtok_r(NULL, "/", &save)) {
        if (!strcmp(tok, ".")) continue;
        if (!strcmp(tok, "..")) {
            if (np > 0 && strcmp(parts[np - 1], "..")) {
                np--;
                continue;
            }
            if (absolute) continue;  // "/.." is "/"
        }
        parts[np++] = tok;
    }
    char *out = nm_malloc(n + 2);
    size_t len = 0;
    if (absolute) out[len++] = '/';
    for (int i = 0; i < np; i++) {
        size_t l = strlen(parts[i]);
        memcpy(out + len, parts[i], l);
        len += l;
        if (i + 1 < np) out[len++] = '/';
    }
    if (len == 0) out[len++] = '.';
    out[len] = 0;
    nm_free(parts);
    nm_free(joined);
    return out;
}

// --- setting one key -------------------------------------------------------------------------------

static void *field(nm_train_config *cfg, const key_spec *k) { return (char *)cfg + k->off; }

static void free_sources(nm_train_config *cfg) {
    for (int i = 0; i < cfg->n_data_paths; i++) nm_free(cfg->data_paths[i].prefix);
    nm_free(cfg->data_paths);
    cfg->data_paths = NULL;
    cfg->n_data_paths = 0;
}

static void set_string(char **slot, const char *value) {
    nm_free(*slot);
    *slot = value ? nm_strdup(value) : NULL;
}

static const char *json_type_name(const cJSON *v) {
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "an invalid value";
}

// Integer keys print their bounds as integers ("<= 16777216", not "<= 1.67772e+07").
static int check_range(const key_spec *k, double v, const char *where, nm_error *err) {
    if (v < k->lo || (k->lo_open && v == k->lo) || v > k->hi) {
        if (k->type == K_INT)
            return nm_error_set(err, "%s: key '%s' = %.17g is out of range: give an integer from %lld to %lld", where,
                                k->name, v, (long long)k->lo, (long long)k->hi);
        return nm_error_set(err, "%s: key '%s' = %.10g is out of range: must be %s %g and <= %g", where, k->name, v,
                            k->lo_open ? ">" : ">=", k->lo, k->hi);
    }
    return 0;
}

static int set_number(nm_train_config *cfg, const key_spec *k, double v, const char *where, const char *text,
                      nm_error *err) {
    if (!isfinite(v)) return nm_error_set(err, "%s: key '%s': %s is not a finite number", where, k->name, text);
    if (k->type == K_INT) {
        if (v != floor(v))
            return nm_error_set(err, "%s: key '%s': expected an integer, got %s", where, k->name, text);
        if (check_range(k, v, where, err)) return -1;  // every range lies within +-2^53
        *(int64_t *)field(cfg, k) = (int64_t)v;
    } else {
        if (check_range(k, v, where, err)) return -1;
        *(double *)field(cfg, k) = v;
    }
    return 0;
}

static int set_enum(nm_train_config *cfg, const key_spec *k, const char *s, const char *where, nm_error *err) {
    for (int i = 0; k->enum_names[i]; i++) {
        if (!strcmp(k->enum_names[i], s)) {
            *(int *)field(cfg, k) = i;
            return 0;
        }
    }
    char allowed[256] = "";
    for (int i = 0; k->enum_names[i]; i++) {
        strncat(allowed, i ? ", " : "", sizeof(allowed) - strlen(allowed) - 1);
        strncat(allowed, k->enum_names[i], sizeof(allowed) - strlen(allowed) - 1);
    }
    return nm_error_set(err, "%s: key '%s': \"%s\" is not one of %s", where, k->name, s, allowed);
}

static int set_path(nm_train_config *cfg, const key_spec *k, const char *s, const char *base, const char *where,
                    nm_error *err) {
    char **slot = field(cfg, k);
    if (!s) {
        set_string(slot, NULL);
        return 0;
    }
    if (!s[0]) return nm_error_set(err, "%s: key '%s': empty path", where, k->name);
    if ((k->flags & K_BYTES_OK) && !strcmp(s, "bytes")) {
        set_string(slot, s);
        return 0;
    }
    nm_free(*slot);
    *slot = resolve_path(base, s);
    return 0;
}

static int set_sources(nm_train_config *cfg, const key_spec *k, const cJSON *v, const char *base, const char *where,
                       nm_error *err) {
    if (!cJSON_IsArray(v))
        return nm_error_set(err, "%s: key '%s': expected an array of {\"prefix\", \"weight\"}, got %s", where, k->name,
                            json_type_name(v));
    free_sources(cfg);
    int n = cJSON_GetArraySize(v);
    cfg->data_paths = nm_calloc((size_t)(n ? n : 1), sizeof(nm_data_source));
    // Walked as a list: cJSON_GetArrayItem(v, i) walks from the head each time, quadratic in
    // the 5,000-entry lists the CLI test trains on.
    int i = 0;
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        if (!cJSON_IsObject(e))
            return nm_error_set(err, "%s: key '%s[%d]': expected an object, got %s", where, k->name, i, json_type_name(e));
        const cJSON *prefix = NULL, *weight = NULL;
        for (const cJSON *c = e->child; c; c = c->next) {
            if (!strcmp(c->string, "prefix") && !prefix) prefix = c;
            else if (!strcmp(c->string, "weight") && !weight) weight = c;
            else return nm_error_set(err, "%s: key '%s[%d].%s': unknown or repeated key (allowed: prefix, weight)",
                                     where, k->name, i, c->string);
        }
        if (!prefix || !cJSON_IsString(prefix) || !prefix->valuestring[0])
            return nm_error_set(err, "%s: key '%s[%d].prefix': expected a non-empty string", where, k->name, i);
        double w = 1.0;
        if (weight) {
            if (!cJSON_IsNumber(weight) || !(weight->valuedouble > 0) || !isfinite(weight->valuedouble))
                return nm_error_set(err, "%s: key '%s[%d].weight': expected a number > 0", where, k->name, i);
            w = weight->valuedouble;
        }
        cfg->data_paths[i].prefix = resolve_path(base, prefix->valuestring);
        cfg->data_paths[i].weight = w;
        cfg->n_data_paths = i + 1;
    }
    return 0;
}

// Sets key k from a JSON value (file, or a parsed --set value). base: directory that
// relative paths resolve against.
static int set_from_json(nm_train_config *cfg, const key_spec *k, const cJSON *v, const char *base, const char *where,
                         nm_error *err) {
    switch (k->type) {
    case K_INT:
    case K_FLOAT:
        if (!cJSON_IsNumber(v))
            return nm_error_set(err, "%s: key '%s': expected %s, got %s", where, k->name,
                                k->type == K_INT ? "an integer" : "a number", json_type_name(v));
        {
            char text[40];
            snprintf(text, sizeof(text), "%.17g", v->valuedouble);
            return set_number(cfg, k, v->valuedouble, where, text, err);
        }
    case K_BOOL:
        if (!cJSON_IsBool(v)) return nm_error_set(err, "%s: key '%s': expected true or false, got %s", where, k->name,
                                                  json_type_name(v));
        *(int *)field(cfg, k) = cJSON_IsTrue(v) ? 1 : 0;
        return 0;
    case K_ENUM:
        if (!cJSON_IsString(v))
            return nm_error_set(err, "%s: key '%s': expected a string, got %s", where, k->name, json_type_name(v));
        return set_enum(cfg, k, v->valuestring, where, err);
    case K_PATH:
    case K_STRING:
        if (cJSON_IsNull(v) && (k->flags & K_NULLABLE)) return set_path(cfg, k, NULL, base, where, err);
        if (!cJSON_IsString(v))
            return nm_error_set(err, "%s: key '%s': expected a string%s, got %s", where, k->name,
                                (k->flags & K_NULLABLE) ? " or null" : "", json_type_name(v));
        if (k->type == K_STRING) {
            set_string(field(cfg, k), v->valuestring);
            return 0;
        }
        return set_path(cfg, k, v->valuestring, base, where, err);
    case K_SOURCES:
        return set_sources(cfg, k, v, base, where, err);
    }
    NM_PANIC("bad key type");
}

// Sets key k from --set text, type-checked against the key. Paths resolve against the cwd.
static int set_from_text(nm_train_config *cfg, const key_spec *k, const char *text, const char *where, nm_error *err) {
    switch (k->type) {
    case K_INT:
    case K_FLOAT: {
        char *end = NULL;
        double v = strtod(text, &end);
        if (!text[0] || *end)
            return nm_error_set(err, "%s: key '%s': expected %s, got \"%s\"", where, k->name,
                                k->type == K_INT ? "an integer" : "a number", text);
        return set_number(cfg, k, v, where, text, err);
    }
    case K_BOOL:
        if (!strcmp(text, "true") || !strcmp(text, "1")) *(int *)field(cfg, k) = 1;
        else if (!strcmp(text, "false") || !strcmp(text, "0")) *(int *)field(cfg, k) = 0;
        else return nm_error_set(err, "%s: key '%s': expected true or false, got \"%s\"", where, k->name, text);
        return 0;
    case K_ENUM:
        return set_enum(cfg, k, text, where, err);
    case K_PATH:
        if (!strcmp(text, "null")) {
            if (!(k->flags & K_NULLABLE)) return nm_error_set(err, "%s: key '%s' cannot be null", where, k->name);
            return set_path(cfg, k, NULL, NULL, where, err);
        }
        return set_path(cfg, k, text, NULL, where, err);
    case K_STRING:
        set_string(field(cfg, k), text);
        return 0;
    case K_SOURCES: {
        cJSON *v = cJSON_Parse(text);
        if (!v)
            return nm_error_set(err, "%s: key '%s': expected a JSON array like [{\"prefix\": \"data/x\", \"weight\": 1}]",
                                where, k->name);
        int rc = set_sources(cfg, k, v, NULL, where, err);
        cJSON_Delete(v);
        return rc;
    }
    }
    NM_PANIC("bad key type");
}

static void set_defaults(nm_train_config *cfg) {
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &keys[i];
        switch (k->type) {
        case K_INT: *(int64_t *)field(cfg, k) = (int64_t)k->dflt; break;
        case K_FLOAT: *(double *)field(cfg, k) = k->dflt; break;
        case K_BOOL:
        case K_ENUM: *(int *)field(cfg, k) = (int)k->dflt; break;
        case K_PATH:
        case K_STRING: set_string(field(cfg, k), k->dflt_s); break;
        case K_SOURCES: free_sources(cfg); break;
        }
    }
}

// --- whole-config checks -------------------------------------------------------------------------

static int parse_split(nm_train_config *cfg, const char *where, nm_error *err) {
    double w[3] = {0, 0, 0};
    int n = 0;
    const char *p = cfg->data_split;
    while (1) {
        char *end = NULL;
        double v = strtod(p, &end);
        if (end == p || !(v >= 0) || !isfinite(v) || n == 3) break;
        w[n++] = v;
        p = end;
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p == 0) {
            double sum = w[0] + w[1] + w[2];
            if (sum <= 0) break;
            for (int i = 0; i < 3; i++) cfg->data_split_frac[i] = w[i] / sum;
            return 0;
        }
        break;
    }
    return nm_error_set(err, "%s: key 'data.split' = \"%s\": expected 1 to 3 comma-separated non-negative weights "
                        "with a positive sum, like \"99,1\" or \"949,50,1\"", where, cfg->data_split);
}

int nm_recompute_modules_parse(const char *list, int *mla_up_proj, int *moe_act, int *layernorm, const char **bad,
                                int *bad_len) {
    *mla_up_proj = *moe_act = *layernorm = 0;
    for (const char *p = list; p && *p;) {
        size_t n = strcspn(p, ",");
        if (n == strlen("mla_up_proj") && !strncmp(p, "mla_up_proj", n)) *mla_up_proj = 1;
        else if (n == strlen("moe_act") && !strncmp(p, "moe_act", n)) *moe_act = 1;
        else if (n == strlen("layernorm") && !strncmp(p, "layernorm", n)) *layernorm = 1;
        else if (n > 0) {
            *bad = p;
            *bad_len = (int)n;
            return -1;
        }
        p += n + (p[n] == ',');
    }
    return 0;
}

static int validate(nm_train_config *cfg, const char *where, nm_error *err) {
    // NM_BACKEND wins over the file and --set, so that a test suite or a job script can run
    // every training on another backend without editing configs; the config then records the
    // backend that ran (checkpoints keep it).
    const char *env = getenv("NM_BACKEND");
    char what[1100];
    if (env && *env) {
        set_string(&cfg->backend, env);
        snprintf(what, sizeof what, "environment variable NM_BACKEND:");
    } else {
        snprintf(what, sizeof what, "%.1000s: key 'backend':", where);
    }
    if (nm_ops_check_backend(cfg->backend, what, err) != 0) return -1;
    // NM_COMM likewise wins over 'communicator' (tests and job scripts pick the library)
    const char *comm_env = getenv("NM_COMM");
    if (comm_env && *comm_env) {
        set_string(&cfg->communicator, comm_env);
        snprintf(what, sizeof what, "environment variable NM_COMM:");
    } else {
        snprintf(what, sizeof what, "%.1000s: key 'communicator':", where);
    }
    if (nm_comm_check_name(cfg->communicator, what, err) != 0) return -1;
    if (!cfg->model == !cfg->init_from)
        return nm_error_set(err, "%s: give exactly one of 'model' (a config.json for a fresh model) or 'init_from' "
                            "(a Hugging Face model directory)%s", where, cfg->model ? "; both are set" : "");
    if (cfg->data_synthetic < 0) cfg->data_synthetic = cfg->n_data_paths == 0;
    if (cfg->data_synthetic && cfg->n_data_paths > 0)
        return nm_error_set(err, "%s: 'data.synthetic' is true but 'data.paths' lists %d dataset(s); use one or the "
                            "other", where, cfg->n_data_paths);
    if (!cfg->data_synthetic && cfg->n_data_paths == 0)
        return nm_error_set(err, "%s: 'data.synthetic' is false and 'data.paths' is empty: no training data", where);
    if (parse_split(cfg, where, err)) return -1;
    if (cfg->log.eval_every > 0 && cfg->data_split_frac[1] <= 0)
        return nm_error_set(err, "%s: 'log.eval_every' = %lld asks for validation but 'data.split' = \"%s\" gives the "
                            "validation split no data: set data.split=99,1 (train,valid) or log.eval_every=0", where,
                            (long long)cfg->log.eval_every, cfg->data_split);

    // recompute_modules: the modules this model recomputes selectively, by Megatron's names
    const char *bad;
    int bad_len;
    if (nm_recompute_modules_parse(cfg->recompute_modules, &cfg->recompute_mla_up_proj, &cfg->recompute_moe_act,
                                   &cfg->recompute_layernorm, &bad, &bad_len) != 0)
        return nm_error_set(err, "%s: 'recompute_modules' = \"%s\": '%.*s' is not a module this trainer recomputes "
                            "selectively (known: mla_up_proj, moe_act, layernorm; --recompute recomputes whole blocks)",
                            where,
                            cfg->recompute_modules, bad_len, bad);
    // recompute_granularity: Megatron's names; selective needs modules to recompute
    const char *gran = cfg->recompute_granularity ? cfg->recompute_granularity : "";
    if (strcmp(gran, "full") == 0) cfg->recompute_full = 1;
    else if (strcmp(gran, "selective") == 0) {
        if (!cfg->recompute_mla_up_proj && !cfg->recompute_moe_act && !cfg->recompute_layernorm)
            return nm_error_set(err, "%s: 'recompute_granularity' = \"selective\" but 'recompute_modules' names no "
                                "module: set recompute_modules (mla_up_proj, moe_act, layernorm; comma-separated)",
                                where);
    } else if (*gran)
        return nm_error_set(err, "%s: 'recompute_granularity' = \"%s\": expected full or selective (or leave it "
                            "out)", where, gran);
    if (cfg->global_batch == 0) cfg->global_batch = cfg->micro_batch;
    if (cfg->global_batch % cfg->micro_batch != 0)
        return nm_error_set(err, "%s: 'global_batch' = %lld is not a multiple of 'micro_batch' = %lld", where,
                            (long long)cfg->global_batch, (long long)cfg->micro_batch);
    cfg->accum_steps = cfg->global_batch / cfg->micro_batch;

    if (cfg->optimizer.min_lr > cfg->optimizer.lr)
        return nm_error_set(err, "%s: 'optimizer.min_lr' = %g is larger than 'optimizer.lr' = %g", where,
                            cfg->optimizer.min_lr, cfg->optimizer.lr);
    // warmup_steps > steps is allowed: a short smoke run (--set steps=5) of a config with a
    // long warm-up simply never reaches lr_max.
    if (cfg->schedule.type == NM_LR_WSD_COSINE) {
        if (cfg->schedule.decay_steps < 1)
            return nm_error_set(err, "%s: schedule 'wsd-cosine' needs 'schedule.decay_steps' >= 1 (got %lld)", where,
                                (long long)cfg->schedule.decay_steps);
        if (cfg->schedule.decay_start < cfg->schedule.warmup_steps)
            return nm_error_set(err, "%s: 'schedule.decay_start' = %lld is before the end of warm-up "
                                "('schedule.warmup_steps' = %lld)", where, (long long)cfg->schedule.decay_start,
                                (long long)cfg->schedule.warmup_steps);
    }
    return 0;
}

// --- parse / load ----------------------------------------------------------------------------------

static int apply_object(nm_train_config *cfg, const cJSON *obj, const char *section, const char *base,
                        const char *where, char *seen, nm_error *err) {
    for (const cJSON *c = obj->child; c; c = c->next) {
        char name[128];
        if (section) snprintf(name, sizeof(name), "%s.%s", section, c->string);
        else snprintf(name, sizeof(name), "%s", c->string);
        if (!section && is_section(c->string)) {
            if (!cJSON_IsObject(c))
                return nm_error_set(err, "%s: key '%s': expected an object, got %s", where, name, json_type_name(c));
            if (apply_object(cfg, c, c->string, base, where, seen, err)) return -1;
            continue;
        }
        // Dotted names are only valid through their section object.
        int ki = strchr(c->string, '.') ? -1 : find_key(name);
        if (ki < 0) return unknown_key(err, where, name);
        if (seen[ki]) return nm_error_set(err, "%s: key '%s' appears twice", where, name);
        seen[ki] = 1;
        if (set_from_json(cfg, &keys[ki], c, base, where, err)) return -1;
    }
    return 0;
}

// A Hugging Face config.json given where a training config belongs (train --config
// configs/tiny.json) would otherwise fail on its first key as "unknown key 'architectures'".
// Its keys name it; the message points at the training config that wraps it, when there is
// one beside it (NAME-train.json, the convention of configs/).
static int model_config_given(const cJSON *root, const char *where, nm_error *err) {
    static const char *const marks[] = {"architectures", "model_type", "hidden_size", "vocab_size", NULL};
    const char *mark = NULL;
    for (int i = 0; marks[i] && !mark; i++)
        if (cJSON_GetObjectItemCaseSensitive(root, marks[i])) mark = marks[i];
    if (!mark) return 0;
    char sibling[1024] = "";
    size_t n = strlen(where);
    if (n > 5 && n < sizeof(sibling) - 16 && !strcmp(where + n - 5, ".json")) {
        snprintf(sibling, sizeof(sibling), "%.*s-train.json", (int)(n - 5), where);
        FILE *f = fopen(sibling, "r");
        if (f) fclose(f);
        else sibling[0] = 0;
    }
    return nm_error_set(err, "%s is a model config (it has '%s'); train takes a training config that names it under "
                        "'model', e.g. %s", where, mark,
                        sibling[0] ? sibling : "configs/tiny-train.json: {\"model\": \"tiny.json\", \"steps\": 100}");
}

// `--set model_config.KEY=VALUE`: VALUE is JSON (2048, true, null, "x", [..]); anything that is
// not valid JSON is taken as a string. The model config's own parser checks the key and value.
static int add_model_set(nm_train_config *cfg, const char *key, const char *value, nm_error *err) {
    // A key the model config does not read would only be reported as ignored, with the run
    // going on under the value the user meant to change.
    const char *closest = NULL;
    if (!nm_model_config_key_known(key, &closest)) {
        if (closest)
            return nm_error_set(err, "--set model_config.%s: unknown model config key '%s' (did you mean '%s'?)", key,
                                key, closest);
        return nm_error_set(err, "--set model_config.%s: unknown model config key '%s'", key, key);
    }
    if (!*key || strchr(key, '.'))
        return nm_error_set(err, "--set model_config.%s: expected model_config.KEY=VALUE with a top-level key of "
                                 "config.json, e.g. --set model_config.vocab_size=2048", key);
    cJSON *obj = cfg->model_set ? cJSON_Parse(cfg->model_set) : cJSON_CreateObject();
    cJSON *v = cJSON_Parse(value);
    if (!v) v = cJSON_CreateString(value);
    cJSON_DeleteItemFromObjectCaseSensitive(obj, key);
    cJSON_AddItemToObject(obj, key, v);
    char *text = cJSON_PrintUnformatted(obj);
    cJSON_Delete(obj);
    NM_CHECK(text, "cJSON_PrintUnformatted");
    set_string(&cfg->model_set, text);
    free(text);
    return 0;
}

static int apply_override(nm_train_config *cfg, const char *ov, nm_error *err) {
    const char *eq = strchr(ov, '=');
    char where[160];
    snprintf(where, sizeof(where), "--set %s", ov);
    if (!eq || eq == ov) return nm_error_set(err, "--set %s: expected key=value, e.g. --set optimizer.lr=1e-3", ov);
    char name[128];
    size_t n = (size_t)(eq - ov);
    if (n >= sizeof(name)) return nm_error_set(err, "--set %s: key too long", ov);
    memcpy(name, ov, n);
    name[n] = 0;
    if (strncmp(name, "model_config.", 13) == 0) return add_model_set(cfg, name + 13, eq + 1, err);
    int ki = find_key(name);
    if (ki < 0) return unknown_key(err, "--set", name);
    return set_from_text(cfg, &keys[ki], eq + 1, where, err);
}

int nm_train_config_parse(nm_train_config *cfg, const char *json_text, const char *name, const char *base_dir,
                          const char *const *overrides, int n_overrides, nm_error *err) {
    memset(cfg, 0, sizeof(*cfg));
    cfg->source_path = nm_strdup(name ? name : "<config>");
    const char *where = cfg->source_path;
    set_defaults(cfg);

    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json_text, &end, 1);
    if (!root) {
        // cJSON reports where it stopped; turn that into a line number.
        int line = 1;
        for (const char *p = json_text; end && p < end && *p; p++) line += *p == '\n';
        nm_error_set(err, "%s: invalid JSON near line %d", where, line);
        nm_train_config_free(cfg);
        return -1;
    }
    char seen[N_KEYS];
    memset(seen, 0, sizeof(seen));
    int rc = 0;
    if (!cJSON_IsObject(root)) rc = nm_error_set(err, "%s: expected a JSON object at the top level", where);
    else if (model_config_given(root, where, err)) rc = -1;
    else rc = apply_object(cfg, root, NULL, base_dir, where, seen, err);
    cJSON_Delete(root);
    for (int i = 0; rc == 0 && i < n_overrides; i++) rc = apply_override(cfg, overrides[i], err);
    if (rc == 0) rc = validate(cfg, where, err);
    if (rc == 0 && cfg->model_set && !cfg->model)
        rc = nm_error_set(err, "%s: --set model_config.* edits the config of a fresh model ('model'); with 'init_from' "
                               "the checkpoint's config.json is used as it is", where);
    if (rc != 0) nm_train_config_free(cfg);
    return rc;
}

int nm_train_config_load(nm_train_config *cfg, const char *path, const char *const *overrides, int n_overrides,
                         nm_error *err) {
    memset(cfg, 0, sizeof(*cfg));
    char *text = NULL;
    size_t size = 0;
    if (nm_file_read_json(path, &text, &size, err)) return nm_error_prefix(err, "training config");
    if (strlen(text) != size) {
        nm_free(text);
        return nm_error_set(err, "%s: the file contains a NUL byte", path);
    }
    // The directory of the file: relative paths inside it resolve against it.
    char *base = nm_strdup(path);
    char *slash = strrchr(base, '/');
    if (slash == base) slash[1] = 0;
    else if (slash) *slash = 0;
    else base[0] = 0;
    int rc = nm_train_config_parse(cfg, text, path, base, overrides, n_overrides, err);
    nm_free(base);
    nm_free(text);
    return rc;
}

void nm_train_config_free(nm_train_config *cfg) {
    if (!cfg) return;
    for (int i = 0; i < N_KEYS; i++) {
        if (keys[i].type == K_PATH || keys[i].type == K_STRING) set_string(field(cfg, &keys[i]), NULL);
    }
    free_sources(cfg);
    set_string(&cfg->model_set, NULL);
    nm_free(cfg->source_path);
    cfg->source_path = NULL;
}

int nm_train_config_model_config(const nm_train_config *cfg, nm_model_config *out, nm_error *err) {
    if (cfg->init_from) return nm_hf_dir_load_config(cfg->init_from, out, err);
    if (!cfg->model_set) return nm_model_config_load(out, cfg->model, err);
    char *text = NULL;
    if (nm_file_read_json(cfg->model, &text, NULL, err)) return -1;
    cJSON *root = cJSON_Parse(text);
    nm_free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return nm_error_set(err, "%s: not a JSON object", cfg->model);
    }
    cJSON *set = cJSON_Parse(cfg->model_set);
    NM_CHECK(set, "model_set is valid JSON");
    for (cJSON *c = set->child; c; c = c->next) {
        cJSON_DeleteItemFromObjectCaseSensitive(root, c->string);
        cJSON_AddItemToObject(root, c->string, cJSON_Duplicate(c, 1));
    }
    cJSON_Delete(set);
    char *merged = cJSON_Print(root);
    cJSON_Delete(root);
    NM_CHECK(merged, "cJSON_Print");
    char where[1100];
    snprintf(where, sizeof(where), "%s with --set model_config %s", cfg->model, cfg->model_set);
    int rc = nm_model_config_parse(out, merged, where, err);
    free(merged);
    return rc;
}

// --- serialise / describe --------------------------------------------------------------------------

static cJSON *section_object(cJSON *root, const char *name, const char **leaf) {
    const char *dot = strchr(name, '.');
    if (!dot) {
        *leaf = name;
        return root;
    }
    char sec[64];
    snprintf(sec, sizeof(sec), "%.*s", (int)(dot - name), name);
    *leaf = dot + 1;
    cJSON *o = cJSON_GetObjectItemCaseSensitive(root, sec);
    if (!o) o = cJSON_AddObjectToObject(root, sec);
    return o;
}

char *nm_train_config_to_json(const nm_train_config *cfg) {
    cJSON *root = cJSON_CreateObject();
    nm_train_config *c = (nm_train_config *)cfg;  // field() is shared with the setters; read only here
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &keys[i];
        const char *leaf;
        cJSON *o = section_object(root, k->name, &leaf);
        switch (k->type) {
        case K_INT: cJSON_AddNumberToObject(o, leaf, (double)*(int64_t *)field(c, k)); break;
        case K_FLOAT: cJSON_AddNumberToObject(o, leaf, *(double *)field(c, k)); break;
        case K_BOOL: cJSON_AddBoolToObject(o, leaf, *(int *)field(c, k) > 0); break;
        case K_ENUM: cJSON_AddStringToObject(o, leaf, k->enum_names[*(int *)field(c, k)]); break;
        case K_PATH:
        case K_STRING: {
            const char *s = *(char **)field(c, k);
            if (s) cJSON_AddStringToObject(o, leaf, s);
            else cJSON_AddNullToObject(o, leaf);
            break;
        }
        case K_SOURCES: {
            cJSON *arr = cJSON_AddArrayToObject(o, leaf);
            for (int j = 0; j < cfg->n_data_paths; j++) {
                cJSON *e = cJSON_CreateObject();
                cJSON_AddStringToObject(e, "prefix", cfg->data_paths[j].prefix);
                cJSON_AddNumberToObject(e, "weight", cfg->data_paths[j].weight);
                cJSON_AddItemToArray(arr, e);
            }
            break;
        }
        }
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    NM_CHECK(text, "cJSON_Print failed");
    char *out = nm_strdup(text);
    cJSON_free(text);
    return out;
}

void nm_train_config_describe(FILE *fp) {
    static const char *const type_names[] = {"int", "number", "bool", "enum", "path", "string", "array"};
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &keys[i];
        char dflt[96];
        switch (k->type) {
        case K_INT: snprintf(dflt, sizeof(dflt), "%lld", (long long)k->dflt); break;
        case K_FLOAT: snprintf(dflt, sizeof(dflt), "%g", k->dflt); break;
        case K_BOOL: snprintf(dflt, sizeof(dflt), "%s", k->dflt < 0 ? "auto" : k->dflt ? "true" : "false"); break;
        case K_ENUM: snprintf(dflt, sizeof(dflt), "%s", k->enum_names[(int)k->dflt]); break;
        case K_PATH:
        case K_STRING: snprintf(dflt, sizeof(dflt), "%s", k->dflt_s ? k->dflt_s : "null"); break;
        case K_SOURCES: snprintf(dflt, sizeof(dflt), "[]"); break;
        }
        fprintf(fp, "  %-30s %-7s %-10s %s", k->name, type_names[k->type], dflt, k->help);
        for (int e = 0; k->type == K_ENUM && k->enum_names[e]; e++) fprintf(fp, "%s%s", e ? "|" : ": ", k->enum_names[e]);
        fputc('\n', fp);
    }
}

// --- derived views ---------------------------------------------------------------------------------

int nm_train_config_accum_steps(const nm_train_config *cfg, int64_t dp_world, int64_t *accum, nm_error *err) {
    NM_CHECK(dp_world >= 1, "dp_world %lld", (long long)dp_world);
    int64_t per_step = cfg->micro_batch * dp_world;
    if (cfg->global_batch % per_step != 0)
        return nm_error_set(err, "%s: 'global_batch' = %lld is not a multiple of 'micro_batch' x data-parallel ranks "
                            "= %lld x %lld", cfg->source_path, (long long)cfg->global_batch,
                            (long long)cfg->micro_batch, (long long)dp_world);
    *accum = cfg->global_batch / per_step;
    return 0;
}

void nm_train_config_lr_schedule(const nm_train_config *cfg, nm_lr_schedule *out) {
    *out = (nm_lr_schedule){
        .type = cfg->schedule.type,
        .lr_max = cfg->optimizer.lr,
        .lr_min = cfg->optimizer.min_lr,
        .warmup_steps = cfg->schedule.warmup_steps,
        .total_steps = cfg->steps,
        .decay_start = cfg->schedule.decay_start,
        .decay_steps = cfg->schedule.decay_steps,
        .decay_fraction = cfg->schedule.decay_fraction,
        .wsd_decay = cfg->schedule.decay_shape,
    };
}

void nm_train_config_adamw(const nm_train_config *cfg, nm_adamw_config *out) {
    *out = (nm_adamw_config){
        .beta1 = cfg->optimizer.beta1,
        .beta2 = cfg->optimizer.beta2,
        .eps = cfg->optimizer.eps,
        .weight_decay = cfg->optimizer.weight_decay,
        .exp_avg_bf16 = cfg->optimizer.exp_avg_dtype == 1,
        .exp_avg_sq_bf16 = cfg->optimizer.exp_avg_sq_dtype == 1,
    };
}

const char *nm_precision_name(nm_precision p) {
    NM_CHECK((int)p >= 0 && (int)p < 3, "bad precision %d", (int)p);
    return precision_names[p];
}
