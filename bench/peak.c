// peak.c: the machine's GEMM peaks, the denominators of every "% of peak" in bench/run.sh.
//
//   fp32: square n x n x n for n in 1024..4096, best of R repetitions, at the given thread
//         count, through both libraries our fp32 GEMM can call (src/ops/cpu/gemm.c):
//         OpenBLAS's cblas_sgemm and oneDNN's dnnl_sgemm. The peak is the higher of the two,
//         so "% of peak" never flatters whichever library the model uses.
//   bf16: a oneDNN matmul with bf16 inputs and f32 accumulation/output (what AMX or
//         AVX512-BF16 accelerate, and what PyTorch's bf16 autocast calls on CPU), same sizes.
//         Built only when oneDNN's header was found (-DNM_HAVE_DNNL); otherwise it prints
//         "bf16 peak: unavailable" and no number.
//   memory: a STREAM-style triad (GB/s), the roof of the memory-bound ops.
//   shapes: the fp32 GEMM rate at the shapes of configs/small.json's training step
//         (micro-batch 8 x 257 tokens), which bounds what a perfect CPU path could reach.
//
// Usage: peak [--threads T] [--reps R] [--max-n N] [--no-shapes] | peak --core
// Output: human lines, then key=value lines (fp32_peak_gflops=..., bf16_peak_gflops=...,
// bf16_isa=...) that run.sh greps.
//
// Not here: a theoretical peak from clock x FMA units (a VM's clock is unknown and the
// measured number is what a kernel can actually reach).
#define _GNU_SOURCE
#include <cblas.h>
#include <cpuid.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef NM_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float *alloc_f32(size_t n) {
    float *p = NULL;
    if (posix_memalign((void **)&p, 64, n * sizeof(float)) != 0) {
        fprintf(stderr, "peak: out of memory (%zu floats)\n", n);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) p[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    return p;
}

// --- CPU features --------------------------------------------------------------------------

typedef struct cpu_features {
    int avx512f, avx512_bf16, amx_tile, amx_bf16;
} cpu_features;

static cpu_features detect_cpu(void) {
    cpu_features f = {0};
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.avx512f = (b >> 16) & 1;
        f.amx_bf16 = (d >> 22) & 1;
        f.amx_tile = (d >> 24) & 1;
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1;
    return f;
}

// --- fp32 through OpenBLAS or oneDNN ------------------------------------------------------

enum { LIB_OPENBLAS = 0, LIB_ONEDNN = 1 };

// Best GFLOP/s of R runs of C(M,N) = A(M,K) B(K,N)^T (the model's y = x W^T), or A B.
static double sgemm_gflops(int lib, int M, int N, int K, int reps, int trans_b) {
    float *A = alloc_f32((size_t)M * K), *B = alloc_f32((size_t)K * N), *C = alloc_f32((size_t)M * N);
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {  // +1: the first run warms caches and thread pools
        double t0 = now_s();
        if (lib == LIB_OPENBLAS) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A, K, B,
                        trans_b ? K : N, 0.0f, C, N);
        } else {
#ifdef NM_HAVE_DNNL
            if (dnnl_sgemm('N', trans_b ? 'T' : 'N', M, N, K, 1.0f, A, K, B, trans_b ? K : N, 0.0f, C, N) !=
                dnnl_success) {
                fprintf(stderr, "peak: dnnl_sgemm failed\n");
                exit(1);
            }
#else
            return -1.0;
#endif
        }
        double dt = now_s() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    free(A);
    free(B);
    free(C);
    return 2.0 * M * (double)N * K / best / 1e9;
}

// --- bf16 through oneDNN ------------------------------------------------------------------

#ifdef NM_HAVE_DNNL
#define DNNL_OK(x)                                                                       \
    do {                                                                                 \
        dnnl_status_t st_ = (x);                                                         \
        if (st_ != dnnl_success) {                                                       \
            fprintf(stderr, "peak: %s failed (status %d)\n", #x, (int)st_);              \
            return -1.0;                                                                 \
        }                                                                                \
    } while (0)

static const char *isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx (AMX bf16/int8)";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16 (AVX512-BF16)";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni (no bf16 dot; bf16 emulated)";
    case dnnl_cpu_isa_avx512_core: return "avx512_core (bf16 emulated)";
    case dnnl_cpu_isa_avx2: return "avx2 (bf16 emulated)";
    default: return "other";
    }
}

