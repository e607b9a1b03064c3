// ops_ref.c: the reference backend's nm_ops table (ref_ops.h says what the backend is). The ops
// live one family per file in this directory; this file only wires them up.
#include <string.h>

#include "ops/ref/ref_ops.h"
#include "ops/xent_stats.h"

// The instance's scratch (ref_ops.h), empty until a bf16 or fp8 GEMM first needs it.
static int ref_ctx_create(void **ctx, nm_error *err) {
    (void)err;  // nothing here can fail but the allocation, which panics
    *ctx = nm_calloc(1, sizeof(nm_ref_ctx));
    return 0;
}

static void ref_ctx_destroy(void *ctx) {
    nm_ref_ctx *c = ctx;
    if (!c) return;
    for (int i = 0; i < 2; i++) nm_free(c->scratch[i].data);
    nm_free(c);
}

static const char *ref_kernel_names(const nm_ops *be) { return "scalar C, double accumulation, one thread"; }

// Host memory, one thread: copies are memcpy, nothing is ever in flight, no threads to set.
static void *ref_alloc(const nm_ops *be, size_t bytes) { return nm_aligned_alloc(bytes ? bytes : 1); }
static void ref_free(const nm_ops *be, void *p) { nm_free(p); }
static void ref_copy(const nm_ops *be, void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
}
static void ref_memset(const nm_ops *be, void *dst, int value, size_t bytes) {
    if (bytes) memset(dst, value, bytes);
}
// The definition: zeros. Giving pages back is the CPU backend's business.
static void ref_discard(const nm_ops *be, void *dst, size_t bytes) { ref_memset(be, dst, 0, bytes); }
static void ref_synchronize(const nm_ops *be) {}
static void ref_set_threads(const nm_ops *be, int n) { (void)n; }
static int ref_threads(const nm_ops *be) { return 1; }
// The scalar loops' rate hardly depends on the size: n = 256 takes a fraction of a second.
static double ref_measure_peak(const nm_ops *be, int bf16) {
    double peak = nm_ops_time_square_gemm(be, 0, 256);
    if (bf16) {
        double p16 = nm_ops_time_square_gemm(be, 1, 256);
        if (p16 > peak) peak = p16;
    }
    return peak;
}

static const nm_ops ref_ops = {
    .name = "ref",
    .ctx_create = ref_ctx_create,
    .ctx_destroy = ref_ctx_destroy,
    .setup = NULL,  // no library, no machine feature: nothing can be missing
    .kernel_names = ref_kernel_names,
    .max_row_dim = NM_REF_MAX_ROW_DIM,
    .alloc = ref_alloc,
    .free = ref_free,
    .copy_to_device = ref_copy,
    .copy_to_host = ref_copy,
    .memset = ref_memset,
    .discard = ref_discard,
    .synchronize = ref_synchronize,
    .set_threads = ref_set_threads,
    .threads = ref_threads,
    .measure_peak = ref_measure_peak,
    .tune = NULL,  // one kernel per op: nothing to choose
    .gemm = nm_ref_gemm,
    .gemm_grouped = nm_ref_gemm_grouped,
    .gemm_bf16 = nm_ref_gemm_bf16,
    .gemm_bf16_grouped = nm_ref_gemm_bf16_grouped,
    .gemm_bf16_weight_type = nm_ref_gemm_bf16_weight_type,
    .round_bf16 = nm_ref_round_bf16,
    .gemm_fp8 = nm_ref_gemm_fp8,
    .cast_bf16 = nm_ref_cast_bf16,
    .widen_bf16 = nm_ref_widen_bf16,
    .round_cast_bf16 = nm_ref_round_cast_bf16,
    .zero = nm_ref_zero,
    .axpy = nm_ref_axpy,
    .copy_2d = nm_ref_copy_2d,
    .add_2d = nm_ref_add_2d,
    .embedding_forward = nm_ref_embedding_forward,
    .embedding_backward = nm_ref_embedding_backward,
    .rmsnorm_forward = nm_ref_rmsnorm_forward,
    .rmsnorm_backward = nm_ref_rmsnorm_backward,
    .swiglu_forward = nm_ref_swiglu_forward,
    .swiglu_backward = nm_ref_swiglu_backward,
    .swiglu_forward_bf16 = nm_ref_swiglu_forward_bf16,
    .swiglu_backward_bf16 = nm_ref_swiglu_backward_bf16,
    .rope_forward = nm_ref_rope_forward,
    .rope_backward = nm_ref_rope_backward,
    .attention_forward = nm_ref_attention_forward,
    .attention_backward = nm_ref_attention_backward,
    .xent_forward = nm_ref_xent_forward,
    .xent_backward = nm_ref_xent_backward,
    .xent_tile_forward = nm_ref_xent_tile_forward,
    .xent_tile_backward = nm_ref_xent_tile_backward,
    .xent_stats_open = nm_ops_xent_stats_open,
    .xent_stats_max = nm_ops_xent_stats_max,
    .xent_stats_sums = nm_ops_xent_stats_sums,
    .xent_stats_close = nm_ops_xent_stats_close,
    .sum = nm_ops_sum,
    .router_forward = nm_ref_router_forward,
    .router_backward = nm_ref_router_backward,
    .balance_loss_forward = nm_ref_balance_loss_forward,
    .balance_loss_backward = nm_ref_balance_loss_backward,
    .moe_permute = nm_ref_moe_permute,
    .moe_gather = nm_ref_moe_gather,
    .moe_gather_bf16 = nm_ref_moe_gather_bf16,
    .moe_combine_forward = nm_ref_moe_combine_forward,
    .moe_combine_backward = nm_ref_moe_combine_backward,
    .moe_scatter_add = nm_ref_moe_scatter_add,
    .fp8_quantize_rows = nm_ref_fp8_quantize_rows,
    .fp8_dequantize_rows = nm_ref_fp8_dequantize_rows,
    .fp8_round_rows = nm_ref_fp8_round_rows,
    .sumsq_chunks = nm_ref_sumsq_chunks,
    .scale_chunks = nm_ref_scale_chunks,
    .first_nonfinite = nm_ref_first_nonfinite,
    .adamw_chunks = nm_ref_adamw_chunks,
    .router_bias_update = nm_ref_router_bias_update,
};

const nm_ops *nm_ops_ref(void) { return &ref_ops; }
