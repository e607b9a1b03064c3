// ops_oracle.c: runs one op (forward and backward) of a backend on tensors read from a file and
// writes its outputs, so that tests/reference/test_ops_torch.py can compare them with an
// independent PyTorch float64 implementation. The backend is NM_BACKEND's (default cpu; the
// Python test runs every one). A test tool, built into the build directory as nm_ops_oracle;
// not installed.
//
//   [NM_BACKEND=cpu|ref] nm_ops_oracle <op> <in.bin> <out.bin>
//   op: gemm | embedding | rmsnorm | swiglu | rope | attention | xent | router | balance | moe
//
// File format (both directions, little-endian), written and read by the Python test:
//   "NMOT" | u32 version = 1 | u32 count | count x { u32 name_len | name | u32 dtype | u64 n | data }
//   dtype: 0 = f32, 1 = i32, 2 = f64; n = element count. Integer options travel in an i32
//   tensor "dims", float options in an f32 tensor "fopts" (order per op below).
// Gradients of "(+=)" outputs are produced from zero-filled buffers.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/fileio.h"
#include "ops/ops.h"

// --- tensor container -------------------------------------------------------------------------

enum { DT_F32 = 0, DT_I32 = 1, DT_F64 = 2, MAX_TENSORS = 64 };

typedef struct {
    char name[64];
    uint32_t dtype;
    uint64_t n;
    void *data;                 // points into the input buffer or owns an output
} tensor;

typedef struct {
    tensor t[MAX_TENSORS];
    int count;
} tensor_set;

static size_t dt_size(uint32_t dt) { return dt == DT_F64 ? 8 : 4; }

static void read_set(tensor_set *s, const char *path, char **buf_out) {
    nm_error err;
    char *buf;
    size_t size;
    if (nm_file_read_all(path, &buf, &size, &err)) NM_PANIC("%s", err.msg);
    size_t pos = 12;
    NM_CHECK(size >= 12 && memcmp(buf, "NMOT", 4) == 0, "%s: not an oracle file", path);
    uint32_t version, count;
    memcpy(&version, buf + 4, 4);
    memcpy(&count, buf + 8, 4);
    NM_CHECK(version == 1 && count <= MAX_TENSORS, "%s: version %u count %u", path, version, count);
    s->count = 0;
    for (uint32_t i = 0; i < count; i++) {
        tensor *t = &s->t[s->count++];
        uint32_t len;
        NM_CHECK(pos + 4 <= size, "%s: truncated", path);
        memcpy(&len, buf + pos, 4);
        pos += 4;
        NM_CHECK(len < sizeof t->name && pos + len + 12 <= size, "%s: bad name length %u", path, len);
        memcpy(t->name, buf + pos, len);
        t->name[len] = 0;
        pos += len;
        memcpy(&t->dtype, buf + pos, 4);
        memcpy(&t->n, buf + pos + 4, 8);
        pos += 12;
        NM_CHECK(t->dtype <= DT_F64 && t->n <= (size - pos) / dt_size(t->dtype), "%s: tensor %s truncated",
                 path, t->name);
        // copy so the data is aligned for its type
        t->data = nm_malloc(t->n * dt_size(t->dtype) + 1);
        memcpy(t->data, buf + pos, t->n * dt_size(t->dtype));
        pos += t->n * dt_size(t->dtype);
    }
    *buf_out = buf;
}

static void *get(tensor_set *s, const char *name, uint32_t dtype, uint64_t n) {
    for (int i = 0; i < s->count; i++) {
        if (strcmp(s->t[i].name, name)) continue;
        NM_CHECK(s->t[i].dtype == dtype && s->t[i].n == n, "tensor %s: dtype %u n %llu, want %u %llu", name,
                 s->t[i].dtype, (unsigned long long)s->t[i].n, dtype, (unsigned long long)n);
        return s->t[i].data;
    }
    NM_PANIC("missing input tensor %s", name);
}

static float *getf(tensor_set *s, const char *name, int64_t n) { return get(s, name, DT_F32, (uint64_t)n); }
static int32_t *geti(tensor_set *s, const char *name, int64_t n) { return get(s, name, DT_I32, (uint64_t)n); }

