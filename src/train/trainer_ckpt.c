// trainer_ckpt.c: the trainer's resume and save (trainer_internal.h). Checkpoints are Hugging
// Face directories of whole tensors by name (train/checkpoint.h) at any layout: under the
// distributed optimizer the moments travel between this rank's ranges and the whole-tensor
// owners (train/zero.h), under tensor parallelism the shards are gathered into full tensors
// (train/tp_shard.h).
#define _GNU_SOURCE

#include "train/trainer_internal.h"

static size_t *full_row_state(const nm_trainer *t, const size_t *row_state);

// --- resume: what may not change --------------------------------------------------------------

// A resume continues the same data stream: a changed corpus, split, batch, sequence length or
// tokenizer would silently train on other samples than the cursor counted. Each change is
// named; without allow_config_change (train --allow-config-change) the resume is refused.
static int resume_changes(const char *saved_json, const nm_train_config *cfg, const char *ckpt_dir, int allow,
                          nm_error *err) {
    static const char *const keys[] = {"data", "seq_len", "global_batch", "tokenizer"};
    cJSON *saved = cJSON_Parse(saved_json ? saved_json : "");
    char *now_text = nm_train_config_to_json(cfg);
    cJSON *now = cJSON_Parse(now_text);
    free(now_text);
    char list[1536] = "";
    size_t n = 0;
    // Where the index mappings are cached is not what the stream is (the same files, or built
    // again, give the same samples): left out of the comparison.
    for (int k = 0; k < 2; k++) {
        cJSON *data = cJSON_GetObjectItemCaseSensitive(k ? now : saved, "data");
        if (cJSON_IsObject(data)) cJSON_DeleteItemFromObjectCaseSensitive(data, "cache_dir");
    }
    for (size_t i = 0; saved && now && i < sizeof keys / sizeof keys[0]; i++) {
        cJSON *a = cJSON_GetObjectItemCaseSensitive(saved, keys[i]), *b = cJSON_GetObjectItemCaseSensitive(now, keys[i]);
        if (!a || !b || cJSON_Compare(a, b, 1)) continue;
        char *ta = cJSON_PrintUnformatted(a), *tb = cJSON_PrintUnformatted(b);
        if (n < sizeof list)
            n += (size_t)snprintf(list + n, sizeof list - n, "%s%s %.200s -> %.200s", n ? "; " : "", keys[i],
                                  ta ? ta : "?", tb ? tb : "?");
        free(ta);
        free(tb);
    }
    cJSON_Delete(saved);
    cJSON_Delete(now);
    if (!list[0]) return 0;
    if (allow) {
        fprintf(stderr, "resume: continuing with a changed config (--allow-config-change): %s\n", list);
        return 0;
    }
    return nm_error_set(err, "resume: the config differs from the checkpoint %s: %s. The data cursor counts samples "
                        "of the old stream; pass --allow-config-change if the change is meant, or train into a new "
                        "--out", ckpt_dir, list);
}

// --- metrics.jsonl on resume ------------------------------------------------------------------

// Keeps the lines of steps <= last_step (the steps a resumed run will not redo) and reloads
// the loss history from them, so the log and the plot read as one uninterrupted run.
static int rewind_metrics(nm_trainer *t, const char *path, int64_t last_step, nm_error *err) {
    char *text;
    nm_error ignore;
    if (nm_file_read_all(path, &text, NULL, &ignore) != 0) return 0;  // no log yet
    nm_atomic_file f;
    if (nm_atomic_open(&f, path, err) != 0) {
        nm_free(text);
        return -1;
    }
    int rc = 0;
    for (char *line = text, *next; line && *line && rc == 0; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        cJSON *obj = cJSON_Parse(line);
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(obj, "step");
        if (cJSON_IsNumber(s) && (int64_t)s->valuedouble <= last_step) {
            rc = nm_fwrite_all(f.fp, line, strlen(line), path, err) || nm_fwrite_all(f.fp, "\n", 1, path, err);
            const cJSON *l = cJSON_GetObjectItemCaseSensitive(obj, "ce_loss");
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, "val_loss");
            if (cJSON_IsNumber(l) && t->n_hist < t->cfg.steps) {
                t->hist_step[t->n_hist] = s->valuedouble;
                t->hist_loss[t->n_hist++] = l->valuedouble;
            }
            if (cJSON_IsNumber(v) && t->n_vhist <= t->cfg.steps) {
                t->hist_vstep[t->n_vhist] = s->valuedouble;
                t->hist_vloss[t->n_vhist++] = v->valuedouble;
            }
        }
        cJSON_Delete(obj);
    }
    nm_free(text);
    if (rc != 0) {
        nm_atomic_abort(&f);
        return -1;
    }
    return nm_atomic_commit(&f, err);
}

