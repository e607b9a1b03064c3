// tuning.c: the CPU backend's tuning hooks (ops.h): the GEMM kernels picked by timing them on
// the model's own GEMMs (issue 12), the square-GEMM peak the MFU is against, and the process
// environment OpenBLAS and libgomp need.
//
// Why measured, not read off feature flags: on an AVX512-BF16 Zen 4 without AMX oneDNN's bf16
// brgemm runs ~1.5x the fp32 peak, where on an AVX512-BF16 Xeon it ran below it; no flag
// tells the two apart. Why one kernel per precision over the whole shape set, not one per
// shape: both libraries round differently, so per-shape picks would make a run's numerics
// depend on which shape won by a few percent on a noisy machine; one pick per precision is
// one code path, and the totals are dominated by the few largest GEMMs either way.
//
// The shapes are the GEMM calls of one step as the model makes them (nm_model_gemm_shapes,
// src/model/gemm_shapes.c: every weight's forward, input- and weight-gradient GEMM; the routed
// experts as the grouped calls moe.c makes), with the operand types each kernel gets (bf16:
// fp32 dense activations, the experts' activations already rounded, the weight copy in the
// kernel's own storage). Timing a single expert GEMM instead would miss that the grouped call runs one expert per
// thread: it once picked oneDNN's bf16 matmul over widen by 2% on an AVX512-BF16 Xeon where
// the step then ran 437 against 745 tokens/s. Rows are capped at 512 for the timing. Each
// (candidate, shape) runs once to warm up (oneDNN JITs per shape) and is then timed three
// times, alternating with the other candidate, the fastest kept; the total cost is printed
// in the banner. The default (oneDNN fp32; bf16 oneDNN with AMX, else widen) stays unless the
// other candidate is at least 3% faster over the step (NM_KERNEL_MARGIN).
//
// Determinism: the pick is written to run_dir/kernels.json with a key of the CPU model, the
// oneDNN version, OpenBLAS's config string, the thread count and the shape set; a later
// start with the same key reads the pick back instead of measuring again. Two separate fresh
// runs may pick differently (and so differ in the last bits); NM_CPU_KERNELS=default takes the
// static defaults (oneDNN sgemm; bf16 oneDNN with AMX, else widen) without measuring, as the
// test suite does.

#define _GNU_SOURCE  // setenv, execv, strcasecmp

#include <cblas.h>
#include <cjson/cJSON.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "core/fileio.h"
#include "ops/cpu/cpu_ops.h"

typedef nm_gemm_shape shape;

typedef struct shape_set {
    const shape *s;
    int n;
} shape_set;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct timing_buffers {
    float *a, *b, *c;           // the largest A, B, C of the set (all groups of a call side by side)
    nm_gemm_group *groups;
} timing_buffers;

// One call of shape x: fp32 (bf16 == 0) or bf16 with the operand types the model passes
// (weights in w_type, the kernel's gemm_bf16_weight_type).
static void run_shape(const nm_ops *be, const shape *x, int bf16, nm_dtype w_type, const timing_buffers *t) {
    int64_t lda = x->ta == NM_NO_TRANS ? x->K : x->M, ldb = x->tb == NM_NO_TRANS ? x->N : x->K;
    nm_dtype act = x->rounded ? NM_F32_BF16 : NM_F32;
    nm_dtype a_type = act, b_type = x->b_is_weight ? w_type : act;
    if (x->groups == 1) {
        if (bf16)
            nm_cpu_gemm_bf16(be, x->ta, x->tb, x->M, x->N, x->K, 1.0f, t->a, a_type, lda, t->b, b_type, ldb, 0.0f, t->c,
                             x->N);
        else
            nm_cpu_gemm(be, x->ta, x->tb, x->M, x->N, x->K, 1.0f, t->a, lda, t->b, ldb, 0.0f, t->c, x->N);
        return;
    }
    for (int64_t g = 0; g < x->groups; g++) {
        t->groups[g] = (nm_gemm_group){.M = x->M, .N = x->N, .K = x->K, .A = t->a + g * x->M * x->K, .lda = lda,
                                       .B = t->b + g * x->K * x->N, .ldb = ldb, .C = t->c + g * x->M * x->N,
                                       .ldc = x->N};
    }
    if (bf16) nm_cpu_gemm_bf16_grouped(be, x->ta, x->tb, 1.0f, 0.0f, t->groups, x->groups, a_type, b_type);
    else nm_cpu_gemm_grouped(be, x->ta, x->tb, 1.0f, 0.0f, t->groups, x->groups);
}

