// trainer_report.c: what the trainer shows (trainer_internal.h): the start-up banner, each
// step's metrics.jsonl line, TensorBoard scalars and the progress line.
#define _GNU_SOURCE

#include "train/trainer_internal.h"

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

// The start-up banner (rank 0, unless quiet): model, data, layout and memory per rank, the
// distributed optimizer's ranges, the pipeline's stages (stage_mem: (2 pp) parameters and
// activation bytes per stage), the GEMM kernels and the measured peak.
void nm_trainer_banner(nm_trainer *t, const double *stage_mem) {
    const nm_train_config *cfg = &t->cfg;
    const nm_trainer_options *opts = &t->opts;
    const nm_mesh_sizes ms = t->mesh->n;
    const nm_param_table *table = nm_model_table(t->model);
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
           nm_precision_name(cfg->precision), t->ops->threads(t->ops));
    char layout[160];
    nm_mesh_describe(&ms, layout, sizeof(layout));
    double mib = 1048576.0;
    printf("layout %s | per rank: params %.1f MiB, grads %.1f MiB, optimizer shard %.1f MiB (%.1f%% of the "
           "state), activations %.1f MiB%s\n",
           layout, (double)table->n_floats * 4 / mib, (double)table->n_floats * 4 / mib,
           (double)t->optim->n_state * (double)nm_optimizer_state_bytes_per_float(&t->optim->cfg) / mib,
           100.0 * (double)t->optim->n_params / (double)(whole->n_params_main + whole->n_params_mtp),
           (double)nm_trainer_activation_bytes(t) / mib,
           t->model_pair ? " (two sets: micro-batches paired, each one's all-to-alls behind the other's compute)" : "");
    if (t->zero && t->zero->widest_row >= 0)
        printf("distributed optimizer: equal ranges of %lld floats over dp %lld and of %lld over the expert group "
               "%lld; %s spans %lld of them\n",
               (long long)t->zero->range_floats[0], (long long)t->zero->dp->size,
               (long long)t->zero->range_floats[1], (long long)t->zero->edp->size,
               table->rows[t->zero->widest_row].name, (long long)t->zero->widest_ranges);
    if (t->pipe) {
        const int64_t v = t->vpp, m = t->accum;
        if (v > 1)
            printf("pipeline %lld stages on %lld ranks (%lld virtual stages each), interleaved 1F1B over %lld "
                   "micro-batches (bubble (PP-1)/(v m+PP-1) = %.3f):", (long long)(ms.pp * v), (long long)ms.pp,
                   (long long)v, (long long)m, (double)(ms.pp - 1) / (double)(v * m + ms.pp - 1));
        else
            printf("pipeline %lld stages, 1F1B over %lld micro-batches (bubble (PP-1)/(m+PP-1) = %.3f):",
                   (long long)ms.pp, (long long)m, (double)(ms.pp - 1) / (double)(m + ms.pp - 1));
        for (int64_t s = 0; s < ms.pp * v; s++) {
            char d[512];
            nm_pipeline_describe_stage(&t->stages[s], &t->mcfg, d, sizeof(d));
            printf("%s %s", s ? " |" : "", d);
        }
        printf("\n");
        for (int64_t s = 0; s < ms.pp; s++)
            printf("stage %lld: params %.1f MiB, activations %.1f MiB (%lld micro-batches in flight%s)\n", (long long)s,
                   stage_mem[2 * s] / mib, stage_mem[2 * s + 1] / mib,
                   (long long)nm_pipeline_slots(ms.pp, v, s, m), v > 1 ? " per chunk" : "");
    }
    printf("%s\n", t->kernels);
    const char *given = getenv("NM_PEAK_GFLOPS");
    printf("peak  %.1f GFLOP/s %s %s (%s) | %.2f MFLOP/token | activations %.1f MiB",
           t->peak_flops / 1e9, cfg->precision == NM_PRECISION_FP32 ? "fp32 GEMM" : "best of the fp32 and bf16 GEMMs",
           given && atof(given) > 0 ? "given by NM_PEAK_GFLOPS" : "measured",
           t->ops->kernel_names(t->ops), t->flops_per_token / 1e6,
           (double)nm_trainer_activation_bytes(t) / 1048576.0);
    if (opts->recompute && !t->pipe) {
        size_t full = nm_model_estimate_activation_bytes(&t->mcfg, cfg->micro_batch, t->T, 0);
        printf(" (recomputation saves %.1f MiB of %.1f)", (double)(full - nm_model_activation_bytes(t->model)) / 1048576.0,
               (double)full / 1048576.0);
    }
    printf("\n");
    fflush(stdout);
}

// One step's report (after its evaluation): metrics.jsonl (rank 0; the byte counters, the
// peak memory and the expert-parallel rounds are reduced over the job first), the divergence
// error when the streak of skipped steps is over, TensorBoard every log_every steps and the
// progress line.
int nm_trainer_report_step(nm_trainer *t, const nm_step_metrics *m, int64_t ep_rounds, double ep_over, int diverged,
                           nm_error *err) {
    const nm_train_config *c = &t->cfg;
    int64_t step = m->step;
    nm_metric *kv = t->step_kv;
    int n = 0;
    kv[n++] = NM_METRIC_F("ce_loss", m->ce_loss);
    kv[n++] = NM_METRIC_F("mtp_loss", m->mtp_loss);
    kv[n++] = NM_METRIC_F("aux_loss", m->aux_loss);
    kv[n++] = NM_METRIC_F("grad_norm", m->grad_norm);
    kv[n++] = NM_METRIC_F("lr", m->lr);
    kv[n++] = NM_METRIC_F("mtp_weight", m->mtp_weight);
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
        // Rank 0's view of the expert all-to-alls: the seconds it waited inside them (exposed),
        // and of the time they were in flight, the share it spent computing instead
        // (moe_shared_expert_overlap; 0 without it): an upper bound on what the overlap hid,
        // since an all-to-all is in flight until its wait returns, moving or not.
        double now = t->mesh->ep->counters.seconds[NM_COMM_ALL_TO_ALL], exposed = now - t->ep_a2a_seen;
        t->ep_a2a_seen = now;
        kv[n++] = NM_METRIC_F("ep_a2a_exposed_s", exposed);
        kv[n++] = NM_METRIC_F("ep_a2a_hidden_fraction",
                              t->ep_overlap_s > 0 ? t->ep_overlap_s / (t->ep_overlap_s + exposed) : 0.0);
    }
    if (t->pipe) {
        int64_t S = t->mesh->n.pp;
        for (int64_t s = 0; s < S; s++) kv[n++] = NM_METRIC_F(t->pp_keys[s], t->pp_idle[s]);
        // (PP-1)/(v m + PP-1): 1F1B's with v = 1, the interleaved schedule's with v chunks a rank
        kv[n++] = NM_METRIC_F("pp_bubble_theory", (double)(S - 1) / (double)(t->vpp * t->accum + S - 1));
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
    return 0;
}
