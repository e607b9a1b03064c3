// hf_dir.c: implementation of hf_dir.h.
//
// Reference: transformers `modeling_utils` (index file {"metadata":..., "weight_map":{name: shard}}),
// llama.cpp's converter (names in the index must equal the union of the shards' names), and
// dsv3-spec 2 / 11 for the tied MTP copies.
// FP8 (DeepSeek's release layout): a weight stored F8_E4M3 with a sibling '<name>_scale_inv'
// (F32/BF16, (ceil(out/bo), ceil(in/bi))) is dequantised as w = e4m3(code) * scale_inv of its
// bo x bi block, as DeepSeek-V3's inference/kernel.py weight_dequant does; the block is
// quantization_config.weight_block_size (128 x 128 when config.json has no quantization_config),
// and a quant_method other than "fp8" or a fmt other than "e4m3" is refused.
#include "io/hf_dir.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"
#include "io/safetensors.h"
#include "ops/fp8.h"

#define MAX_UNKNOWN_LISTED 5

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = nm_malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int nm_model_dir_check(const char *dir, int run_ok, nm_error *err) {
    const char *expected = run_ok ? "a Hugging Face directory with config.json, or a run directory"
                                  : "a Hugging Face directory with config.json and model.safetensors";
    struct stat st;
    if (stat(dir, &st) != 0) return nm_error_set(err, "%s: %s (expected %s)", dir, strerror(errno), expected);
    if (S_ISDIR(st.st_mode)) return 0;
    size_t n = strlen(dir);
    // A GGUF file is what `export --format gguf` writes for llama.cpp; nothing here reads one.
    if (n > 5 && !strcmp(dir + n - 5, ".gguf"))
        return nm_error_set(err, "%s is a GGUF file, not a model directory (%s); GGUF is an export format only", dir,
                            expected);
    return nm_error_set(err, "%s is a file, not a model directory (%s)", dir, expected);
}

int nm_hf_dir_load_config(const char *dir, nm_model_config *cfg, nm_error *err) {
    if (nm_model_dir_check(dir, 0, err)) return -1;
    char *path = join(dir, "config.json");
    int rc = nm_model_config_load(cfg, path, err);
    nm_free(path);
    return rc;
}

// --- the set of files holding the tensors ------------------------------------------------------

typedef struct file_set {
    nm_safetensors **files;     // (n)
    int n;
    char *what;                 // "DIR/model.safetensors" or the index path, for messages
} file_set;

