// cmd_plan.c: `nanomegatron plan`: per-rank memory and per-step communication of a parallel
// layout, before launching it (src/train/plan.h has where every number comes from).
//
//   plan --config MODEL.json | --model DIR  --world N [--tp T] [--pp P] [--ep E]
//        [--seq-len S] [--micro-batch B] [--global-batch G] [--recompute]
//        [--precision fp32|bf16|fp8] [--bucket-mb M] [--flops F] [--memory-gib M]
//        [--moe-receive-capacity X] [--exp-avg-dtype fp32|bf16] [--exp-avg-sq-dtype fp32|bf16]
//        [--bw-intra GB/s --bw-inter GB/s [--latency-intra us] [--latency-inter us]
//         [--ranks-per-node R] [--overlap-grad-reduce] [--overlap-ep] [--pair-micro-batches]]
//        [--data-parallel-sharding-strategy optim|optim_grads] [--bf16-copy-storage bf16|fp32]
// The last stdout line is one JSON object with every number. With --flops, the time model
// (src/train/plan_time.c) gives each stage's step time and the job's tokens/s and MFU; the
// bandwidths add the communication.
#include <stdio.h>
#include <string.h>

#include "args.h"
#include "commands.h"
#include "io/hf_dir.h"
#include "model/model.h"
#include "train/plan.h"
#include "train/train_config.h"

static const double GIB = 1073741824.0;

static int parse_precision(const char *s, nm_precision *p) {
    if (!strcmp(s, "fp32")) *p = NM_PRECISION_FP32;
    else if (!strcmp(s, "bf16")) *p = NM_PRECISION_BF16;
    else if (!strcmp(s, "fp8")) *p = NM_PRECISION_FP8;
    else return -1;
    return 0;
}

// "12.3 GiB" or "4.5 MiB": the unit that keeps the number readable.
static const char *fmt_bytes(char *buf, size_t cap, int64_t bytes) {
    if ((double)bytes >= GIB) snprintf(buf, cap, "%.2f GiB", (double)bytes / GIB);
    else snprintf(buf, cap, "%.2f MiB", (double)bytes / 1048576.0);
    return buf;
}

static void print_comm_json(const nm_plan_comm *c) {
    printf("{\"dp_reduce_scatter\": %lld, \"dp_all_gather\": %lld, \"dp_all_reduce\": %lld, "
           "\"edp_reduce_scatter\": %lld, \"edp_all_gather\": %lld, \"ep_all_to_all\": %lld, \"ep_all_to_all_job\": %lld, "
           "\"tp_all_reduce\": %lld, \"tp_reduce_scatter\": %lld, \"tp_all_gather\": %lld, \"pp_send\": %lld, "
           "\"pp_recv\": %lld}",
           (long long)c->dp_reduce_scatter, (long long)c->dp_all_gather, (long long)c->dp_all_reduce,
           (long long)c->edp_reduce_scatter, (long long)c->edp_all_gather, (long long)c->ep_all_to_all,
           (long long)c->ep_all_to_all_job, (long long)c->tp_all_reduce, (long long)c->tp_reduce_scatter,
           (long long)c->tp_all_gather, (long long)c->pp_send, (long long)c->pp_recv);
}

