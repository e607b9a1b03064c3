// kernels.c: picks the CPU GEMM kernels by timing them on the model's own GEMMs (issue 12).
//
// Why measured, not read off feature flags: on an AVX512-BF16 Zen 4 without AMX oneDNN's bf16
// brgemm runs ~1.5x the fp32 peak, where on an AVX512-BF16 Xeon it ran below it; no flag
// tells the two apart. Why one kernel per precision over the whole shape set, not one per
// shape: both libraries round differently, so per-shape picks would make a run's numerics
// depend on which shape won by a few percent on a noisy machine; one pick per precision is
// one code path, and the totals are dominated by the few largest GEMMs either way.
//
// The shapes: for every weight (out, in) of one step (attention projections, dense MLP, the
// routed experts at rows * K / E rows each, shared experts, head) the forward NT GEMM
// (rows, out, in), the input gradient NN (rows, in, out) and the weight gradient TN
// (out, in, rows), each weighted by how many layers have it; rows capped at 512 for the
// timing. Each (candidate, shape) runs once to warm up (oneDNN JITs per shape) and is then
// timed once; the total cost is printed in the banner (budget: ~1 s for
// configs/small-train.json on 2 loaded cores, ~4 s on 2 cores for it uncapped).
//
// Determinism: the pick is written to run_dir/kernels.json with a key of the CPU model, the
// oneDNN version, OpenBLAS's config string, the thread count and the shape set; a later
// start with the same key reads the pick back instead of measuring again. Two separate fresh
// runs may pick differently (and so differ in the last bits); NM_CPU_KERNELS=default takes the
// static defaults (oneDNN sgemm; bf16 oneDNN with AMX, else widen) without measuring, as the
// test suite does.
#include "train/kernels.h"

#include <cblas.h>
#include <cjson/cJSON.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "io/fileio.h"
#include "ops/cpu/cpu_ops.h"

typedef struct shape {
    nm_transpose ta, tb;
    int64_t M, N, K, count;
} shape;

enum { MAX_SHAPES = 64 };

typedef struct shape_set {
    shape s[MAX_SHAPES];
    int n;
} shape_set;

static void add_shape(shape_set *set, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K,
                      int64_t count) {
    if (M <= 0 || N <= 0 || K <= 0 || count <= 0) return;
    for (int i = 0; i < set->n; i++) {
        shape *x = &set->s[i];
        if (x->ta == ta && x->tb == tb && x->M == M && x->N == N && x->K == K) {
            x->count += count;
            return;
        }
    }
    if (set->n < MAX_SHAPES) set->s[set->n++] = (shape){ta, tb, M, N, K, count};
}

// One weight W(out, in) applied to `rows` rows in `count` places: forward, dX, dW.
static void add_linear(shape_set *set, int64_t rows, int64_t out, int64_t in, int64_t count) {
    add_shape(set, NM_NO_TRANS, NM_TRANS, rows, out, in, count);
    add_shape(set, NM_NO_TRANS, NM_NO_TRANS, rows, in, out, count);
    add_shape(set, NM_TRANS, NM_NO_TRANS, out, in, rows, count);
}

static void model_shapes(shape_set *set, const nm_model_config *m, int64_t rows, int64_t tokens) {
    set->n = 0;
    int64_t nl = m->n_layers, n_moe = 0;
    for (int64_t l = 0; l < nl; l++) n_moe += nm_layer_is_moe(m, l);
    int64_t n_dense = nl - n_moe;
    if (m->Rq > 0) {
        add_linear(set, rows, m->Rq, m->D, nl);
        add_linear(set, rows, m->H * m->Dqk, m->Rq, nl);
    } else {
        add_linear(set, rows, m->H * m->Dqk, m->D, nl);
    }
    add_linear(set, rows, m->Rkv + m->Dr, m->D, nl);
    add_linear(set, rows, m->H * (m->Dn + m->Dv), m->Rkv, nl);
    add_linear(set, rows, m->D, m->H * m->Dv, nl);
    add_linear(set, rows, m->F, m->D, 2 * n_dense);  // gate and up
    add_linear(set, rows, m->D, m->F, n_dense);
    if (n_moe > 0 && m->E > 0) {
        int64_t per = (tokens * m->K + m->E - 1) / m->E;  // rows per expert in the step itself
        add_linear(set, per, m->Fe, m->D, 2 * n_moe * m->E);
        add_linear(set, per, m->D, m->Fe, n_moe * m->E);
        add_linear(set, rows, m->Fs, m->D, 2 * n_moe);
        add_linear(set, rows, m->D, m->Fs, n_moe);
    }
    add_linear(set, rows, m->V, m->D, 1 + m->M);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Seconds one step's GEMMs take (sum over shapes of one timed run after a warm-up, times count) with the kernel
// currently set; bf16 selects nm_cpu_gemm_bf16 on bf16 operands.
static double time_set(const shape_set *set, int bf16, float *a, float *b, float *c, double *flops) {
    double total = 0;
    *flops = 0;
    for (int i = 0; i < set->n; i++) {
        const shape *x = &set->s[i];
        int64_t lda = x->ta == NM_NO_TRANS ? x->K : x->M, ldb = x->tb == NM_NO_TRANS ? x->N : x->K;
        double best = 1e30;
        for (int r = 0; r < 2; r++) {
            double t0 = now_s();
            if (bf16)
                nm_cpu_gemm_bf16(x->ta, x->tb, x->M, x->N, x->K, 1.0f, a, NM_BF16, lda, b, NM_BF16, ldb, 0.0f, c,
                                 x->N);
            else
                nm_cpu_gemm(x->ta, x->tb, x->M, x->N, x->K, 1.0f, a, lda, b, ldb, 0.0f, c, x->N);
            double dt = now_s() - t0;
            if (r > 0 && dt < best) best = dt;
        }
        total += best * (double)x->count;
        *flops += 2.0 * (double)x->M * (double)x->N * (double)x->K * (double)x->count;
    }
    return total;
}

static void cpu_model(char *out, size_t n) {
    snprintf(out, n, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *v = strchr(line, ':');
            if (v) {
                v += 1 + (v[1] == ' ');
                v[strcspn(v, "\n")] = 0;
                snprintf(out, n, "%s", v);
            }
            break;
        }
    }
    fclose(f);
}