static void file_set_close(file_set *fs) {
    for (int i = 0; i < fs->n; i++) nm_safetensors_close(fs->files[i]);
    nm_free(fs->files);
    nm_free(fs->what);
    memset(fs, 0, sizeof(*fs));
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

// Opens the shards named by the index and checks that every weight_map entry is in the shard
// it names and that no shard holds a tensor the index does not list.
static int open_sharded(file_set *fs, const char *dir, const char *index_path, nm_error *err) {
    char *text = NULL;
    if (nm_file_read_json(index_path, &text, NULL, err)) return -1;
    cJSON *root = cJSON_Parse(text);
    nm_free(text);
    if (!root) return nm_error_set(err, "%s: malformed JSON", index_path);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    int rc = 0;
    if (!cJSON_IsObject(map)) {
        cJSON_Delete(root);
        return nm_error_set(err, "%s: no 'weight_map' object", index_path);
    }
    int n_entries = cJSON_GetArraySize(map);
    const char **shards = nm_malloc((size_t)(n_entries + 1) * sizeof(char *));
    int n_shards = 0;
    for (const cJSON *e = map->child; e; e = e->next) {
        if (!cJSON_IsString(e)) {
            rc = nm_error_set(err, "%s: weight_map entry '%s' is not a file name", index_path, e->string);
            break;
        }
        if (strchr(e->valuestring, '/') || strcmp(e->valuestring, "..") == 0) {
            rc = nm_error_set(err, "%s: weight_map entry '%s' names '%s' outside the directory", index_path, e->string,
                              e->valuestring);
            break;
        }
        shards[n_shards++] = e->valuestring;
    }
    if (rc == 0) {
        qsort(shards, (size_t)n_shards, sizeof(char *), cmp_str);
        int u = 0;
        for (int i = 0; i < n_shards; i++) {
            if (u == 0 || strcmp(shards[u - 1], shards[i]) != 0) shards[u++] = shards[i];
        }
        n_shards = u;
        fs->files = nm_calloc((size_t)n_shards + 1, sizeof(nm_safetensors *));
        for (int i = 0; i < n_shards && rc == 0; i++) {
            char *p = join(dir, shards[i]);
            rc = nm_safetensors_open(&fs->files[fs->n], p, err);
            if (rc == 0) fs->n++;
            nm_free(p);
        }
    }
    int64_t listed = 0;
    for (const cJSON *e = map->child; e && rc == 0; e = e->next) {
        const char **hit = bsearch(&e->valuestring, shards, (size_t)n_shards, sizeof(char *), cmp_str);
        nm_safetensors *st = fs->files[hit - shards];
        if (nm_safetensors_find(st, e->string) < 0) {
            rc = nm_error_set(err, "%s: tensor '%s' is listed in %s but missing from that file", nm_safetensors_path(st),
                              e->string, index_path);
        }
        listed++;
    }
    int64_t total = 0;
    for (int i = 0; i < fs->n; i++) total += nm_safetensors_count(fs->files[i]);
    if (rc == 0 && total != listed) {
        // Find one culprit to name it.
        for (int i = 0; i < fs->n && rc == 0; i++) {
            for (int k = 0; k < nm_safetensors_count(fs->files[i]); k++) {
                const char *nm = nm_safetensors_name(fs->files[i], k);
                const cJSON *e = cJSON_GetObjectItemCaseSensitive(map, nm);
                if (!e || strcmp(e->valuestring, shards[i]) != 0) {
                    rc = nm_error_set(err, "%s: tensor '%s' is not listed for this file in %s",
                                      nm_safetensors_path(fs->files[i]), nm, index_path);
                    break;
                }
            }
        }
        if (rc == 0) rc = nm_error_set(err, "%s: %lld tensors in the shards but %lld in weight_map", index_path,
                                       (long long)total, (long long)listed);
    }
    nm_free(shards);
    cJSON_Delete(root);
    return rc;
}

static int file_set_open(file_set *fs, const char *dir, nm_error *err) {
    memset(fs, 0, sizeof(*fs));
    char *index = join(dir, "model.safetensors.index.json");
    char *single = join(dir, "model.safetensors");
    int rc;
    if (access(index, F_OK) == 0) {
        fs->what = index;
        index = NULL;
        rc = open_sharded(fs, dir, fs->what, err);
    } else if (access(single, F_OK) == 0) {
        fs->what = single;
        single = NULL;
        fs->files = nm_calloc(1, sizeof(nm_safetensors *));
        rc = nm_safetensors_open(&fs->files[0], fs->what, err);
        if (rc == 0) fs->n = 1;
    } else {
        rc = nm_error_set(err, "%s: neither model.safetensors nor model.safetensors.index.json found", dir);
    }
    nm_free(index);
    nm_free(single);
    if (rc) file_set_close(fs);
    return rc;
}

// Finds name in the set; returns the tensor index and sets *st, or -1.
static int file_set_find(const file_set *fs, const char *name, nm_safetensors **st) {
    for (int i = 0; i < fs->n; i++) {
        int k = nm_safetensors_find(fs->files[i], name);
        if (k >= 0) { *st = fs->files[i]; return k; }
    }
    return -1;
}

static int shape_matches(const nm_safetensors *st, int k, const nm_tensor_spec *r, char *got, size_t n) {
    int64_t shape[NM_ST_MAX_DIMS];
    int nd = nm_safetensors_shape(st, k, shape);
    nm_shape_str(got, n, nd, shape);
    if (nd != r->ndim) return 0;
    for (int d = 0; d < nd; d++) {
        if (shape[d] != r->shape[d]) return 0;
    }
    return 1;
}

// --- FP8 block dequantisation ------------------------------------------------------------------

// The block of one scale: config.json's quantization_config.weight_block_size [rows, cols] as
// given; without a quantization_config, DeepSeek-V3's release value 128 x 128.
typedef struct fp8_block {
    int64_t o, i;
} fp8_block;

// config.json's quantization_config: only quant_method "fp8" with fmt "e4m3" (DeepSeek's release)
// is implemented; anything else would be decoded wrongly, so it is refused naming the value.
static int read_quant_config(const char *dir, fp8_block *blk, nm_error *err) {
    blk->o = blk->i = 128;
    char *path = join(dir, "config.json"), *text = NULL;
    int rc = access(path, F_OK) == 0 ? nm_file_read_all(path, &text, NULL, err) : 0;
    cJSON *root = rc == 0 && text ? cJSON_Parse(text) : NULL;
    if (rc == 0 && text && !root) rc = nm_error_set(err, "%s: malformed JSON", path);
    const cJSON *q = root ? cJSON_GetObjectItemCaseSensitive(root, "quantization_config") : NULL;
    if (rc == 0 && q && !cJSON_IsNull(q)) {
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(q, "quant_method");
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(q, "fmt");
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(q, "weight_block_size");
        char *bs = b ? cJSON_PrintUnformatted(b) : NULL;
        if (!cJSON_IsObject(q)) {
            rc = nm_error_set(err, "%s: quantization_config is not an object", path);
        } else if (!cJSON_IsString(m) || strcmp(m->valuestring, "fp8") != 0) {
            char *ms = m ? cJSON_PrintUnformatted(m) : NULL;
            rc = nm_error_set(err, "%s: quantization_config.quant_method %s is not implemented (only \"fp8\", "
                              "DeepSeek's block-scaled release format)", path, ms ? ms : "(missing)");
            cJSON_free(ms);
        } else if (f && !(cJSON_IsString(f) && strcmp(f->valuestring, "e4m3") == 0)) {
            char *fs = cJSON_PrintUnformatted(f);
            rc = nm_error_set(err, "%s: quantization_config.fmt %s is not implemented (only \"e4m3\")", path, fs);
            cJSON_free(fs);
        } else if (b) {
            const cJSON *b0 = cJSON_GetArrayItem(b, 0), *b1 = cJSON_GetArrayItem(b, 1);
            if (!cJSON_IsArray(b) || cJSON_GetArraySize(b) != 2 || !cJSON_IsNumber(b0) || !cJSON_IsNumber(b1) ||
                b0->valuedouble < 1 || b1->valuedouble < 1 || b0->valuedouble > 1048576 || b1->valuedouble > 1048576 ||
                b0->valuedouble != (double)(int64_t)b0->valuedouble || b1->valuedouble != (double)(int64_t)b1->valuedouble) {
                rc = nm_error_set(err, "%s: quantization_config.weight_block_size %s: expected [rows, cols], two integers in "
                                  "[1, 2^20]", path, bs);
            } else {
                blk->o = (int64_t)b0->valuedouble;
                blk->i = (int64_t)b1->valuedouble;
            }
        }
        cJSON_free(bs);
    }
    cJSON_Delete(root);
    nm_free(text);
    nm_free(path);
    return rc;
}

// Reads the F8_E4M3 matrix k of st (shape (O, I)) times its '<name>_scale_inv' blocks into dst.
static int read_fp8_block(const file_set *fs, const nm_safetensors *st, int k, const nm_tensor_spec *row,
                          fp8_block blk, float *dst, nm_error *err) {
    const char *name = nm_safetensors_name(st, k);
    if (row->ndim != 2) {
        return nm_error_set(err, "%s: tensor '%s' is F8_E4M3 but 1-D; only matrices are stored in FP8",
                            nm_safetensors_path(st), name);
    }
    char sname[160];
    snprintf(sname, sizeof(sname), "%s_scale_inv", name);
    nm_safetensors *ss = NULL;
    int ks = file_set_find(fs, sname, &ss);
    if (ks < 0) {
        return nm_error_set(err, "%s: tensor '%s' is F8_E4M3 but '%s' (its per-block scales) is missing",
                            nm_safetensors_path(st), name, sname);
    }
    const int64_t O = row->shape[0], I = row->shape[1];
    const int64_t bo = (O + blk.o - 1) / blk.o, bi = (I + blk.i - 1) / blk.i;
    int64_t shape[NM_ST_MAX_DIMS];
    int nd = nm_safetensors_shape(ss, ks, shape);
    if (nd != 2 || shape[0] != bo || shape[1] != bi) {
        char got[128];
        nm_shape_str(got, sizeof(got), nd, shape);
        return nm_error_set(err, "%s: scales '%s' have shape %s, expected [%lld, %lld] (%lld x %lld blocks of [%lld, %lld])",
                            nm_safetensors_path(ss), sname, got, (long long)bo, (long long)bi, (long long)blk.o,
                            (long long)blk.i, (long long)O, (long long)I);
    }
    float *scale = nm_malloc((size_t)(bo * bi) * sizeof(float));
    if (nm_safetensors_read_f32(ss, ks, scale, bo * bi, err)) {
        nm_free(scale);
        return -1;
    }
    size_t nbytes = 0;
    const uint8_t *codes = nm_safetensors_data(st, k, &nbytes);
    NM_CHECK(nbytes == (size_t)(O * I), "F8 tensor byte size");
    float lut[256];
    for (int c = 0; c < 256; c++) lut[c] = nm_fp8_e4m3_decode((uint8_t)c);
    for (int64_t o = 0; o < O; o++) {
        const float *srow = scale + (o / blk.o) * bi;
        for (int64_t i = 0; i < I; i++) dst[o * I + i] = lut[codes[o * I + i]] * srow[i / blk.i];
    }
    nm_free(scale);
    return 0;
}

static int is_fp8_e4m3(const nm_safetensors *st, int k) {
    return strcmp(nm_safetensors_dtype_name(st, k), "F8_E4M3") == 0;
}

// The FP8 scales the loader consumed: not "unknown" tensors.
static int is_scale_of_known(const nm_param_table *t, const char *nm) {
    size_t n = strlen(nm), sl = strlen("_scale_inv");
    if (n <= sl || strcmp(nm + n - sl, "_scale_inv") != 0) return 0;
    char base[160];
    if (n - sl >= sizeof(base)) return 0;
    memcpy(base, nm, n - sl);
    base[n - sl] = 0;
    return nm_param_table_find(t, base) >= 0;
}

// --- load ------------------------------------------------------------------------------------

int nm_hf_dir_load_params(const char *dir, const nm_param_table *t, float *params, nm_error *err) {
    fp8_block blk;
    if (read_quant_config(dir, &blk, err)) return -1;
    file_set fs;
    if (file_set_open(&fs, dir, err)) return -1;
    int rc = 0;
    char want[128], got[128];
    // MTP blocks all absent (a release without them, or one saved by a tool that drops them):
    // they keep the values already in params (nm_hf_dir_load_model initialises them fresh).
    int64_t n_mtp = 0, n_mtp_found = 0;
    for (int r = 0; r < t->n_rows; r++) {
        const nm_tensor_spec *row = &t->rows[r];
        if ((row->flags & NM_TENSOR_TIED) || !(row->flags & NM_TENSOR_MTP)) continue;
        nm_safetensors *st = NULL;
        n_mtp++;
        if (file_set_find(&fs, row->name, &st) >= 0) n_mtp_found++;
    }
    const int skip_mtp = n_mtp > 0 && n_mtp_found == 0;
    if (skip_mtp) {
        fprintf(stderr, "notice: %s: no MTP tensors (%lld expected); the MTP layers start from fresh initialisation\n",
                fs.what, (long long)n_mtp);
    }
    // Pass 1: the rows with storage.
    for (int r = 0; r < t->n_rows && rc == 0; r++) {
        const nm_tensor_spec *row = &t->rows[r];
        if (row->flags & NM_TENSOR_TIED) continue;
        if (skip_mtp && (row->flags & NM_TENSOR_MTP)) continue;
        nm_safetensors *st = NULL;
        int k = file_set_find(&fs, row->name, &st);
        nm_shape_str(want, sizeof(want), row->ndim, row->shape);
        if (k < 0 && (row->flags & NM_TENSOR_OPTIONAL)) {
            // The router bias of a method that never reads it: zeros, as a fresh model has.
            if (params) memset(params + row->offset, 0, (size_t)row->numel * sizeof(float));
            continue;
        }
        if (k < 0) {
            rc = nm_error_set(err, "%s: missing tensor '%s' (expected shape %s)", fs.what, row->name, want);
            break;
        }
        if (!shape_matches(st, k, row, got, sizeof(got))) {
            rc = nm_error_set(err, "%s: tensor '%s' has shape %s, expected %s", nm_safetensors_path(st), row->name, got,
                              want);
            break;
        }
        nm_st_dtype dt = nm_safetensors_dtype(st, k);
        if (is_fp8_e4m3(st, k)) {
            if (params) rc = read_fp8_block(&fs, st, k, row, blk, params + row->offset, err);
            continue;
        }
        if (dt == NM_ST_OTHER) {
            // Let the reader produce its dtype message (FP8 hint) even when only checking.
            float dummy;
            rc = nm_safetensors_read_f32(st, k, &dummy, nm_safetensors_numel(st, k), err);
            if (rc == 0) rc = -1;
            break;
        }
        if (params) rc = nm_safetensors_read_f32(st, k, params + row->offset, row->numel, err);
    }
    // Pass 2: MTP copies of embedding / head. The model uses the owner; a copy that differs
    // means the file was edited by something unaware of the sharing, which is worth a warning
    // but not a refusal (dsv3-spec 11).
    float *tmp = NULL;
    for (int r = 0; r < t->n_rows && rc == 0; r++) {
        const nm_tensor_spec *row = &t->rows[r];
        if (!(row->flags & NM_TENSOR_TIED)) continue;
        nm_safetensors *st = NULL;
        int k = file_set_find(&fs, row->name, &st);
        if (k < 0) continue;
        const char *owner = t->rows[row->owner].name;
        if (!shape_matches(st, k, row, got, sizeof(got))) {
            fprintf(stderr, "warning: %s: MTP copy '%s' has shape %s, not that of '%s'; ignored (the main tensor is used)\n",
                    nm_safetensors_path(st), row->name, got, owner);
            continue;
        }
        if (!params || nm_safetensors_dtype(st, k) == NM_ST_OTHER) continue;
        if (!tmp) tmp = nm_malloc((size_t)row->numel * sizeof(float));
        if (nm_safetensors_read_f32(st, k, tmp, row->numel, err)) { rc = -1; break; }
        const float *own = params + row->offset;
        int64_t n_diff = 0;
        double max_diff = 0;
        for (int64_t i = 0; i < row->numel; i++) {
            if (tmp[i] != own[i] && !(isnan(tmp[i]) && isnan(own[i]))) {
                n_diff++;
                double d = fabs((double)tmp[i] - (double)own[i]);
                if (!(d <= max_diff)) max_diff = d;
            }
        }
        if (n_diff) {
            fprintf(stderr, "warning: %s: MTP copy '%s' differs from '%s' in %lld of %lld values (max |diff| %.3g); "
                            "the main tensor is used\n", nm_safetensors_path(st), row->name, owner,
                    (long long)n_diff, (long long)row->numel, max_diff);
        }
    }
    nm_free(tmp);
    // Tensors in the files that the model does not have (e.g. FP8 scales, biases).
    if (rc == 0) {
        int64_t n_unknown = 0;
        char listed[MAX_UNKNOWN_LISTED * 120] = "";
        for (int f = 0; f < fs.n; f++) {
            for (int k = 0; k < nm_safetensors_count(fs.files[f]); k++) {
                const char *nm = nm_safetensors_name(fs.files[f], k);
                if (nm_param_table_find(t, nm) >= 0 || is_scale_of_known(t, nm)) continue;
                if (n_unknown++ < MAX_UNKNOWN_LISTED) {
                    size_t len = strlen(listed);
                    snprintf(listed + len, sizeof(listed) - len, "%s'%.100s'", len ? ", " : "", nm);
                }
            }
        }
        if (n_unknown) {
            fprintf(stderr, "warning: %s: %lld tensor(s) not in the model were ignored: %s%s\n", fs.what,
                    (long long)n_unknown, listed, n_unknown > MAX_UNKNOWN_LISTED ? ", ..." : "");
        }
    }
    file_set_close(&fs);
    return rc;
}

int nm_hf_dir_load_model(const char *dir, const nm_param_table *t, const nm_model_config *cfg, uint64_t seed,
                         float *params, nm_error *err) {
    nm_params_init(params, t, cfg, seed);
    return nm_hf_dir_load_params(dir, t, params, err);
}

// --- save ------------------------------------------------------------------------------------

int nm_hf_dir_save(const char *dir, const nm_model_config *cfg, const nm_param_table *t, const float *params,
                   int bf16, nm_error *err) {
    if (!cfg->json_text) return nm_error_set(err, "%s: model config has no JSON text to write", dir);
    if (nm_mkdir_p(dir, err)) return -1;
    // A stale shard index would take precedence over the model.safetensors written here.
    char *index = join(dir, "model.safetensors.index.json");
    int sharded = access(index, F_OK) == 0;
    nm_free(index);
    if (sharded) {
        return nm_error_set(err, "%s: already holds a sharded checkpoint (model.safetensors.index.json); "
                                 "save into an empty directory", dir);
    }
    char *cfg_path = join(dir, "config.json");
    int rc = nm_file_write_atomic(cfg_path, cfg->json_text, strlen(cfg->json_text), err);
    nm_free(cfg_path);
    if (rc) return -1;

    nm_st_tensor *ts = nm_calloc((size_t)t->n_rows + 1, sizeof(nm_st_tensor));
    for (int r = 0; r < t->n_rows; r++) {
        const nm_tensor_spec *row = &t->rows[r];
        ts[r].name = row->name;
        ts[r].ndim = row->ndim;
        ts[r].shape[0] = row->shape[0];
        ts[r].shape[1] = row->shape[1];
        ts[r].data = params + row->offset;  // tied rows carry the owner's offset: written as copies
        // The aux-loss-free bias is kept in fp32 everywhere (transformers PR #42580, dsv3-spec 9.10).
        ts[r].dtype = (bf16 && !(row->flags & NM_TENSOR_ROUTER_BIAS)) ? NM_ST_BF16 : NM_ST_F32;
    }
    char *st_path = join(dir, "model.safetensors");
    rc = nm_safetensors_write(st_path, ts, t->n_rows, err);
    nm_free(st_path);
    nm_free(ts);
    return rc;
}
