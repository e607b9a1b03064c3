// trainer.c: the one stateful owner of a training run (design.md 9): model, optimizer,
// data loaders, checkpoints and logs. nm_trainer_step is one optimizer step:
//
//   for each of accum micro-batches: next batch -> forward -> backward (grads +=, scaled 1/accum)
//   divergence guard: non-finite loss or gradient -> skip the update, count, stop after N in a row
//   clip to the global norm -> AdamW -> aux-loss-free bias update from the step's expert counts
//   metrics.jsonl / TensorBoard / progress line -> validation -> checkpoint
//
// Determinism: every reduction has a fixed order and every random draw is counter-based, so
// a run resumed from a checkpoint continues bit for bit (tests/test_resume.sh kills one).
// Parallelism (design.md 6, docs/parallelism.md): the same step on every rank of the mesh.
// Each data-parallel rank takes its rows of every global batch; gradients are reduce-
// scattered (ZeRO-1, train/zero.h), each rank updates the tensors it owns and the parameters
// are all-gathered; the loss, the expert loads and the gradient norm are all-reduced so that
// every rank takes the same decisions (clipping, skipping, bias updates). Only rank 0 prints
// and writes logs; checkpoints are written by every rank (train/checkpoint.h).
// Tensor parallelism splits the model over the tp group (model.h, docs/parallelism.md);
// checkpoints stay full HF tensors (train/tp_shard.h). Pipeline parallelism (train/pipeline.h):
// each stage holds its layers, runs the 1F1B schedule over the step's micro-batches, and the
// step's decisions (loss terms, clipping, skipping) are reduced over the stages too.
#define _GNU_SOURCE

#include "train/trainer.h"

#include <cblas.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/fileio.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "comm/comm.h"
#include "comm/mesh.h"
#include "io/hf_dir.h"
#include "model/config.h"
#include "model/flops.h"
#include "model/model.h"
#include "ops/ops.h"
#include "train/balance.h"
#include "train/checkpoint.h"
#include "train/kernels.h"
#include "train/memcheck.h"
#include "train/metrics.h"
#include "train/optim.h"
#include "train/pipeline.h"
#include "train/run_lock.h"
#include "train/schedule.h"
#include "train/tensorboard.h"
#include "train/tp_shard.h"
#include "train/train_config.h"
#include "train/zero.h"

struct nm_trainer {
    nm_train_config cfg;        // borrowed, immutable
    nm_trainer_options opts;
    nm_model_config mcfg;
    nm_model *model;
    nm_optimizer *optim;
    const nm_ops *ops;          // the backend (cfg.backend), a static table
    int cpu;                    // ops is the CPU backend: its GEMM kernels are chosen (kernels.c)
    nm_comm *world;             // owned
    nm_mesh *mesh;              // groups of the layout
    nm_zero *zero;              // ZeRO-1 ownership and buckets (world > 1)
    nm_param_table full_table;  // tensor parallelism: the one-process table (checkpoint layout)
    int sp;                     // sequence parallelism (tp > 1 and sequence_parallel)
    unsigned char *tp_summed;   // (n_rows) sequence-parallel partial rows already summed over tp this step
    int rank0;                  // this process prints and writes the logs
    int inject_nan_here;        // --inject-nan poisons this rank's gradient (NM_TEST_INJECT_NAN_RANK)
    int64_t comm_seen[5][NM_COMM_N_OPS]; // dp / edp / ep / tp / pp byte counters at the last step's end
    double comm_time_seen[5];   // their seconds inside collectives, all operations
    // pipeline parallelism (NULL / 0 without it)
    nm_pipeline *pipe;
    nm_model_stage *stages;     // (pp) every stage's layers
    nm_comm *emb;               // embedding group: first and last stage of this pipeline (2 ranks), else 1
    int32_t *tokens_all;        // (accum, micro_batch, T) the step's micro-batches, read by every stage
    double *pp_idle;            // (pp) each stage's idle fraction of the last step
    char (*pp_keys)[48];        // (pp) their metric names
    nm_metric *step_kv;         // (STEP_METRICS + pp) one step's metrics.jsonl entries
    int embed_copy_row;         // the table row of the last stage's embedding copy (left out of the norm), else -1
    nm_loader *train_data;
    nm_loader *valid_data;      // NULL when there is no validation split
    nm_lr_schedule sched;
    int64_t T;                  // model sequence length = seq_len + 1 (inputs and shifted targets)
    int64_t accum;
    int32_t *tokens;            // (micro_batch, T)
    int64_t *step_counts;       // (n_moe, E) expert selections summed over the step's micro-batches
    const float *model_params_readonly; // the parameters, for reading without marking them changed
    const float **bias_ptrs;    // (n_moe) router bias of each MoE layer

    int64_t step;               // optimizer steps completed
    int64_t tokens_seen;
    int64_t skipped_steps;
    int64_t nan_streak;
    char nan_first[256];        // tensor where the current streak's first non-finite value appeared

    double flops_per_token;
    double peak_flops;          // measured fp32 GEMM FLOP/s, summed over the ranks (raised by a faster step)
    int peak_raised;            // the note that the start-up peak was low has been printed
    char kernels[640];          // the GEMM kernels chosen and how (kernels.c), for the banner
    double t_start;             // wall clock at create (for ETA)
    int64_t step_at_start;

