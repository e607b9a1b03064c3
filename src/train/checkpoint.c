// checkpoint.c: implementation of checkpoint.h.
#define _GNU_SOURCE
#include "train/checkpoint.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/fileio.h"
#include "io/table_io.h"

#define CKPT_FORMAT 1
static const char *const ckpt_files[] = {"config.json", "model.safetensors", "optim_m.safetensors", "optim_v.safetensors"};
enum { N_CKPT_FILES = 4 };

void nm_ckpt_state_free(nm_ckpt_state *st) {
    if (!st) return;
    nm_free(st->train_config_json);
    nm_free(st->tokenizer);
    st->train_config_json = NULL;
    st->tokenizer = NULL;
}

// --- helpers ----------------------------------------------------------------------------------

static int file_crc(const char *path, uint32_t *crc, int64_t *size, nm_error *err) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return nm_error_set(err, "%s: cannot open: %s", path, strerror(errno));
    static _Thread_local unsigned char buf[1 << 20];
    uint32_t c = 0;
    int64_t n = 0;
    size_t got;
    while ((got = fread(buf, 1, sizeof(buf), fp)) > 0) {
        c = nm_crc32c(c, buf, got);
        n += (int64_t)got;
    }
    int bad = ferror(fp);
    fclose(fp);
    if (bad) return nm_error_set(err, "%s: read error", path);
    *crc = c;
    *size = n;
    return 0;
}

static int write_text_atomic(const char *path, const char *text, nm_error *err) {
    nm_atomic_file f;
    if (nm_atomic_open(&f, path, err) != 0) return -1;
    if (nm_fwrite_all(f.fp, text, strlen(text), path, err) != 0) {
        nm_atomic_abort(&f);
        return -1;
    }
    return nm_atomic_commit(&f, err);
}

static int remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) return unlink(path);
    struct dirent *e;
    char child[4096];
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(child, sizeof(child), "%s/%s", path, e->d_name);
        remove_tree(child);
    }
    closedir(d);
    return rmdir(path);
}

// A save killed midway leaves step_N.tmp.<pid>/ behind; one trainer owns a run directory,
// so any such directory is garbage by the time we save again.
static void remove_stale_tmp(const char *run_dir) {
    DIR *d = opendir(run_dir);
    if (!d) return;
    struct dirent *e;
    char path[4400];
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "step_", 5) == 0 && strstr(e->d_name, ".tmp.")) {
            snprintf(path, sizeof(path), "%s/%s", run_dir, e->d_name);
            remove_tree(path);
        }
    }
    closedir(d);
}

// Step numbers of the complete-looking step_NNN directories, newest first.
static int list_steps(const char *run_dir, int64_t **steps_out) {
    DIR *d = opendir(run_dir);
    *steps_out = NULL;
    if (!d) return 0;
    int n = 0, cap = 16;
    int64_t *steps = nm_malloc((size_t)cap * sizeof(int64_t));
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long long s;
        int used = 0;
        if (sscanf(e->d_name, "step_%lld%n", &s, &used) == 1 && used == (int)strlen(e->d_name)) {
            if (n == cap) steps = nm_realloc(steps, (size_t)(cap *= 2) * sizeof(int64_t));
            steps[n++] = s;
        }
    }
    closedir(d);
    for (int i = 1; i < n; i++) {  // insertion sort, descending: a handful of entries
        int64_t v = steps[i];
        int j = i - 1;
        while (j >= 0 && steps[j] < v) { steps[j + 1] = steps[j]; j--; }
        steps[j + 1] = v;
    }
    *steps_out = steps;
    return n;
}

// --- save -------------------------------------------------------------------------------------