// Best GFLOP/s of R runs of a bf16 x bf16 -> f32 matmul (M,K) x (K,N). *impl receives the
// implementation oneDNN picked (e.g. "brg:avx512_core_bf16").
static double dnnl_bf16_gflops(dnnl_engine_t eng, dnnl_stream_t strm, int M, int N, int K, int reps,
                               char *impl, size_t impl_len) {
    dnnl_dims_t a_dims = {M, K}, b_dims = {K, N}, c_dims = {M, N};
    dnnl_primitive_desc_t pd;
#if DNNL_VERSION_MAJOR >= 3
    dnnl_memory_desc_t a_md, b_md, c_md;
    DNNL_OK(dnnl_memory_desc_create_with_tag(&a_md, 2, a_dims, dnnl_bf16, dnnl_ab));
    DNNL_OK(dnnl_memory_desc_create_with_tag(&b_md, 2, b_dims, dnnl_bf16, dnnl_ab));
    DNNL_OK(dnnl_memory_desc_create_with_tag(&c_md, 2, c_dims, dnnl_f32, dnnl_ab));
    DNNL_OK(dnnl_matmul_primitive_desc_create(&pd, eng, a_md, b_md, NULL, c_md, NULL));
    const dnnl_memory_desc_t pa = a_md, pb = b_md, pc = c_md;
#else
    dnnl_memory_desc_t a_md, b_md, c_md;
    DNNL_OK(dnnl_memory_desc_init_by_tag(&a_md, 2, a_dims, dnnl_bf16, dnnl_ab));
    DNNL_OK(dnnl_memory_desc_init_by_tag(&b_md, 2, b_dims, dnnl_bf16, dnnl_ab));
    DNNL_OK(dnnl_memory_desc_init_by_tag(&c_md, 2, c_dims, dnnl_f32, dnnl_ab));
    dnnl_matmul_desc_t desc;
    DNNL_OK(dnnl_matmul_desc_init(&desc, &a_md, &b_md, NULL, &c_md));
    DNNL_OK(dnnl_primitive_desc_create(&pd, &desc, NULL, eng, NULL));
    const dnnl_memory_desc_t *pa = &a_md, *pb = &b_md, *pc = &c_md;
#endif
    const char *info = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &info) == dnnl_success && info)
        snprintf(impl, impl_len, "%s", info);
    dnnl_primitive_t prim;
    DNNL_OK(dnnl_primitive_create(&prim, pd));
    dnnl_memory_t a_m, b_m, c_m;
    DNNL_OK(dnnl_memory_create(&a_m, pa, eng, DNNL_MEMORY_ALLOCATE));
    DNNL_OK(dnnl_memory_create(&b_m, pb, eng, DNNL_MEMORY_ALLOCATE));
    DNNL_OK(dnnl_memory_create(&c_m, pc, eng, DNNL_MEMORY_ALLOCATE));
    // Fill bf16 buffers with small finite values (the bit pattern of ~0.01..1.0).
    void *ap, *bp;
    dnnl_memory_get_data_handle(a_m, &ap);
    dnnl_memory_get_data_handle(b_m, &bp);
    for (size_t i = 0; i < (size_t)M * K; i++) ((uint16_t *)ap)[i] = (uint16_t)(0x3c00 + (i % 251));
    for (size_t i = 0; i < (size_t)K * N; i++) ((uint16_t *)bp)[i] = (uint16_t)(0x3c00 + (i % 241));
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, a_m}, {DNNL_ARG_WEIGHTS, b_m}, {DNNL_ARG_DST, c_m}};
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {
        double t0 = now_s();
        DNNL_OK(dnnl_primitive_execute(prim, strm, 3, args));
        DNNL_OK(dnnl_stream_wait(strm));
        double dt = now_s() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    dnnl_memory_destroy(a_m);
    dnnl_memory_destroy(b_m);
    dnnl_memory_destroy(c_m);
    dnnl_primitive_destroy(prim);
    dnnl_primitive_desc_destroy(pd);
#if DNNL_VERSION_MAJOR >= 3
    dnnl_memory_desc_destroy(a_md);
    dnnl_memory_desc_destroy(b_md);
    dnnl_memory_desc_destroy(c_md);
#endif
    return 2.0 * M * (double)N * K / best / 1e9;
}
#endif