static void make_key(char *key, size_t n, const shape_set *set) {
    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    const dnnl_version_t *v = dnnl_version();
    int len = snprintf(key, n, "%s | oneDNN %d.%d.%d | %s | %d threads | shapes", cpu, v->major, v->minor,
                       v->patch, openblas_get_config(), omp_get_max_threads());
    for (int i = 0; i < set->n && len > 0 && (size_t)len < n; i++) {
        const shape *x = &set->s[i];
        len += snprintf(key + len, n - (size_t)len, " %c%c%lldx%lldx%lld*%lld", x->ta == NM_TRANS ? 'T' : 'N',
                        x->tb == NM_TRANS ? 'T' : 'N', (long long)x->M, (long long)x->N, (long long)x->K,
                        (long long)x->count);
    }
}

static int forced(const char *var) {
    const char *v = getenv(var);
    return v && *v && strcmp(v, "auto") != 0;
}

// Reads a cached pick: 1 when it applies (same key), 0 when absent or for another key, -1
// (err naming the file) when it does not parse.
static int read_cache(const char *path, const char *key, char *fp32, char *bf16, nm_error *err) {
    char *text;
    size_t size;
    nm_error ignore;
    if (nm_file_read_all(path, &text, &size, &ignore) != 0) return 0;
    cJSON *j = cJSON_ParseWithLength(text, size);
    nm_free(text);
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(j, "key");
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "fp32");
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "bf16");
    int ok = cJSON_IsObject(j) && cJSON_IsString(k) && cJSON_IsString(f) && cJSON_IsString(b) &&
             (strcmp(f->valuestring, "onednn") == 0 || strcmp(f->valuestring, "openblas") == 0) &&
             (strcmp(b->valuestring, "onednn") == 0 || strcmp(b->valuestring, "widen") == 0);
    if (!ok) {
        cJSON_Delete(j);
        return nm_error_set(err, "%s: not a kernel choice (expected a JSON object with string fields key, fp32 "
                            "onednn|openblas and bf16 onednn|widen); delete it to measure again", path);
    }
    int same = strcmp(k->valuestring, key) == 0;
    if (same) {
        snprintf(fp32, 16, "%s", f->valuestring);
        snprintf(bf16, 16, "%s", b->valuestring);
    }
    cJSON_Delete(j);
    return same;
}

static int write_cache(const char *path, const char *key, const char *fp32, const char *bf16, double g32[2],
                       double g16[2], nm_error *err) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "key", key);
    cJSON_AddStringToObject(j, "fp32", fp32);
    cJSON_AddStringToObject(j, "bf16", bf16);
    cJSON_AddNumberToObject(j, "fp32_onednn_gflops", g32[0]);
    cJSON_AddNumberToObject(j, "fp32_openblas_gflops", g32[1]);
    cJSON_AddNumberToObject(j, "bf16_onednn_gflops", g16[0]);
    cJSON_AddNumberToObject(j, "bf16_widen_gflops", g16[1]);
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    nm_atomic_file f;
    int rc = -1;
    if (nm_atomic_open(&f, path, err) == 0) {
        if (nm_fwrite_all(f.fp, text, strlen(text), path, err) == 0 && nm_fwrite_all(f.fp, "\n", 1, path, err) == 0)
            rc = nm_atomic_commit(&f, err);
        else
            nm_atomic_abort(&f);
    }
    free(text);
    return rc;
}

