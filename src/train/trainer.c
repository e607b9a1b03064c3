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
// The phases live in their own files (trainer_internal.h): this one creates and destroys,
// trainer_step.c steps, trainer_report.c reports, trainer_ckpt.c resumes and saves.
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

#include "train/trainer_internal.h"
#include "train/plan.h"

#include <unistd.h>

// The machine peak the MFU is measured against: the backend's own measurement (ops.h:
// measure_peak; the CPU times 2048^3 GEMMs through the kernels just chosen, a one-time ~0.25 s
// on 2 cores, the reference backend 256^3). Runs below fp32 also have the bf16 GEMM: their
// peak is the better of the two, so the MFU keeps meaning "of the best measured kernel". On a
// shared machine any single measurement can be low, so NM_PEAK_GFLOPS overrides it.
static double measure_gemm_peak(const nm_ops *ops, nm_precision precision) {
    const char *given = getenv("NM_PEAK_GFLOPS");
    if (given && atof(given) > 0) return atof(given) * 1e9;
    return ops->measure_peak(ops, precision != NM_PRECISION_FP32);
}

// --- create ---------------------------------------------------------------------------------

// *first = 1 on the lowest rank of this process's node (data.cache_per_node: it builds the
// node's index mappings while the node's other ranks wait). The node is the host name, or
// NM_NODE_NAME where it is set (a launcher whose host names do not tell nodes apart; the tests'
// stand-in for two nodes on one machine); ranks compare a hash of it (an all-gather).
static int node_first_rank(nm_trainer *t, int *first, nm_error *err) {
    char name[256] = "";
    const char *given = getenv("NM_NODE_NAME");
    if (given && *given) snprintf(name, sizeof name, "%s", given);
    else if (gethostname(name, sizeof name - 1) != 0) snprintf(name, sizeof name, "unknown");
    int64_t h = (int64_t)1469598103934665603ull;  // FNV-1a 64 of the name
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) h = (int64_t)(((uint64_t)h ^ *p) * 1099511628211ull);
    int n = t->world->size, me = t->world->rank;
    int64_t *all = nm_calloc((size_t)n, sizeof(int64_t)), *counts = nm_calloc((size_t)n, sizeof(int64_t));
    all[me] = h;
    for (int r = 0; r < n; r++) counts[r] = 1;
    int rc = nm_comm_all_gather(t->world, all, counts, NM_DT_I64, err);
    *first = 1;
    for (int r = 0; rc == 0 && r < me; r++)
        if (all[r] == h) *first = 0;
    nm_free(all);
    nm_free(counts);
    return rc;
}

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
    // The index mappings of datasets on disk are built once, by rank 0, into the cache, and
    // memory-mapped by every rank (the others wait for it; on a file system rank 0 does not
    // share, each rank finds no cache and builds its own).
    char cache[4200] = "";
    if (spec.n_sources > 0) {
        if (c->data_cache_dir && *c->data_cache_dir) snprintf(cache, sizeof cache, "%s", c->data_cache_dir);
        else snprintf(cache, sizeof cache, "%s/index_cache", t->opts.run_dir);
        spec.cache_dir = cache;
    }
    int builder = t->rank0, rc = 0;
    if (spec.cache_dir && c->data_cache_per_node && node_first_rank(t, &builder, err) != 0) rc = -1;
    for (int turn = 0; turn < 2 && rc == 0; turn++) {
        if ((turn == 0) == builder) {
            rc = nm_loader_create(&t->train_data, &spec, NM_SPLIT_TRAIN, t->mesh->dp_rank, (int)t->mesh->n.dp, err);
            // Validation: every rank runs the same held-out batches (expert-parallel forwards
            // need every rank of the group), so the value is the one-process value on every rank.
            if (rc == 0 && c->log.eval_every > 0 && c->data_split_frac[1] > 0)
                rc = nm_loader_create(&t->valid_data, &spec, NM_SPLIT_VALID, 0, 1, err);
        }
        if (turn == 0 && spec.cache_dir && t->world->size > 1 && rc == 0) rc = nm_comm_barrier(t->world, err);
    }
    nm_free(prefixes);
    nm_free(weights);
    return rc;
}

