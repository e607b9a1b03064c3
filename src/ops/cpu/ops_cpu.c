// ops_cpu.c: the CPU backend's nm_ops table (design.md 3). The ops themselves live one family
// per file in this directory (cpu_ops.h lists them); this file only wires them up.
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "core/check.h"

#include "ops/cpu/cpu_ops.h"
#include "ops/xent_stats.h"

// The instance's state (cpu_ops.h): empty until the ops' first use or setup fills it.
static int cpu_ctx_create(void **ctx, nm_error *err) {
    (void)err;  // nothing here can fail but the allocation, which panics
    nm_cpu_ctx *c = nm_calloc(1, sizeof *c);
    c->bf16 = nm_cpu_bf16_state_create();
    *ctx = c;
    return 0;
}

static void cpu_ctx_destroy(void *ctx) {
    nm_cpu_ctx *c = ctx;
    if (!c) return;
    nm_cpu_bf16_state_destroy(c->bf16);
    nm_free(c->grouped_order);
    nm_free(c->fp8_scratch);
    nm_free(c);
}

static const char *cpu_kernel_names(const nm_ops *be) {
    char *names = nm_cpu_ctx_of(be)->kernel_names;
    if (!names[0]) {
        const char *bf16 = nm_cpu_gemm_bf16_kernel(be);
        snprintf(names, sizeof nm_cpu_ctx_of(be)->kernel_names, "fp32 GEMM %s, bf16 GEMM %s", nm_cpu_gemm_library(be),
                 bf16[0] == 'w' ? "widen (fp32 FMA units)" : "onednn");
    }
    return names;
}

static int cpu_setup(const nm_ops *be, nm_error *err) {
    return nm_cpu_gemm_setup(be, err) != 0 || nm_cpu_gemm_bf16_setup(be, err) != 0 ? -1 : 0;
}

// Memory is the host's: the ops run on it directly, so the copies are memcpy and nothing is
// ever in flight.
static void *cpu_alloc(const nm_ops *be, size_t bytes) { return nm_aligned_alloc(bytes ? bytes : 1); }
static void cpu_free(const nm_ops *be, void *p) { nm_free(p); }
static void cpu_copy(const nm_ops *be, void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
}
static void cpu_memset(const nm_ops *be, void *dst, int value, size_t bytes) {
    if (bytes) memset(dst, value, bytes);
}
static void cpu_discard(const nm_ops *be, void *dst, size_t bytes) { nm_host_discard(dst, bytes); }
static void cpu_synchronize(const nm_ops *be) {}

// OpenMP runs the ops' loops and the grouped GEMMs; OpenBLAS has a thread pool of its own.
// Both counts are process-wide (the libraries keep one each), not the instance's: two
// instances in one process run on the same threads, and the last set_threads wins.
static void cpu_set_threads(const nm_ops *be, int n) {
    if (n <= 0) return;
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}
static int cpu_threads(const nm_ops *be) { return omp_get_max_threads(); }

static const nm_ops cpu_ops = {
    .name = "cpu",
    .ctx_create = cpu_ctx_create,
    .ctx_destroy = cpu_ctx_destroy,
    .setup = cpu_setup,
    .kernel_names = cpu_kernel_names,
    .max_row_dim = NM_CPU_MAX_STACK_DIM,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy_to_device = cpu_copy,
    .copy_to_host = cpu_copy,
    .memset = cpu_memset,
    .discard = cpu_discard,
    .synchronize = cpu_synchronize,
    .set_threads = cpu_set_threads,
    .threads = cpu_threads,
    .measure_peak = nm_cpu_measure_peak,
    .tune = nm_cpu_tune,
    .gemm = nm_cpu_gemm,
    .gemm_grouped = nm_cpu_gemm_grouped,
    .gemm_bf16 = nm_cpu_gemm_bf16,
    .gemm_bf16_grouped = nm_cpu_gemm_bf16_grouped,
    .gemm_bf16_weight_type = nm_cpu_gemm_bf16_weight_type,
    .round_bf16 = nm_cpu_round_bf16,
    .cast_bf16 = nm_cpu_cast_bf16,
    .widen_bf16 = nm_cpu_widen_bf16,
    .round_cast_bf16 = nm_cpu_round_cast_bf16,
    .gemm_fp8 = nm_cpu_gemm_fp8,
    .zero = nm_cpu_zero,
    .axpy = nm_cpu_axpy,
    .copy_2d = nm_cpu_copy_2d,
    .add_2d = nm_cpu_add_2d,
    .embedding_forward = nm_cpu_embedding_forward,
    .embedding_backward = nm_cpu_embedding_backward,
    .rmsnorm_forward = nm_cpu_rmsnorm_forward,
    .rmsnorm_backward = nm_cpu_rmsnorm_backward,
    .swiglu_forward = nm_cpu_swiglu_forward,
    .swiglu_backward = nm_cpu_swiglu_backward,
    .swiglu_forward_bf16 = nm_cpu_swiglu_forward_bf16,
    .swiglu_backward_bf16 = nm_cpu_swiglu_backward_bf16,
    .rope_forward = nm_cpu_rope_forward,
    .rope_backward = nm_cpu_rope_backward,
    .attention_forward = nm_cpu_attention_forward,
    .attention_backward = nm_cpu_attention_backward,
    .xent_forward = nm_cpu_xent_forward,
    .xent_backward = nm_cpu_xent_backward,
    .xent_tile_forward = nm_cpu_xent_tile_forward,
    .xent_tile_backward = nm_cpu_xent_tile_backward,
    .xent_stats_open = nm_ops_xent_stats_open,
    .xent_stats_max = nm_ops_xent_stats_max,
    .xent_stats_sums = nm_ops_xent_stats_sums,
    .xent_stats_close = nm_ops_xent_stats_close,
    .sum = nm_ops_sum,
    .router_forward = nm_cpu_router_forward,
    .router_backward = nm_cpu_router_backward,
    .balance_loss_forward = nm_cpu_balance_loss_forward,
    .balance_loss_backward = nm_cpu_balance_loss_backward,
    .moe_permute = nm_cpu_moe_permute,
    .moe_gather = nm_cpu_moe_gather,
    .moe_gather_bf16 = nm_cpu_moe_gather_bf16,
    .moe_combine_forward = nm_cpu_moe_combine_forward,
    .moe_combine_backward = nm_cpu_moe_combine_backward,
    .moe_scatter_add = nm_cpu_moe_scatter_add,
    .fp8_quantize_rows = nm_cpu_fp8_quantize_rows,
    .fp8_dequantize_rows = nm_cpu_fp8_dequantize_rows,
    .fp8_round_rows = nm_cpu_fp8_round_rows,
    .sumsq_chunks = nm_cpu_sumsq_chunks,
    .scale_chunks = nm_cpu_scale_chunks,
    .first_nonfinite = nm_cpu_first_nonfinite,
    .adamw_chunks = nm_cpu_adamw_chunks,
    .router_bias_update = nm_cpu_router_bias_update,
};

const nm_ops *nm_ops_cpu(void) { return &cpu_ops; }