int nm_checkpoint_save(const char *run_dir, const nm_ckpt_state *st, const nm_model_config *mcfg,
                       const nm_param_table *t, const float *params, const float *adam_m, const float *adam_v,
                       int64_t keep_last, char *out_dir, size_t out_cap, nm_error *err) {
    char final_dir[4096], tmp_dir[4200], path[4400];
    snprintf(final_dir, sizeof(final_dir), "%s/step_%06" PRId64, run_dir, st->step);
    snprintf(tmp_dir, sizeof(tmp_dir), "%s.tmp.%ld", final_dir, (long)getpid());
    if (nm_mkdir_p(run_dir, err) != 0) return -1;
    remove_stale_tmp(run_dir);
    if (mkdir(tmp_dir, 0755) != 0) return nm_error_set(err, "%s: cannot create: %s", tmp_dir, strerror(errno));

    int rc = 0;
    snprintf(path, sizeof(path), "%s/config.json", tmp_dir);
    rc = write_text_atomic(path, mcfg->json_text, err);
    if (rc == 0) {
        snprintf(path, sizeof(path), "%s/model.safetensors", tmp_dir);
        rc = nm_table_write_safetensors(path, t, params, err);
    }
    if (rc == 0) {
        snprintf(path, sizeof(path), "%s/optim_m.safetensors", tmp_dir);
        rc = nm_table_write_safetensors(path, t, adam_m, err);
    }
    if (rc == 0) {
        snprintf(path, sizeof(path), "%s/optim_v.safetensors", tmp_dir);
        rc = nm_table_write_safetensors(path, t, adam_v, err);
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "format", CKPT_FORMAT);
    cJSON_AddNumberToObject(root, "step", (double)st->step);
    cJSON_AddNumberToObject(root, "tokens", (double)st->tokens);
    cJSON *cursor = cJSON_AddObjectToObject(root, "data_cursor");
    cJSON_AddNumberToObject(cursor, "sample", (double)st->data_sample);
    cJSON_AddNumberToObject(root, "optimizer_step", (double)st->optim_step);
    cJSON_AddNumberToObject(root, "skipped_steps", (double)st->skipped_steps);
    cJSON_AddNumberToObject(root, "nan_streak", (double)st->nan_streak);
    // Every random draw is a counter-based function of (seed, purpose, step, ...): the seed
    // and the step are the whole RNG state.
    cJSON *rng = cJSON_AddObjectToObject(root, "rng");
    cJSON_AddNumberToObject(rng, "seed", (double)st->seed);
    cJSON_AddStringToObject(rng, "generator", "splitmix64-counter");
    cJSON *layout = cJSON_AddObjectToObject(root, "layout");
    cJSON_AddNumberToObject(layout, "data_parallel", (double)st->world);
    cJSON_AddNumberToObject(layout, "tensor_parallel", 1);
    cJSON_AddNumberToObject(layout, "expert_parallel", 1);
    cJSON_AddNumberToObject(layout, "pipeline_parallel", 1);
    cJSON_AddStringToObject(root, "tokenizer", st->tokenizer ? st->tokenizer : "bytes");
    cJSON *tc = st->train_config_json ? cJSON_Parse(st->train_config_json) : NULL;
    cJSON_AddItemToObject(root, "train_config", tc ? tc : cJSON_CreateNull());
    cJSON *files = cJSON_AddObjectToObject(root, "files");
    for (int i = 0; rc == 0 && i < N_CKPT_FILES; i++) {
        uint32_t crc;
        int64_t size;
        snprintf(path, sizeof(path), "%s/%s", tmp_dir, ckpt_files[i]);
        rc = file_crc(path, &crc, &size, err);
        if (rc != 0) break;
        cJSON *f = cJSON_AddObjectToObject(files, ckpt_files[i]);
        cJSON_AddNumberToObject(f, "size", (double)size);
        char hex[16];
        snprintf(hex, sizeof(hex), "%08x", crc);
        cJSON_AddStringToObject(f, "crc32c", hex);
    }
    if (rc == 0) {
        char *text = cJSON_Print(root);
        size_t len = strlen(text);
        char *with_nl = nm_malloc(len + 2);
        memcpy(with_nl, text, len);
        memcpy(with_nl + len, "\n", 2);
        free(text);
        snprintf(path, sizeof(path), "%s/trainer.json", tmp_dir);
        rc = write_text_atomic(path, with_nl, err);
        nm_free(with_nl);
    }
    cJSON_Delete(root);
    if (rc == 0 && nm_fsync_dir(tmp_dir, err) != 0) rc = -1;
    if (rc == 0) {
        // Re-saving a step (a resumed run reaching it again) replaces the old copy.
        remove_tree(final_dir);
        if (rename(tmp_dir, final_dir) != 0) rc = nm_error_set(err, "%s: rename failed: %s", final_dir, strerror(errno));
    }
    if (rc == 0) rc = nm_fsync_dir(run_dir, err);
    if (rc == 0) {
        char latest[4200], line[64];
        snprintf(latest, sizeof(latest), "%s/latest", run_dir);
        snprintf(line, sizeof(line), "step_%06" PRId64 "\n", st->step);
        rc = write_text_atomic(latest, line, err);
    }
    if (rc != 0) {
        remove_tree(tmp_dir);
        return nm_error_prefix(err, "saving checkpoint %s", final_dir);
    }
    if (keep_last > 0) {
        int64_t *steps;
        int n = list_steps(run_dir, &steps);
        for (int i = (int)keep_last; i < n; i++) {
            snprintf(path, sizeof(path), "%s/step_%06" PRId64, run_dir, steps[i]);
            remove_tree(path);
        }
        nm_free(steps);
    }
    if (out_dir) snprintf(out_dir, out_cap, "%s", final_dir);
    return 0;
}

