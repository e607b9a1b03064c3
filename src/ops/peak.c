// peak.c: the square-GEMM timing every backend's measure_peak uses (ops.h).
#include <string.h>
#include <time.h>

#include "ops/ops.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// The best of three n^3 GEMMs after one warm-up (the first call JITs or faults the pages in).
// bf16: the operands as the model stores bf16 weights, the top half of each float (what the
// values are does not matter to the timing, only that they are finite).
double nm_ops_time_square_gemm(const nm_ops *ops, int bf16, int n) {
    const size_t nn = (size_t)n * (size_t)n;
    float *a = ops->alloc(ops, nn * sizeof(float)), *b = ops->alloc(ops, nn * sizeof(float)), *c = ops->alloc(ops, nn * sizeof(float));
    float *host = nm_aligned_alloc(nn * sizeof(float));
    for (size_t i = 0; i < nn; i++) host[i] = (float)(i % 7) * 0.1f;
    if (bf16) {
        uint16_t *h16 = (uint16_t *)host;  // in place: host[i] is read before h16[i] is written
        for (size_t i = 0; i < nn; i++) {
            uint32_t u;
            memcpy(&u, &host[i], 4);
            h16[i] = (uint16_t)(u >> 16);
        }
    }
    ops->copy_to_device(ops, a, host, nn * (bf16 ? 2 : 4));
    ops->copy_to_device(ops, b, host, nn * (bf16 ? 2 : 4));
    nm_free(host);
    double best = 1e30;
    for (int r = 0; r < 4; r++) {
        double t0 = now_s();
        if (bf16) ops->gemm_bf16(ops, NM_NO_TRANS, NM_NO_TRANS, n, n, n, 1.0f, a, NM_BF16, n, b, NM_BF16, n, 0.0f, c, n);
        else ops->gemm(ops, NM_NO_TRANS, NM_NO_TRANS, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        ops->synchronize(ops);
        double dt = now_s() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    ops->free(ops, a);
    ops->free(ops, b);
    ops->free(ops, c);
    return 2.0 * n * n * (double)n / best;
}