// --- memory bandwidth ---------------------------------------------------------------------

// STREAM-style triad a = b + s*c over 3 x 32M floats (384 MiB, beyond the caches a VM
// usually shows), best of R; counts 12 bytes per element (no write-allocate).
static double triad_gbs(int reps) {
    const size_t n = (size_t)32 << 20;
    float *a = alloc_f32(n), *b = alloc_f32(n), *c = alloc_f32(n);
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {
        double t0 = now_s();
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) a[i] = b[i] + 0.5f * c[i];
        double dt = now_s() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    volatile float sink = a[n / 2];
    (void)sink;
    free(a);
    free(b);
    free(c);
    return 12.0 * (double)n / best / 1e9;
}

// --- main ---------------------------------------------------------------------------------

int main(int argc, char **argv) {
    int threads = 0, reps = 3, max_n = 4096, shapes = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--max-n") && i + 1 < argc) max_n = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-shapes")) shapes = 0;
        else if (!strcmp(argv[i], "--core")) {
            // What run.sh needs before anything else: the kernels OpenBLAS picked and the ISA.
            cpu_features f = detect_cpu();
            printf("openblas_core=%s avx512f=%d\n", openblas_get_corename(), f.avx512f);
            return 0;
        }
        else {
            fprintf(stderr, "usage: peak [--threads T] [--reps R] [--max-n N] [--no-shapes]\n");
            return 2;
        }
    }
    if (threads <= 0) threads = omp_get_num_procs();
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    cpu_features f = detect_cpu();
    const char *core = openblas_get_corename();
    printf("cpu: avx512f=%d avx512_bf16=%d amx_tile=%d amx_bf16=%d | threads %d | OpenBLAS %s | kernels %s\n",
           f.avx512f, f.avx512_bf16, f.amx_tile, f.amx_bf16, threads, openblas_get_config(), core);
    // OpenBLAS's DYNAMIC_ARCH picks kernels from the CPU model number; a model newer than the
    // library (e.g. Emerald Rapids, model 207, under Debian 12's 0.3.21) falls back to the
    // SSE3 "Prescott" kernels, 4-6x slower than the AVX-512 ones on the same machine.
    if (f.avx512f && (!strcmp(core, "Prescott") || !strcmp(core, "Core2") || !strcmp(core, "Nehalem")))
        printf("warning: OpenBLAS chose the %s kernels on an AVX-512 CPU; set OPENBLAS_CORETYPE=SkylakeX "
               "(or Cooperlake) before the process starts\n", core);
    printf("openblas_core=%s\n", core);

#ifdef NM_HAVE_DNNL
    const int n_libs = 2;
#else
    const int n_libs = 1;
