// moe_dispatch.cu: the CUDA backend's dropless MoE dispatch and combine (dsv3-spec 5 step 9;
// src/ops/ref/moe_dispatch.c is the definition).
//
// The N*K assignments a = n*K + k are grouped by expert, stable in flat order: permuted row r
// holds assignment perm[r], expert e's rows are [offsets[e], offsets[e+1]). moe_permute counts
// each expert's assignments (one block per expert, a fixed-order block sum), turns the counts
// into offsets on the host (E + 1 integers in host-readable memory, which is where ops.h wants
// them), and places each expert's assignments with a block-wide prefix sum over the flat
// order (one block per expert, chunk by chunk), so the order within an expert is the flat one.
//
// Rows add into their tokens in permuted-row order, as the reference adds them, without
// atomics: inv[a] (=) the permuted row of assignment a, and the thread of (token n, column d)
// adds its token's K rows in increasing row order. Compiled, not yet run on a GPU.
#include "ops/cuda/cuda_common.cuh"

#define FOR_EACH(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)
#define GRID(n) nm_cuda_blocks((n), 256), 256, 0, NM_CUDA_STREAM

// --- permute --------------------------------------------------------------------------------------------

// counts[e] (=) #{a : topk_idx[a] == e} for block e; block E counts the ids outside [0, E)
static __global__ void count_kernel(int32_t *counts, const int32_t *topk_idx, int64_t NK, int64_t E) {
    __shared__ double red[NM_CUDA_THREADS];
    const int64_t e = blockIdx.x;
    double c = 0.0;  // exact: integers far below 2^53
    for (int64_t a = threadIdx.x; a < NK; a += blockDim.x) {
        const int32_t x = topk_idx[a];
        c += e < E ? (x == e) : (x < 0 || x >= E);
    }
    c = nm_dev_block_sum(c, red);
    if (threadIdx.x == 0) counts[e] = (int32_t)c;
}

// perm[offset_e + rank] (=) a for expert e's assignments in flat order; offset_e from counts
static __global__ void place_kernel(int32_t *perm, const int32_t *counts, const int32_t *topk_idx, int64_t NK) {
    __shared__ int32_t scan[NM_CUDA_THREADS];
    __shared__ int64_t base;
    const int32_t e = (int32_t)blockIdx.x;
    const int t = threadIdx.x;
    if (t == 0) {
        int64_t o = 0;
        for (int32_t i = 0; i < e; i++) o += counts[i];
        base = o;
    }
    __syncthreads();
    for (int64_t a0 = 0; a0 < NK; a0 += blockDim.x) {
        const int64_t a = a0 + t;
        const int32_t flag = a < NK && topk_idx[a] == e;
        // inclusive prefix sum of the flags over the chunk (Hillis-Steele)
        scan[t] = flag;
        __syncthreads();
        for (int s = 1; s < (int)blockDim.x; s <<= 1) {
            const int32_t add = t >= s ? scan[t - s] : 0;
            __syncthreads();
            scan[t] += add;
            __syncthreads();
        }
        if (flag) perm[base + scan[t] - 1] = (int32_t)a;
        __syncthreads();
        if (t == 0) base += scan[blockDim.x - 1];
        __syncthreads();
    }
}

void nm_cuda_moe_permute(const nm_ops *be, int32_t *offsets, int32_t *perm, const int32_t *topk_idx, int64_t N,
                         int64_t K, int64_t E) {
    NM_CHECK(N >= 0 && K >= 1 && E >= 1 && N * K <= INT32_MAX && E < INT32_MAX, "moe_permute N=%lld K=%lld E=%lld",
             (long long)N, (long long)K, (long long)E);
    const int64_t NK = N * K;
    int32_t *counts = (int32_t *)nm_cuda_scratch(be, NM_CUDA_SCRATCH_WORK, (size_t)(E + 1) * sizeof(int32_t));
    count_kernel<<<(unsigned)(E + 1), NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(counts, topk_idx, NK, E);
    // counts to the host, into offsets (host-readable, E + 1 entries), then the exclusive scan:
    // a host loop over E + 1 integers
    NM_CUDA_CALL(cudaMemcpyAsync(offsets, counts, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyDefault, NM_CUDA_STREAM));
    NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
    NM_CHECK(offsets[E] == 0, "moe_permute: %d expert ids outside [0, %lld)", offsets[E], (long long)E);
    int64_t r = 0;
    for (int64_t e = 0; e <= E; e++) {
        const int64_t c = e < E ? offsets[e] : 0;
        offsets[e] = (int32_t)r;
        r += c;
    }
    NM_CHECK(r == NK, "moe_permute: counts add up to %lld, not N*K = %lld", (long long)r, (long long)NK);
    if (NK > 0) place_kernel<<<(unsigned)E, NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(perm, counts, topk_idx, NK);
    NM_CUDA_OP_DONE("moe_permute");
}

// --- gather ---------------------------------------------------------------------------------------------

// dst(N*K, D) (=) src[perm[r] / K]; bf16: rounded, bits (may be NULL) the bf16 twin
static __global__ void gather_kernel(float *dst, uint16_t *bits, const float *src, const int32_t *perm, int64_t NK,
                                     int64_t K, int64_t D, int bf16) {
    FOR_EACH(i, NK * D) {
        const int64_t r = i / D, d = i % D;
        float v = src[(int64_t)(perm[r] / K) * D + d];
        if (bf16) {
            uint16_t h = nm_dev_f32_to_bf16(v);
            v = nm_dev_bf16_to_f32(h);
            if (bits) bits[i] = h;
        }
        dst[i] = v;
    }
}