// Output tensors are zero-filled, so "(+=)" gradients come out as plain gradients.
static void *add_out(tensor_set *o, const char *name, uint32_t dtype, int64_t n) {
    NM_CHECK(o->count < MAX_TENSORS && strlen(name) < 64, "too many outputs");
    tensor *t = &o->t[o->count++];
    strcpy(t->name, name);
    t->dtype = dtype;
    t->n = (uint64_t)n;
    t->data = nm_calloc((size_t)n + 1, dt_size(dtype));
    return t->data;
}

static float *outf(tensor_set *o, const char *name, int64_t n) { return add_out(o, name, DT_F32, n); }
static int32_t *outi(tensor_set *o, const char *name, int64_t n) { return add_out(o, name, DT_I32, n); }

static void write_set(const tensor_set *s, const char *path) {
    FILE *fp = fopen(path, "wb");
    NM_CHECK(fp, "cannot open %s", path);
    uint32_t version = 1, count = (uint32_t)s->count;
    int ok = fwrite("NMOT", 1, 4, fp) == 4 && fwrite(&version, 4, 1, fp) == 1 && fwrite(&count, 4, 1, fp) == 1;
    for (int i = 0; i < s->count && ok; i++) {
        const tensor *t = &s->t[i];
        uint32_t len = (uint32_t)strlen(t->name);
        ok = fwrite(&len, 4, 1, fp) == 1 && fwrite(t->name, 1, len, fp) == len && fwrite(&t->dtype, 4, 1, fp) == 1 &&
             fwrite(&t->n, 8, 1, fp) == 1 && fwrite(t->data, dt_size(t->dtype), t->n, fp) == t->n;
    }
    NM_CHECK(ok && fclose(fp) == 0, "writing %s failed", path);
}

// --- ops --------------------------------------------------------------------------------------

// dims: ta tb M N K lda ldb ldc; fopts: alpha beta; A, B, C -> C
static void run_gemm(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 8);
    const float *fo = getf(in, "fopts", 2);
    int64_t M = d[2], N = d[3], K = d[4], lda = d[5], ldb = d[6], ldc = d[7];
    int64_t ar = d[0] ? K : M, br = d[1] ? N : K;
    float *C = outf(out, "C", M * ldc);
    memcpy(C, getf(in, "C", M * ldc), sizeof(float) * (size_t)(M * ldc));
    ops->gemm(ops, d[0] ? NM_TRANS : NM_NO_TRANS, d[1] ? NM_TRANS : NM_NO_TRANS, M, N, K, fo[0], getf(in, "A", ar * lda),
              lda, getf(in, "B", br * ldb), ldb, fo[1], C, ldc);
}

// dims: N D V; tokens, emb, dout -> out, demb
static void run_embedding(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 3);
    int64_t N = d[0], D = d[1], V = d[2];
    const int32_t *tok = geti(in, "tokens", N);
    ops->embedding_forward(ops, outf(out, "out", N * D), tok, getf(in, "emb", V * D), N, D);
    ops->embedding_backward(ops, outf(out, "demb", V * D), getf(in, "dout", N * D), tok, N, D);
}

// dims: N D; fopts: eps; x, w, dout -> out, rstd, dx, dw
static void run_rmsnorm(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 2);
    int64_t N = d[0], D = d[1];
    const float *x = getf(in, "x", N * D), *w = getf(in, "w", D);
    float *rstd = outf(out, "rstd", N);
    ops->rmsnorm_forward(ops, outf(out, "out", N * D), rstd, x, w, N, D, getf(in, "fopts", 1)[0]);
    ops->rmsnorm_backward(ops, outf(out, "dx", N * D), outf(out, "dw", D), getf(in, "dout", N * D), x, w, rstd, N, D);
}

// dims: N F; gate_up, dout -> out, dgate_up
static void run_swiglu(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 2);
    int64_t N = d[0], F = d[1];
    const float *gu = getf(in, "gate_up", N * 2 * F);
    ops->swiglu_forward(ops, outf(out, "out", N * F), gu, N, F);
    ops->swiglu_backward(ops, outf(out, "dgate_up", N * 2 * F), getf(in, "dout", N * F), gu, N, F);
}

