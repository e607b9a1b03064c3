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
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"
#include "io/table_io.h"

#define CKPT_FORMAT 1

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
    return nm_file_write_atomic(path, text, strlen(text), err);
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

// The files one rank writes: model, optim_m, optim_v (shard names at world > 1).
static const char *const kinds[3] = {"model", "optim_m", "optim_v"};

static void shard_name(char *buf, size_t cap, int kind, int rank, int world) {
    if (world == 1) snprintf(buf, cap, "%s.safetensors", kinds[kind]);
    else snprintf(buf, cap, "%s-%05d-of-%05d.safetensors", kinds[kind], rank + 1, world);
}

// The last pipeline stage's copy of the embedding: the first stage writes that tensor (the
// copy is equal to it); loading by name fills the copy from there.
static int stage_copy(const nm_param_table *t, const nm_tensor_spec *r) {
    return t->embed_copy && !(r->flags & NM_TENSOR_TIED) && r->layer < 0 && r->offset == t->embed;
}

// Writes this rank's rows of buf into path. state: row offsets into buf (NULL: row offsets);
// tied rows are written (as copies of their owner) only for the model file.
static int write_rows(const char *path, const nm_param_table *t, const float *buf, const unsigned char *owned,
                      const size_t *state, int with_tied, nm_error *err) {
    nm_st_tensor *ts = nm_calloc((size_t)t->n_rows, sizeof(nm_st_tensor));
    int n = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        int tied = (r->flags & NM_TENSOR_TIED) != 0;
        int own_row = tied ? r->owner : i;
        if (tied && !with_tied) continue;
        if (owned && !owned[own_row]) continue;
        if (stage_copy(t, r)) continue;
        size_t off = state ? state[own_row] : r->offset;
        if (off == SIZE_MAX) continue;  // no optimizer state (router bias)
        ts[n].name = r->name;
        ts[n].ndim = r->ndim;
        for (int d = 0; d < r->ndim; d++) ts[n].shape[d] = r->shape[d];
        ts[n].data = buf + off;
        ts[n].dtype = NM_ST_F32;
        n++;
    }
    int rc = nm_safetensors_write(path, ts, n, err);
    nm_free(ts);
    return rc;
}

// The names this rank wrote into a kind's file, '\n'-separated (for rank 0's index files).
static char *row_names(const nm_param_table *t, const unsigned char *owned, const size_t *state, int with_tied,
                       size_t *len) {
    size_t cap = 1, n = 0;
    for (int i = 0; i < t->n_rows; i++) cap += strlen(t->rows[i].name) + 1;
    char *out = nm_malloc(cap + 4);
    for (int i = 0; i < t->n_rows; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        int tied = (r->flags & NM_TENSOR_TIED) != 0;
        int own_row = tied ? r->owner : i;
        if ((tied && !with_tied) || (owned && !owned[own_row]) || stage_copy(t, r)) continue;
        if ((state ? state[own_row] : r->offset) == SIZE_MAX) continue;
        size_t l = strlen(r->name);
        memcpy(out + n, r->name, l);
        out[n + l] = '\n';
        n += l + 1;
    }
    *len = n;
    return out;
}

// All ranks' byte strings, concatenated in rank order on every rank (two all_gathers:
// lengths, then the bytes padded to whole 32-bit words).
static int gather_bytes(nm_comm *c, const char *mine, size_t len, char **all, int64_t **lens, nm_error *err) {
    int R = c->size;
    int64_t *ln = nm_calloc((size_t)R, sizeof(int64_t)), *ones = nm_calloc((size_t)R, sizeof(int64_t));
    for (int r = 0; r < R; r++) ones[r] = 1;
    ln[c->rank] = (int64_t)len;
    int rc = nm_comm_all_gather(c, ln, ones, NM_DT_I64, err);
    int64_t *words = nm_calloc((size_t)R, sizeof(int64_t));
    int64_t total = 0, before = 0;
    for (int r = 0; r < R; r++) {
        words[r] = (ln[r] + 3) / 4;
        if (r < c->rank) before += words[r];
        total += words[r];
    }
    char *buf = nm_calloc((size_t)total * 4 + 1, 1);
    memcpy(buf + before * 4, mine, len);
    if (rc == 0) rc = nm_comm_all_gather(c, buf, words, NM_DT_I32, err);
    // squeeze out the padding
    size_t at = 0, from = 0;
    for (int r = 0; r < R; r++) {
        memmove(buf + at, buf + from, (size_t)ln[r]);
        at += (size_t)ln[r];
        from += (size_t)words[r] * 4;
    }
    buf[at] = 0;
    nm_free(ones);
    nm_free(words);
    *all = buf;
    *lens = ln;
    return rc;
}