// Seconds one step's GEMMs take under each of two candidates (fp32: the libraries; bf16: the
// kernels), into total[2]: per shape the best of three timed calls each after a warm-up
// (oneDNN JITs per shape), times its count. The candidates alternate call by call, so a burst
// of load on a shared machine slows both rather than the one being timed: timed one whole set
// after the other, a pick flipped between runs of the same binary (bf16 on tiny: onednn 122 /
// widen 119 GFLOP/s in one run, 113 / 224 in the next).
static void time_set(const nm_ops *be, const shape_set *set, int bf16, const char *const names[2],
                     const timing_buffers *t, double total[2], double *flops) {
    total[0] = total[1] = 0;
    *flops = 0;
    for (int i = 0; i < set->n; i++) {
        const shape *x = &set->s[i];
        double best[2] = {1e30, 1e30};
        for (int r = 0; r < 4; r++) {
            for (int k = 0; k < 2; k++) {
                if (bf16) nm_cpu_gemm_bf16_set_kernel(be, names[k]);
                else nm_cpu_gemm_set_library(be, names[k]);
                nm_dtype w_type = bf16 ? nm_cpu_gemm_bf16_weight_type(be) : NM_F32;
                double t0 = now_s();
                run_shape(be, x, bf16, w_type, t);
                double dt = now_s() - t0;
                if (r > 0 && dt < best[k]) best[k] = dt;
            }
        }
        for (int k = 0; k < 2; k++) total[k] += best[k] * (double)x->count;
        *flops += 2.0 * (double)x->M * (double)x->N * (double)x->K * (double)x->groups * (double)x->count;
    }
}

// A candidate replaces the default only when it is at least this much faster over the step:
// two kernels within a few percent are a coin flip on a shared machine (fp32 onednn 168 /
// openblas 173 GFLOP/s in one bench run, 204 / 198 in the next), and each flip changes a fresh
// run's rounding; keeping the default then makes fresh runs on one machine alike.
#define NM_KERNEL_MARGIN 0.03

// Index of the pick among two timed candidates (seconds t), def the default's index.
static int pick(const double t[2], int def) {
    int other = 1 - def;
    return t[other] < t[def] * (1.0 - NM_KERNEL_MARGIN) ? other : def;
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
    // The ISA is oneDNN's effective one: ONEDNN_MAX_CPU_ISA changes it (and which kernels
    // exist) without changing the CPU's name.
    int len = snprintf(key, n, "%s | oneDNN %d.%d.%d isa %s | %s | %d threads | shapes", cpu, v->major, v->minor,
                       v->patch, nm_cpu_isa_name(), openblas_get_config(), omp_get_max_threads());
    for (int i = 0; i < set->n && len > 0 && (size_t)len < n; i++) {
        const shape *x = &set->s[i];
        len += snprintf(key + len, n - (size_t)len, " %c%c%lldx%lldx%lld/%lld*%lld", x->ta == NM_TRANS ? 'T' : 'N',
                        x->tb == NM_TRANS ? 'T' : 'N', (long long)x->M, (long long)x->N, (long long)x->K,
                        (long long)x->groups, (long long)x->count);
    }
}

static int forced(const char *var) {
    const char *v = getenv(var);
    return v && *v && strcmp(v, "auto") != 0;
}

// Reads a cached pick: 1 when it applies (same key), 0 when absent or for another key, -1
// (err naming the file) when it does not parse (nm_kernels_parse).
static int read_cache(const char *path, const char *key, char *fp32, char *bf16, nm_error *err) {
    char *text;
    size_t size;
    nm_error ignore;
    if (nm_file_read_all(path, &text, &size, &ignore) != 0) return 0;
    int rc = nm_kernels_parse(text, size, path, key, fp32, bf16, err);
    nm_free(text);
    return rc;
}

static int write_cache(const char *path, const char *key, const char *fp32, const char *bf16, double g32[2],
                       double g16[2], nm_error *err) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "key", key);
    cJSON_AddStringToObject(j, "fp32", fp32);
    cJSON_AddStringToObject(j, "bf16", bf16);
    cJSON_AddNumberToObject(j, "fp32_onednn_gflops", g32[0]);
    cJSON_AddNumberToObject(j, "fp32_openblas_gflops", g32[1]);
    if (g16[0] > 0) cJSON_AddNumberToObject(j, "bf16_onednn_gflops", g16[0]);
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

