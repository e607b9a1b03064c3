// balance.c: the aux-loss-free bias update and load statistics (see balance.h).
// Reference: DeepSeek-V3 report section 2.1.2; Megatron-Core moe_utils.get_updated_expert_bias.
#include "train/balance.h"

#include <math.h>

#include "core/check.h"

void nm_balance_compute_stats(nm_balance_stats *st, const int64_t *counts, const float *const *biases,
                              int n_layers, int64_t E) {
    st->load_max_over_mean = counts ? 1.0 : NAN;
    st->bias_min = biases ? INFINITY : NAN;
    st->bias_max = biases ? -INFINITY : NAN;
    for (int l = 0; l < n_layers; l++) {
        if (counts) {
            const int64_t *c = counts + (int64_t)l * E;
            int64_t sum = 0, mx = 0;
            for (int64_t i = 0; i < E; i++) {
                sum += c[i];
                if (c[i] > mx) mx = c[i];
            }
            if (sum > 0) {
                double r = (double)mx / ((double)sum / (double)E);
                if (r > st->load_max_over_mean) st->load_max_over_mean = r;
            }
        }
        if (biases) {
            for (int64_t i = 0; i < E; i++) {
                float b = biases[l][i];
                if (b < st->bias_min) st->bias_min = b;
                if (b > st->bias_max) st->bias_max = b;
            }
        }
    }
    if (biases && n_layers == 0) st->bias_min = st->bias_max = 0.0;
}
