// gemm_shapes.c: the GEMMs one training step makes (flops.h: nm_model_gemm_shapes), the
// workload a backend tunes its kernels on.
#include "model/flops.h"

typedef struct shape_list {
    nm_gemm_shape *s;
    int n, max;
} shape_list;

// A call already listed with the same shape and operands counts once more; otherwise it is added.
static void add_shape(shape_list *set, nm_gemm_shape x) {
    if (x.M <= 0 || x.N <= 0 || x.K <= 0 || x.count <= 0) return;
    for (int i = 0; i < set->n; i++) {
        nm_gemm_shape *y = &set->s[i];
        if (y->ta == x.ta && y->tb == x.tb && y->M == x.M && y->N == x.N && y->K == x.K && y->groups == x.groups &&
            y->b_is_weight == x.b_is_weight && y->rounded == x.rounded) {
            y->count += x.count;
            return;
        }
    }
    if (set->n < set->max) set->s[set->n++] = x;
}

// One weight W(out, in) applied to `rows` rows in `count` calls of `groups` groups: forward,
// dX, dW (nm_linear_* and the experts' grouped calls in moe.c).
static void add_linear(shape_list *set, int64_t rows, int64_t out, int64_t in, int64_t groups, int64_t count) {
    int rounded = groups > 1;
    add_shape(set, (nm_gemm_shape){NM_NO_TRANS, NM_TRANS, rows, out, in, groups, count, 1, rounded});
    add_shape(set, (nm_gemm_shape){NM_NO_TRANS, NM_NO_TRANS, rows, in, out, groups, count, 1, rounded});
    add_shape(set, (nm_gemm_shape){NM_TRANS, NM_NO_TRANS, out, in, rows, groups, count, 0, rounded});
}

int nm_model_gemm_shapes(const nm_model_config *m, int64_t rows, int64_t tokens, nm_gemm_shape *shapes, int max) {
    shape_list list = {shapes, 0, max}, *set = &list;
    int64_t nl = m->n_layers, n_moe = 0;
    for (int64_t l = 0; l < nl; l++) n_moe += nm_layer_is_moe(m, l);
    int64_t n_dense = nl - n_moe;
    if (m->Rq > 0) {
        add_linear(set, rows, m->Rq, m->D, 1, nl);
        add_linear(set, rows, m->H * m->Dqk, m->Rq, 1, nl);
    } else {
        add_linear(set, rows, m->H * m->Dqk, m->D, 1, nl);
    }
    add_linear(set, rows, m->Rkv, m->D, 1, nl);  // kv_a: the latent and the rope key, two GEMMs
    add_linear(set, rows, m->Dr, m->D, 1, nl);
    add_linear(set, rows, m->H * (m->Dn + m->Dv), m->Rkv, 1, nl);
    add_linear(set, rows, m->D, m->H * m->Dv, 1, nl);
    add_linear(set, rows, 2 * m->F, m->D, 1, n_dense);  // [gate; up] in one GEMM
    add_linear(set, rows, m->D, m->F, 1, n_dense);
    if (n_moe > 0 && m->E > 0) {
        // the experts of a layer in one grouped call, at their mean row count in the step
        int64_t per = (tokens * m->K + m->E - 1) / m->E;
        if (per > rows) per = rows;
        add_linear(set, per, 2 * m->Fe, m->D, m->E, n_moe);
        add_linear(set, per, m->D, m->Fe, m->E, n_moe);
        add_linear(set, rows, 2 * m->Fs, m->D, 1, n_moe);
        add_linear(set, rows, m->D, m->Fs, 1, n_moe);
    }
    add_linear(set, rows, m->V, m->D, 1, 1 + m->M);
    return list.n;
}