// log.eval_batches, bounded by the validation split's distinct batches: beyond them the loader
// wraps around and repeats the same windows, so a large value over a tiny split only looped (for
// hours, with no output) to the same number.
int64_t nm_trainer_eval_batches(const nm_trainer *t) {
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

// moe_pair_micro_batches: what the pairing needs (trainer_step.c, "paired micro-batches").
static int check_pairing(const nm_trainer *t, const nm_mesh_sizes *ms, nm_error *err) {
    if (nm_pair_micro_batches_check(ms, t->vpp, t->accum, t->cfg.global_batch, t->cfg.micro_batch, err) != 0)
        return -1;
    if (t->opts.external_data)
        return nm_error_set(err, "moe_pair_micro_batches: the trainer pairs the micro-batches it loads itself; a "
                                 "caller's (external_data) come one at a time: set moe_pair_micro_batches to false");
    return 0;
}

// The model config and the parallel layout, checked on every rank before any work; the mesh
// and the pipeline stages' layers.
static int create_layout(nm_trainer *t, nm_error *err) {
    const nm_train_config *cfg = &t->cfg;
    if (nm_train_config_model_config(cfg, &t->mcfg, err) != 0) return -1;
    if (check_model_against_config(&t->mcfg, cfg, err) != 0) return -1;
    // The layout, checked on every rank before any work.
    nm_mesh_sizes ms;
    int64_t n_moe_layers = 0;
    for (int64_t l = 0; l < t->mcfg.L; l++) n_moe_layers += nm_layer_is_moe(&t->mcfg, l);
    if (nm_mesh_check(&ms, t->world->size, cfg->tensor_parallel_size, cfg->pipeline_parallel_size,
                      cfg->expert_parallel_size, n_moe_layers > 0 ? t->mcfg.E : 0, cfg->global_batch, cfg->micro_batch,
                      err) != 0)
        return -1;
    t->sp = ms.tp > 1 && cfg->sequence_parallel;
    if (ms.tp > 1 && ms.ep > 1 && !t->sp) {
        // Without sequence parallelism every tp rank holds the same tokens, so each would send
        // them into the expert all-to-all again (Megatron requires --sequence-parallel here).
        nm_error_set(err, "tensor_parallel_size %lld with expert_parallel_size %lld: tensor x expert parallelism "
                     "needs sequence parallelism: set sequence_parallel to true (or one of them to 1)",
                     (long long)ms.tp, (long long)ms.ep);
        return -1;
    }
    if (ms.tp > 1 && !nm_model_supports_tensor_parallel()) {
        nm_error_set(err, "tensor_parallel_size %lld: tensor parallelism is not implemented", (long long)ms.tp);
        return -1;
    }
    if (nm_pipeline_virtual_size(ms.pp, cfg->virtual_pipeline_size, cfg->pipeline_layout, &t->vpp, err) != 0)
        return -1;
    t->stages = nm_calloc((size_t)(ms.pp * t->vpp), sizeof(nm_model_stage));
    if (nm_pipeline_layout(t->stages, ms.pp, t->vpp, cfg->pipeline_layout, &t->mcfg, err) != 0) return -1;
    if (ms.ep > 1 && !nm_model_supports_expert_parallel()) {
        nm_error_set(err, "expert_parallel_size %lld: expert parallelism is not implemented yet", (long long)ms.ep);
        return -1;
    }
    if (nm_mesh_create(&t->mesh, t->world, &ms, err) != 0) return -1;
    if (nm_train_config_accum_steps(cfg, ms.dp, &t->accum, err) != 0) return -1;
    if (nm_pipeline_check_micro_batches(ms.pp, t->vpp, t->accum, err) != 0) return -1;
    if (cfg->moe_pair_micro_batches && check_pairing(t, &ms, err) != 0) return -1;
    t->T = cfg->seq_len + 1;
    return 0;
}

// The model of this rank's stage and shard, its pipeline schedule and embedding group, and its
// parameters: initialised from the seed, or loaded from init_from.
static int create_model(nm_trainer *t, nm_error *err) {
    const nm_train_config *cfg = &t->cfg;
    const nm_trainer_options *opts = &t->opts;
    const nm_mesh_sizes ms = t->mesh->n;
    nm_model_options mopts = {.recompute = opts->recompute, .ep = t->mesh->ep, .tp = t->mesh->tp,
                              .sequence_parallel = t->sp, .vocab_multiple = cfg->make_vocab_size_divisible_by,
                              .moe_receive_capacity = cfg->moe_receive_capacity, .precision = cfg->precision,
                              .recompute_mla_up_proj = cfg->recompute_mla_up_proj,
                              .recompute_layernorm = cfg->recompute_layernorm,
                              .recompute_moe_act = cfg->recompute_moe_act,
                              .shared_expert_overlap = cfg->moe_shared_expert_overlap,
                              .ep_split = cfg->overlap_moe_expert_parallel_comm ? 2 : 1};
    if (ms.pp > 1) {
        // The stage's layers only (its chunks' under the interleaved schedule), and one activation
        // set per micro-batch in flight on each chunk.
        t->chunks = nm_calloc((size_t)t->vpp, sizeof(nm_model_stage));
        nm_pipeline_rank_chunks(t->stages, ms.pp, t->vpp, t->mesh->pp_rank, t->chunks);
        mopts.stage = t->chunks;
        mopts.n_chunks = t->vpp;
        mopts.act_slots = nm_pipeline_slots(ms.pp, t->vpp, t->mesh->pp_rank, t->accum);
        // paired micro-batches: blocks of w in turn on two models (pipeline.c)
        if (cfg->moe_pair_micro_batches) mopts.act_slots = nm_pipeline_pair_slots(ms.pp, t->mesh->pp_rank, t->accum);
    }
    if (nm_train_check_memory(cfg, &t->mcfg, t->world->size, opts->recompute, t->mesh->pp_rank, err) != 0) return -1;
    if (nm_backend_select(&t->ops, cfg->backend, err) != 0) return -1;
    if (cfg->threads > 0) t->ops->set_threads(t->ops, (int)cfg->threads);  // before the first op runs
    if (nm_model_create_ex(&t->model, &t->mcfg, t->ops, cfg->micro_batch, t->T, &mopts, err) != 0) return -1;
    if (nm_model_set_precision(t->model, cfg->precision, err) != 0) return -1;
    if (cfg->moe_pair_micro_batches && (nm_model_create_pair(&t->model_pair, t->model, &mopts, err) != 0 ||
                                        nm_coop_create(&t->coop, 0, err) != 0))
        return -1;
    const nm_param_table *table = nm_model_table(t->model);
    t->embed_copy_row = -1;
    for (int i = 0; table->embed_copy && i < table->n_rows; i++) {
        const nm_tensor_spec *r = &table->rows[i];
        if (r->layer < 0 && !(r->flags & NM_TENSOR_TIED) && r->offset == table->embed) t->embed_copy_row = i;
    }
    if (ms.pp > 1) {
        if (nm_pipeline_create(&t->pipe, t->mesh->pp, t->model, t->vpp, cfg->micro_batch, t->T, err) != 0) return -1;
        if (t->model_pair) nm_pipeline_set_pair(t->pipe, t->model_pair, t->coop);
        // Megatron's embedding group: the first and the last stage of each pipeline (the last
        // holds a copy of the embedding for MTP or a tied head); every other rank alone.
        int pp = t->mesh->pp_rank, ends = pp == 0 || pp == ms.pp - 1;
        int need = t->mcfg.M > 0 || t->mcfg.tie_embeddings;
        int color = ends && need ? t->mesh->tp_rank + (int)ms.tp * t->mesh->dp_rank : (int)ms.world + t->world->rank;
        if (nm_comm_split(t->world, color, pp, "emb", &t->emb, err) != 0) return -1;
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
        return -1;
    // ... of this stage's tensors under pipeline parallelism (rows in the shards' order)
    if (ms.tp > 1 && ms.pp > 1 &&
        nm_param_table_restrict_chunks(&t->full_table, &t->mcfg, t->chunks, t->vpp, err) != 0)
        return -1;
    if (cfg->init_from && ms.tp > 1) {
        // The directory holds full tensors: load them, then cut this rank's shards out.
        float *full = nm_aligned_alloc(t->full_table.n_floats * sizeof(float));
        int rc = nm_hf_dir_load_model(cfg->init_from, &t->full_table, &t->mcfg, (uint64_t)cfg->seed, full, err);
        if (rc == 0) nm_tp_slice_full(table, &t->full_table, full, nm_model_params(t->model), NULL);
        nm_free(full);
        if (rc != 0) return -1;
    } else if (cfg->init_from) {
        if (nm_hf_dir_load_model(cfg->init_from, table, &t->mcfg, (uint64_t)cfg->seed, nm_model_params(t->model), err) != 0) return -1;
    } else {
        nm_params_init(nm_model_params(t->model), table, &t->mcfg, (uint64_t)cfg->seed);
    }
    return 0;
}

// AdamW (over this rank's ranges of the distributed optimizer at world > 1), the schedule,
// the loaders and the step's buffers.
static int create_optimizer(nm_trainer *t, nm_error *err) {
    const nm_train_config *cfg = &t->cfg;
    const nm_mesh_sizes ms = t->mesh->n;
    const nm_param_table *table = nm_model_table(t->model);
    nm_adamw_config acfg;
    nm_train_config_adamw(cfg, &acfg);
    if (t->world->size > 1) {
        // Under tensor parallelism without sequence parallelism (EP 1) every tp rank runs the
        // routed experts on the same tokens: they are replicated over tp like every unsplit
        // tensor and reduce over dp (edp = dp x tp / ep would count them TP times). With it
        // each tp rank's experts saw its own tokens: edp, as with EP.
        nm_comm *expert_group = ms.tp > 1 && !t->sp ? t->mesh->dp : t->mesh->edp;
        if (nm_zero_create(&t->zero, table, t->mesh->dp, expert_group, cfg->bucket_mb * 262144, err) != 0) return -1;
        // bf16: the fp32 master weights of the GEMMs live in their owners' ranges only (zero.h);
        // fp8's GEMMs quantise the fp32 weights themselves, so they stay whole there
        if (cfg->precision == NM_PRECISION_BF16) {
            unsigned char *copy_rows = nm_malloc((size_t)(table->n_rows > 0 ? table->n_rows : 1));
            for (int i = 0; i < table->n_rows; i++) copy_rows[i] = (unsigned char)nm_param_row_reads_copy(table, i);
            nm_zero_shard_master(t->zero, copy_rows);
            nm_free(copy_rows);
        }
        if (cfg->data_parallel_sharding_strategy == 1) {
            // The gradient buffer's pages go back at once (its alloc wrote zeros on them), before
            // the moments are allocated: from here on it is resident only while a backward fills it.
            nm_zero_shard_grads(t->zero, t->ops, t->chunks, t->chunks ? (int)t->vpp : 1);
            t->ops->discard(t->ops, nm_model_grads(t->model), table->n_floats * sizeof(float));
        }
        if (nm_optimizer_create_ranges(&t->optim, table, &acfg, t->zero->own_begin, t->zero->own_end, t->ops, err) != 0)
            return -1;
    } else if (nm_optimizer_create(&t->optim, table, &acfg, t->ops, err) != 0) {
        return -1;
    }
    nm_train_config_lr_schedule(cfg, &t->sched);
    if (!t->opts.external_data && make_loaders(t, err) != 0) return -1;
    if (t->valid_data && t->rank0 && nm_trainer_eval_batches(t) < cfg->log.eval_batches)
        fprintf(stderr, "notice: log.eval_batches %lld is more than the validation split's %lld distinct batches of "
                "micro_batch %lld; each evaluation runs %lld\n", (long long)cfg->log.eval_batches,
                (long long)nm_trainer_eval_batches(t), (long long)cfg->micro_batch, (long long)nm_trainer_eval_batches(t));

    int n_moe;
    const int *moe_ids;
    nm_model_expert_counts(t->model, &n_moe, &moe_ids);
    int64_t E = t->mcfg.E > 0 ? t->mcfg.E : 1;
    t->step_counts = nm_calloc((size_t)(n_moe > 0 ? n_moe : 1) * (size_t)E, sizeof(int64_t));
    t->bias_ptrs = nm_calloc((size_t)(n_moe > 0 ? n_moe : 1), sizeof(float *));
    for (int i = 0; i < n_moe; i++) t->bias_ptrs[i] = nm_model_params(t->model) + table->layers[moe_ids[i]].router_bias;
    t->tokens = nm_malloc((size_t)(cfg->micro_batch * t->T) * sizeof(int32_t));
    t->tp_summed = nm_calloc((size_t)table->n_rows, 1);
    // loss.svg's points, one per step (a caller's steps have no count and no file)
    int64_t n_points = t->opts.external_data ? 0 : cfg->steps;
    t->hist_step = nm_calloc((size_t)n_points + 1, sizeof(double));
    t->hist_loss = nm_calloc((size_t)n_points + 1, sizeof(double));
    t->hist_vstep = nm_calloc((size_t)n_points + 2, sizeof(double));
    t->hist_vloss = nm_calloc((size_t)n_points + 2, sizeof(double));
    return 0;
}

// The run directory: locked, refused when it holds a run and --resume is not given, the GEMM
// kernels chosen (kernels.json), the checkpoint resumed, metrics.jsonl and TensorBoard opened.
static int open_run_dir(nm_trainer *t, nm_error *err) {
    const nm_train_config *cfg = &t->cfg;
    const nm_trainer_options *opts = &t->opts;
    if (!opts->run_dir) {  // a caller's micro-batches and no files (external_data): default kernels
        snprintf(t->kernels, sizeof(t->kernels), "backend %s: %s", cfg->backend, t->ops->kernel_names(t->ops));
        return 0;
    }
    if (t->rank0 && nm_mkdir_p(opts->run_dir, err) != 0) return -1;
    // Before anything in the directory is read or written: one trainer per run (run_lock.h).
    if (t->rank0 && nm_run_lock_acquire(opts->run_dir, &t->run_lock, err) != 0) return -1;
    if (nm_comm_barrier(t->world, err) != 0) return -1;
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
            return -1;
        }
    }
    // Before the first GEMM the backend tunes its kernels on the step's GEMMs: a fresh
    // single-process run measures and keeps its pick in the run directory, a resume (or a
    // multi-rank run, whose ranks must agree) reads it back or takes the defaults. The token
    // dimension is capped at 512 for the timing (the pick, not the step, is what is measured:
    // every GEMM stays in the same blocking regime and the measurement well under a second for
    // configs/small-train.json).
    if (!t->ops->tune) {
        snprintf(t->kernels, sizeof(t->kernels), "backend %s: %s (no kernel choice)", cfg->backend,
                 t->ops->kernel_names(t->ops));
    } else {
        const int64_t rows = cfg->micro_batch * cfg->seq_len;
        nm_gemm_shape shapes[NM_MODEL_MAX_GEMM_SHAPES];
        int n = nm_model_gemm_shapes(&t->mcfg, rows < 512 ? rows : 512, rows, shapes, NM_MODEL_MAX_GEMM_SHAPES);
        if (t->ops->tune(t->ops, shapes, n, opts->run_dir, t->world->size == 1 && !opts->resume, t->kernels,
                         sizeof(t->kernels), err) != 0)
            return -1;
    }
    if (opts->resume && nm_trainer_resume(t, metrics_path, &resumed, err) != 0) return -1;
    if (t->rank0) {
        if (nm_metrics_open(&t->metrics, metrics_path, resumed, err) != 0) return -1;
        if (nm_tb_open(&t->tb, opts->run_dir, -1.0, err) != 0) return -1;
    }
    return 0;
}