// The moments in the checkpoint's whole-tensor layout (zero.h), fp32 whatever their storage:
// at one process the optimizer's own buffers (fp32 copies of bf16 ones); under the
// distributed optimizer, buffers of their own for the whole tensors this rank writes, filled
// from the ranges (gather) or emptied into them (scatter).
typedef struct ckpt_moments {
    float *m, *v;
    size_t *row_state;          // (n_rows) where each whole row sits; SIZE_MAX: not here
    int own;                    // the whole-tensor buffers are this struct's
    int copy[2];                // m / v are fp32 copies of bf16 moments (one process)
} ckpt_moments;

static void moments_close(ckpt_moments *w) {
    if (w->own) nm_free(w->row_state);
    if (w->own || w->copy[0]) nm_free(w->m);
    if (w->own || w->copy[1]) nm_free(w->v);
    *w = (ckpt_moments){0};
}

// Moment `which` of this rank's ranges, ranges -> whole tensors (gather) or back.
static int moment_exchange(nm_trainer *t, ckpt_moments *w, int which, int to_whole, nm_error *err) {
    int copy;
    float *range = nm_optimizer_moment_f32(t->optim, which, &copy);
    int rc = nm_zero_state_exchange(t->zero, range, t->optim->row_state, which ? w->v : w->m, w->row_state, to_whole,
                                    err);
    if (rc == 0 && !to_whole) nm_optimizer_moment_set(t->optim, which, range);
    if (copy) nm_free(range);
    return rc;
}

static int moments_open(nm_trainer *t, ckpt_moments *w, int gather, nm_error *err) {
    *w = (ckpt_moments){0};
    if (!t->zero) {
        w->m = nm_optimizer_moment_f32(t->optim, 0, &w->copy[0]);
        w->v = nm_optimizer_moment_f32(t->optim, 1, &w->copy[1]);
        w->row_state = t->optim->row_state;
        return 0;
    }
    const nm_param_table *table = nm_model_table(t->model);
    size_t n = nm_optimizer_state_floats(table, t->zero->owned);
    *w = (ckpt_moments){.m = nm_aligned_alloc((n ? n : 1) * sizeof(float)),
                        .v = nm_aligned_alloc((n ? n : 1) * sizeof(float)),
                        .row_state = nm_malloc((size_t)(table->n_rows > 0 ? table->n_rows : 1) * sizeof(size_t)),
                        .own = 1};
    nm_optimizer_state_offsets(table, t->zero->owned, w->row_state);
    if (gather && (moment_exchange(t, w, 0, 1, err) != 0 || moment_exchange(t, w, 1, 1, err) != 0)) {
        moments_close(w);
        return -1;
    }
    return 0;
}

// Loaded whole tensors back into the optimizer (its ranges; bf16 storage rounds them, exact
// for moments that were bf16 when saved).
static int moments_scatter(nm_trainer *t, ckpt_moments *w, nm_error *err) {
    if (!w->own) {
        for (int k = 0; k < 2; k++) nm_optimizer_moment_set(t->optim, k, k ? w->v : w->m);
        return 0;
    }
    if (moment_exchange(t, w, 0, 0, err) != 0) return -1;
    return moment_exchange(t, w, 1, 0, err);
}

