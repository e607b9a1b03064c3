// lanes.h: row reductions in explicit double lanes, shared by the CPU ops.
//
// Without -ffast-math GCC keeps a floating-point reduction in source order, so a plain
// `s += a[i] * b[i]` loop runs one dependent double add per element. Written out as
// NM_CPU_LANES partial sums (lane j takes the elements i = j mod NM_CPU_LANES), combined in lane
// order, the loop vectorises and the result is still a fixed function of the input: the same
// bits with 8- or 16-wide vectors and any thread count.
#pragma once

#include <stdint.h>

#define NM_CPU_LANES 16

// sum_i (double)a[i] * b[i]; each product is exact in double (24 + 24 bits < 53).
static inline double nm_cpu_dot_lanes(const float *a, const float *b, int64_t n) {
    double acc[NM_CPU_LANES] = {0};
    int64_t i = 0;
    for (; i + NM_CPU_LANES <= n; i += NM_CPU_LANES)
        for (int j = 0; j < NM_CPU_LANES; j++) acc[j] += (double)a[i + j] * b[i + j];
    for (int j = 0; i + j < n; j++) acc[j] += (double)a[i + j] * b[i + j];
    double s = 0.0;
    for (int j = 0; j < NM_CPU_LANES; j++) s += acc[j];
    return s;
}