int nm_kernels_choose(const nm_model_config *m, int64_t rows, const char *run_dir, int measure, char *desc,
                      size_t desc_size, nm_error *err) {
    shape_set set;
    // The token dimension is capped for the timing (the pick, not the step, is what is
    // measured): 512 rows keep every GEMM in the same blocking regime while the whole
    // measurement stays well under a second for configs/small-train.json at full speed.
    model_shapes(&set, m, rows < 512 ? rows : 512, rows);
    char key[4096], path[4200];
    make_key(key, sizeof key, &set);
    snprintf(path, sizeof path, "%s/kernels.json", run_dir);
    char fp32[16], bf16[16];
    int cached = read_cache(path, key, fp32, bf16, err);
    if (cached < 0) return -1;
    int force32 = forced("NM_CPU_GEMM"), force16 = forced("NM_CPU_BF16_GEMM");
    const char *how = getenv("NM_CPU_KERNELS");
    if (how && *how && strcmp(how, "default") == 0) measure = 0;
    else if (how && *how && strcmp(how, "measure") != 0)
        return nm_error_set(err, "environment variable NM_CPU_KERNELS=%s: expected measure or default", how);
    double g32[2] = {0, 0}, g16[2] = {0, 0}, spent = 0;
    if (!cached && measure) {
        int64_t na = 0, nb = 0, nc = 0;
        for (int i = 0; i < set.n; i++) {
            const shape *x = &set.s[i];
            if (x->M * x->K > na) na = x->M * x->K;
            if (x->K * x->N > nb) nb = x->K * x->N;
            if (x->M * x->N > nc) nc = x->M * x->N;
        }
        float *a = nm_aligned_alloc((size_t)na * sizeof(float));
        float *b = nm_aligned_alloc((size_t)nb * sizeof(float));
        float *c = nm_aligned_alloc((size_t)nc * sizeof(float));
        for (int64_t i = 0; i < na; i++) a[i] = (float)(i % 7) * 0.1f;
        for (int64_t i = 0; i < nb; i++) b[i] = (float)(i % 5) * 0.1f;
        double t0 = now_s(), flops = 0;
        const char *lib[2] = {"onednn", "openblas"}, *k16[2] = {"onednn", "widen"};
        double t32[2], t16[2];
        snprintf(fp32, sizeof fp32, "%s", "onednn");
        snprintf(bf16, sizeof bf16, "%s", "onednn");
        if (!force32) {
            for (int i = 0; i < 2; i++) {
                nm_cpu_gemm_set_library(lib[i]);
                t32[i] = time_set(&set, 0, a, b, c, &flops);
                g32[i] = flops / t32[i] / 1e9;
            }
            snprintf(fp32, sizeof fp32, "%s", t32[0] <= t32[1] ? lib[0] : lib[1]);
            nm_cpu_gemm_set_library(fp32);  // widen runs on the fp32 library just chosen
        }
        // bf16 operands: the fp32 buffers reinterpreted hold finite bf16 values (halves of
        // small floats), so the timing sees no NaN or denormal slow paths.
        if (!force16) {
            for (int i = 0; i < 2; i++) {
                nm_cpu_gemm_bf16_set_kernel(k16[i]);
                t16[i] = time_set(&set, 1, a, b, c, &flops);
                g16[i] = flops / t16[i] / 1e9;
            }
            snprintf(bf16, sizeof bf16, "%s", t16[0] <= t16[1] ? k16[0] : k16[1]);
        }
        spent = now_s() - t0;
        nm_free(a);
        nm_free(b);
        nm_free(c);
        if (write_cache(path, key, fp32, bf16, g32, g16, err) != 0) return -1;
    } else if (!cached) {
        snprintf(fp32, sizeof fp32, "%s", "onednn");
        snprintf(bf16, sizeof bf16, "%s", nm_cpu_gemm_bf16_kernel());
    }
    // A forced kernel wins over the measurement and the cache: its setter is never called,
    // so the library's own lazy parse of the variable decides it (and rejects a bad value).
    if (!force32) nm_cpu_gemm_set_library(fp32);
    if (!force16) nm_cpu_gemm_bf16_set_kernel(bf16);
    if (cached)
        snprintf(desc, desc_size, "kernels fp32 %s, bf16 %s (from %s)%s", nm_cpu_gemm_library(),
                 nm_cpu_gemm_bf16_kernel(), path, force32 || force16 ? " | forced by environment" : "");
    else if (measure)
        snprintf(desc, desc_size,
                 "kernels fp32 %s, bf16 %s measured on %d model GEMM shapes in %.2f s: fp32 onednn %.0f / openblas "
                 "%.0f GFLOP/s, bf16 onednn %.0f / widen %.0f GFLOP/s%s",
                 nm_cpu_gemm_library(), nm_cpu_gemm_bf16_kernel(), set.n, spent, g32[0], g32[1], g16[0], g16[1],
                 force32 || force16 ? " | forced by environment" : "");
    else
        snprintf(desc, desc_size, "kernels fp32 %s, bf16 %s (defaults, not measured)", nm_cpu_gemm_library(),
                 nm_cpu_gemm_bf16_kernel());
    return 0;
}
