// xent_stats.c: the vocabulary-parallel head's statistics combine and the loss total (ops.h
// xent_stats_open .. close, sum), one definition for every backend: N values a row, no GEMM
// in sight, so plain loops on memory the host can read (the CPU backends' own; the CUDA
// backend's managed memory, after it synchronises).
#include <math.h>

#include "ops/ops.h"
#include "ops/xent_stats.h"

void nm_ops_xent_stats_open(const nm_ops *be, double *stats, int64_t N) {
    (void)be;
    for (int64_t n = 0; n < N; n++) stats[3 * n] = -INFINITY, stats[3 * n + 1] = 0.0, stats[3 * n + 2] = 0.0;
}

void nm_ops_xent_stats_max(const nm_ops *be, double *mx, const double *stats, const int32_t *targets, int64_t N) {
    (void)be;
    for (int64_t n = 0; n < N; n++) mx[n] = targets[n] < 0 ? 0.0 : stats[3 * n];
}

void nm_ops_xent_stats_sums(const nm_ops *be, double *sums, const double *stats, const double *mx,
                            const int32_t *targets, int64_t N) {
    (void)be;
    for (int64_t n = 0; n < N; n++) {
        sums[2 * n] = targets[n] < 0 ? 0.0 : stats[3 * n + 1] * exp(stats[3 * n] - mx[n]);
        sums[2 * n + 1] = stats[3 * n + 2];
    }
}

void nm_ops_xent_stats_close(const nm_ops *be, float *losses, float *lse, const double *sums, const double *mx,
                             const int32_t *targets, int64_t N) {
    (void)be;
    for (int64_t n = 0; n < N; n++) {
        if (targets[n] < 0) {
            losses[n] = 0.0f, lse[n] = 0.0f;  // lse never read for these rows
            continue;
        }
        double log_s = log(sums[2 * n]);
        losses[n] = (float)(log_s + mx[n] - sums[2 * n + 1]);
        lse[n] = (float)(log_s + mx[n]);
    }
}

double nm_ops_sum(const nm_ops *be, const float *x, int64_t n) {
    (void)be;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += x[i];
    return s;
}
