// memcheck.c: the trainer's memory check before allocation (memcheck.h says why).
#include "train/memcheck.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "train/plan.h"

int64_t nm_memory_peak_rss_bytes(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
    return (int64_t)ru.ru_maxrss * 1024;  // Linux reports KiB
}

static int64_t read_meminfo_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    long long kib = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kib) == 1) break;
    fclose(f);
    return kib < 0 ? -1 : (int64_t)kib * 1024;
}

// A cgroup v2 file holding one number ("max" or absent: -1).
static int64_t read_cgroup_number(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char buf[64] = "";
    long long v = -1;
    if (fgets(buf, sizeof buf, f) && strncmp(buf, "max", 3) != 0) v = strtoll(buf, NULL, 10);
    fclose(f);
    return v > 0 ? (int64_t)v : -1;
}

int64_t nm_memory_available_bytes(void) {
    int64_t avail = read_meminfo_available();
    int64_t limit = read_cgroup_number("/sys/fs/cgroup/memory.max");
    int64_t used = read_cgroup_number("/sys/fs/cgroup/memory.current");
    if (limit > 0) {
        int64_t left = limit - (used > 0 ? used : 0);
        if (left < 0) left = 0;
        if (avail < 0 || left < avail) avail = left;
    }
    return avail;
}

int64_t nm_local_ranks(int64_t world) {
    const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        long long n = v ? strtoll(v, NULL, 10) : 0;  // Slurm may write "2(x3)": the leading count
        if (n > 0 && n <= world) return (int64_t)n;
    }
    return world;
}

static double gib(int64_t bytes) { return (double)bytes / 1073741824.0; }

int nm_train_check_memory(const nm_train_config *cfg, const nm_model_config *m, int64_t world, int recompute,
                          int64_t pp_rank, nm_error *err) {
    const char *off = getenv("NM_MEMORY_CHECK");
    if (off && strcmp(off, "off") == 0) return 0;
    int64_t avail = nm_memory_available_bytes();
    if (avail < 0) return 0;  // not Linux, or /proc not mounted: nothing to compare with
    nm_plan_request r = {.world = world, .tp = cfg->tensor_parallel_size, .pp = cfg->pipeline_parallel_size,
                         .ep = cfg->expert_parallel_size, .seq_len = cfg->seq_len, .micro_batch = cfg->micro_batch,
                         .global_batch = cfg->global_batch, .recompute = recompute,
                         .sequence_parallel = cfg->sequence_parallel,
                         .vocab_multiple = cfg->make_vocab_size_divisible_by, .precision = cfg->precision,
                         .bucket_mb = cfg->bucket_mb, .pipeline_layout = cfg->pipeline_layout,
                         .virtual_pipeline_size = cfg->virtual_pipeline_size,
                         .moe_receive_capacity = cfg->moe_receive_capacity,
                         .exp_avg_bf16 = cfg->optimizer.exp_avg_dtype == 1,
                         .exp_avg_sq_bf16 = cfg->optimizer.exp_avg_sq_dtype == 1,
                         .shard_grads = cfg->data_parallel_sharding_strategy == 1,
                         .overlap_ep = cfg->overlap_moe_expert_parallel_comm,
                         .pair_micro_batches = cfg->moe_pair_micro_batches};
    nm_plan p;
    nm_error ignore;
    if (nm_plan_compute(&p, m, &r, &ignore) != 0) return 0;  // the layout checks that follow say why
    const nm_plan_stage *s = &p.stages[pp_rank < p.n_stages ? pp_rank : 0];
    int64_t local = nm_local_ranks(world), share = avail / local;
    int rc = 0;
    int64_t grads = r.shard_grads && world > 1 ? s->grads_resident_bytes + s->grad_shard_bytes : s->grads_bytes;
    if (s->total_bytes > share) {
        rc = nm_error_set(err,
                          "this run needs %.2f GiB per rank (planner: params %.2f, grads %.2f, bf16 copies %.2f, optimizer "
                          "shard %.2f, activations %.2f GiB) but this machine has %.2f GiB available for %lld rank%s "
                          "(%.2f GiB each). Ways out: more ranks (data, pipeline or expert parallelism shard the "
                          "state), --recompute, a smaller micro_batch or seq_len, or a smaller model; `nanomegatron "
                          "plan --config MODEL.json --world N ...` sizes a layout before launching it. "
                          "NM_MEMORY_CHECK=off skips this check",
                          gib(s->total_bytes), gib(s->params_resident_bytes), gib(grads), gib(s->bf16_copy_bytes + s->bf16_twin_bytes),
                          gib(s->optimizer_bytes), gib(s->activation_bytes), gib(avail), (long long)local,
                          local == 1 ? "" : "s", gib(share));
    }
    nm_plan_free(&p);
    return rc;
}