static void print_json(const nm_plan *p, const nm_plan_request *r, double memory_gib, int fits) {
    printf("{\"world\": %lld, \"tp\": %lld, \"pp\": %lld, \"dp\": %lld, \"ep\": %lld, \"edp\": %lld, "
           "\"seq_len\": %lld, \"micro_batch\": %lld, \"global_batch\": %lld, \"accum\": %lld, \"recompute\": %s, "
           "\"stages\": [",
           (long long)p->n.world, (long long)p->n.tp, (long long)p->n.pp, (long long)p->n.dp, (long long)p->n.ep,
           (long long)p->n.edp, (long long)r->seq_len, (long long)r->micro_batch, (long long)r->global_batch,
           (long long)p->accum, r->recompute ? "true" : "false");
    for (int64_t i = 0; i < p->n_stages; i++) {
        const nm_plan_stage *s = &p->stages[i];
        printf("%s{\"first_layer\": %lld, \"n_layers\": %lld, \"first\": %s, \"last\": %s, \"params_bytes\": %lld, "
               "\"params_resident_bytes\": %lld, \"params_resident_bytes_first\": %lld, \"grads_bytes\": %lld, \"grads_resident_bytes\": %lld, \"grad_shard_bytes\": %lld, "
               "\"grad_shard_bytes_first\": %lld, \"bf16_copy_bytes\": %lld, \"bf16_twin_bytes\": %lld, \"optimizer_bytes\": %lld, \"optimizer_bytes_first\": %lld, "
               "\"optimizer_mean_bytes\": %lld, "
               "\"activation_bytes\": %lld, \"in_flight\": %lld, \"ep_receive_rows\": %lld, \"ep_buffer_bytes\": %lld, "
               "\"total_bytes\": %lld, "
               "\"comm\": ",
               i ? ", " : "", (long long)s->first_layer, (long long)s->n_layers, s->first ? "true" : "false",
               s->last ? "true" : "false", (long long)s->params_bytes, (long long)s->params_resident_bytes,
               (long long)s->params_resident_bytes_first, (long long)s->grads_bytes,
               (long long)s->grads_resident_bytes, (long long)s->grad_shard_bytes, (long long)s->grad_shard_bytes_first,
               (long long)s->bf16_copy_bytes, (long long)s->bf16_twin_bytes, (long long)s->optimizer_bytes,
               (long long)s->optimizer_bytes_first,
               (long long)s->optimizer_mean_bytes,
               (long long)s->activation_bytes, (long long)s->in_flight, (long long)s->ep_receive_rows,
               (long long)s->ep_buffer_bytes,
               (long long)s->total_bytes);
        print_comm_json(&s->comm);
        const nm_plan_time *t = &s->time;
        printf(", \"flops_per_step_rank\": %.17g, \"time\": {\"compute_s\": %.17g, \"tp_s\": %.17g, \"ep_s\": %.17g, "
               "\"pp_s\": %.17g, \"dp_s\": %.17g, \"hidden_s\": %.17g, \"dp_exposed_s\": %.17g, \"busy_s\": %.17g}}",
               s->flops_per_step_rank, t->compute_s, t->tp_s, t->ep_s, t->pp_s, t->dp_s, t->hidden_s, t->dp_exposed_s,
               t->busy_s);
    }
    printf("], \"comm\": ");
    print_comm_json(&p->comm);
    printf(", \"flops_per_step_rank\": %.17g, \"compute_s\": %.17g, \"step_s\": %.17g, \"bubble_fraction\": %.17g, "
           "\"tokens_per_s_rank\": %.17g, \"mfu\": %.17g, \"memory_gib\": %g, \"fits\": %s}\n",
           p->flops_per_step_rank, p->compute_s, p->step_s, p->bubble_fraction, p->tokens_per_s_rank, p->mfu, memory_gib,
           fits ? "true" : "false");
}