int nm_cpu_tune(const nm_ops *be, const nm_gemm_shape *shapes, int n_shapes, const char *run_dir, int measure,
                char *desc, size_t desc_size, nm_error *err) {
    const shape_set set = {shapes, n_shapes};
    char key[4096], path[4200];
    make_key(key, sizeof key, &set);
    snprintf(path, sizeof path, "%s/kernels.json", run_dir ? run_dir : "");
    char fp32[NM_KERNEL_NAME_SIZE], bf16[NM_KERNEL_NAME_SIZE];
    // no directory: nothing to read back or keep, so no measurement either (its pick would be
    // lost, and a later run could not take the same kernels)
    int cached = run_dir ? read_cache(path, key, fp32, bf16, err) : 0;
    if (!run_dir) measure = 0;
    if (cached < 0) return -1;
    int force32 = forced("NM_CPU_GEMM"), force16 = forced("NM_CPU_BF16_GEMM");
    const char *how = getenv("NM_CPU_KERNELS");
    if (how && *how && strcmp(how, "default") == 0) measure = 0;
    else if (how && *how && strcmp(how, "measure") != 0)
        return nm_error_set(err, "environment variable NM_CPU_KERNELS=%s: expected measure or default", how);
    double g32[2] = {0, 0}, g16[2] = {0, 0}, spent = 0;
    // oneDNN 2.6 has no bf16 matmul below AVX-512: that candidate is then skipped, not timed.
    char why16[1024] = "";
    int onednn16 = nm_cpu_gemm_bf16_onednn_usable(be, why16, sizeof why16);
    if (!cached && measure) {
        int64_t na = 0, nb = 0, nc = 0, ng = 1;
        for (int i = 0; i < set.n; i++) {
            const shape *x = &set.s[i];
            if (x->groups * x->M * x->K > na) na = x->groups * x->M * x->K;
            if (x->groups * x->K * x->N > nb) nb = x->groups * x->K * x->N;
            if (x->groups * x->M * x->N > nc) nc = x->groups * x->M * x->N;
            if (x->groups > ng) ng = x->groups;
        }
        timing_buffers tb = {
            .a = nm_aligned_alloc((size_t)na * sizeof(float)),
            .b = nm_aligned_alloc((size_t)nb * sizeof(float)),
            .c = nm_aligned_alloc((size_t)nc * sizeof(float)),
            .groups = nm_malloc((size_t)ng * sizeof(nm_gemm_group)),
        };
        // multiples of 0.125 up to 0.75: exact in bf16, so NM_F32_BF16 operands hold what they claim
        for (int64_t i = 0; i < na; i++) tb.a[i] = (float)(i % 7) * 0.125f;
        for (int64_t i = 0; i < nb; i++) tb.b[i] = (float)(i % 5) * 0.125f;
        double t0 = now_s(), flops = 0;
        const char *lib[2] = {"onednn", "openblas"}, *k16[2] = {"onednn", "widen"};
        double t32[2], t16[2];
        int def16 = strcmp(nm_cpu_gemm_bf16_kernel(be), "widen") == 0;  // the static default's index in k16
        snprintf(fp32, sizeof fp32, "%s", "onednn");
        snprintf(bf16, sizeof bf16, "%s", "onednn");
        if (!force32) {
            time_set(be, &set, 0, lib, &tb, t32, &flops);
            for (int i = 0; i < 2; i++) g32[i] = flops / t32[i] / 1e9;
            snprintf(fp32, sizeof fp32, "%s", lib[pick(t32, 0)]);
            nm_cpu_gemm_set_library(be, fp32);  // widen runs on the fp32 library just chosen
        }
        // bf16 weights (NM_BF16): the fp32 buffer reinterpreted holds finite bf16 values
        // (halves of small floats), so the timing sees no NaN or denormal slow paths.
        if (!force16 && onednn16) {
            time_set(be, &set, 1, k16, &tb, t16, &flops);
            for (int i = 0; i < 2; i++) g16[i] = flops / t16[i] / 1e9;
            snprintf(bf16, sizeof bf16, "%s", k16[pick(t16, def16)]);
        } else if (!force16) {
            snprintf(bf16, sizeof bf16, "%s", "widen");
        }
        spent = now_s() - t0;
        nm_free(tb.a);
        nm_free(tb.b);
        nm_free(tb.c);
        nm_free(tb.groups);
        if (write_cache(path, key, fp32, bf16, g32, g16, err) != 0) return -1;
    } else if (!cached) {
        snprintf(fp32, sizeof fp32, "%s", "onednn");
        snprintf(bf16, sizeof bf16, "%s", nm_cpu_gemm_bf16_kernel(be));
    }
    // A forced kernel wins over the measurement and the cache: its setter is never called,
    // so the library's own lazy parse of the variable decides it (and rejects a bad value).
    if (!force32) nm_cpu_gemm_set_library(be, fp32);
    if (!force16 && nm_cpu_gemm_bf16_set_kernel(be, bf16) != 0)
        return nm_error_set(err, "%s: bf16 kernel %s cannot run here (%s); delete the file to measure again", path,
                            bf16, why16);
    char note16[1100] = "";
    if (!onednn16) snprintf(note16, sizeof note16, " | bf16 onednn: not available on this CPU (%s)", why16);
    char rates16[96] = "";
    if (g16[0] > 0) snprintf(rates16, sizeof rates16, ", bf16 onednn %.0f / widen %.0f GFLOP/s", g16[0], g16[1]);
    if (cached)
        snprintf(desc, desc_size, "kernels fp32 %s, bf16 %s (from %s)%s%s", nm_cpu_gemm_library(be),
                 nm_cpu_gemm_bf16_kernel(be), path, force32 || force16 ? " | forced by environment" : "", note16);
    else if (measure)
        snprintf(desc, desc_size,
                 "kernels fp32 %s, bf16 %s measured on %d model GEMM shapes in %.2f s: fp32 onednn %.0f / openblas "
                 "%.0f GFLOP/s%s%s%s",
                 nm_cpu_gemm_library(be), nm_cpu_gemm_bf16_kernel(be), set.n, spent, g32[0], g32[1], rates16,
                 force32 || force16 ? " | forced by environment" : "", note16);
    else
        snprintf(desc, desc_size, "kernels fp32 %s, bf16 %s (defaults, not measured)%s", nm_cpu_gemm_library(be),
                 nm_cpu_gemm_bf16_kernel(be), note16);
    return 0;
}