    nm_metrics_writer *metrics;
    nm_tb_writer *tb;
    int tty;
    double *hist_step, *hist_loss;     // (cfg.steps) train loss per step, for loss.svg
    double *hist_vstep, *hist_vloss;   // (cfg.steps + 1) validation points
    int64_t n_hist, n_vhist;
    int finished;
    int run_lock;               // rank 0: the open RUN_DIR/.lock it holds an flock on (-1: none)
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// The machine peak the MFU is measured against: the best of three n^3 GEMMs through the run's
// own fp32 GEMM (ops->gemm) at the run's thread count, after one warm-up. On the CPU backend
// (oneDNN or OpenBLAS, src/ops/cpu/gemm.c) n = 2048, a one-time ~0.25 s on 2 cores, printed in
// the banner: smaller squares understate it (oneDNN's sgemm reached 133 GFLOP/s at 1024^3 and
// ~190 at 1536^3 where it does 265-330 at 2048^3 and above, bench/peak). Another backend is
// timed at n = 256, which its GEMM's rate hardly depends on and the reference backend's scalar
// loops finish in a fraction of a second. bench/peak.c measures both CPU libraries over more
// sizes; this is the quick in-process version. On a shared machine any single measurement can
// be low, so NM_PEAK_GFLOPS overrides it.
static double time_square_gemm(const nm_ops *ops, int bf16, int n, const void *a, const void *b, float *c) {
    double best = 1e30;
    for (int r = 0; r < 4; r++) {  // the first run warms the library up and is not counted
        double t0 = now_s();
        if (bf16) ops->gemm_bf16(NM_NO_TRANS, NM_NO_TRANS, n, n, n, 1.0f, a, NM_BF16, n, b, NM_BF16, n, 0.0f, c, n);
        else ops->gemm(NM_NO_TRANS, NM_NO_TRANS, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double dt = now_s() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    return 2.0 * n * n * (double)n / best;
}

// Runs below fp32 also have the bf16 GEMM (the kernel chosen for it, kernels.c): their peak
// is the better of the two, so the MFU keeps meaning "of the best measured kernel".
static double measure_gemm_peak(const nm_ops *ops, int cpu, nm_precision precision) {
    const char *given = getenv("NM_PEAK_GFLOPS");
    if (given && atof(given) > 0) return atof(given) * 1e9;
    const int n = cpu ? 2048 : 256;
    float *a = nm_aligned_alloc((size_t)n * n * sizeof(float));
    float *b = nm_aligned_alloc((size_t)n * n * sizeof(float));
    float *c = nm_aligned_alloc((size_t)n * n * sizeof(float));
    for (size_t i = 0; i < (size_t)n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    double peak = time_square_gemm(ops, 0, n, a, b, c);
    if (precision != NM_PRECISION_FP32) {
        // bf16 operands as the model stores them: the top half of each float (the values
        // i/10 rounded; what they are does not matter to the timing).
        uint16_t *a16 = (uint16_t *)a, *b16 = (uint16_t *)b;  // in place: a[i] is read before a16[i] is written
        for (size_t i = 0; i < (size_t)n * n; i++) {
            uint32_t ua, ub;
            memcpy(&ua, &a[i], 4);
            memcpy(&ub, &b[i], 4);
            a16[i] = (uint16_t)(ua >> 16);
            b16[i] = (uint16_t)(ub >> 16);
        }
        double p16 = time_square_gemm(ops, 1, n, a16, b16, c);
        if (p16 > peak) peak = p16;
    }
    nm_free(a);
    nm_free(b);
    nm_free(c);
    return peak;
}

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

// --- create -----------------------------------------------------------------------------------

static size_t *full_row_state(const nm_trainer *t, const size_t *row_state);

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

// metrics.jsonl entries of a step besides the per-stage ones: 20 always, up to 20 from
// comm_metrics, ep_rounds and ep_recv_max_over_mean, pp_bubble_theory and val_loss; with
// room to spare.
#define STEP_METRICS 64

static int make_loaders(nm_trainer *t, nm_error *err) {
    const nm_train_config *c = &t->cfg;
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    spec.n_sources = c->data_synthetic ? 0 : c->n_data_paths;
    // As many as the config lists (no fixed cap: blends of thousands of shards are common).
    const char **prefixes = nm_calloc((size_t)spec.n_sources + 1, sizeof(char *));
    double *weights = nm_calloc((size_t)spec.n_sources + 1, sizeof(double));
    for (int i = 0; i < spec.n_sources; i++) {
        prefixes[i] = c->data_paths[i].prefix;
        weights[i] = c->data_paths[i].weight;
    }
    spec.prefixes = prefixes;
    spec.weights = weights;
    if (c->data_synthetic) spec.synthetic_tokens = c->data_synthetic_tokens;
    spec.seed = (uint32_t)c->seed;
    spec.seq_len = c->seq_len;
    for (int i = 0; i < 3; i++) spec.split[i] = c->data_split_frac[i];
    // Megatron compat: the train split's first steps*global_batch samples are exactly
    // Megatron's GPTDataset order for the same data, seed and seq_len.
    spec.num_samples[NM_SPLIT_TRAIN] = c->steps * c->global_batch;
    int rc = nm_loader_create(&t->train_data, &spec, NM_SPLIT_TRAIN, t->mesh->dp_rank, (int)t->mesh->n.dp, err);
    // Validation: every rank runs the same held-out batches (expert-parallel forwards need
    // every rank of the group), so the value is the one-process value on every rank.
    if (rc == 0 && c->log.eval_every > 0 && c->data_split_frac[1] > 0)
        rc = nm_loader_create(&t->valid_data, &spec, NM_SPLIT_VALID, 0, 1, err);
    nm_free(prefixes);
    nm_free(weights);
    return rc;
}

// log.eval_batches, bounded by the validation split's distinct batches: beyond them the loader
// wraps around and repeats the same windows, so a large value over a tiny split only looped (for
// hours, with no output) to the same number.
static int64_t eval_batches(const nm_trainer *t) {
    int64_t windows = (nm_loader_tokens(t->valid_data) - 1) / t->cfg.seq_len;
    int64_t distinct = windows / t->cfg.micro_batch > 0 ? windows / t->cfg.micro_batch : 1;
    return t->cfg.log.eval_batches < distinct ? t->cfg.log.eval_batches : distinct;
}

// Mismatches between the training config and the model, found before anything is allocated:
// a tokenizer with more ids than the model's vocabulary is refused (otherwise the first step
// fails on a token id); a bias update speed for a router that ignores the bias gets a notice.
static int check_model_against_config(const nm_model_config *m, const nm_train_config *cfg, nm_error *err) {
    if (cfg->seq_len > m->max_pos)
        return nm_error_set(err, "seq_len %lld is longer than the model's max_position_embeddings %lld: set "
                            "seq_len <= %lld, or raise model_config.max_position_embeddings (with rope_scaling for "
                            "a longer context than the model was trained for)",
                            (long long)cfg->seq_len, (long long)m->max_pos, (long long)m->max_pos);
    if (m->E > 0 && !nm_routing_uses_bias(m) && cfg->balance.bias_update_speed > 0) {
        fprintf(stderr, "notice: balance.bias_update_speed %g is not used: aux-loss-free balancing needs "
                        "topk_method 'noaux_tc' (this model's routing ignores the bias)\n",
                cfg->balance.bias_update_speed);
    }
    const char *tok_path = cfg->tokenizer ? cfg->tokenizer : "bytes";
    if (cfg->data_synthetic && strcmp(tok_path, "bytes") != 0)
        return nm_error_set(err, "tokenizer %s with the built-in corpus: its tokens are bytes, so the run would train "
                            "on bytes and sample with %s's merges; set tokenizer=bytes, or prepare a dataset with "
                            "this tokenizer (nanomegatron prepare --tokenizer %s) and train on it (data.paths)",
                            tok_path, tok_path, tok_path);
    nm_tokenizer *tok = NULL;
    if (nm_tokenizer_load(&tok, tok_path, err) != 0) return -1;
    int64_t n_ids = nm_tokenizer_vocab_size(tok);
    nm_tokenizer_free(tok);
    if (n_ids > m->V) {
        if (cfg->init_from)
            return nm_error_set(err, "tokenizer %s has %lld ids but the model's vocab_size is %lld (%s): use the "
                                     "tokenizer the checkpoint was trained with", tok_path, (long long)n_ids,
                                (long long)m->V, cfg->init_from);
        return nm_error_set(err, "tokenizer %s has %lld ids but the model's vocab_size is %lld (%s): give the model "
                                 "at least %lld, e.g. --set model_config.vocab_size=%lld, or train a tokenizer with "
                                 "at most %lld ids", tok_path, (long long)n_ids, (long long)m->V, cfg->model,
                            (long long)n_ids, (long long)n_ids, (long long)m->V);
    }
    return 0;
}

int nm_trainer_create(nm_trainer **out, const nm_train_config *cfg, const nm_trainer_options *opts, nm_error *err) {
    *out = NULL;
    if (!opts->run_dir) return nm_error_set(err, "trainer: a run directory is required");
    nm_trainer *t = nm_calloc(1, sizeof(nm_trainer));
    t->cfg = *cfg;
    t->opts = *opts;
    t->run_lock = -1;
    if (t->opts.max_nan_streak <= 0) t->opts.max_nan_streak = 5;
    if (cfg->threads > 0) {
        omp_set_num_threads((int)cfg->threads);
        openblas_set_num_threads((int)cfg->threads);
    }
    int rc = -1;
    if (nm_comm_init(&t->world, err) != 0) goto fail;
    t->rank0 = t->world->rank == 0;
    if (!t->rank0) t->opts.quiet = 1;
    // Test hook (tests/test_dist_faults.sh): NM_TEST_INJECT_NAN_RANK=R limits --inject-nan to
    // world rank R, a NaN that one rank alone produces; unset, every rank poisons its gradient.
    t->inject_nan_here = 1;
    const char *nan_rank = getenv("NM_TEST_INJECT_NAN_RANK");
    if (nan_rank && *nan_rank) {
        char *end;
        long r = strtol(nan_rank, &end, 10);
        if (*end || r < 0 || r >= t->world->size) {
            nm_error_set(err, "NM_TEST_INJECT_NAN_RANK=%s: expected a rank from 0 to %d", nan_rank, t->world->size - 1);
            goto fail;
        }
        t->inject_nan_here = r == t->world->rank;
    }
    if (nm_train_config_model_config(cfg, &t->mcfg, err) != 0) goto fail;
    if (check_model_against_config(&t->mcfg, cfg, err) != 0) goto fail;
    // The layout, checked on every rank before any work.
    nm_mesh_sizes ms;
    int64_t n_moe_layers = 0;
    for (int64_t l = 0; l < t->mcfg.L; l++) n_moe_layers += nm_layer_is_moe(&t->mcfg, l);
    if (nm_mesh_check(&ms, t->world->size, cfg->tensor_parallel_size, cfg->pipeline_parallel_size,
                      cfg->expert_parallel_size, n_moe_layers > 0 ? t->mcfg.E : 0, cfg->global_batch, cfg->micro_batch,
                      err) != 0)
        goto fail;
    t->sp = ms.tp > 1 && cfg->sequence_parallel;
    if (ms.tp > 1 && ms.ep > 1 && !t->sp) {
        // Without sequence parallelism every tp rank holds the same tokens, so each would send
        // them into the expert all-to-all again (Megatron requires --sequence-parallel here).
        nm_error_set(err, "tensor_parallel_size %lld with expert_parallel_size %lld: tensor x expert parallelism "
                     "needs sequence parallelism: set sequence_parallel to true (or one of them to 1)",
                     (long long)ms.tp, (long long)ms.ep);
        goto fail;
    }
    if (ms.tp > 1 && !nm_model_supports_tensor_parallel()) {
        nm_error_set(err, "tensor_parallel_size %lld: tensor parallelism is not implemented", (long long)ms.tp);
        goto fail;
    }
    t->stages = nm_calloc((size_t)ms.pp, sizeof(nm_model_stage));
    if (nm_pipeline_layout(t->stages, ms.pp, cfg->pipeline_layout, &t->mcfg, err) != 0) goto fail;
    if (ms.ep > 1 && !nm_model_supports_expert_parallel()) {
        nm_error_set(err, "expert_parallel_size %lld: expert parallelism is not implemented yet", (long long)ms.ep);
        goto fail;
    }
    if (nm_mesh_create(&t->mesh, t->world, &ms, err) != 0) goto fail;
    if (nm_train_config_accum_steps(cfg, ms.dp, &t->accum, err) != 0) goto fail;
    t->T = cfg->seq_len + 1;
    nm_model_options mopts = {.recompute = opts->recompute, .ep = t->mesh->ep, .tp = t->mesh->tp,
                              .sequence_parallel = t->sp, .vocab_multiple = cfg->make_vocab_size_divisible_by,
                              .moe_receive_capacity = cfg->moe_receive_capacity, .precision = cfg->precision};
    if (ms.pp > 1) {
        // The stage's layers only, and one activation set per micro-batch in flight under 1F1B.
        mopts.stage = &t->stages[t->mesh->pp_rank];
        mopts.act_slots = nm_pipeline_slots(ms.pp, t->mesh->pp_rank, t->accum);
    }
    if (nm_train_check_memory(cfg, &t->mcfg, t->world->size, opts->recompute, t->mesh->pp_rank, err) != 0) goto fail;
    if (!(t->ops = nm_ops_select(cfg->backend, err))) goto fail;
    t->cpu = t->ops == nm_ops_by_name("cpu");
    if (nm_model_create_ex(&t->model, &t->mcfg, t->ops, cfg->micro_batch, t->T, &mopts, err) != 0) goto fail;
    if (nm_model_set_precision(t->model, cfg->precision, err) != 0) goto fail;
    const nm_param_table *table = nm_model_table(t->model);
    t->embed_copy_row = -1;
    for (int i = 0; table->embed_copy && i < table->n_rows; i++) {
        const nm_tensor_spec *r = &table->rows[i];
        if (r->layer < 0 && !(r->flags & NM_TENSOR_TIED) && r->offset == table->embed) t->embed_copy_row = i;
    }
    if (ms.pp > 1) {
        if (nm_pipeline_create(&t->pipe, t->mesh->pp, t->model, cfg->micro_batch, t->T, err) != 0) goto fail;
        // Megatron's embedding group: the first and the last stage of each pipeline (the last
        // holds a copy of the embedding for MTP or a tied head); every other rank alone.
        int pp = t->mesh->pp_rank, ends = pp == 0 || pp == ms.pp - 1;
        int need = t->mcfg.M > 0 || t->mcfg.tie_embeddings;
        int color = ends && need ? t->mesh->tp_rank + (int)ms.tp * t->mesh->dp_rank : (int)ms.world + t->world->rank;
        if (nm_comm_split(t->world, color, pp, "emb", &t->emb, err) != 0) goto fail;
        t->tokens_all = nm_malloc((size_t)(t->accum * cfg->micro_batch * t->T) * sizeof(int32_t));
        t->pp_idle = nm_calloc((size_t)ms.pp, sizeof(double));
        t->pp_keys = nm_calloc((size_t)ms.pp, sizeof(*t->pp_keys));
        for (int64_t s = 0; s < ms.pp; s++) snprintf(t->pp_keys[s], sizeof(t->pp_keys[s]), "pp_idle_fraction_stage%lld", (long long)s);
    }
    // One entry per pipeline stage on top of the fixed ones: a fixed array of 64 overflowed
    // from about 23 stages.
    t->step_kv = nm_calloc((size_t)(STEP_METRICS + ms.pp), sizeof(nm_metric));
    t->model_params_readonly = nm_model_params(t->model);
    // the checkpoint layout: whole tensors, of this rank's experts under expert parallelism
    if (ms.tp > 1 && nm_param_table_build_ep(&t->full_table, &t->mcfg, ms.ep > 1 ? t->mesh->ep_rank : 0, ms.ep,
                                             err) != 0)
        goto fail;
    // ... of this stage's tensors under pipeline parallelism (rows in the shards' order)
    if (ms.tp > 1 && ms.pp > 1 &&
        nm_param_table_restrict_stage(&t->full_table, &t->mcfg, &t->stages[t->mesh->pp_rank], err) != 0)
        goto fail;
    if (cfg->init_from && ms.tp > 1) {
        // The directory holds full tensors: load them, then cut this rank's shards out.
        float *full = nm_aligned_alloc(t->full_table.n_floats * sizeof(float));
        rc = nm_hf_dir_load_model(cfg->init_from, &t->full_table, &t->mcfg, (uint64_t)cfg->seed, full, err);
        if (rc == 0) nm_tp_slice_full(table, &t->full_table, full, nm_model_params(t->model), NULL);
        nm_free(full);
        if (rc != 0) goto fail;
        rc = -1;
    } else if (cfg->init_from) {
        if (nm_hf_dir_load_model(cfg->init_from, table, &t->mcfg, (uint64_t)cfg->seed, nm_model_params(t->model), err) != 0) goto fail;
    } else {
        nm_params_init(nm_model_params(t->model), table, &t->mcfg, (uint64_t)cfg->seed);
    }
    nm_adamw_config acfg;
    nm_train_config_adamw(cfg, &acfg);
    if (t->world->size > 1) {
        // Under tensor parallelism without sequence parallelism (EP 1) every tp rank runs the
        // routed experts on the same tokens: they are replicated over tp like every unsplit
        // tensor and reduce over dp (edp = dp x tp / ep would count them TP times). With it
        // each tp rank's experts saw its own tokens: edp, as with EP.
        nm_comm *expert_group = ms.tp > 1 && !t->sp ? t->mesh->dp : t->mesh->edp;
        if (nm_zero_create(&t->zero, table, t->mesh->dp, expert_group, cfg->bucket_mb * 262144, err) != 0) goto fail;
        if (nm_optimizer_create_ranges(&t->optim, table, &acfg, t->zero->own_begin, t->zero->own_end, err) != 0)
            goto fail;
    } else if (nm_optimizer_create(&t->optim, table, &acfg, err) != 0) {
        goto fail;
    }
    nm_train_config_lr_schedule(cfg, &t->sched);
    if (make_loaders(t, err) != 0) goto fail;
    if (t->valid_data && t->rank0 && eval_batches(t) < cfg->log.eval_batches)
        fprintf(stderr, "notice: log.eval_batches %lld is more than the validation split's %lld distinct batches of "
                "micro_batch %lld; each evaluation runs %lld\n", (long long)cfg->log.eval_batches,
                (long long)eval_batches(t), (long long)cfg->micro_batch, (long long)eval_batches(t));

    int n_moe;
    const int *moe_ids;
    nm_model_expert_counts(t->model, &n_moe, &moe_ids);
    int64_t E = t->mcfg.E > 0 ? t->mcfg.E : 1;
    t->step_counts = nm_calloc((size_t)(n_moe > 0 ? n_moe : 1) * (size_t)E, sizeof(int64_t));
    t->bias_ptrs = nm_calloc((size_t)(n_moe > 0 ? n_moe : 1), sizeof(float *));
    for (int i = 0; i < n_moe; i++) t->bias_ptrs[i] = nm_model_params(t->model) + table->layers[moe_ids[i]].router_bias;
    t->tokens = nm_malloc((size_t)(cfg->micro_batch * t->T) * sizeof(int32_t));
    t->tp_summed = nm_calloc((size_t)table->n_rows, 1);
    t->hist_step = nm_calloc((size_t)cfg->steps + 1, sizeof(double));
    t->hist_loss = nm_calloc((size_t)cfg->steps + 1, sizeof(double));
    t->hist_vstep = nm_calloc((size_t)cfg->steps + 2, sizeof(double));
    t->hist_vloss = nm_calloc((size_t)cfg->steps + 2, sizeof(double));

    // resume
    if (t->rank0 && nm_mkdir_p(opts->run_dir, err) != 0) goto fail;
    // Before anything in the directory is read or written: one trainer per run (run_lock.h).
    if (t->rank0 && nm_run_lock_acquire(opts->run_dir, &t->run_lock, err) != 0) goto fail;
    if (nm_comm_barrier(t->world, err) != 0) goto fail;
    char metrics_path[4200];
    snprintf(metrics_path, sizeof(metrics_path), "%s/metrics.jsonl", opts->run_dir);
    int resumed = 0;
    if (!opts->resume) {
        // Never mix two runs in one directory (their checkpoints would interleave and the
        // older run's metrics would be truncated): continuing is what --resume is for.
        char latest[4300];
        snprintf(latest, sizeof(latest), "%s/latest", opts->run_dir);
        FILE *fp = fopen(latest, "r");
        if (fp) {
            fclose(fp);
            nm_error_set(err, "%s already holds a run (it has a 'latest' checkpoint): pass --resume to continue it, "
                         "or choose another --out", opts->run_dir);
            goto fail;
        }
    }
    // Before the first GEMM; a fresh single-process run measures and writes kernels.json, a
    // resume (or a multi-rank run, whose ranks must agree) reads it back or takes the defaults.
    // The choice is among the CPU backend's kernels; another backend has its own and no choice.
    if (!t->cpu)
        snprintf(t->kernels, sizeof(t->kernels), "backend %s: %s (no kernel choice)", cfg->backend,
                 t->ops->kernel_names());
    else if (nm_kernels_choose(&t->mcfg, cfg->micro_batch * cfg->seq_len, opts->run_dir,
                               t->world->size == 1 && !opts->resume, t->kernels, sizeof(t->kernels), err) != 0)
        goto fail;
    if (opts->resume) {
        nm_ckpt_state st;
        char dir[4200];
        ckpt_moments w;
        if (moments_open(t, &w, 0, err) != 0) goto fail;
        nm_ckpt_shard shard = {.world = t->world, .owned = t->zero ? t->zero->owned : NULL, .row_state = w.row_state};
        int lr;
        if (ms.tp > 1) {
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
        if (lr < 0) goto fail;
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
            if (changed != 0) goto fail;
            if (t->rank0 && rewind_metrics(t, metrics_path, t->step, err) != 0) goto fail;
            resumed = 1;
            if (!t->opts.quiet) printf("resume: continuing from %s (step %lld)\n", dir, (long long)t->step);
        }
    }
    if (t->rank0) {
        if (nm_metrics_open(&t->metrics, metrics_path, resumed, err) != 0) goto fail;
        if (nm_tb_open(&t->tb, opts->run_dir, -1.0, err) != 0) goto fail;
    }

    t->flops_per_token = nm_model_flops_per_token(&t->mcfg, t->T);
    // Every rank measures at once (on a shared machine that is the capacity they share); the
    // job's peak is the sum.
    t->peak_flops = measure_gemm_peak(t->ops, t->cpu, cfg->precision);
    if (nm_comm_all_reduce(t->world, &t->peak_flops, 1, NM_DT_F64, NM_RED_SUM, err) != 0) goto fail;
    // Each stage's own memory for the banner (rank 0 holds only stage 0's): parameters and
    // the activation sets of its micro-batches in flight.
    double *stage_mem = t->pipe ? nm_calloc((size_t)(2 * ms.pp), sizeof(double)) : NULL;
    if (t->pipe) {
        if (t->mesh->dp_rank == 0 && t->mesh->tp_rank == 0) {
            stage_mem[2 * t->mesh->pp_rank] = (double)table->n_floats * 4;
            stage_mem[2 * t->mesh->pp_rank + 1] = (double)nm_model_activation_bytes(t->model);
        }
        if (nm_comm_all_reduce(t->world, stage_mem, 2 * ms.pp, NM_DT_F64, NM_RED_SUM, err) != 0) {
            nm_free(stage_mem);
            goto fail;
        }
    }
    t->tty = nm_progress_is_tty(stdout);
    t->t_start = now_s();
    t->step_at_start = t->step;
    if (!t->opts.quiet) {
        char total[32], active[32], desc[256];
        // The whole model's count, not this rank's shard or stage (under pp the table holds
        // stage 0's layers only): a table of the one-process layout, built for the count.
        const nm_param_table *whole = ms.tp > 1 ? &t->full_table : table;  // this stage's, not a shard's
        nm_param_table model_table = {0};
        nm_error ignore;
        int64_t n_main = nm_param_table_build(&model_table, &t->mcfg, &ignore) == 0 ? model_table.n_params_main
                                                                                     : whole->n_params_main;
        nm_param_table_free(&model_table);
        nm_format_si(total, sizeof(total), (double)n_main);
        nm_format_si(active, sizeof(active), (double)nm_model_params_active(&t->mcfg));
        nm_loader_describe(t->train_data, desc, sizeof(desc));
        int64_t n_dense = 0;
        for (int64_t l = 0; l < t->mcfg.L; l++) n_dense += !nm_layer_is_moe(&t->mcfg, l);
        printf("model %s params (%s active/token) | %lld layers (%lld dense, %lld MoE: %lld experts, top-%lld, %lld groups) | MTP %lld\n",
               total, active, (long long)t->mcfg.L, (long long)n_dense, (long long)(t->mcfg.L - n_dense),
               (long long)t->mcfg.E, (long long)t->mcfg.K, (long long)t->mcfg.G, (long long)t->mcfg.M);
        printf("data  %s | seq %lld x batch %lld (micro %lld x %lld accum) | %s | %d threads\n", desc,
               (long long)cfg->seq_len, (long long)cfg->global_batch, (long long)cfg->micro_batch, (long long)t->accum,
               nm_precision_name(cfg->precision), omp_get_max_threads());
        char layout[160];
        nm_mesh_describe(&ms, layout, sizeof(layout));
        double mib = 1048576.0;
        printf("layout %s | per rank: params %.1f MiB, grads %.1f MiB, optimizer shard %.1f MiB (%.1f%% of the "
               "state), activations %.1f MiB\n",
               layout, (double)table->n_floats * 4 / mib, (double)table->n_floats * 4 / mib,
               (double)t->optim->n_state * (double)nm_optimizer_state_bytes_per_float(&t->optim->cfg) / mib,
               100.0 * (double)t->optim->n_params / (double)(whole->n_params_main + whole->n_params_mtp),
               (double)nm_model_activation_bytes(t->model) / mib);
        if (t->zero && t->zero->widest_row >= 0)
            printf("distributed optimizer: equal ranges of %lld floats over dp %lld and of %lld over the expert group "
                   "%lld; %s spans %lld of them\n",
                   (long long)t->zero->range_floats[0], (long long)t->zero->dp->size,
                   (long long)t->zero->range_floats[1], (long long)t->zero->edp->size,
                   table->rows[t->zero->widest_row].name, (long long)t->zero->widest_ranges);
        if (t->pipe) {
            printf("pipeline %lld stages, 1F1B over %lld micro-batches (bubble (PP-1)/(m+PP-1) = %.3f):", (long long)ms.pp,
                   (long long)t->accum, (double)(ms.pp - 1) / (double)(t->accum + ms.pp - 1));
            for (int64_t s = 0; s < ms.pp; s++) {
                char d[512];
                nm_pipeline_describe_stage(&t->stages[s], &t->mcfg, d, sizeof(d));
                printf("%s %s", s ? " |" : "", d);
            }
            printf("\n");
            for (int64_t s = 0; s < ms.pp; s++)
                printf("stage %lld: params %.1f MiB, activations %.1f MiB (%lld micro-batches in flight)\n", (long long)s,
                       stage_mem[2 * s] / mib, stage_mem[2 * s + 1] / mib,
                       (long long)nm_pipeline_slots(ms.pp, s, t->accum));
        }
        printf("%s\n", t->kernels);
        const char *given = getenv("NM_PEAK_GFLOPS");
        printf("peak  %.1f GFLOP/s %s %s (%s) | %.2f MFLOP/token | activations %.1f MiB",
               t->peak_flops / 1e9, cfg->precision == NM_PRECISION_FP32 ? "fp32 GEMM" : "best of the fp32 and bf16 GEMMs",
               given && atof(given) > 0 ? "given by NM_PEAK_GFLOPS" : "measured",
               t->ops->kernel_names(), t->flops_per_token / 1e6,
               (double)nm_model_activation_bytes(t->model) / 1048576.0);
        if (opts->recompute && !t->pipe) {
            size_t full = nm_model_estimate_activation_bytes(&t->mcfg, cfg->micro_batch, t->T, 0);
            printf(" (recomputation saves %.1f MiB of %.1f)", (double)(full - nm_model_activation_bytes(t->model)) / 1048576.0,
                   (double)full / 1048576.0);
        }
        printf("\n");
        fflush(stdout);
    }
    nm_free(stage_mem);
    *out = t;
    return 0;
fail:
    // The caller prints err and, under MPI, stops the job (nm_trainer_abort).
    nm_trainer_destroy(t);
    return rc;
}

// --- step -------------------------------------------------------------------------------------

// This rank's bytes moved during the step, per group and operation (docs/parallelism.md has
// the formulas): the counters' growth since the last step. The all-to-all bytes are also
// summed over the job: that total follows from the configuration alone (dropless routing
// hands every token's K rows to the exchange), while one rank's share depends on its routing.
static int comm_metrics(nm_trainer *t, nm_metric *kv, int *n_out, nm_error *err) {
    static const char *const keys[][NM_COMM_N_OPS] = {
        {"comm_dp_all_reduce_bytes", "comm_dp_reduce_scatter_bytes", "comm_dp_all_gather_bytes", NULL, NULL, NULL, NULL},
        {NULL, "comm_edp_reduce_scatter_bytes", "comm_edp_all_gather_bytes", NULL, NULL, NULL, NULL},
        {NULL, NULL, NULL, "comm_ep_all_to_all_bytes", NULL, NULL, NULL},
        {"comm_tp_all_reduce_bytes", "comm_tp_reduce_scatter_bytes", "comm_tp_all_gather_bytes", NULL, NULL, NULL, NULL},
        {NULL, NULL, NULL, NULL, NULL, "comm_pp_send_bytes", "comm_pp_recv_bytes"},
    };
    nm_comm *groups[5] = {t->mesh->dp, t->mesh->edp, t->mesh->ep, t->mesh->tp, t->mesh->pp};
    int n = 0;
    int64_t a2a = 0;
    int n_groups = t->pipe ? 5 : 4;
    for (int g = 0; g < n_groups; g++) {
        for (int op = 0; op < NM_COMM_N_OPS; op++) {
            if (!keys[g][op]) continue;
            int64_t now = groups[g]->counters.bytes[op];
            kv[n++] = NM_METRIC_I(keys[g][op], now - t->comm_seen[g][op]);
            if (op == NM_COMM_ALL_TO_ALL) a2a = now - t->comm_seen[g][op];
            t->comm_seen[g][op] = now;
        }
    }
    // Seconds this rank spent inside each group's collectives during the step (rank 0's view;
    // under EP and TP most of it lies inside the forward and backward).
    static const char *const time_keys[5] = {"comm_dp_s", "comm_edp_s", "comm_ep_s", "comm_tp_s", "comm_pp_s"};
    for (int g = 0; g < n_groups; g++) {
        double now = 0;
        for (int op = 0; op < NM_COMM_N_OPS; op++) now += groups[g]->counters.seconds[op];
        kv[n++] = NM_METRIC_F(time_keys[g], now - t->comm_time_seen[g]);
        t->comm_time_seen[g] = now;
    }
    if (nm_comm_all_reduce(t->world, &a2a, 1, NM_DT_I64, NM_RED_SUM, err) != 0) return -1;
    kv[n++] = NM_METRIC_I("comm_ep_all_to_all_bytes_job", a2a);
    // How much of the gradient reduction was started while the backward still ran.
    int64_t bucket_floats = 0;
    for (int b = 0; b < t->zero->n_buckets; b++) bucket_floats += t->zero->buckets[b].n;
    kv[n++] = NM_METRIC_I("grad_buckets", t->zero->n_buckets);
    kv[n++] = NM_METRIC_I("grad_buckets_started_in_backward", t->zero->n_started_early);
    kv[n++] = NM_METRIC_F("grad_reduce_overlap_fraction",
                          bucket_floats > 0 ? (double)t->zero->floats_started_early / (double)bucket_floats : 0.0);
    *n_out += n;
    return 0;
}

// The name the lowest rank holding one gave, on every rank ("" when no rank has one).
static int first_bad_name(nm_trainer *t, const char *mine, char out[128], nm_error *err) {
    out[0] = 0;
    if (t->world->size == 1) {
        if (mine) snprintf(out, 128, "%s", mine);
        return 0;
    }
    int32_t who = mine ? t->world->rank : INT32_MAX;
    if (nm_comm_all_reduce(t->world, &who, 1, NM_DT_I32, NM_RED_MIN, err) != 0) return -1;
    if (who == INT32_MAX) return 0;
    int32_t words[32] = {0};
    if (t->world->rank == who) snprintf((char *)words, sizeof(words), "%s", mine);
    if (nm_comm_broadcast(t->world, words, 32, NM_DT_I32, who, err) != 0) return -1;
    snprintf(out, 128, "%s", (const char *)words);
    return 0;
}

// Sequence parallelism: the rows computed on each rank's tokens (norms, router, eh_proj;
// NM_TENSOR_SEQ_PARTIAL) hold partial gradients; they are summed over tp once per step, after
// the last micro-batch's backward has finished their layer (layer -1: the global rows), and
// before any bucket holding them starts reducing over dp.
static int tp_sum_partial_rows(nm_trainer *t, int layer, nm_error *err) {
    if (!t->sp) return 0;
    const nm_param_table *table = nm_model_table(t->model);
    float *g = nm_model_grads(t->model);
    for (int r = 0; r < table->n_rows; r++) {
        const nm_tensor_spec *row = &table->rows[r];
        if (!(row->flags & NM_TENSOR_SEQ_PARTIAL) || (row->flags & NM_TENSOR_TIED) || t->tp_summed[r]) continue;
        if (layer != -2 && row->layer != layer) continue;  // -2: every row not summed yet
        if (nm_comm_all_reduce(t->mesh->tp, g + row->offset, row->numel, NM_DT_F32, NM_RED_SUM, err) != 0) return -1;
        t->tp_summed[r] = 1;
    }
    return 0;
}

static int zero_backward_hook(void *trainer, int layer, nm_error *err) {
    nm_trainer *t = trainer;
    if (tp_sum_partial_rows(t, layer, err) != 0) return -1;
    return nm_zero_layer_done(t->zero, layer, err);
}

// Floats of this rank's embedding (its vocabulary shard under TP), which the embedding group
// of the first and last pipeline stage sums and keeps equal.
static int64_t embed_floats(const nm_trainer *t) {
    const nm_param_table *tb = nm_model_table(t->model);
    int row = nm_param_table_find(tb, "model.embed_tokens.weight");
    NM_CHECK(row >= 0, "embedding group without an embedding row");
    return tb->rows[row].numel;
}

// After the micro-batches: gradients reduce-scattered to their owners, and the loss terms,
// the finiteness flag and the expert loads all-reduced, so every rank decides the same.
static int reduce_step(nm_trainer *t, nm_step_metrics *m, int n_moe, int *finite, nm_error *err) {
    if (t->world->size == 1) return 0;
    if (tp_sum_partial_rows(t, -2, err) != 0) return -1;
    if (t->emb && t->emb->size > 1) {
        // The embedding's gradient summed over the first stage and the last stage's copy (each
        // dp rank with its peer, before the dp reduction), so both hold the one-process
        // gradient and their AdamW updates keep the two copies equal. Under TP each holds the
        // same vocabulary shard.
        if (nm_comm_all_reduce(t->emb, nm_model_grads(t->model) + nm_model_table(t->model)->embed, embed_floats(t),
                               NM_DT_F32, NM_RED_SUM, err) != 0)
            return -1;
    }
    if (nm_zero_finish(t->zero, err) != 0) return -1;
    nm_comm *dp = t->mesh->dp;
    double dpn = (double)t->mesh->n.dp;
    double terms[5] = {m->loss, m->ce_loss, m->mtp_loss, m->aux_loss, *finite ? 0.0 : 1.0};
    if (nm_comm_all_reduce(dp, terms, 5, NM_DT_F64, NM_RED_SUM, err) != 0) return -1;
    // Over the stages: CE and MTP live on the last stage (the others add 0), each stage adds its
    // layers' balance loss, and a non-finite value on any stage counts everywhere.
    if (t->pipe && nm_comm_all_reduce(t->mesh->pp, terms, 5, NM_DT_F64, NM_RED_SUM, err) != 0) return -1;
    m->loss = terms[0] / dpn;
    m->ce_loss = terms[1] / dpn;
    m->mtp_loss = terms[2] / dpn;
    m->aux_loss = terms[3] / dpn;
    *finite = terms[4] == 0.0;
    int64_t E = t->mcfg.E;
    if (n_moe > 0 && nm_comm_all_reduce(dp, t->step_counts, (int64_t)n_moe * E, NM_DT_I64, NM_RED_SUM, err) != 0)
        return -1;
    return 0;
}

// This rank's part of the squared gradient norm: the rows it owns, except that a tensor
// tensor parallelism does not split is held alike by every tp rank and counted on tp rank 0
// only (the shards of a split one are distinct and each counts).
static double tp_grad_sumsq(nm_trainer *t) {
    const float *g = nm_model_grads(t->model);
    if (t->mesh->n.tp == 1) return nm_optimizer_grad_sumsq_except(t->optim, g, t->embed_copy_row);
    const nm_optimizer *o = t->optim;
    const nm_param_table *table = nm_model_table(t->model);
    double sum = 0.0;
    for (int64_t c = 0; c < o->n_chunks; c++) {
        if (o->chunks[c].row == t->embed_copy_row) continue;  // the last stage's copy: counted on the first
        const nm_tensor_spec *row = &table->rows[o->chunks[c].row];
        // under sequence parallelism the routed experts are owned over edp (tp included): once
        if (t->mesh->tp_rank != 0 && row->tp_dim < 0 && !(t->sp && (row->flags & NM_TENSOR_EXPERT))) continue;
        const float *x = g + o->chunks[c].offset;
        double part = 0.0;
        for (size_t i = 0; i < o->chunks[c].len; i++) part += (double)x[i] * (double)x[i];
        sum += part;
    }
    return sum;
}

// The pre-step checks over the whole job: the norm from every rank's owned rows (each tensor
// is owned once in the world), clipping from it, and the first non-finite tensor's name.
static int check_grads(nm_trainer *t, double max_norm, nm_grad_report *rep, nm_error *err) {
    if (t->world->size == 1) {
        nm_optimizer_check_grads(t->optim, nm_model_grads(t->model), max_norm, rep);
        return 0;
    }
    memset(rep, 0, sizeof(*rep));
    double sumsq = tp_grad_sumsq(t);
    if (nm_comm_all_reduce(t->world, &sumsq, 1, NM_DT_F64, NM_RED_SUM, err) != 0) return -1;
    rep->norm = sqrt(sumsq);
    rep->bad_row = -1;
    rep->clip_scale = 1.0f;
    if (!isfinite(rep->norm)) {
        rep->finite = 0;
        int row = nm_optimizer_first_nonfinite(t->optim, nm_model_grads(t->model));
        static char name[128];
        if (first_bad_name(t, row >= 0 ? nm_model_table(t->model)->rows[row].name : NULL, name, err) != 0) return -1;
        rep->bad_name = name[0] ? name : NULL;
        return 0;
    }
    rep->finite = 1;
    if (max_norm > 0.0) {
        double coef = max_norm / (rep->norm + 1e-6);
        rep->clip_scale = coef < 1.0 ? (float)coef : 1.0f;
    }
    return 0;
}

// --- pipeline parallelism -------------------------------------------------------------------

typedef struct pp_step {
    nm_trainer *t;
    nm_step_metrics *m;
    int n_moe;
    int *finite;
} pp_step;

// After micro-batch i's forward on this stage: its loss terms (the last stage's CE and MTP,
// every stage's balance loss) and expert loads, summed in micro-batch order as one process does.
static int pp_after_forward(void *ctx, int64_t micro, const nm_loss_terms *lt, nm_error *err) {
    (void)micro;
    (void)err;
    pp_step *ps = ctx;
    nm_trainer *t = ps->t;
    const int64_t *counts = nm_model_expert_counts(t->model, NULL, NULL);
    for (int64_t i = 0; i < (int64_t)ps->n_moe * t->mcfg.E; i++) t->step_counts[i] += counts[i];
    ps->m->loss += lt->loss / (double)t->accum;
    ps->m->ce_loss += lt->ce / (double)t->accum;
    ps->m->mtp_loss += lt->mtp / (double)t->accum;
    ps->m->aux_loss += lt->aux / (double)t->accum;
    if (!isfinite(lt->loss)) *ps->finite = 0;
    return 0;
}

// The last micro-batch's backward finishes the gradients (as in the one-stage loop).
static int pp_before_backward(void *ctx, int64_t micro, nm_error *err) {
    (void)err;
    pp_step *ps = ctx;
    nm_trainer *t = ps->t;
    if (micro == t->accum - 1 && t->zero) {
        nm_zero_begin(t->zero, nm_model_grads(t->model));
        memset(t->tp_summed, 0, (size_t)nm_model_table(t->model)->n_rows);
        if (t->cfg.overlap_grad_reduce) nm_model_set_backward_hook(t->model, zero_backward_hook, t);
    }
    return 0;
}

// The step's micro-batches through this stage under 1F1B; the stages' idle fractions (time in
// send/recv over the schedule's time) gathered for the metrics.
static int pipeline_micro_batches(nm_trainer *t, const nm_loss_options *opt, nm_step_metrics *m, int n_moe,
                                  int *finite, nm_error *err) {
    const nm_train_config *c = &t->cfg;
    int64_t BT = c->micro_batch * t->T;
    double ta = now_s();
    for (int64_t i = 0; i < t->accum; i++) {
        if (nm_loader_next_batch(t->train_data, t->tokens_all + i * BT, c->micro_batch, err) != 0) return -1;
    }
    m->t_data = now_s() - ta;
    pp_step ps = {t, m, n_moe, finite};
    nm_pipeline_hooks hooks = {pp_after_forward, pp_before_backward, &ps};
    nm_pipeline_times times;
    int rc = nm_pipeline_train(t->pipe, t->tokens_all, t->accum, opt, &hooks, &times, err);
    nm_model_set_backward_hook(t->model, NULL, NULL);
    if (rc != 0) return -1;
    m->t_forward = times.forward;
    m->t_backward = times.backward;
    memset(t->pp_idle, 0, (size_t)t->mesh->n.pp * sizeof(double));
    if (t->mesh->dp_rank == 0 && t->mesh->tp_rank == 0)
        t->pp_idle[t->mesh->pp_rank] = times.total > 0 ? times.comm / times.total : 0.0;
    return nm_comm_all_reduce(t->world, t->pp_idle, t->mesh->n.pp, NM_DT_F64, NM_RED_SUM, err);
}

// The expert-load and bias statistics over every stage's MoE layers (max, min, max); a stage
// without MoE layers contributes nothing.
static int pipeline_balance_stats(nm_trainer *t, nm_balance_stats *bs, int n_moe, nm_error *err) {
    double mx[2] = {bs->load_max_over_mean, n_moe > 0 && isfinite(bs->bias_max) ? bs->bias_max : -INFINITY};
    double mn = n_moe > 0 && isfinite(bs->bias_min) ? bs->bias_min : INFINITY;
    if (nm_comm_all_reduce(t->mesh->pp, mx, 2, NM_DT_F64, NM_RED_MAX, err) != 0 ||
        nm_comm_all_reduce(t->mesh->pp, &mn, 1, NM_DT_F64, NM_RED_MIN, err) != 0)
        return -1;
    bs->load_max_over_mean = mx[0];
    // No finite bias anywhere: a dense model (0, as one process reports) or a router that
    // ignores the bias (NaN, likewise).
    int moe_anywhere = 0;
    for (int64_t l = 0; l < t->mcfg.n_layers; l++) moe_anywhere |= nm_layer_is_moe(&t->mcfg, l);
    double none = !moe_anywhere || nm_routing_uses_bias(&t->mcfg) ? 0.0 : NAN;
    bs->bias_max = isfinite(mn) ? mx[1] : none;
    bs->bias_min = isfinite(mn) ? mn : none;
    return 0;
}

int nm_trainer_evaluate(nm_trainer *t, double *val_loss, nm_error *err) {
    *val_loss = NAN;
    if (!t->valid_data) return 0;
    // The same held-out batches every time, so successive values are comparable.
    nm_loader_set_cursor(t->valid_data, (nm_data_cursor){.sample = 0});
    nm_loss_options opt = {.mtp_weight = 0.0f, .aux_weight = 0.0f, .grad_scale = 1.0f};
    double sum = 0.0;
    const int64_t n_batches = eval_batches(t);
    for (int64_t i = 0; i < n_batches; i++) {
        nm_loss_terms lt;
        if (nm_loader_next_batch(t->valid_data, t->tokens, t->cfg.micro_batch, err) != 0) return -1;
        if (t->pipe) {
            if (nm_pipeline_forward(t->pipe, t->tokens, &opt, &lt, err) != 0) return -1;
        } else if (nm_model_forward(t->model, t->tokens, t->cfg.micro_batch, t->T, &opt, &lt, NULL, err) != 0) {
            return -1;
        }
        sum += lt.ce;
    }
    *val_loss = sum / (double)n_batches;
    // The loss is the last stage's; every stage reports it.
    if (t->pipe && nm_comm_broadcast(t->mesh->pp, val_loss, 1, NM_DT_F64, (int)t->mesh->n.pp - 1, err) != 0) return -1;
    return 0;
}

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
    nm_ckpt_state st = {
        .step = t->step, .tokens = t->tokens_seen, .data_sample = nm_loader_get_cursor(t->train_data).sample,
        .optim_step = t->optim->step, .skipped_steps = t->skipped_steps, .nan_streak = t->nan_streak,
        .seed = t->cfg.seed, .world = t->mesh->n.dp,
    };
    st.train_config_json = nm_train_config_to_json(&t->cfg);
    st.tokenizer = nm_strdup(t->cfg.tokenizer ? t->cfg.tokenizer : "bytes");
    char dir[4200];
    int rc = t->metrics ? nm_metrics_sync(t->metrics, err) : 0;
    if (rc == 0 && t->mesh->n.tp > 1) {
        rc = save_tp(t, run_dir, &st, dir, sizeof(dir), err);
    } else if (rc == 0) {
        ckpt_moments w;
        rc = moments_open(t, &w, 1, err);
        nm_ckpt_shard shard = {.world = t->world, .owned = t->zero ? t->zero->owned : NULL, .row_state = w.row_state,
                               .tp = t->mesh->n.tp, .pp = t->mesh->n.pp, .ep = t->mesh->n.ep};
        if (rc == 0)
            rc = nm_checkpoint_save(run_dir, &st, &t->mcfg, nm_model_table(t->model), nm_model_params(t->model), w.m,
                                    w.v, &shard, t->cfg.checkpoint.keep_last, dir, sizeof(dir), err);
        moments_close(&w);
    }
    nm_ckpt_state_free(&st);
    if (rc == 0 && !t->opts.quiet) {
        if (t->tty) printf("\r\033[K");
        printf("saved %s\n", dir);
        fflush(stdout);
    }
    return rc;
}

int nm_trainer_step(nm_trainer *t, nm_step_metrics *m, nm_error *err) {
    const nm_train_config *c = &t->cfg;
    if (t->step >= c->steps) return 0;
    // Megatron's --exit-interval: end this process at such a step (the caller saves), leaving
    // the schedule and the data order those of the full run.
    if (c->exit_interval > 0 && t->step > t->step_at_start && t->step % c->exit_interval == 0) return 0;
    int64_t step = t->step + 1;
    memset(m, 0, sizeof(*m));
    m->step = step;
    m->steps_total = c->steps;
    m->val_loss = NAN;
    int n_moe;
    nm_model_expert_counts(t->model, &n_moe, NULL);
    int64_t E = t->mcfg.E;
    memset(t->step_counts, 0, (size_t)n_moe * (size_t)(E > 0 ? E : 1) * sizeof(int64_t));

    double t0 = now_s();
    nm_loss_options opt = {
        .mtp_weight = (float)nm_mtp_weight_at(c->mtp.weight, c->mtp.weight_after, c->mtp.switch_step, step),
        .aux_weight = (float)c->balance.aux_weight,
        // Each rank's gradients are summed over the data-parallel group: 1/(accum x dp) makes the
        // sum the mean over the global batch, as one process computes it.
        .grad_scale = 1.0f / (float)(t->accum * t->mesh->n.dp),
    };
    nm_model_zero_grads(t->model);
    int64_t n_inject = t->opts.inject_nan_count > 1 ? t->opts.inject_nan_count : 1;
    if (t->inject_nan_here && t->opts.inject_nan_step > 0 && step >= t->opts.inject_nan_step &&
        step < t->opts.inject_nan_step + n_inject) {
        // Testing hook for the divergence guard: poison one gradient of the first block before
        // the backward, which adds to it (grads +=), so the NaN is this rank's own, there
        // before any reduction. The reductions carry it to every rank's decision: the
        // reduce-scatter into its owner's shard, then the gradient norm all-reduced over the
        // world, so all ranks skip the step (check_grads).
        size_t off = nm_model_table(t->model)->layers[0].input_norm;
        if (off != NM_OFF_NONE) nm_model_grads(t->model)[off] = NAN;  // the stage holding layer 0
    }
    int finite = 1;
    if (t->pipe && pipeline_micro_batches(t, &opt, m, n_moe, &finite, err) != 0) return -1;
    for (int64_t micro = 0; !t->pipe && micro < t->accum; micro++) {
        double ta = now_s();
        if (nm_loader_next_batch(t->train_data, t->tokens, c->micro_batch, err) != 0) return -1;
        double tb = now_s();
        nm_loss_terms lt;
        if (nm_model_forward(t->model, t->tokens, c->micro_batch, t->T, &opt, &lt, NULL, err) != 0) return -1;
        const int64_t *counts = nm_model_expert_counts(t->model, NULL, NULL);
        for (int64_t i = 0; i < (int64_t)n_moe * E; i++) t->step_counts[i] += counts[i];
        double tc = now_s();
        // The last micro-batch's backward finishes the gradients: buckets start reducing as
        // soon as their layers are done (overlap_grad_reduce), the rest in reduce_step.
        int last = micro == t->accum - 1;
        if (last && t->zero) {
            nm_zero_begin(t->zero, nm_model_grads(t->model));
            memset(t->tp_summed, 0, (size_t)nm_model_table(t->model)->n_rows);
            if (c->overlap_grad_reduce) nm_model_set_backward_hook(t->model, zero_backward_hook, t);
        }
        int rc = nm_model_backward(t->model, err);
        nm_model_set_backward_hook(t->model, NULL, NULL);
        if (rc != 0) return -1;
        double td = now_s();
        m->t_data += tb - ta;
        m->t_forward += tc - tb;
        m->t_backward += td - tc;
        m->loss += lt.loss / (double)t->accum;
        m->ce_loss += lt.ce / (double)t->accum;
        m->mtp_loss += lt.mtp / (double)t->accum;
        m->aux_loss += lt.aux / (double)t->accum;
        if (!isfinite(lt.loss)) finite = 0;
    }
    double te = now_s();
    if (reduce_step(t, m, n_moe, &finite, err) != 0) return -1;
    double t_comm = now_s() - te, t_gather = 0.0;
    te = now_s();
    nm_grad_report rep;
    // The clip factor is applied inside the AdamW update: nothing reads the clipped
    // gradients, so they are not rewritten in a pass of their own.
    if (check_grads(t, c->optimizer.clip_grad, &rep, err) != 0) return -1;
    m->grad_norm = rep.norm;
    m->lr = nm_lr_at(&t->sched, step);
    int diverged = 0;
    if (!finite || !rep.finite) {
        // Divergence guard: skip the update (parameters, moments and biases untouched). Name
        // where it started: a non-finite parameter if the loss itself is not finite (a NaN
        // weight poisons every gradient), else the first tensor with a non-finite gradient.
        m->skipped = 1;
        t->skipped_steps++;
        const char *where = rep.bad_name;
        char where_buf[128];
        if (!finite) {
            int row = nm_optimizer_first_nonfinite(t->optim, t->model_params_readonly);
            if (first_bad_name(t, row >= 0 ? nm_model_table(t->model)->rows[row].name : NULL, where_buf, err) != 0)
                return -1;
            where = where_buf[0] ? where_buf : NULL;
        }
        char what[200];
        if (where) snprintf(what, sizeof(what), "%s (first in %s)", finite ? "gradient" : "loss; non-finite parameter", where);
        else snprintf(what, sizeof(what), "%s", finite ? "gradient" : "loss");
        if (t->nan_streak++ == 0) snprintf(t->nan_first, sizeof(t->nan_first), "%s", what);
        if (t->rank0)
            fprintf(stderr, "step %lld: non-finite %s; update skipped (%lld in a row)\n", (long long)step, what,
                    (long long)t->nan_streak);
        diverged = t->nan_streak >= t->opts.max_nan_streak;
    } else {
        t->nan_streak = 0;
        nm_optimizer_step_scaled(t->optim, nm_model_params(t->model), nm_model_grads(t->model), rep.clip_scale, m->lr);
        if (t->zero) {
            double tg = now_s();
            if (nm_zero_all_gather_params(t->zero, nm_model_params(t->model), err) != 0) return -1;
            // Both embedding holders applied the same gradient; at dp > 2 MPI may sum it in
            // another order for the two stages' buckets, so the first stage's weights are
            // copied over the last stage's: the tie then holds exactly, whatever the order.
            if (t->emb && t->emb->size > 1 &&
                nm_comm_broadcast(t->emb, nm_model_params(t->model) + nm_model_table(t->model)->embed,
                                  embed_floats(t), NM_DT_F32, 0, err) != 0)
                return -1;
            t_gather = now_s() - tg;
            t_comm += t_gather;
        }
        float gamma = (float)nm_bias_gamma_at(c->balance.bias_update_speed, c->balance.bias_update_stop_step, step);
        // Aux-loss-free balancing exists for noaux_tc only: other methods never read the bias.
        if (gamma > 0.0f && nm_routing_uses_bias(&t->mcfg)) {
            for (int i = 0; i < n_moe; i++) {
                nm_balance_update_bias((float *)t->bias_ptrs[i], t->step_counts + (size_t)i * E, E, gamma);
            }
        }
    }
    double tf = now_s();
    m->t_comm = t_comm;
    m->t_optimizer = tf - te - t_gather;
    t->step = step;
    int64_t step_tokens = c->global_batch * c->seq_len;
    t->tokens_seen += step_tokens;
    double dt = tf - t0;
    m->tokens_per_s = (double)step_tokens / dt;
    m->tflops = t->flops_per_token * m->tokens_per_s / 1e12;
    // The peak is one short timing at start-up (measure_gemm_peak); a step whose whole rate
    // beats it proves it low (the machine was busy while it was timed: 103-107% MFU was seen
    // for 300 steps), so the peak rises to that rate and the MFU never exceeds 100%.
    double achieved = t->flops_per_token * m->tokens_per_s;
    if (achieved > t->peak_flops) {
        if (t->rank0 && !t->peak_raised)
            fprintf(stderr, "note: step %lld ran at %.1f GFLOP/s, above the %.1f GFLOP/s peak timed at start-up (the "
                    "machine was busy then); the MFU's peak is raised to the best rate seen\n", (long long)step,
                    achieved / 1e9, t->peak_flops / 1e9);
        t->peak_raised = 1;
        t->peak_flops = achieved;
    }
    m->mfu = achieved / t->peak_flops;
    nm_balance_stats bs = {1.0, 0.0, 0.0};
    if (n_moe > 0)
        nm_balance_compute_stats(&bs, t->step_counts, nm_routing_uses_bias(&t->mcfg) ? t->bias_ptrs : NULL,
                                 n_moe, E);
    if (t->pipe && pipeline_balance_stats(t, &bs, n_moe, err) != 0) return -1;
    m->tokens = t->tokens_seen;
    m->mtp_weight = opt.mtp_weight;
    m->skipped_total = t->skipped_steps;
    m->load_max_over_mean = bs.load_max_over_mean;
    m->bias_min = bs.bias_min;
    m->bias_max = bs.bias_max;
    // The expert-parallel exchange of the step (before an evaluation adds its own): the most
    // rounds any MoE layer took and the busiest receiver over the mean, over the job.
    int64_t ep_rounds = 0;
    double ep_over = 0.0;
    if (t->mesh->n.ep > 1) {
        nm_model_ep_stats(t->model, &ep_rounds, &ep_over);
        if (nm_comm_all_reduce(t->world, &ep_rounds, 1, NM_DT_I64, NM_RED_MAX, err) != 0 ||
            nm_comm_all_reduce(t->world, &ep_over, 1, NM_DT_F64, NM_RED_MAX, err) != 0)
            return -1;
    }

    int eval_now = c->log.eval_every > 0 && (step % c->log.eval_every == 0 || step == c->steps);
    if (eval_now && t->valid_data) {
        if (nm_trainer_evaluate(t, &m->val_loss, err) != 0) return -1;
        t->hist_vstep[t->n_vhist] = (double)step;
        t->hist_vloss[t->n_vhist++] = m->val_loss;
    }
    if (t->n_hist < c->steps) {
        t->hist_step[t->n_hist] = (double)step;
        t->hist_loss[t->n_hist++] = m->ce_loss;
    }

    // logs
    nm_metric *kv = t->step_kv;
    int n = 0;
    kv[n++] = NM_METRIC_F("ce_loss", m->ce_loss);
    kv[n++] = NM_METRIC_F("mtp_loss", m->mtp_loss);
    kv[n++] = NM_METRIC_F("aux_loss", m->aux_loss);
    kv[n++] = NM_METRIC_F("grad_norm", m->grad_norm);
    kv[n++] = NM_METRIC_F("lr", m->lr);
    kv[n++] = NM_METRIC_F("mtp_weight", opt.mtp_weight);
    kv[n++] = NM_METRIC_I("tokens", t->tokens_seen);
    kv[n++] = NM_METRIC_F("tokens_per_s", m->tokens_per_s);
    kv[n++] = NM_METRIC_F("tflops", m->tflops);
    kv[n++] = NM_METRIC_F("mfu", m->mfu);
    kv[n++] = NM_METRIC_F("expert_load_max_over_mean", m->load_max_over_mean);
    kv[n++] = NM_METRIC_F("bias_min", m->bias_min);
    kv[n++] = NM_METRIC_F("bias_max", m->bias_max);
    kv[n++] = NM_METRIC_I("skipped", m->skipped);
    kv[n++] = NM_METRIC_I("skipped_total", t->skipped_steps);
    kv[n++] = NM_METRIC_F("time_data_s", m->t_data);
    kv[n++] = NM_METRIC_F("time_forward_s", m->t_forward);
    kv[n++] = NM_METRIC_F("time_backward_s", m->t_backward);
    kv[n++] = NM_METRIC_F("time_optimizer_s", m->t_optimizer);
    kv[n++] = NM_METRIC_F("time_comm_s", m->t_comm);
    // The peak resident memory of the job's largest rank so far (getrusage), beside the
    // planner's total_bytes per rank (docs/parallelism.md has how they compare).
    int64_t rss = nm_memory_peak_rss_bytes();
    if (t->world->size > 1 && nm_comm_all_reduce(t->world, &rss, 1, NM_DT_I64, NM_RED_MAX, err) != 0) return -1;
    kv[n++] = NM_METRIC_I("rss_peak_bytes", rss);
    if (t->world->size > 1 && comm_metrics(t, kv + n, &n, err) != 0) return -1;
    if (t->mesh->n.ep > 1) {
        kv[n++] = NM_METRIC_I("ep_rounds", ep_rounds);
        kv[n++] = NM_METRIC_F("ep_recv_max_over_mean", ep_over);
    }
    if (t->pipe) {
        int64_t S = t->mesh->n.pp;
        for (int64_t s = 0; s < S; s++) kv[n++] = NM_METRIC_F(t->pp_keys[s], t->pp_idle[s]);
        kv[n++] = NM_METRIC_F("pp_bubble_theory", (double)(S - 1) / (double)(t->accum + S - 1));
    }
    if (!isnan(m->val_loss)) kv[n++] = NM_METRIC_F("val_loss", m->val_loss);
    if (t->metrics && nm_metrics_write(t->metrics, step, m->loss, kv, n, err) != 0) return -1;
    if (diverged) {
        if (t->metrics) nm_metrics_sync(t->metrics, err);
        return nm_error_set(err, "diverged: %lld consecutive non-finite steps ending at step %lld; the first was a non-finite %s",
                            (long long)t->nan_streak, (long long)step, t->nan_first);
    }
    int log_now = step % c->log.log_every == 0 || step == c->steps || step == t->step_at_start + 1;
    if (log_now && t->tb) {
        static const char *const tags[] = {"loss/total", "loss/ce", "loss/mtp", "loss/aux", "train/grad_norm",
                                           "train/lr", "perf/tokens_per_s", "perf/mfu", "moe/load_max_over_mean",
                                           "moe/bias_min", "moe/bias_max"};
        float vals[] = {(float)m->loss, (float)m->ce_loss, (float)m->mtp_loss, (float)m->aux_loss, (float)m->grad_norm,
                        (float)m->lr, (float)m->tokens_per_s, (float)m->mfu, (float)m->load_max_over_mean,
                        (float)m->bias_min, (float)m->bias_max};
        if (nm_tb_add_scalars(t->tb, step, tags, vals, 11, err) != 0) return -1;
        if (!isnan(m->val_loss) && nm_tb_add_scalar(t->tb, "loss/val", step, (float)m->val_loss, err) != 0) return -1;
        if (nm_tb_flush(t->tb, err) != 0) return -1;
    }
    if (!t->opts.quiet) {
        nm_progress p = {
            // The progress line shows the main next-token CE as "loss" (Megatron's "lm loss"):
            // the number comparable to the validation loss and the corpus entropy floor.
            // metrics.jsonl has both: "loss" (the total objective) and "ce_loss".
            .step = step, .total = c->steps, .loss = m->ce_loss, .mtp_loss = t->mcfg.M > 0 ? m->mtp_loss : NAN,
            .lr = m->lr, .grad_norm = m->grad_norm, .tokens_per_s = m->tokens_per_s, .mfu = m->mfu,
            .eta_s = nm_progress_eta(step, c->steps, step - t->step_at_start, now_s() - t->t_start),
        };
        nm_progress_print(stdout, &p, t->tty, log_now);
        if (!isnan(m->val_loss)) {
            if (t->tty) printf("\r\033[K");
            printf("step %6lld/%lld | validation loss %.4f | perplexity %.2f\n", (long long)step, (long long)c->steps,
                   m->val_loss, exp(m->val_loss));
        }
        fflush(stdout);
    }
    if (c->checkpoint.save_every > 0 && step % c->checkpoint.save_every == 0) {
        if (nm_trainer_save(t, err) != 0) return -1;
    }
    return 1;
}

// --- finish / destroy -------------------------------------------------------------------------

int nm_trainer_finish(nm_trainer *t, nm_error *err) {
    if (t->finished || !t->metrics) return 0;
    t->finished = 1;
    char path[4200];
    snprintf(path, sizeof(path), "%s/loss.svg", t->opts.run_dir);
    nm_plot_series s[2] = {
        {.label = "train", .x = t->hist_step, .y = t->hist_loss, .n = t->n_hist},
        {.label = "validation", .x = t->hist_vstep, .y = t->hist_vloss, .n = t->n_vhist},
    };
    int rc = nm_plot_write_svg(path, "loss", s, t->n_vhist > 0 ? 2 : 1, err);
    if (rc == 0) rc = nm_metrics_sync(t->metrics, err);
    if (rc == 0 && nm_tb_flush(t->tb, err) != 0) rc = -1;
    return rc;
}

void nm_trainer_destroy(nm_trainer *t) {
    if (!t) return;
    nm_error ignore;
    if (t->metrics) nm_trainer_finish(t, &ignore);
    nm_metrics_close(t->metrics);
    nm_tb_close(t->tb);
    nm_loader_destroy(t->train_data);
    nm_loader_destroy(t->valid_data);
    nm_optimizer_destroy(t->optim);
    nm_model_destroy(t->model);
    nm_model_config_free(&t->mcfg);
    nm_zero_destroy(t->zero);
    nm_param_table_free(&t->full_table);
    nm_free(t->tp_summed);
    nm_pipeline_destroy(t->pipe);
    nm_comm_destroy(t->emb);
    nm_free(t->stages);
    nm_free(t->tokens_all);
    nm_free(t->pp_idle);
    nm_free(t->pp_keys);
    nm_free(t->step_kv);
    nm_mesh_destroy(t->mesh);
    nm_comm_destroy(t->world);
    nm_free(t->tokens);
    nm_free(t->step_counts);
    nm_free(t->bias_ptrs);
    nm_free(t->hist_step);
    nm_free(t->hist_loss);
    nm_free(t->hist_vstep);
    nm_free(t->hist_vloss);
    nm_run_lock_release(t->run_lock);
    nm_free(t);
}

nm_model *nm_trainer_model(nm_trainer *t) { return t->model; }
int64_t nm_trainer_step_count(const nm_trainer *t) { return t->step; }

int nm_trainer_agree_stop(nm_trainer *t, int mine, int *any, nm_error *err) {
    int32_t v = mine;
    if (nm_comm_all_reduce(t->world, &v, 1, NM_DT_I32, NM_RED_MAX, err) != 0) return -1;
    *any = v;
    return 0;
}