int nm_cmd_plan(int argc, char **argv) {
    static const char *const vflags[] = {"config", "model", "world", "tp", "pp", "ep", "seq-len", "micro-batch",
                                         "global-batch", "precision", "bucket-mb", "flops", "memory-gib",
                                         "make-vocab-size-divisible-by", "pipeline-layout", "moe-receive-capacity",
                                         "exp-avg-dtype", "exp-avg-sq-dtype", "bw-intra", "bw-inter",
                                         "latency-intra", "latency-inter", "ranks-per-node", "recompute-modules",
                                         "virtual-pipeline-size", "data-parallel-sharding-strategy", "bf16-copy-storage", NULL};
    static const char *const bflags[] = {"recompute", "no-sequence-parallel", "overlap-grad-reduce", "overlap-ep", "pair-micro-batches", NULL};
    nm_args a;
    if (nm_args_parse(&a, "plan", argc, argv, vflags, bflags)) return 2;
    const char *dir = nm_args_str(&a, "model", NULL), *cfg_path = nm_args_str(&a, "config", NULL);
    if ((!dir) == (!cfg_path) || !nm_args_has(&a, "world")) {
        fprintf(stderr, "usage: nanomegatron plan --config MODEL.json | --model DIR --world N [--tp T] [--pp P] [--ep E] "
                        "[--seq-len S] [--micro-batch B] [--global-batch G] [--recompute] [--precision fp32|bf16|fp8] "
                        "[--bucket-mb M] [--flops F] [--memory-gib M] [--no-sequence-parallel] [--make-vocab-size-divisible-by K] "
                        "[--pipeline-layout 'Et|tt|tmL'] [--virtual-pipeline-size V] [--moe-receive-capacity X] [--exp-avg-dtype fp32|bf16] "
                        "[--exp-avg-sq-dtype fp32|bf16] [--bw-intra GB/s --bw-inter GB/s [--latency-intra us] "
                        "[--latency-inter us] [--ranks-per-node R] [--overlap-grad-reduce] [--overlap-ep] [--pair-micro-batches]] "
                        "[--recompute-modules mla_up_proj,moe_act] [--data-parallel-sharding-strategy optim|optim_grads] [--bf16-copy-storage bf16|fp32]\n");
        return 2;
    }
    nm_plan_request r = {.recompute = nm_args_has(&a, "recompute"), .sequence_parallel = !nm_args_has(&a, "no-sequence-parallel")};
    double memory_gib;
    // The training config's bounds (train_config.c) for the sizes it shares with plan.
    const int64_t M = 1 << 20;
    if (nm_args_i64_in(&a, "world", 1, 1, M, &r.world) || nm_args_i64_in(&a, "tp", 1, 1, M, &r.tp) ||
        nm_args_i64_in(&a, "pp", 1, 1, M, &r.pp) || nm_args_i64_in(&a, "ep", 1, 1, M, &r.ep) ||
        nm_args_i64_in(&a, "seq-len", 4096, 1, 1 << 24, &r.seq_len) ||
        nm_args_i64_in(&a, "micro-batch", 1, 1, 1 << 24, &r.micro_batch) ||
        nm_args_i64_in(&a, "bucket-mb", 40, 1, M, &r.bucket_mb) ||
        nm_args_i64_in(&a, "make-vocab-size-divisible-by", 128, 1, M, &r.vocab_multiple) ||
        nm_args_f64_in(&a, "flops", 0, 0, 1e30, &r.flops) || nm_args_f64_in(&a, "memory-gib", 80, 0, 1e9, &memory_gib) ||
        nm_args_f64_in(&a, "moe-receive-capacity", NM_MOE_RECEIVE_CAPACITY, 1e-9, 1e6, &r.moe_receive_capacity) ||
        nm_args_f64_in(&a, "bw-intra", 0, 1e-9, 1e9, &r.bw_intra) || nm_args_f64_in(&a, "bw-inter", 0, 1e-9, 1e9, &r.bw_inter) ||
        nm_args_f64_in(&a, "latency-intra", 0, 0, 1e9, &r.latency_intra) ||
        nm_args_f64_in(&a, "latency-inter", 0, 0, 1e9, &r.latency_inter) ||
        nm_args_i64_in(&a, "ranks-per-node", 0, 1, M, &r.ranks_per_node) ||
        nm_args_i64_in(&a, "virtual-pipeline-size", 0, 1, NM_MAX_MODEL_CHUNKS, &r.virtual_pipeline_size))
        return 2;
    // GB/s and microseconds on the command line, bytes/s and seconds in the model
    if ((nm_args_has(&a, "bw-intra") || nm_args_has(&a, "bw-inter")) &&
        !(nm_args_has(&a, "bw-intra") && nm_args_has(&a, "bw-inter") && nm_args_has(&a, "flops"))) {
        fprintf(stderr, "plan: --bw-intra and --bw-inter go together, with --flops (the time model needs all three)\n");
        return 2;
    }
    r.bw_intra *= 1e9, r.bw_inter *= 1e9, r.latency_intra *= 1e-6, r.latency_inter *= 1e-6;
    r.overlap_grad_reduce = nm_args_has(&a, "overlap-grad-reduce");
    // comma-separated, as the training config's recompute_modules
    const char *bad;
    int bad_len;
    if (nm_recompute_modules_parse(nm_args_str(&a, "recompute-modules", ""), &r.recompute_mla_up_proj,
                                   &r.recompute_moe_act, &r.recompute_layernorm, &bad, &bad_len) != 0) {
        fprintf(stderr, "plan: --recompute-modules: '%.*s' is not one of mla_up_proj, moe_act, layernorm\n", bad_len,
                bad);
        return 2;
    }
    r.overlap_ep = nm_args_has(&a, "overlap-ep");
    r.pair_micro_batches = nm_args_has(&a, "pair-micro-batches");
    const char *sharding = nm_args_str(&a, "data-parallel-sharding-strategy", "optim");
    if (strcmp(sharding, "optim") != 0 && strcmp(sharding, "optim_grads") != 0) {
        fprintf(stderr, "plan: --data-parallel-sharding-strategy must be optim or optim_grads, got '%s'\n", sharding);
        return 2;
    }
    r.shard_grads = !strcmp(sharding, "optim_grads");
    // The bf16 weight copy's storage: bf16 (a GPU, a CPU with AVX512-BF16 or AMX), or fp32 holding
    // bf16 values (the CPU's widen kernel, as on an AVX2-only machine)
    const char *copy_storage = nm_args_str(&a, "bf16-copy-storage", "bf16");
    if (strcmp(copy_storage, "bf16") != 0 && strcmp(copy_storage, "fp32") != 0) {
        fprintf(stderr, "plan: --bf16-copy-storage must be bf16 or fp32, got '%s'\n", copy_storage);
        return 2;
    }
    r.copy_fp32 = !strcmp(copy_storage, "fp32");
    // One micro-batch per data-parallel rank unless given.
    int64_t dp = r.tp * r.pp > 0 ? r.world / (r.tp * r.pp) : 1;
    if (nm_args_i64_in(&a, "global-batch", r.micro_batch * (dp > 0 ? dp : 1), 1, 1 << 30, &r.global_batch)) return 2;
    const char *prec = nm_args_str(&a, "precision", "fp32");
    if (parse_precision(prec, &r.precision) != 0) {
        fprintf(stderr, "plan: --precision must be fp32, bf16 or fp8, got '%s'\n", prec);
        return 2;
    }
    r.pipeline_layout = nm_args_str(&a, "pipeline-layout", NULL);
    const char *moment_flags[2] = {"exp-avg-dtype", "exp-avg-sq-dtype"};
    int *moment_bf16[2] = {&r.exp_avg_bf16, &r.exp_avg_sq_bf16};
    for (int k = 0; k < 2; k++) {
        const char *v = nm_args_str(&a, moment_flags[k], "fp32");
        if (strcmp(v, "fp32") != 0 && strcmp(v, "bf16") != 0) {
            fprintf(stderr, "plan: --%s must be fp32 or bf16, got '%s'\n", moment_flags[k], v);
            return 2;
        }
        *moment_bf16[k] = !strcmp(v, "bf16");
    }
    nm_error err;
    nm_model_config cfg;
    if ((dir ? nm_hf_dir_load_config(dir, &cfg, &err) : nm_model_config_load(&cfg, cfg_path, &err)) != 0) {
        fprintf(stderr, "plan: %s\n", err.msg);
        return 1;
    }
    nm_plan p;
    if (nm_plan_compute(&p, &cfg, &r, &err) != 0) {
        fprintf(stderr, "plan: %s\n", err.msg);
        nm_model_config_free(&cfg);
        return 1;
    }
    char layout[160];
    nm_mesh_describe(&p.n, layout, sizeof(layout));
    printf("plan  %s: %s | seq %lld x global batch %lld (micro %lld x %lld accum per dp rank) | %s%s\n",
           dir ? dir : cfg_path, layout, (long long)r.seq_len, (long long)r.global_batch,
           (long long)r.micro_batch, (long long)p.accum, prec,
           r.recompute ? " | recompute" : r.recompute_mla_up_proj || r.recompute_moe_act || r.recompute_layernorm ? " | selective recompute"
                                                                                                  : "");
    int fits = 1;
    for (int64_t i = 0; i < p.n_stages; i++) {
        const nm_plan_stage *s = &p.stages[i];
        char what[96];
        snprintf(what, sizeof(what), "%s%lld layers from %lld%s", s->first ? "embedding, " : "", (long long)s->n_layers,
                 (long long)s->first_layer, s->last ? ", head, MTP, loss" : "");
        char b[8][32], g[3][32], grads[112], params[112];
        if (s->params_resident_bytes != s->params_bytes)  // bf16: the master weights sharded (zero.h)
            snprintf(params, sizeof params, "%s resident of %s", fmt_bytes(g[0], 32, s->params_resident_bytes),
                     fmt_bytes(g[1], 32, s->params_bytes));
        else
            fmt_bytes(params, sizeof params, s->params_bytes);
        if (r.shard_grads && p.n.world > 1)
            snprintf(grads, sizeof grads, "%s resident of %s + shard %s", fmt_bytes(g[0], 32, s->grads_resident_bytes),
                     fmt_bytes(g[1], 32, s->grads_bytes), fmt_bytes(g[2], 32, s->grad_shard_bytes));
        else
            fmt_bytes(grads, sizeof grads, s->grads_bytes);
        printf("stage %lld (%s) per rank: params %s | grads %s | bf16 copy %s | optimizer shard %s | activations %s "
               "for %lld micro-batches in flight (EP receive side %s of it, %lld rows per round; bf16 copies %s) | "
               "total %s\n",
               (long long)i, what, params, grads,
               fmt_bytes(b[2], 32, s->bf16_copy_bytes), fmt_bytes(b[3], 32, s->optimizer_bytes),
               fmt_bytes(b[4], 32, s->activation_bytes), (long long)s->in_flight,
               fmt_bytes(b[5], 32, s->ep_buffer_bytes), (long long)s->ep_receive_rows,
               fmt_bytes(b[7], 32, s->bf16_twin_bytes), fmt_bytes(b[6], 32, s->total_bytes));
        if (s->total_bytes / GIB > memory_gib) fits = 0;
    }
    const nm_plan_comm *c = &p.comm;
    printf("comm  per rank of stage 0 and step, MiB: dp reduce_scatter %.1f, all_gather %.1f, all_reduce %.3f | edp "
           "reduce_scatter %.1f, all_gather %.1f | ep all_to_all %.1f (job %.1f) | tp all_reduce %.1f, reduce_scatter %.1f, "
           "all_gather %.1f | pp send %.1f, recv %.1f\n",
           c->dp_reduce_scatter / 1048576.0, c->dp_all_gather / 1048576.0, c->dp_all_reduce / 1048576.0,
           c->edp_reduce_scatter / 1048576.0, c->edp_all_gather / 1048576.0, c->ep_all_to_all / 1048576.0,
           c->ep_all_to_all_job / 1048576.0, c->tp_all_reduce / 1048576.0, c->tp_reduce_scatter / 1048576.0,
           c->tp_all_gather / 1048576.0, c->pp_send / 1048576.0, c->pp_recv / 1048576.0);
    printf("compute %.4g TFLOP per rank and step", p.flops_per_step_rank / 1e12);
    if (r.flops > 0) printf(", %.3g s at %.4g TFLOP/s", p.compute_s, r.flops / 1e12);
    printf("\n");
    for (int64_t i = 0; r.flops > 0 && i < p.n_stages; i++) {
        const nm_plan_time *t = &p.stages[i].time;
        printf("time  stage %lld per step: compute %.4g s | tp %.4g | ep all_to_all %.4g | pp %.4g | dp/edp %.4g | "
               "hidden %.4g | busy %.4g s\n",
               (long long)i, t->compute_s, t->tp_s, t->ep_s, t->pp_s, t->dp_s, t->hidden_s, t->busy_s);
    }
    if (r.flops > 0)
        printf("step  %.4g s (pipeline bubble %.1f%%%s) | %.4g tokens/s per rank | MFU %.1f%% of %.4g TFLOP/s%s\n",
               p.step_s, 100.0 * p.bubble_fraction, p.n.pp > 1 ? " of the slots" : "", p.tokens_per_s_rank,
               100.0 * p.mfu, r.flops / 1e12, r.bw_intra > 0 ? "" : " (communication not timed: no --bw-intra/--bw-inter)");
    printf("%s in %g GiB per rank\n", fits ? "fits" : "does not fit", memory_gib);
    print_json(&p, &r, memory_gib, fits);
    nm_plan_free(&p);
    nm_model_config_free(&cfg);
    return 0;
}