#endif
    static const char *lib_name[2] = {"openblas", "onednn"};
    double fp32_best = 0.0, lib_best[2] = {0.0, 0.0};
    for (int n = 1024; n <= max_n; n += 1024) {
        for (int lib = 0; lib < n_libs; lib++) {
            double g = sgemm_gflops(lib, n, n, n, n >= 3072 ? (reps > 2 ? 2 : reps) : reps, 0);
            printf("fp32 sgemm   n=%-5d %-8s %8.1f GFLOP/s\n", n, lib_name[lib], g);
            if (g > lib_best[lib]) lib_best[lib] = g;
            if (g > fp32_best) fp32_best = g;
        }
    }
    if (shapes) {
        // configs/small.json, one micro-batch: N = 8 x 257 tokens, ~N*K/E = 514 rows per expert.
        static const struct { const char *what; int M, N, K; } s[] = {
            {"lm_head      (N,V,D)", 2056, 4096, 512},  {"dense up     (N,2F,D)", 2056, 3072, 512},
            {"q_b          (N,H*96,Rq)", 2056, 768, 256}, {"o_proj       (N,D,H*Dv)", 2056, 512, 512},
            {"expert up    (n_e,2Fe,D)", 514, 512, 512}, {"expert down  (n_e,D,Fe)", 514, 512, 256},
            {"router       (N,E,D)", 2056, 16, 512},
        };
        for (size_t i = 0; i < sizeof(s) / sizeof(s[0]); i++) {
            for (int lib = 0; lib < n_libs; lib++) {
                double g = sgemm_gflops(lib, s[i].M, s[i].N, s[i].K, reps + 2, 1);
                printf("fp32 shape   %-26s %5dx%5dx%5d %-8s %8.1f GFLOP/s\n", s[i].what, s[i].M, s[i].N, s[i].K,
                       lib_name[lib], g);
            }
        }
    }
    for (int lib = 0; lib < n_libs; lib++) printf("fp32_%s_peak_gflops=%.1f\n", lib_name[lib], lib_best[lib]);
    printf("fp32_peak_gflops=%.1f\n", fp32_best);
    printf("memory_gbs=%.1f\n", triad_gbs(reps + 2));

#ifdef NM_HAVE_DNNL
    dnnl_engine_t eng;
    dnnl_stream_t strm;
    if (dnnl_engine_create(&eng, dnnl_cpu, 0) != dnnl_success ||
        dnnl_stream_create(&strm, eng, dnnl_stream_default_flags) != dnnl_success) {
        printf("bf16 peak: unavailable (oneDNN engine creation failed)\n");
        return 0;
    }
    const dnnl_version_t *v = dnnl_version();
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    double bf16_best = 0.0;
    char impl[128] = "?";
    for (int n = 1024; n <= max_n; n += 1024) {
        double g = dnnl_bf16_gflops(eng, strm, n, n, n, n >= 3072 ? (reps > 2 ? 2 : reps) : reps, impl, sizeof(impl));
        if (g < 0) break;
        printf("bf16 matmul  n=%-5d %8.1f GFLOP/s  (oneDNN impl %s)\n", n, g, impl);
        if (g > bf16_best) bf16_best = g;
    }
    dnnl_stream_destroy(strm);
    dnnl_engine_destroy(eng);
    int native = f.amx_bf16 || f.avx512_bf16;
    printf("oneDNN %d.%d.%d, effective ISA %s; CPU has %s\n", v->major, v->minor, v->patch, isa_name(isa),
           f.amx_bf16 ? "AMX-BF16" : f.avx512_bf16 ? "AVX512-BF16 (no AMX)" : "no native bf16 dot product");
    // What nanomegatron's bf16 GEMM picks by default (src/ops/cpu/gemm_bf16.c): oneDNN where it
    // reports AMX usable, else the fp32 FMA units.
    char isa_short[64];  // run.sh names it (ONEDNN_MAX_CPU_ISA changes it): the name's first word
    snprintf(isa_short, sizeof isa_short, "%s", isa_name(isa));
    isa_short[strcspn(isa_short, " ")] = 0;
    printf("onednn_isa=%s\n", isa_short);
    printf("bf16_amx_usable=%d\n", ((unsigned)isa & (unsigned)dnnl_cpu_isa_avx512_core_amx) ==
                                        (unsigned)dnnl_cpu_isa_avx512_core_amx);
    if (bf16_best > 0) {
        printf("bf16_peak_gflops=%.1f\n", bf16_best);
        printf("bf16_isa=%s%s\n", impl, native ? "" : "(emulated)");
    } else {
        printf("bf16 peak: unavailable (oneDNN matmul failed)\n");
    }
#else
    printf("bf16 peak: unavailable (built without oneDNN; apt-get install libdnnl-dev)\n");
#endif
    return 0;
}