// HF's index: {"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}.
static int write_index(const char *path, const char *names, const int64_t *lens, int world, int kind,
                       int64_t total_size, nm_error *err) {
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)total_size);
    cJSON *map = cJSON_AddObjectToObject(root, "weight_map");
    const char *p = names;
    for (int r = 0; r < world; r++) {
        char file[128];
        shard_name(file, sizeof(file), kind, r, world);
        const char *end = p + lens[r];
        while (p < end) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            char name[128];
            snprintf(name, sizeof(name), "%.*s", (int)(nl - p), p);
            cJSON_AddStringToObject(map, name, file);
            p = nl + 1;
        }
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    int rc = write_text_atomic(path, text, err);
    free(text);
    return rc;
}

enum { REC = 7 };  // per rank: status, then (crc, size) of its three files

// Fault injection for the tests (tests/test_dist_faults.sh): NM_TEST_KILL_IN_SAVE=RANK:STEP
// [:PHASE] kills that rank with SIGKILL at that step's save, as a node lost mid-save:
//   shards (the default)  its shard files written, nothing gathered or committed
//   commit                rank 0: the temporary directory complete (trainer.json synced), not
//                         yet renamed into place
//   latest                rank 0: renamed to step_N, `latest` still naming the previous one
// Only rank 0 reaches the last two; any other rank given them is never killed.
static void test_kill_point(const char *phase, int rank, int64_t step) {
    const char *spec = getenv("NM_TEST_KILL_IN_SAVE");
    if (!spec) return;
    long kill_rank = -1, kill_step = -1;
    char want[16] = "shards";
    int n = sscanf(spec, "%ld:%ld:%15s", &kill_rank, &kill_step, want);
    if (n < 2 || kill_rank != rank || kill_step != step || strcmp(want, phase) != 0) return;
    fflush(stdout);
    fflush(stderr);
    raise(SIGKILL);
}