// dims: B T H hd off Dr; x, cos, sin, dout -> y, dx
static void run_rope(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 6);
    int64_t B = d[0], T = d[1], H = d[2], hd = d[3], off = d[4], Dr = d[5], n = B * T * H * hd;
    const float *cs = getf(in, "cos", T * Dr / 2), *sn = getf(in, "sin", T * Dr / 2);
    float *y = outf(out, "y", n), *dx = outf(out, "dx", n);
    memcpy(y, getf(in, "x", n), sizeof(float) * (size_t)n);
    memcpy(dx, getf(in, "dout", n), sizeof(float) * (size_t)n);
    ops->rope_forward(ops, y, cs, sn, B, T, H, hd, off, Dr);
    ops->rope_backward(ops, dx, cs, sn, B, T, H, hd, off, Dr);
}

// dims: B T H Dn Dr Dv; fopts: scale; q, kv, k_pe, dout -> out, lse, dq, dkv, dk_pe
static void run_attention(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 6);
    int64_t B = d[0], T = d[1], H = d[2], Dn = d[3], Dr = d[4], Dv = d[5];
    float scale = getf(in, "fopts", 1)[0];
    const float *q = getf(in, "q", B * T * H * (Dn + Dr)), *kv = getf(in, "kv", B * T * H * (Dn + Dv));
    const float *kpe = getf(in, "k_pe", B * T * Dr);
    float *o = outf(out, "out", B * T * H * Dv), *lse = outf(out, "lse", B * H * T);
    ops->attention_forward(ops, o, lse, q, kv, kpe, B, T, H, Dn, Dr, Dv, scale);
    float *scratch = nm_malloc(sizeof(float) * (size_t)(B * H * T * Dr + 1));
    ops->attention_backward(ops, outf(out, "dq", B * T * H * (Dn + Dr)), outf(out, "dkv", B * T * H * (Dn + Dv)),
                            outf(out, "dk_pe", B * T * Dr), scratch, getf(in, "dout", B * T * H * Dv), q, kv, kpe,
                            o, lse, B, T, H, Dn, Dr, Dv, scale);
    nm_free(scratch);
}

// dims: N V; fopts: scale; logits, targets -> losses, lse, dlogits
static void run_xent(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 2);
    int64_t N = d[0], V = d[1];
    const float *lg = getf(in, "logits", N * V);
    const int32_t *tg = geti(in, "targets", N);
    float *lse = outf(out, "lse", N);
    ops->xent_forward(ops, outf(out, "losses", N), lse, lg, tg, N, V);
    ops->xent_backward(ops, outf(out, "dlogits", N * V), lg, lse, tg, getf(in, "fopts", 1)[0], N, V);
}

// dims: N E K G Gk scoring method norm has_bias; fopts: routed_scaling;
// logits, bias, dtopk_weight -> topk_idx, topk_weight, scores, dlogits
static void run_router(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 9);
    nm_router_params p = {d[0], d[1], d[2], d[3], d[4], (nm_scoring)d[5], (nm_topk_method)d[6], d[7],
                          getf(in, "fopts", 1)[0]};
    int32_t *idx = outi(out, "topk_idx", p.N * p.K);
    float *s = outf(out, "scores", p.N * p.E);
    ops->router_forward(ops, idx, outf(out, "topk_weight", p.N * p.K), s, getf(in, "logits", p.N * p.E),
                        d[8] ? getf(in, "bias", p.E) : NULL, &p);
    ops->router_backward(ops, outf(out, "dlogits", p.N * p.E), getf(in, "dtopk_weight", p.N * p.K), s, idx, &p);
}