// --- load -------------------------------------------------------------------------------------

static int64_t json_int(const cJSON *obj, const char *key, int *ok) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    // An integer within +-2^53 (what the writer's doubles hold exactly); anything else would
    // make the int64 conversion undefined (found by tests/fuzz/fuzz_trainer_json).
    if (!cJSON_IsNumber(v) || !(fabs(v->valuedouble) <= 9007199254740992.0) || v->valuedouble != floor(v->valuedouble)) {
        *ok = 0;
        return 0;
    }
    return (int64_t)v->valuedouble;
}

// Checks trainer.json and the files it lists; fills st on success.
static int verify_checkpoint(const char *dir, nm_ckpt_state *st, nm_error *err) {
    char path[4400];
    char *text;
    size_t len;
    snprintf(path, sizeof(path), "%s/trainer.json", dir);
    if (nm_file_read_all(path, &text, &len, err) != 0) return -1;
    int rc = nm_checkpoint_verify_trainer(dir, text, len, st, err);
    nm_free(text);
    return rc;
}

int nm_checkpoint_verify_trainer(const char *dir, const char *text, size_t len, nm_ckpt_state *st, nm_error *err) {
    char path[4400];
    snprintf(path, sizeof(path), "%s/trainer.json", dir);
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root) return nm_error_set(err, "%s: not valid JSON", path);
    int ok = 1, rc = 0;
    memset(st, 0, sizeof(*st));
    if (json_int(root, "format", &ok) != CKPT_FORMAT || !ok) {
        cJSON_Delete(root);
        return nm_error_set(err, "%s: unknown checkpoint format", path);
    }
    st->step = json_int(root, "step", &ok);
    st->tokens = json_int(root, "tokens", &ok);
    st->data_sample = json_int(cJSON_GetObjectItemCaseSensitive(root, "data_cursor"), "sample", &ok);
    st->optim_step = json_int(root, "optimizer_step", &ok);
    st->skipped_steps = json_int(root, "skipped_steps", &ok);
    st->nan_streak = json_int(root, "nan_streak", &ok);
    st->seed = json_int(cJSON_GetObjectItemCaseSensitive(root, "rng"), "seed", &ok);
    st->world = json_int(cJSON_GetObjectItemCaseSensitive(root, "layout"), "data_parallel", &ok);
    if (!ok) rc = nm_error_set(err, "%s: a required field is missing or not an integer", path);
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(root, "files");
    for (int i = 0; rc == 0 && i < N_CKPT_FILES; i++) {
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(files, ckpt_files[i]);
        const cJSON *crc_s = cJSON_GetObjectItemCaseSensitive(f, "crc32c");
        int ok2 = 1;
        int64_t want_size = json_int(f, "size", &ok2);
        if (!ok2 || !cJSON_IsString(crc_s)) {
            rc = nm_error_set(err, "%s: no checksum recorded for %s", path, ckpt_files[i]);
            break;
        }
        char fpath[4400];
        snprintf(fpath, sizeof(fpath), "%s/%s", dir, ckpt_files[i]);
        uint32_t crc;
        int64_t size;
        if (file_crc(fpath, &crc, &size, err) != 0) {
            rc = -1;
            break;
        }
        char hex[16];
        snprintf(hex, sizeof(hex), "%08x", crc);
        if (size != want_size) {
            rc = nm_error_set(err, "%s: size %" PRId64 " bytes, trainer.json recorded %" PRId64, fpath, size, want_size);
        } else if (strcmp(hex, crc_s->valuestring) != 0) {
            rc = nm_error_set(err, "%s: CRC-32C %s, trainer.json recorded %s (file corrupt)", fpath, hex, crc_s->valuestring);
        }
    }
    if (rc == 0) {
        const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "train_config");
        if (tc && !cJSON_IsNull(tc)) {
            char *s = cJSON_Print(tc);
            st->train_config_json = nm_strdup(s);
            free(s);
        }
        const cJSON *tok = cJSON_GetObjectItemCaseSensitive(root, "tokenizer");
        st->tokenizer = nm_strdup(cJSON_IsString(tok) ? tok->valuestring : "bytes");
    }
    cJSON_Delete(root);
    if (rc != 0) nm_ckpt_state_free(st);
    return rc;
}

