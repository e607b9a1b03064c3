// balance.h: DeepSeek-V3's auxiliary-loss-free load balancing [dsv3-spec 6.1] and the
// router-load statistics the metrics report.
//
// After every optimizer step, for each MoE layer (MTP layers included), with n_i the number
// of (token, expert) selections of expert i over the whole global batch:
//     b_i <- b_i + gamma * sign(mean_j n_j - n_i),   sign(0) = 0
// so overloaded experts are made less attractive and underloaded ones more. The bias is
// never touched by the optimizer, weight decay or gradients (optim.h skips the row).
// gamma comes from nm_bias_gamma_at (schedule.h).
#pragma once

#include <stdint.h>

// The update itself is the backend's op (ops.h: router_bias_update): the bias lives where the
// model's weights do. Its mean is sum/E in double, so a count equal to the mean is recognised
// exactly (no update), as in Megatron's get_updated_expert_bias.

// Statistics over n_layers rows of E counts and biases (either may be NULL to skip):
// load_max_over_mean = max over layers of (max_i n_i / mean_i n_i) (1 = perfect balance;
// layers with no tokens are skipped), bias_min / bias_max over all rows.
typedef struct nm_balance_stats {
    double load_max_over_mean;  // worst layer's max/mean expert load
    double bias_min;            // smallest bias over all layers
    double bias_max;            // largest bias over all layers
} nm_balance_stats;

void nm_balance_compute_stats(nm_balance_stats *st, const int64_t *counts /* (n_layers, E) */,
                              const float *const *biases /* (n_layers) pointers to (E), may be NULL */,
                              int n_layers, int64_t E);