int nm_checkpoint_save(const char *run_dir, const nm_ckpt_state *st, const nm_model_config *mcfg,
                       const nm_param_table *t, const float *params, const float *adam_m, const float *adam_v,
                       const nm_ckpt_shard *shard, int64_t keep_last, char *out_dir, size_t out_cap, nm_error *err) {
    nm_comm *single = NULL, *c = shard ? shard->world : NULL;
    if (!c) c = single = nm_comm_single();
    const unsigned char *owned = shard ? shard->owned : NULL;
    const size_t *state = shard ? shard->row_state : NULL;
    int R = c->size, me = c->rank;
    char final_dir[4096], tmp_dir[4200], path[4400];
    snprintf(final_dir, sizeof(final_dir), "%s/step_%06" PRId64, run_dir, st->step);
    // Rank 0 makes the temporary directory; its name travels to the others.
    int64_t status = 0;
    if (me == 0) {
        snprintf(tmp_dir, sizeof(tmp_dir), "%s.tmp.%ld", final_dir, (long)getpid());
        if (nm_mkdir_p(run_dir, err) != 0) status = -1;
        if (status == 0) {
            remove_stale_tmp(run_dir);
            if (mkdir(tmp_dir, 0755) != 0) status = nm_error_set(err, "%s: cannot create: %s", tmp_dir, strerror(errno));
        }
    }
    int rc = 0;
    if (R > 1) {
        rc = nm_comm_broadcast(c, tmp_dir, (int64_t)sizeof(tmp_dir) / 4, NM_DT_I32, 0, err);
        if (rc == 0) rc = nm_comm_broadcast(c, &status, 1, NM_DT_I64, 0, err);
        if (rc == 0 && status != 0 && me != 0) rc = nm_error_set(err, "saving %s: rank 0 could not create %s", final_dir, tmp_dir);
    }
    if (status != 0) rc = -1;
    if (rc != 0) {
        nm_comm_destroy(single);
        return nm_error_prefix(err, "saving checkpoint %s", final_dir);
    }

    // Every rank: its shard of the model and of both moments, each file atomic, then sizes
    // and CRCs for trainer.json.
    int64_t *rec = nm_calloc((size_t)R * REC, sizeof(int64_t)), *rec_counts = nm_calloc((size_t)R, sizeof(int64_t));
    int64_t *my = rec + (size_t)me * REC;
    const float *bufs[3] = {params, adam_m, adam_v};
    for (int k = 0; k < 3 && rc == 0; k++) {
        char file[128];
        shard_name(file, sizeof(file), k, me, R);
        snprintf(path, sizeof(path), "%s/%s", tmp_dir, file);
        rc = write_rows(path, t, bufs[k], owned, k == 0 ? NULL : state, k == 0, err);
        uint32_t crc = 0;
        int64_t size = 0;
        if (rc == 0) rc = file_crc(path, &crc, &size, err);
        my[1 + 2 * k] = crc;
        my[2 + 2 * k] = size;
    }
    my[0] = rc;
    test_kill_point("shards", me, st->step);
    char *names[3] = {NULL, NULL, NULL};
    int64_t *lens[3] = {NULL, NULL, NULL};
    nm_error comm_err;
    int crc_rc = 0;
    if (R > 1) {
        for (int r = 0; r < R; r++) rec_counts[r] = REC;
        crc_rc = nm_comm_all_gather(c, rec, rec_counts, NM_DT_I64, &comm_err);
        for (int k = 0; k < 3 && crc_rc == 0; k++) {
            size_t len;
            char *mine = row_names(t, owned, k == 0 ? NULL : state, k == 0, &len);
            crc_rc = gather_bytes(c, mine, len, &names[k], &lens[k], &comm_err);
            nm_free(mine);
        }
        if (crc_rc != 0) {
            if (rc == 0) *err = comm_err;
            rc = -1;
        }
        for (int r = 0; r < R && rc == 0; r++) {
            if (rec[(size_t)r * REC] != 0) rc = nm_error_set(err, "rank %d failed to write its checkpoint shard", r);
        }
    }

    // Rank 0 commits: index files, config.json, trainer.json last, rename, `latest`.
    if (me == 0 && rc == 0) {
        if (R > 1) {
            for (int k = 0; k < 3 && rc == 0; k++) {
                int64_t total = 0;
                for (int r = 0; r < R; r++) total += rec[(size_t)r * REC + 2 + 2 * k];
                snprintf(path, sizeof(path), "%s/%s.safetensors.index.json", tmp_dir, kinds[k]);
                rc = write_index(path, names[k], lens[k], R, k, total, err);
            }
        }
        snprintf(path, sizeof(path), "%s/config.json", tmp_dir);
        if (rc == 0) rc = write_text_atomic(path, mcfg->json_text, err);
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
        cJSON_AddNumberToObject(layout, "world", (double)R);
        cJSON_AddNumberToObject(layout, "data_parallel", (double)st->world);
        cJSON_AddNumberToObject(layout, "tensor_parallel", shard && shard->tp ? (double)shard->tp : 1);
        cJSON_AddNumberToObject(layout, "expert_parallel", shard && shard->ep ? (double)shard->ep : 1);
        cJSON_AddNumberToObject(layout, "pipeline_parallel", shard && shard->pp ? (double)shard->pp : 1);
        cJSON_AddStringToObject(root, "tokenizer", st->tokenizer ? st->tokenizer : "bytes");
        cJSON *tc = st->train_config_json ? cJSON_Parse(st->train_config_json) : NULL;
        cJSON_AddItemToObject(root, "train_config", tc ? tc : cJSON_CreateNull());
        cJSON *files = cJSON_AddObjectToObject(root, "files");
        // config.json and the index files: checksummed here; the shards: as their ranks reported.
        const char *own_files[4] = {"config.json", "model.safetensors.index.json", "optim_m.safetensors.index.json",
                                    "optim_v.safetensors.index.json"};
        for (int i = 0; rc == 0 && i < (R > 1 ? 4 : 1); i++) {
            uint32_t crc;
            int64_t size;
            snprintf(path, sizeof(path), "%s/%s", tmp_dir, own_files[i]);
            rc = file_crc(path, &crc, &size, err);
            if (rc != 0) break;
            cJSON *f = cJSON_AddObjectToObject(files, own_files[i]);
            cJSON_AddNumberToObject(f, "size", (double)size);
            char hex[16];
            snprintf(hex, sizeof(hex), "%08x", crc);
            cJSON_AddStringToObject(f, "crc32c", hex);
        }
        for (int r = 0; rc == 0 && r < R; r++) {
            for (int k = 0; k < 3; k++) {
                char file[128], hex[16];
                shard_name(file, sizeof(file), k, r, R);
                cJSON *f = cJSON_AddObjectToObject(files, file);
                cJSON_AddNumberToObject(f, "size", (double)rec[(size_t)r * REC + 2 + 2 * k]);
                snprintf(hex, sizeof(hex), "%08x", (uint32_t)rec[(size_t)r * REC + 1 + 2 * k]);
                cJSON_AddStringToObject(f, "crc32c", hex);
            }
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
        if (rc == 0) test_kill_point("commit", me, st->step);
        if (rc == 0) {
            // Re-saving a step (a resumed run reaching it again) replaces the old copy.
            remove_tree(final_dir);
            if (rename(tmp_dir, final_dir) != 0) rc = nm_error_set(err, "%s: rename failed: %s", final_dir, strerror(errno));
        }
        if (rc == 0) rc = nm_fsync_dir(run_dir, err);
        if (rc == 0) test_kill_point("latest", me, st->step);
        if (rc == 0) {
            char latest[4200], line[64];
            snprintf(latest, sizeof(latest), "%s/latest", run_dir);
            snprintf(line, sizeof(line), "step_%06" PRId64 "\n", st->step);
            rc = write_text_atomic(latest, line, err);
        }
        if (rc == 0 && keep_last > 0) {
            int64_t *steps;
            int n = list_steps(run_dir, &steps);
            for (int i = (int)keep_last; i < n; i++) {
                snprintf(path, sizeof(path), "%s/step_%06" PRId64, run_dir, steps[i]);
                remove_tree(path);
            }
            nm_free(steps);
        }
    }
    if (me == 0 && rc != 0) remove_tree(tmp_dir);
    if (R > 1 && crc_rc == 0) {
        // Everyone learns whether rank 0 committed.
        int64_t committed = rc;
        if (nm_comm_broadcast(c, &committed, 1, NM_DT_I64, 0, &comm_err) != 0) {
            *err = comm_err;
            rc = -1;
        } else if (committed != 0 && rc == 0) {
            rc = nm_error_set(err, "rank 0 could not commit the checkpoint");
        }
    }
    for (int k = 0; k < 3; k++) {
        nm_free(names[k]);
        nm_free(lens[k]);
    }
    nm_free(rec);
    nm_free(rec_counts);
    nm_comm_destroy(single);
    if (rc != 0) return nm_error_prefix(err, "saving checkpoint %s", final_dir);
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
    if (nm_file_read_json(path, &text, &len, err) != 0) return -1;
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
    // Every file trainer.json lists must be there with its size and CRC; a listing without
    // the model (one file or an index) is not a checkpoint.
    if (rc == 0 && !cJSON_GetObjectItemCaseSensitive(files, "model.safetensors") &&
        !cJSON_GetObjectItemCaseSensitive(files, "model.safetensors.index.json"))
        rc = nm_error_set(err, "%s: lists neither model.safetensors nor model.safetensors.index.json", path);
    if (rc == 0 && !cJSON_GetObjectItemCaseSensitive(files, "config.json"))
        rc = nm_error_set(err, "%s: no checksum recorded for config.json", path);
    const cJSON *f = NULL;
    cJSON_ArrayForEach(f, files) {
        if (rc != 0) break;
        const cJSON *crc_s = cJSON_GetObjectItemCaseSensitive(f, "crc32c");
        int ok2 = 1;
        int64_t want_size = json_int(f, "size", &ok2);
        if (!ok2 || !cJSON_IsString(crc_s) || !f->string || strchr(f->string, '/')) {
            rc = nm_error_set(err, "%s: bad checksum entry for %s", path, f->string ? f->string : "?");
            break;
        }
        char fpath[4400];
        snprintf(fpath, sizeof(fpath), "%s/%s", dir, f->string);
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

// One kind (model / optim_m / optim_v) of a checkpoint by tensor name, whichever layout wrote
// it: the single file, or the shards its index lists. Rows with dest[row] == SIZE_MAX are
// skipped; dest NULL: row offsets (every non-tied row).
static int load_kind(const char *dir, int kind, const nm_param_table *t, float *buf, const size_t *dest,
                     nm_error *err) {
    char path[4400];
    snprintf(path, sizeof(path), "%s/%s.safetensors.index.json", dir, kinds[kind]);
    char *text = NULL;
    nm_error ignore;
    cJSON *map = NULL, *root = NULL;
    if (nm_file_read_all(path, &text, NULL, &ignore) == 0) {
        root = cJSON_Parse(text);
        nm_free(text);
        map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
        if (!cJSON_IsObject(map)) {
            cJSON_Delete(root);
            return nm_error_set(err, "%s: no \"weight_map\" object", path);
        }
    }
    // Open each file at most once: files are few (one per rank of the writing layout).
    enum { MAX_OPEN = 4096 };
    char **open_names = nm_calloc(MAX_OPEN, sizeof(char *));
    nm_safetensors **open_files = nm_calloc(MAX_OPEN, sizeof(nm_safetensors *));
    int n_open = 0, rc = 0;
    for (int i = 0; i < t->n_rows && rc == 0; i++) {
        const nm_tensor_spec *r = &t->rows[i];
        if (r->flags & NM_TENSOR_TIED) continue;
        size_t off = dest ? dest[i] : r->offset;
        if (off == SIZE_MAX) continue;
        char file[256];
        if (map) {
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(map, r->name);
            if (!cJSON_IsString(fn) || strchr(fn->valuestring, '/')) {
                rc = nm_error_set(err, "%s: tensor '%s' is not in the weight map", path, r->name);
                break;
            }
            snprintf(file, sizeof(file), "%s", fn->valuestring);
        } else {
            snprintf(file, sizeof(file), "%s.safetensors", kinds[kind]);
        }
        int f = 0;
        while (f < n_open && strcmp(open_names[f], file) != 0) f++;
        if (f == n_open) {
            if (n_open == MAX_OPEN) {
                rc = nm_error_set(err, "%s: more than %d files", dir, MAX_OPEN);
                break;
            }
            snprintf(path, sizeof(path), "%s/%s", dir, file);
            if (nm_safetensors_open(&open_files[f], path, err) != 0) {
                rc = -1;
                break;
            }
            open_names[f] = nm_strdup(file);
            n_open++;
        }
        rc = nm_table_read_row(open_files[f], r, buf + off, err);
    }
    for (int f = 0; f < n_open; f++) {
        nm_safetensors_close(open_files[f]);
        nm_free(open_names[f]);
    }
    nm_free(open_files);
    nm_free(open_names);
    cJSON_Delete(root);
    return rc;
}

int nm_checkpoint_load_latest(const char *run_dir, nm_ckpt_state *st, const nm_param_table *t, float *params,
                              float *adam_m, float *adam_v, const nm_ckpt_shard *shard, char *out_dir,
                              size_t out_cap, nm_error *err) {
    int rc = find_valid(run_dir, st, out_dir, out_cap, err);
    if (rc != 0) return rc;
    const size_t *state = shard ? shard->row_state : NULL;
    float *bufs[3] = {params, adam_m, adam_v};
    for (int k = 0; k < 3; k++) {
        if (load_kind(out_dir, k, t, bufs[k], k == 0 ? NULL : state, err) != 0) {
            nm_ckpt_state_free(st);
            return -1;
        }
    }
    return 0;
}