// Candidates in order: what `latest` names, then every step_* newest first.
static int find_valid(const char *run_dir, nm_ckpt_state *st, char *out_dir, size_t out_cap, nm_error *err) {
    char latest_path[4200], first[4200] = "";
    snprintf(latest_path, sizeof(latest_path), "%s/latest", run_dir);
    char *text;
    nm_error ignore;
    if (nm_file_read_all(latest_path, &text, NULL, &ignore) == 0) {
        text[strcspn(text, "\r\n")] = 0;
        snprintf(first, sizeof(first), "%s/%s", run_dir, text);
        nm_free(text);
    }
    int64_t *steps;
    int n = list_steps(run_dir, &steps);
    if (!first[0] && n == 0) {
        nm_free(steps);
        return 1;
    }
    int rc = -1;
    char tried[4200] = "";
    for (int i = -1; i < n; i++) {
        char dir[4200];
        if (i < 0) {
            if (!first[0]) continue;
            snprintf(dir, sizeof(dir), "%s", first);
        } else {
            snprintf(dir, sizeof(dir), "%s/step_%06" PRId64, run_dir, steps[i]);
            if (!strcmp(dir, first)) continue;
        }
        nm_error why;
        if (verify_checkpoint(dir, st, &why) == 0) {
            if (tried[0]) fprintf(stderr, "checkpoint: using %s instead\n", dir);
            snprintf(out_dir, out_cap, "%s", dir);
            rc = 0;
            break;
        }
        fprintf(stderr, "checkpoint: %s is not usable: %s\n", dir, why.msg);
        snprintf(tried, sizeof(tried), "%s", dir);
    }
    nm_free(steps);
    if (rc != 0) nm_error_set(err, "%s: no valid checkpoint (the last one tried was %s)", run_dir, tried);
    return rc;
}

int nm_checkpoint_find_latest(const char *run_dir, char *out_dir, size_t out_cap, nm_error *err) {
    nm_ckpt_state st;
    int rc = find_valid(run_dir, &st, out_dir, out_cap, err);
    if (rc == 1) return nm_error_set(err, "%s: no checkpoint in this run directory", run_dir);
    if (rc == 0) nm_ckpt_state_free(&st);
    return rc;
}

int nm_checkpoint_load_latest(const char *run_dir, nm_ckpt_state *st, const nm_param_table *t, float *params,
                              float *adam_m, float *adam_v, char *out_dir, size_t out_cap, nm_error *err) {
    int rc = find_valid(run_dir, st, out_dir, out_cap, err);
    if (rc != 0) return rc;
    char path[4400];
    const char *names[3] = {"model.safetensors", "optim_m.safetensors", "optim_v.safetensors"};
    float *bufs[3] = {params, adam_m, adam_v};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof(path), "%s/%s", out_dir, names[i]);
        if (nm_table_read_safetensors(path, t, bufs[i], err) != 0) {
            nm_ckpt_state_free(st);
            return -1;
        }
    }
    return 0;
}
