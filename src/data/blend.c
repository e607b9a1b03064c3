// blend.c: implementation of blend.h.
#include "data/blend.h"

#include <math.h>

#include "core/check.h"

int nm_blend_normalize(const double *weights, int n, double *out) {
    double sum = 0;
    for (int i = 0; i < n; i++) {
        if (!isfinite(weights[i]) || weights[i] < 0) return -1;
        sum += weights[i];
    }
    if (!(sum > 0)) return -1;
    for (int i = 0; i < n; i++) out[i] = weights[i] / sum;
    return 0;
}

int nm_blend_next(nm_blend_state *st, int64_t *sample_in_ds) {
    // The error is computed exactly as helpers.cpp does, in double, so the choice (and its
    // ties) match Megatron for every s.
    double t = st->next > 1 ? (double)st->next : 1.0;
    int best = 0;
    double best_err = st->weights[0] * t - (double)st->counts[0];
    for (int i = 1; i < st->n; i++) {
        double e = st->weights[i] * t - (double)st->counts[i];
        if (e > best_err) {
            best_err = e;
            best = i;
        }
    }
    *sample_in_ds = st->counts[best]++;
    st->next++;
    return best;
}

void nm_blend_build_indices(const double *weights, int n, int64_t size, int16_t *dataset_index,
                            int64_t *dataset_sample_index) {
    NM_CHECK(n >= 1 && n < 32767, "n=%d datasets", n);
    int64_t *counts = nm_calloc((size_t)n, sizeof(int64_t));
    nm_blend_state st = {.n = n, .weights = weights, .next = 0, .counts = counts};
    for (int64_t s = 0; s < size; s++) {
        dataset_index[s] = (int16_t)nm_blend_next(&st, &dataset_sample_index[s]);
    }
    nm_free(counts);
}

int64_t nm_blend_dataset_size(double weight, int64_t target, double surplus) {
    return (int64_t)ceil(ceil((double)target * weight) * (1.0 + surplus));
}