// --resume: the newest valid checkpoint of the run directory into the model, the optimizer
// (the moments through the checkpoint's whole-tensor layout) and the data cursor; *resumed = 1
// when there was one. The training config may not have changed what the data stream is
// (resume_changes), and metrics.jsonl is cut back to the checkpoint's step.
int nm_trainer_resume(nm_trainer *t, const char *metrics_path, int *resumed, nm_error *err) {
    const nm_train_config *cfg = &t->cfg;
    const nm_trainer_options *opts = &t->opts;
    const nm_param_table *table = nm_model_table(t->model);
    nm_ckpt_state st;
    char dir[4200];
    ckpt_moments w;
    if (moments_open(t, &w, 0, err) != 0) return -1;
    nm_ckpt_shard shard = {.world = t->world, .owned = t->zero ? t->zero->owned : NULL, .row_state = w.row_state};
    int lr;
    if (t->mesh->n.tp > 1) {
        // Full tensors into the one-process layout, then this rank's shards (and of the
        // moments, the rows it owns) cut out.
        size_t nf = t->full_table.n_floats;
        float *fp = nm_aligned_alloc(nf * sizeof(float)), *fm = nm_aligned_alloc(nf * sizeof(float));
        float *fv = nm_aligned_alloc(nf * sizeof(float));
        size_t *state = full_row_state(t, w.row_state);
        nm_ckpt_shard full_shard = {.world = t->world, .row_state = state};
        lr = nm_checkpoint_load_latest(opts->run_dir, &st, &t->full_table, fp, fm, fv, &full_shard, dir,
                                       sizeof(dir), err);
        nm_free(state);
        if (lr == 0) {
            nm_tp_slice_full(table, &t->full_table, fp, nm_model_params(t->model), NULL);
            nm_tp_slice_full(table, &t->full_table, fm, w.m, w.row_state);
            nm_tp_slice_full(table, &t->full_table, fv, w.v, w.row_state);
        }
        nm_free(fp);
        nm_free(fm);
        nm_free(fv);
    } else {
        lr = nm_checkpoint_load_latest(opts->run_dir, &st, table, nm_model_params(t->model), w.m, w.v, &shard, dir,
                                       sizeof(dir), err);
    }
    if (lr == 0 && moments_scatter(t, &w, err) != 0) lr = -1;
    moments_close(&w);
    if (lr < 0) return -1;
    if (lr == 1) {
        if (!t->opts.quiet) printf("resume: no checkpoint in %s, starting fresh\n", opts->run_dir);
    } else {
        t->step = st.step;
        t->tokens_seen = st.tokens;
        t->skipped_steps = st.skipped_steps;
        t->nan_streak = st.nan_streak;
        t->optim->step = st.optim_step;
        nm_loader_set_cursor(t->train_data, (nm_data_cursor){.sample = st.data_sample});
        if (st.seed != cfg->seed) fprintf(stderr, "resume: warning: checkpoint seed %lld differs from config seed %lld\n", (long long)st.seed, (long long)cfg->seed);
        int changed = resume_changes(st.train_config_json, cfg, dir, opts->allow_config_change, err);
        nm_ckpt_state_free(&st);
        if (changed != 0) return -1;
        if (t->rank0 && rewind_metrics(t, metrics_path, t->step, err) != 0) return -1;
        *resumed = 1;
        if (!t->opts.quiet) printf("resume: continuing from %s (step %lld)\n", dir, (long long)t->step);
    }
    return 0;
}

// --- save ---------------------------------------------------------------------------------------

// Where the moments of the rows this rank owns sit in the one-process layout (the row offsets;
// SIZE_MAX for rows it does not own and rows without optimizer state, the router bias).
static size_t *full_row_state(const nm_trainer *t, const size_t *row_state) {
    const nm_param_table *full = &t->full_table;
    size_t *state = nm_malloc((size_t)full->n_rows * sizeof(size_t));
    for (int r = 0; r < full->n_rows; r++) state[r] = row_state[r] == SIZE_MAX ? SIZE_MAX : full->rows[r].offset;
    return state;
}

