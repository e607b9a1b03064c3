// ops_cpu.c: the CPU backend's nm_ops table (design.md 3). The ops themselves live one family
// per file in this directory (cpu_ops.h lists them); this file only wires them up.
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "core/check.h"

#include "ops/cpu/cpu_ops.h"

static const char *cpu_kernel_names(void) {
    static char names[96];
    if (!names[0]) {
        const char *bf16 = nm_cpu_gemm_bf16_kernel();
        snprintf(names, sizeof names, "fp32 GEMM %s, bf16 GEMM %s", nm_cpu_gemm_library(),
                 bf16[0] == 'w' ? "widen (fp32 FMA units)" : "onednn");
    }
    return names;
}

static int cpu_setup(nm_error *err) {
    return nm_cpu_gemm_setup(err) != 0 || nm_cpu_gemm_bf16_setup(err) != 0 ? -1 : 0;
}

// Memory is the host's: the ops run on it directly, so the copies are memcpy and nothing is
// ever in flight.
static void *cpu_alloc(size_t bytes) { return nm_aligned_alloc(bytes ? bytes : 1); }
static void cpu_free(void *p) { nm_free(p); }
static void cpu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
}
static void cpu_memset(void *dst, int value, size_t bytes) {
    if (bytes) memset(dst, value, bytes);
}
static void cpu_synchronize(void) {}

// OpenMP runs the ops' loops and the grouped GEMMs; OpenBLAS has a thread pool of its own.
static void cpu_set_threads(int n) {
    if (n <= 0) return;
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}
static int cpu_threads(void) { return omp_get_max_threads(); }

static const nm_ops cpu_ops = {
    .setup = cpu_setup,
    .kernel_names = cpu_kernel_names,
    .max_row_dim = NM_CPU_MAX_STACK_DIM,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy_to_device = cpu_copy,
    .copy_to_host = cpu_copy,
    .memset = cpu_memset,
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