// dims: B T E K scoring; fopts: dloss; logits -> scores, f, loss (f64), dlogits
static void run_balance(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 5);
    int64_t B = d[0], T = d[1], E = d[2], K = d[3];
    nm_scoring sc = (nm_scoring)d[4];
    // scores through router_forward (its selection outputs are not needed here)
    nm_router_params p = {B * T, E, K, 1, 1, sc, NM_TOPK_GREEDY, 0, 1.0f};
    float *s = outf(out, "scores", B * T * E), *f = outf(out, "f", B * E);
    int32_t *idx = nm_malloc(sizeof(int32_t) * (size_t)(B * T * K + 1));
    float *w = nm_malloc(sizeof(float) * (size_t)(B * T * K + 1));
    ops->router_forward(ops, idx, w, s, getf(in, "logits", B * T * E), NULL, &p);
    double *loss = add_out(out, "loss", DT_F64, 1);
    loss[0] = ops->balance_loss_forward(ops, f, s, B, T, E, K);
    ops->balance_loss_backward(ops, outf(out, "dlogits", B * T * E), getf(in, "fopts", 1)[0], f, s, B, T, E, K, sc);
    nm_free(idx);
    nm_free(w);
}

// dims: N K E D; topk_idx, src, expert_out, topk_weight, y0, dy, ddst
//   -> offsets, perm, gathered, gathered_bf16 (moe_gather_bf16's fp32 storage) and
//      gathered_bf16_copy (its bf16 copy, widened), y, dexpert_out, dtopk_weight, dsrc
static void run_moe(const nm_ops *ops, tensor_set *in, tensor_set *out) {
    const int32_t *d = geti(in, "dims", 4);
    int64_t N = d[0], K = d[1], E = d[2], D = d[3];
    int32_t *perm = outi(out, "perm", N * K);
    ops->moe_permute(ops, outi(out, "offsets", E + 1), perm, geti(in, "topk_idx", N * K), N, K, E);
    ops->moe_gather(ops, outf(out, "gathered", N * K * D), getf(in, "src", N * D), perm, N, K, D);
    float *copy = outf(out, "gathered_bf16_copy", N * K * D);
    uint16_t *bits = nm_malloc(sizeof(uint16_t) * (size_t)(N * K * D + 1));
    ops->moe_gather_bf16(ops, outf(out, "gathered_bf16", N * K * D), bits, getf(in, "src", N * D), perm, N, K, D);
    for (int64_t i = 0; i < N * K * D; i++) {
        uint32_t u = (uint32_t)bits[i] << 16;
        memcpy(&copy[i], &u, sizeof u);
    }
    nm_free(bits);
    float *y = outf(out, "y", N * D);
    memcpy(y, getf(in, "y0", N * D), sizeof(float) * (size_t)(N * D));
    const float *eo = getf(in, "expert_out", N * K * D), *tw = getf(in, "topk_weight", N * K);
    ops->moe_combine_forward(ops, y, eo, tw, perm, N, K, D);
    ops->moe_combine_backward(ops, outf(out, "dexpert_out", N * K * D), outf(out, "dtopk_weight", N * K),
                              getf(in, "dy", N * D), eo, tw, perm, N, K, D);
    ops->moe_scatter_add(ops, outf(out, "dsrc", N * D), getf(in, "ddst", N * K * D), perm, N, K, D);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s <op> <in.bin> <out.bin>\n", argv[0]);
        return 2;
    }
    static const struct {
        const char *name;
        void (*run)(const nm_ops *, tensor_set *, tensor_set *);
    } table[] = {
        {"gemm", run_gemm},   {"embedding", run_embedding}, {"rmsnorm", run_rmsnorm}, {"swiglu", run_swiglu},
        {"rope", run_rope},   {"attention", run_attention}, {"xent", run_xent},       {"router", run_router},
        {"balance", run_balance}, {"moe", run_moe},
    };
    nm_error err;
    const nm_ops *ops;
    if (nm_backend_select(&ops, NULL, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    static tensor_set in, out;
    char *buf;
    read_set(&in, argv[2], &buf);
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcmp(argv[1], table[i].name)) continue;
        table[i].run(ops, &in, &out);
        write_set(&out, argv[3]);
        for (int j = 0; j < in.count; j++) nm_free(in.t[j].data);
        for (int j = 0; j < out.count; j++) nm_free(out.t[j].data);
        nm_free(buf);
        nm_backend_destroy(ops);
        return 0;
    }
    fprintf(stderr, "unknown op %s\n", argv[1]);
    nm_backend_destroy(ops);
    return 2;
}