// A tensor-parallel save writes full HF tensors: each dp owner's rows are gathered over its
// tp group into the one-process layout and tp rank 0 writes them (the other tp ranks write
// empty shard files), so the directory is the one any layout writes.
static int save_tp(nm_trainer *t, const char *run_dir, const nm_ckpt_state *st, char *dir, size_t cap,
                   nm_error *err) {
    const nm_param_table *loc = nm_model_table(t->model), *full = &t->full_table;
    size_t nf = full->n_floats;
    float *fp = nm_aligned_alloc(nf * sizeof(float)), *fm = nm_aligned_alloc(nf * sizeof(float));
    float *fv = nm_aligned_alloc(nf * sizeof(float));
    const unsigned char *owned = t->zero->owned;
    unsigned char *writes = nm_calloc((size_t)full->n_rows, 1);
    // Each row once: tp rank 0 of its dp owner (routed experts under sequence parallelism: their
    // edp owner, whatever its tp rank).
    for (int r = 0; r < full->n_rows; r++) {
        int expert_edp = t->sp && (full->rows[r].flags & NM_TENSOR_EXPERT);
        writes[r] = owned[r] && (t->mesh->tp_rank == 0 || expert_edp);
    }
    ckpt_moments w;
    int rc = moments_open(t, &w, 1, err);
    if (rc == 0) rc = nm_tp_gather_full(loc, full, t->model_params_readonly, NULL, fp, owned, t->mesh->tp, err);
    if (rc == 0) rc = nm_tp_gather_full(loc, full, w.m, w.row_state, fm, owned, t->mesh->tp, err);
    if (rc == 0) rc = nm_tp_gather_full(loc, full, w.v, w.row_state, fv, owned, t->mesh->tp, err);
    if (rc == 0) {
        size_t *state = full_row_state(t, w.row_state);
        nm_ckpt_shard shard = {.world = t->world, .owned = writes, .row_state = state, .tp = t->mesh->n.tp,
                               .pp = t->mesh->n.pp, .ep = t->mesh->n.ep};
        rc = nm_checkpoint_save(run_dir, st, &t->mcfg, full, fp, fm, fv, &shard, t->cfg.checkpoint.keep_last, dir,
                                cap, err);
        nm_free(state);
    }
    moments_close(&w);
    nm_free(writes);
    nm_free(fp);
    nm_free(fm);
    nm_free(fv);
    return rc;
}

int nm_trainer_save(nm_trainer *t, nm_error *err) { return nm_trainer_save_to(t, t->opts.run_dir, err); }

int nm_trainer_save_to(nm_trainer *t, const char *run_dir, nm_error *err) {
    if (!run_dir) return nm_error_set(err, "trainer: no run directory to save into (created without one)");
    if (!t->train_data)
        return nm_error_set(err, "trainer: a checkpoint records the data position, and this trainer's micro-batches "
                                 "come from its caller (external_data): save the model with the caller's means");
    nm_ckpt_state st = {
        .step = t->step, .tokens = t->tokens_seen, .data_sample = nm_loader_get_cursor(t->train_data).sample,
        .optim_step = t->optim->step, .skipped_steps = t->skipped_steps, .nan_streak = t->nan_streak,
        .seed = t->cfg.seed, .world = t->mesh->n.dp,
    };
    st.train_config_json = nm_train_config_to_json(&t->cfg);
    st.tokenizer = nm_strdup(t->cfg.tokenizer ? t->cfg.tokenizer : "bytes");
    char dir[4200];
    int rc = t->metrics ? nm_metrics_sync(t->metrics, err) : 0;
    // sharded master weights (zero.h): each tensor whole on the rank that writes it, for the save
    // (released again after it, unless they were still whole: before the first update)
    float *params = (float *)t->model_params_readonly;
    int sharded = t->zero && t->zero->copy_rows && !t->zero->params_whole;
    if (rc == 0 && sharded) rc = nm_zero_gather_master(t->zero, params, err);
    if (rc == 0 && t->mesh->n.tp > 1) {
        rc = save_tp(t, run_dir, &st, dir, sizeof(dir), err);
    } else if (rc == 0) {
        ckpt_moments w;
        rc = moments_open(t, &w, 1, err);
        nm_ckpt_shard shard = {.world = t->world, .owned = t->zero ? t->zero->owned : NULL, .row_state = w.row_state,
                               .tp = t->mesh->n.tp, .pp = t->mesh->n.pp, .ep = t->mesh->n.ep};
        if (rc == 0)
            rc = nm_checkpoint_save(run_dir, &st, &t->mcfg, nm_model_table(t->model), params, w.m, w.v, &shard,
                                    t->cfg.checkpoint.keep_last, dir, sizeof(dir), err);
        moments_close(&w);
    }
    if (sharded) nm_zero_release_master(t->zero, params, t->ops);
    nm_ckpt_state_free(&st);
    if (rc == 0 && !t->opts.quiet) {
        if (t->tty) printf("\r\033[K");
        printf("saved %s\n", dir);
        fflush(stdout);
    }
    return rc;
}

