// xent_stats.h: the host definitions of ops.h's xent_stats_open .. close and sum, shared by
// the backends' tables (xent_stats.c).
#pragma once

#include <stdint.h>

#include "ops/ops.h"

void nm_ops_xent_stats_open(const nm_ops *be, double *stats, int64_t N);
void nm_ops_xent_stats_max(const nm_ops *be, double *mx, const double *stats, const int32_t *targets, int64_t N);
void nm_ops_xent_stats_sums(const nm_ops *be, double *sums, const double *stats, const double *mx,
                            const int32_t *targets, int64_t N);
void nm_ops_xent_stats_close(const nm_ops *be, float *losses, float *lse, const double *sums, const double *mx,
                             const int32_t *targets, int64_t N);
double nm_ops_sum(const nm_ops *be, const float *x, int64_t n);