// RUN_DIR/memory.json (rank 0, at every start): what this run allocated, in bytes, as `plan`
// counts it (its JSON's params_bytes, params_resident_bytes_first, grads_bytes,
// optimizer_bytes_first, activation_bytes, grads_resident_bytes and grad_shard_bytes_first under
// gradient sharding, bf16_copy_bytes and bf16_twin_bytes: the bf16 weight and activation copies
// the first forward will allocate, the kernels being chosen by now):
// rank 0's buffers, and each pipeline stage's parameters and activations (stage_mem, or rank
// 0's alone without a pipeline). Written atomically; tests/test_plan.sh compares it byte for
// byte with the plan of the same layout.
static int write_memory(nm_trainer *t, const double *stage_mem, nm_error *err) {
    const nm_param_table *table = nm_model_table(t->model);
    int64_t params = (int64_t)table->n_floats * 4, acts = nm_trainer_activation_bytes(t);
    int64_t optim = (int64_t)t->optim->n_state * nm_optimizer_state_bytes_per_float(&t->optim->cfg);
    int64_t twins = nm_model_bf16_twin_bytes(t->model) + (t->model_pair ? nm_model_bf16_twin_bytes(t->model_pair) : 0);
    // under gradient sharding (0 otherwise): the gradient buffer's resident bound and this rank's shard
    int64_t grads_resident = 0, grad_shard = 0;
    if (t->zero && t->zero->be) {
        grads_resident = 4 * nm_zero_sharded_resident_floats(t->zero);
        grad_shard = 4 * t->zero->acc_floats;
    }
    // bf16 at world > 1: the fp32 master weights this rank keeps (zero.h nm_zero_shard_master);
    // and the bf16 weight copy as the first forward will allocate it (the kernels are chosen)
    int64_t params_resident = params, copy = 0;
    if (t->zero && t->zero->copy_rows)
        params_resident = 4 * nm_zero_master_floats(t->zero, t->zero->dp->rank, t->zero->edp->rank);
    if (t->cfg.precision != NM_PRECISION_FP32)
        copy = (int64_t)table->n_floats * (t->ops->gemm_bf16_weight_type(t->ops) == NM_BF16 ? 2 : 4);
    char text[8192];
    size_t k = (size_t)snprintf(text, sizeof text,
                                "{\"params_bytes\": %lld, \"params_resident_bytes\": %lld, \"grads_bytes\": %lld, "
                                "\"optimizer_bytes\": %lld, \"activation_bytes\": %lld, \"bf16_copy_bytes\": %lld, "
                                "\"bf16_twin_bytes\": %lld, \"grads_resident_bytes\": %lld, "
                                "\"grad_shard_bytes\": %lld, \"stages\": [",
                                (long long)params, (long long)params_resident, (long long)params, (long long)optim,
                                (long long)acts, (long long)copy, (long long)twins,
                                (long long)grads_resident, (long long)grad_shard);
    int64_t pp = t->mesh->n.pp;
    for (int64_t s = 0; s < pp && k < sizeof text; s++)
        k += (size_t)snprintf(text + k, sizeof text - k, "%s{\"params_bytes\": %lld, \"activation_bytes\": %lld}",
                              s ? ", " : "", (long long)(stage_mem ? stage_mem[2 * s] : (double)params),
                              (long long)(stage_mem ? stage_mem[2 * s + 1] : (double)acts));
    if (k < sizeof text) snprintf(text + k, sizeof text - k, "]}\n");
    char path[4200];
    snprintf(path, sizeof path, "%s/memory.json", t->opts.run_dir);
    return nm_file_write_atomic(path, text, strlen(text), err);
}