void nm_cuda_moe_gather(const nm_ops *be, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                        int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe shape N=%lld K=%lld D=%lld", (long long)N, (long long)K, (long long)D);
    if (N * K * D > 0) gather_kernel<<<GRID(N * K * D)>>>(dst, NULL, src, perm, N * K, K, D, 0);
    NM_CUDA_OP_DONE("moe_gather");
}

void nm_cuda_moe_gather_bf16(const nm_ops *be, float *dst, uint16_t *bits, const float *src, const int32_t *perm,
                             int64_t N, int64_t K, int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0, "moe shape N=%lld K=%lld D=%lld", (long long)N, (long long)K, (long long)D);
    if (N * K * D > 0) gather_kernel<<<GRID(N * K * D)>>>(dst, bits, src, perm, N * K, K, D, 1);
    NM_CUDA_OP_DONE("moe_gather_bf16");
}

// --- combine and scatter: token rows in permuted-row order ------------------------------------------

static __global__ void invert_kernel(int32_t *inv, const int32_t *perm, int64_t NK) {
    FOR_EACH(r, NK) inv[perm[r]] = (int32_t)r;
}

// The permuted rows of token n's K assignments, ascending (insertion sort of K <= a few dozen)
static __device__ void token_rows(int32_t *rows, const int32_t *inv, int64_t n, int64_t K) {
    for (int64_t k = 0; k < K; k++) {
        int32_t x = inv[n * K + k];
        int64_t j = k;
        for (; j > 0 && rows[j - 1] > x; j--) rows[j] = rows[j - 1];
        rows[j] = x;
    }
}

#define MAX_K 64  // experts per token a token-row thread keeps (DeepSeek-V3: 8)

// y(N,D) (+=) topk_weight[perm[r]] * rows[r] (weighted) or rows[r] (scatter), r ascending per token
static __global__ void add_rows_kernel(float *y, const float *rows_in, const float *topk_weight, const int32_t *perm,
                                       const int32_t *inv, int64_t N, int64_t K, int64_t D) {
    FOR_EACH(i, N * D) {
        const int64_t n = i / D, d = i % D;
        int32_t rows[MAX_K];
        token_rows(rows, inv, n, K);
        float acc = y[i];
        for (int64_t k = 0; k < K; k++) {
            const int64_t r = rows[k];
            if (topk_weight) acc += topk_weight[perm[r]] * rows_in[r * D + d];
            else acc += rows_in[r * D + d];
        }
        y[i] = acc;
    }
}

static void add_rows(const nm_ops *be, const char *op, float *y, const float *rows_in, const float *topk_weight,
                     const int32_t *perm, int64_t N, int64_t K, int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && K <= MAX_K && D >= 0, "%s shape N=%lld K=%lld (1..%d) D=%lld", op, (long long)N,
             (long long)K, MAX_K, (long long)D);
    if (N * K * D > 0) {
        int32_t *inv = (int32_t *)nm_cuda_scratch(be, NM_CUDA_SCRATCH_WORK, (size_t)(N * K) * sizeof(int32_t));
        invert_kernel<<<GRID(N * K)>>>(inv, perm, N * K);
        add_rows_kernel<<<GRID(N * D)>>>(y, rows_in, topk_weight, perm, inv, N, K, D);
    }
    NM_CUDA_OP_DONE(op);
}

void nm_cuda_moe_combine_forward(const nm_ops *be, float *y, const float *expert_out, const float *topk_weight,
                                 const int32_t *perm, int64_t N, int64_t K, int64_t D) {
    add_rows(be, "moe_combine_forward", y, expert_out, topk_weight, perm, N, K, D);
}

void nm_cuda_moe_scatter_add(const nm_ops *be, float *dsrc, const float *ddst, const int32_t *perm, int64_t N,
                             int64_t K, int64_t D) {
    add_rows(be, "moe_scatter_add", dsrc, ddst, NULL, perm, N, K, D);
}

// dexpert_out(N*K,D) (=) topk_weight[a] * dy[token]; block r also dtopk_weight[a] (=)
// dy[token] . expert_out[r] in double (fixed-order block sum)
static __global__ void combine_backward_kernel(float *dexpert_out, float *dtopk_weight, const float *dy,
                                               const float *expert_out, const float *topk_weight,
                                               const int32_t *perm, int64_t K, int64_t D) {
    __shared__ double red[NM_CUDA_THREADS];
    const int64_t r = blockIdx.x;
    const int32_t a = perm[r];
    const float *g = dy + (int64_t)(a / K) * D;
    double dot = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        dexpert_out[r * D + d] = topk_weight[a] * g[d];
        dot += (double)g[d] * expert_out[r * D + d];
    }
    dot = nm_dev_block_sum(dot, red);
    if (threadIdx.x == 0) dtopk_weight[a] = (float)dot;
}

void nm_cuda_moe_combine_backward(const nm_ops *be, float *dexpert_out, float *dtopk_weight, const float *dy,
                                  const float *expert_out, const float *topk_weight, const int32_t *perm, int64_t N,
                                  int64_t K, int64_t D) {
    NM_CHECK(N >= 0 && K >= 1 && D >= 0 && N * K <= INT32_MAX, "moe shape N=%lld K=%lld D=%lld", (long long)N,
             (long long)K, (long long)D);
    if (N * K > 0)
        combine_backward_kernel<<<(unsigned)(N * K), NM_CUDA_THREADS, 0, NM_CUDA_STREAM>>>(
            dexpert_out, dtopk_weight, dy, expert_out, topk_weight, perm, K, D);
    NM_CUDA_OP_DONE("moe_combine_backward");
}