// The peak the MFU is measured against: n = 2048 squares through the chosen kernels, a one-time
// ~0.25 s on 2 cores. Smaller squares understate it (oneDNN's sgemm reached 133 GFLOP/s at
// 1024^3 and ~190 at 1536^3 where it does 265-330 at 2048^3 and above, bench/peak); bench/peak.c
// measures both libraries over more sizes.
double nm_cpu_measure_peak(const nm_ops *be, int bf16) {
    double peak = nm_ops_time_square_gemm(be, 0, 2048);
    if (bf16) {
        double p16 = nm_ops_time_square_gemm(be, 1, 2048);
        if (p16 > peak) peak = p16;
    }
    return peak;
}

char *openblas_get_corename(void);

// Two process-level settings that must be in the environment before the libraries load, so
// they are set here and the program re-executes itself once (only when something changes):
//  - OpenBLAS (0.3.21, DYNAMIC_ARCH) picks its kernels from a list of known CPU models; a
//    virtualised recent Xeon reports a generic model and gets the Prescott (SSE3) kernels,
//    several times slower than the AVX-512 ones the CPU has. OPENBLAS_CORETYPE fixes it.
//  - how long libgomp's idle threads spin before sleeping between parallel regions. A step
//    runs thousands of short regions (every GEMM, every elementwise op), so sleeping at once
//    (OMP_WAIT_POLICY=passive) pays a futex wake-up each time, and spinning long (libgomp's
//    default 300,000 spins) takes the cores from working threads when the machine is shared.
//    configs/small.json, 2 threads, 2 cores (tokens/s): alone, passive ~900, 10,000 spins
//    ~1,050-1,150, 100,000 ~1,150; two runs sharing the cores, each: passive ~620, 10,000
//    ~560, 30,000 ~470, 100,000 ~380. So GOMP_SPINCOUNT=10000: most of the idle-machine gain,
//    -10% when oversubscribed. Users who set OMP_WAIT_POLICY or GOMP_SPINCOUNT keep theirs.
void nm_ops_cpu_prepare_process(char **argv) {
    int changed = 0;
    if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT")) {
        setenv("GOMP_SPINCOUNT", "10000", 1);
        changed = 1;
    }
    const char *core = openblas_get_corename();
    if (!getenv("OPENBLAS_CORETYPE") && core &&
        (!strcasecmp(core, "Prescott") || !strcasecmp(core, "Core2") || !strcasecmp(core, "Nehalem"))) {
        __builtin_cpu_init();
        const char *want = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : NULL;
        if (want) {
            setenv("OPENBLAS_CORETYPE", want, 1);
            changed = 1;
        }
    }
    if (changed) execv("/proc/self/exe", argv);  // on failure carry on as we are
}