int nm_trainer_create(nm_trainer **out, const nm_train_config *cfg, const nm_trainer_options *opts, nm_error *err) {
    *out = NULL;
    if (!opts->run_dir && !opts->external_data) return nm_error_set(err, "trainer: a run directory is required");
    nm_trainer *t = nm_calloc(1, sizeof(nm_trainer));
    t->cfg = *cfg;
    t->opts = *opts;
    if (cfg->recompute_full) t->opts.recompute = 1;  // recompute_granularity: full, as --recompute
    t->run_lock = -1;
    if (t->opts.max_nan_streak <= 0) t->opts.max_nan_streak = 5;
    int rc = -1;
    if (nm_comm_init_as(&t->world, cfg->communicator, err) != 0) goto fail;
    t->rank0 = t->world->rank == 0;
    if (!t->rank0) t->opts.quiet = 1;
    if (create_layout(t, err) != 0 || create_model(t, err) != 0 || create_optimizer(t, err) != 0 ||
        open_run_dir(t, err) != 0)
        goto fail;
    const nm_mesh_sizes ms = t->mesh->n;
    const nm_param_table *table = nm_model_table(t->model);
    t->flops_per_token = nm_model_flops_per_token(&t->mcfg, t->T);
    // Every rank measures at once (on a shared machine that is the capacity they share); the
    // job's peak is the sum.
    t->peak_flops = measure_gemm_peak(t->ops, cfg->precision);
    if (nm_comm_all_reduce(t->world, &t->peak_flops, 1, NM_DT_F64, NM_RED_SUM, err) != 0) goto fail;
    // Each stage's own memory for the banner (rank 0 holds only stage 0's): parameters and
    // the activation sets of its micro-batches in flight.
    double *stage_mem = t->pipe ? nm_calloc((size_t)(2 * ms.pp), sizeof(double)) : NULL;
    if (t->pipe) {
        if (t->mesh->dp_rank == 0 && t->mesh->tp_rank == 0) {
            stage_mem[2 * t->mesh->pp_rank] = (double)table->n_floats * 4;
            stage_mem[2 * t->mesh->pp_rank + 1] = (double)nm_trainer_activation_bytes(t);
        }
        if (nm_comm_all_reduce(t->world, stage_mem, 2 * ms.pp, NM_DT_F64, NM_RED_SUM, err) != 0) {
            nm_free(stage_mem);
            goto fail;
        }
    }
    // Sharded master weights (zero.h): the copy is rounded now, from the whole weights just
    // initialised or loaded, and the floats outside this rank's ranges given back before the
    // first step. So are the gradient buffer's zeros (the first backward writes them again): the
    // whole weights, their copy and the gradients are never resident at once.
    if (t->zero && t->zero->copy_rows) {
        t->ops->discard(t->ops, nm_model_grads(t->model), table->n_floats * sizeof(float));
        if (nm_model_weight_copy_prepare(t->model, err) != 0) goto fail;
        nm_zero_release_master(t->zero, (float *)t->model_params_readonly, t->ops);
        nm_model_weight_copy_written(t->model, 1);
    }
    t->tty = nm_progress_is_tty(stdout);
    t->t_start = now_s();
    t->step_at_start = t->step;
    if (!t->opts.quiet) nm_trainer_banner(t, stage_mem);
    if (t->rank0 && t->opts.run_dir && write_memory(t, stage_mem, err) != 0) {
        nm_free(stage_mem);
        goto fail;
    }
    nm_free(stage_mem);
    *out = t;
    return 0;
fail:
    // The caller prints err and, under MPI, stops the job (nm_trainer_abort).
    nm_trainer_destroy(t);
    return rc;
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
    nm_pipeline_destroy(t->pipe);  // before the model: it frees its buffers through the model's backend
    nm_optimizer_destroy(t->optim);
    nm_model_destroy(t->model_pair);  // before the model whose weights it uses
    nm_coop_destroy(t->coop);
    nm_model_destroy(t->model);
    nm_model_config_free(&t->mcfg);
    nm_zero_destroy(t->zero);
    nm_param_table_free(&t->full_table);
    nm_free(t->tp_summed);
    nm_comm_destroy(t->emb);
    nm_free(t->stages);
    nm_free(t->chunks);
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
    nm_backend_destroy(t->ops);  // last: the model, optimizer and pipeline freed their buffers through it
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
