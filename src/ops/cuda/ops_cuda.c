// ops_cuda.c: the CUDA backend's nm_ops table (cuda_ops.h says what the backend is today). The
// ops live one family per .cu file in this directory, mirroring src/ops/ref; this file only
// wires them up, in C, so the table is checked by the same compiler and flags as the others.
// Built only with the CUDA toolkit (CMake's NM_CUDA, which defines NM_HAVE_CUDA).
#include "ops/cuda/cuda_ops.h"
#include "ops/xent_stats.h"

static void cuda_set_threads(const nm_ops *be,
                             int n) { (void)n; }  // the host side is one thread; the device has its own
static int cuda_threads(const nm_ops *be) { return 1; }

// The head's statistics combine and loss total: N values a row, read and written where they
// are, in managed memory, by the host definitions (ops/xent_stats.c) once the device is idle.
static void cuda_xent_stats_open(const nm_ops *be, double *stats, int64_t N) {
    be->synchronize(be);
    nm_ops_xent_stats_open(be, stats, N);
}
static void cuda_xent_stats_max(const nm_ops *be, double *mx, const double *stats, const int32_t *targets, int64_t N) {
    be->synchronize(be);
    nm_ops_xent_stats_max(be, mx, stats, targets, N);
}
static void cuda_xent_stats_sums(const nm_ops *be, double *sums, const double *stats, const double *mx,
                                 const int32_t *targets, int64_t N) {
    be->synchronize(be);
    nm_ops_xent_stats_sums(be, sums, stats, mx, targets, N);
}
static void cuda_xent_stats_close(const nm_ops *be, float *losses, float *lse, const double *sums, const double *mx,
                                  const int32_t *targets, int64_t N) {
    be->synchronize(be);
    nm_ops_xent_stats_close(be, losses, lse, sums, mx, targets, N);
}
static double cuda_sum(const nm_ops *be, const float *x, int64_t n) {
    be->synchronize(be);
    return nm_ops_sum(be, x, n);
}

static const nm_ops cuda_ops = {
    .name = "cuda",
    .ctx_create = nm_cuda_ctx_create,
    .ctx_destroy = nm_cuda_ctx_destroy,
    .setup = nm_cuda_setup,
    .kernel_names = nm_cuda_kernel_names,
    .max_row_dim = NM_CUDA_MAX_ROW_DIM,
    .alloc = nm_cuda_alloc,
    .free = nm_cuda_free,
    .copy_to_device = nm_cuda_copy,
    .copy_to_host = nm_cuda_copy,
    .memset = nm_cuda_memset,
    .discard = nm_cuda_discard,
    .synchronize = nm_cuda_synchronize,
    .set_threads = cuda_set_threads,
    .threads = cuda_threads,
    .measure_peak = nm_cuda_measure_peak,
    .tune = NULL,  // cuBLASLt's heuristic picks per call; nothing to cache yet
    .gemm = nm_cuda_gemm,
    .gemm_grouped = nm_cuda_gemm_grouped,
    .gemm_bf16 = nm_cuda_gemm_bf16,
    .gemm_bf16_grouped = nm_cuda_gemm_bf16_grouped,
    .gemm_bf16_weight_type = nm_cuda_gemm_bf16_weight_type,
    .round_bf16 = nm_cuda_round_bf16,
    .gemm_fp8 = nm_cuda_gemm_fp8,
    .cast_bf16 = nm_cuda_cast_bf16,
    .widen_bf16 = nm_cuda_widen_bf16,
    .round_cast_bf16 = nm_cuda_round_cast_bf16,
    .zero = nm_cuda_zero,
    .axpy = nm_cuda_axpy,
    .copy_2d = nm_cuda_copy_2d,
    .add_2d = nm_cuda_add_2d,
    .embedding_forward = nm_cuda_embedding_forward,
    .embedding_backward = nm_cuda_embedding_backward,
    .rmsnorm_forward = nm_cuda_rmsnorm_forward,
    .rmsnorm_backward = nm_cuda_rmsnorm_backward,
    .swiglu_forward = nm_cuda_swiglu_forward,
    .swiglu_backward = nm_cuda_swiglu_backward,
    .swiglu_forward_bf16 = nm_cuda_swiglu_forward_bf16,
    .swiglu_backward_bf16 = nm_cuda_swiglu_backward_bf16,
    .rope_forward = nm_cuda_rope_forward,
    .rope_backward = nm_cuda_rope_backward,
    .attention_forward = nm_cuda_attention_forward,
    .attention_backward = nm_cuda_attention_backward,
    .xent_forward = nm_cuda_xent_forward,
    .xent_backward = nm_cuda_xent_backward,
    .xent_tile_forward = nm_cuda_xent_tile_forward,
    .xent_tile_backward = nm_cuda_xent_tile_backward,
    .xent_stats_open = cuda_xent_stats_open,
    .xent_stats_max = cuda_xent_stats_max,
    .xent_stats_sums = cuda_xent_stats_sums,
    .xent_stats_close = cuda_xent_stats_close,
    .sum = cuda_sum,
    .router_forward = nm_cuda_router_forward,
    .router_backward = nm_cuda_router_backward,
    .balance_loss_forward = nm_cuda_balance_loss_forward,
    .balance_loss_backward = nm_cuda_balance_loss_backward,
    .moe_permute = nm_cuda_moe_permute,
    .moe_gather = nm_cuda_moe_gather,
    .moe_gather_bf16 = nm_cuda_moe_gather_bf16,
    .moe_combine_forward = nm_cuda_moe_combine_forward,
    .moe_combine_backward = nm_cuda_moe_combine_backward,
    .moe_scatter_add = nm_cuda_moe_scatter_add,
    .fp8_quantize_rows = nm_cuda_fp8_quantize_rows,
    .fp8_dequantize_rows = nm_cuda_fp8_dequantize_rows,
    .fp8_round_rows = nm_cuda_fp8_round_rows,
    .sumsq_chunks = nm_cuda_sumsq_chunks,
    .scale_chunks = nm_cuda_scale_chunks,
    .first_nonfinite = nm_cuda_first_nonfinite,
    .adamw_chunks = nm_cuda_adamw_chunks,
    .router_bias_update = nm_cuda_router_bias_update,
};

const nm_ops *nm_ops_cuda(void) { return &cuda_ops; }
