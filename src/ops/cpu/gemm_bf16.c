// gemm_bf16.c: the CPU bf16 GEMM, row-major C(M,N) = alpha * op(A) op(B) + beta * C with
// bf16 operands, fp32 accumulation and an fp32 C, through oneDNN's matmul (ops.h), and the
// fp32 -> bf16 cast. Not here: the fp32 GEMM (gemm.c, OpenBLAS) and fp8 emulation.
// Reference: the bf16 format is the top 16 bits of an IEEE binary32, rounded to nearest even
// (torch.Tensor.to(torch.bfloat16) gives the same bits, NaN kept a quiet NaN).
//
// Two kernels, one contract (bf16 operands, exact products, fp32 accumulation):
//  - "onednn": oneDNN's bf16 matmul, on AMX tiles or AVX512-BF16 dot products (vdpbf16ps).
//  - "widen": both operands widened to fp32 (bf16 -> fp32 is exact; fp32 operands are rounded
//    to bf16 first, then widened) and multiplied by the fp32 GEMM (gemm.c) on the FMA units.
//    A product of two bf16 values is exact in fp32, so this is the same arithmetic as a bf16
//    GEMM with fp32 accumulation, summed in a different order.
// Why two: without AMX, bf16 dot products are slower than fp32 FMAs. On the AVX512-BF16 Xeon
// of docs/performance.md one core retires 2 vfmadd231ps (32 flops each) per cycle but only
// 1 vdpbf16ps (64 flops) every 2 cycles: 81 against 162 GFLOP/s, measured with 24
// independent accumulator chains; oneDNN's bf16 matmul reaches exactly that 162 GFLOP/s on
// 2 cores, the fp32 GEMM ~300. With AMX the tiles are ~8-16x the fp32 rate and oneDNN wins.
// NM_CPU_BF16_GEMM=auto (default) picks "onednn" when oneDNN reports AMX as usable on this
// CPU and OS (dnnl_get_effective_cpu_isa), "widen" otherwise; onednn|widen force one (tests
// run both). Any other value is an error, and so is onednn where oneDNN cannot create its bf16
// matmul (oneDNN 2.6 below AVX-512: AVX2-only CPUs, or ONEDNN_MAX_CPU_ISA=AVX2): both are
// found by nm_cpu_gemm_bf16_setup when the model is created, never by an abort mid-step.
//
// One primitive per (ta, tb, alpha != 1, beta != 0), with M, N, K and the leading dimensions
// given at run time (DNNL_RUNTIME_DIM_VAL), created on first use and then reused forever:
//  - the model calls this with data-dependent M (per-expert row counts), so a cache of
//    fixed-shape primitives would keep creating them: creation measured 200-700 us, more than
//    a whole 256 x 256 x 256 GEMM, and oneDNN 2.6 does not cache primitive descriptors;
//  - oneDNN 2.6 picks its jit bf16 gemm ("gemm:jit") for runtime shapes and its brgemm
//    kernels for fixed ones; at 1 thread the two measured within noise of each other
//    (M in 37..1024, N and K in 256..2048, all transposes).
//  The unit stride of each operand stays a compile-time 1: with both strides at run time
//  oneDNN cannot tell a transposed operand from a plain one and falls back to "ref:any",
//  ~1000x slower. Transposes are strides, so nothing is copied to transpose.
//
// alpha is a run-time output scale (applied before post-ops, so to the product only); beta
// is oneDNN's sum post-op with scale 1, after C has been scaled by beta in place when beta is
// neither 0 nor 1: the sum scale is fixed at primitive creation and the model only uses 0 and
// 1, so other values pay one extra pass over C instead of a primitive each. beta == 0 uses a
// primitive without the sum post-op, which never reads C (NaN-safe, ops.h).
//
// widen: operands that are not NM_F32_BF16 go to fp32 scratch (packed), then nm_cpu_gemm.
// The model keeps its weight copy as NM_F32_BF16 for this kernel (gemm_bf16_weight_type), so
// only fp32 activations are rounded here; a bf16 weight would be widened on every call.
//
// onednn: fp32 operands are rounded into bf16 scratch owned by the backend instance, packed
// (leading dimension = row length), one buffer per operand. A buffer grows only when a larger
// operand is first seen, so a training loop allocates here in its first step only. The
// oneDNN engine, stream, primitives and scratch are the instance's (nm_cpu_bf16_state, in
// be->ctx; two instances share none of it), used by one calling thread: the model calls from its main thread,
// which the code checks (not inside an OpenMP parallel region). oneDNN itself still makes a
// few small heap objects per call (the memory objects, whose run-time shapes differ per
// call); they are not nm_malloc allocations and cost ~1 us.
//
// Threads: Debian's libdnnl is the OpenMP build; it runs on our OpenMP threads and reads
// omp_get_max_threads() at execution, so omp_set_num_threads applies to later calls.
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/bf16.h"

#define NM_DNNL_CHECK(expr)                                                                \
    do {                                                                                   \
        dnnl_status_t nm_dnnl_status_ = (expr);                                            \
        NM_CHECK(nm_dnnl_status_ == dnnl_success, "%s failed in %s: %s", #expr, __func__, \
                 dnnl_status2str(nm_dnnl_status_));                                        \
    } while (0)

// --- the instance's state (nm_cpu_ctx.bf16) -------------------------------------------------

typedef struct nm_bf16_scratch {
    uint16_t *data;
    size_t cap;                 // elements
} nm_bf16_scratch;

typedef struct nm_f32_scratch {
    float *data;
    size_t cap;                 // elements
} nm_f32_scratch;

typedef enum bf16_kernel { BF16_UNSET = 0, BF16_ONEDNN, BF16_WIDEN } bf16_kernel;

struct nm_cpu_bf16_state {
    int ready;                          // 0 not yet, 1 set up, -1 failed (why)
    int onednn_usable;                  // 0 not probed, 1 yes, -1 no (onednn_why)
    char why[1024], onednn_why[1024];
    bf16_kernel kernel;
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    dnnl_primitive_t prim[2][2][2][2];  // [ta][tb][alpha != 1][beta != 0], created on first use
    float alpha;                        // value read through alpha_mem at execution
    dnnl_memory_t alpha_mem;            // 1-element f32 view of alpha (run-time output scale)
    nm_bf16_scratch a, b;
    nm_f32_scratch wa, wb;              // widened operands of the "widen" kernel
    nm_gemm_group *grouped_groups;      // gemm_bf16_grouped's chunk, with widened operands
    int64_t grouped_cap;
    nm_f32_scratch grouped_buf;         // the chunk's widened operands
};

nm_cpu_bf16_state *nm_cpu_bf16_state_create(void) { return nm_calloc(1, sizeof(nm_cpu_bf16_state)); }

void nm_cpu_bf16_state_destroy(nm_cpu_bf16_state *g) {
    if (!g) return;
    for (int i = 0; i < 16; i++) {
        dnnl_primitive_t p = g->prim[i & 1][i >> 1 & 1][i >> 2 & 1][i >> 3 & 1];
        if (p) dnnl_primitive_destroy(p);
    }
    if (g->alpha_mem) dnnl_memory_destroy(g->alpha_mem);
    if (g->stream) dnnl_stream_destroy(g->stream);
    if (g->engine) dnnl_engine_destroy(g->engine);
    nm_free(g->a.data);
    nm_free(g->b.data);
    nm_free(g->wa.data);
    nm_free(g->wb.data);
    nm_free(g->grouped_groups);
    nm_free(g->grouped_buf.data);
    nm_free(g);
}

// oneDNN's effective ISA (after ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA caps) by name. The
// values nest (each ISA's bits include the lower ones'), so the widest match wins.
const char *nm_cpu_isa_name(void) {
    static const struct { dnnl_cpu_isa_t isa; const char *name; } isas[] = {
        {dnnl_cpu_isa_avx512_core_amx, "avx512_core_amx"}, {dnnl_cpu_isa_avx512_core_bf16, "avx512_core_bf16"},
        {dnnl_cpu_isa_avx512_core_vnni, "avx512_core_vnni"}, {dnnl_cpu_isa_avx512_core, "avx512_core"},
        {dnnl_cpu_isa_avx2_vnni, "avx2_vnni"}, {dnnl_cpu_isa_avx2, "avx2"}, {dnnl_cpu_isa_avx, "avx"},
        {dnnl_cpu_isa_sse41, "sse41"},
    };
    unsigned have = (unsigned)dnnl_get_effective_cpu_isa();
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++)
        if ((have & (unsigned)isas[i].isa) == (unsigned)isas[i].isa) return isas[i].name;
    return "below sse41";
}

#define NM_DNNL_TRY(expr)                                                                        \
    do {                                                                                         \
        dnnl_status_t nm_dnnl_status_ = (expr);                                                  \
        if (nm_dnnl_status_ != dnnl_success)                                                     \
            return nm_error_set(err, "oneDNN %s: %s", #expr, dnnl_status2str(nm_dnnl_status_)); \
    } while (0)

static int init_state(nm_cpu_bf16_state *g, nm_error *err) {
    NM_DNNL_TRY(dnnl_engine_create(&g->engine, dnnl_cpu, 0));
    NM_DNNL_TRY(dnnl_stream_create(&g->stream, g->engine, dnnl_stream_default_flags));
    dnnl_memory_desc_t md;
    dnnl_dims_t dims = {1};
    NM_DNNL_TRY(dnnl_memory_desc_init_by_tag(&md, 1, dims, dnnl_f32, dnnl_a));
    NM_DNNL_TRY(dnnl_memory_create(&g->alpha_mem, &md, g->engine, &g->alpha));
    const char *v = getenv("NM_CPU_BF16_GEMM");
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    int amx = ((unsigned)isa & (unsigned)dnnl_cpu_isa_avx512_core_amx) == (unsigned)dnnl_cpu_isa_avx512_core_amx;
    if (!v || !*v || strcmp(v, "auto") == 0) g->kernel = amx ? BF16_ONEDNN : BF16_WIDEN;
    else if (strcmp(v, "onednn") == 0) g->kernel = BF16_ONEDNN;
    else if (strcmp(v, "widen") == 0) g->kernel = BF16_WIDEN;
    else return nm_error_set(err, "environment variable NM_CPU_BF16_GEMM=%s: expected auto, onednn or widen", v);
    return 0;
}

// Sets the instance's oneDNN state up once; the outcome (and its message) is kept, so every later caller sees
// the same answer. 0, or -1 with err filled.
static int setup(nm_cpu_bf16_state *g, nm_error *err) {
    if (g->ready == 0) {
        nm_error e;
        g->ready = init_state(g, &e) == 0 ? 1 : -1;
        if (g->ready < 0) snprintf(g->why, sizeof g->why, "%.1000s", e.msg);
    }
    if (g->ready < 0) return nm_error_set(err, "%s", g->why);
    return 0;
}

// For entry points that return nothing: nm_cpu_gemm_bf16_setup ran at model creation (ops.h
// setup), so a failure here is a caller that skipped it.
static void init_once(nm_cpu_bf16_state *g) {
    nm_error err;
    if (setup(g, &err) != 0)
        nm_check_failed(__FILE__, __LINE__, "gemm_bf16 set up (ops->setup)", "%s", err.msg);
}

static int create_primitive(nm_cpu_bf16_state *g, nm_transpose ta, nm_transpose tb, int scaled, int accumulate,
                            nm_error *err);

// Whether oneDNN can run its bf16 matmul here: all 16 primitives this file uses are created
// once (~10 ms), so a later call never meets a creation failure. oneDNN 2.6 has no bf16
// matmul below AVX-512 (AVX2-only CPUs, or ONEDNN_MAX_CPU_ISA=AVX2): "unimplemented".
int nm_cpu_gemm_bf16_onednn_usable(const nm_ops *be, char *why, size_t why_size) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    NM_CHECK(!omp_in_parallel(), "gemm_bf16 state is set up from one thread");
    nm_error err;
    if (setup(g, &err) != 0) {
        snprintf(why, why_size, "%s", err.msg);
        return 0;
    }
    if (g->onednn_usable == 0) {
        g->onednn_usable = 1;
        for (int i = 0; i < 16 && g->onednn_usable == 1; i++)
            if (create_primitive(g, (nm_transpose)(i & 1), (nm_transpose)(i >> 1 & 1), i >> 2 & 1, i >> 3 & 1, &err)) {
                g->onednn_usable = -1;
                snprintf(g->onednn_why, sizeof g->onednn_why, "oneDNN %d.%d.%d has no bf16 matmul for ISA %s (%.900s)",
                         dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch, nm_cpu_isa_name(),
                         err.msg);
            }
    }
    if (g->onednn_usable < 0) snprintf(why, why_size, "%s", g->onednn_why);
    return g->onednn_usable > 0;
}

int nm_cpu_gemm_bf16_setup(const nm_ops *be, nm_error *err) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    NM_CHECK(!omp_in_parallel(), "gemm_bf16 state is set up from one thread");
    if (setup(g, err) != 0) return -1;
    if (g->kernel != BF16_ONEDNN) return 0;
    char why[1024];
    if (nm_cpu_gemm_bf16_onednn_usable(be, why, sizeof why)) return 0;
    const char *v = getenv("NM_CPU_BF16_GEMM");
    if (v && strcmp(v, "onednn") == 0)
        return nm_error_set(err, "environment variable NM_CPU_BF16_GEMM=onednn: %s; unset it (auto runs the widen "
                            "kernel here) or set NM_CPU_BF16_GEMM=widen", why);
    g->kernel = BF16_WIDEN;  // auto chose onednn for AMX, which oneDNN then could not use
    return 0;
}

const char *nm_cpu_gemm_bf16_kernel(const nm_ops *be) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    NM_CHECK(!omp_in_parallel(), "gemm_bf16 state is set up from one thread");
    init_once(g);
    return g->kernel == BF16_ONEDNN ? "onednn" : "widen";
}

// Set by the measured choice (kernels.c) from one thread, before the step loop; -1 for an
// unknown name or for onednn where oneDNN cannot run it (nm_cpu_gemm_bf16_onednn_usable).
int nm_cpu_gemm_bf16_set_kernel(const nm_ops *be, const char *name) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    NM_CHECK(!omp_in_parallel(), "gemm_bf16 state is set up from one thread");
    init_once(g);
    char why[1024];
    if (strcmp(name, "onednn") == 0 && nm_cpu_gemm_bf16_onednn_usable(be, why, sizeof why)) g->kernel = BF16_ONEDNN;
    else if (strcmp(name, "widen") == 0) g->kernel = BF16_WIDEN;
    else return -1;
    return 0;
}

// Grows only: a training loop sees its largest shapes in the first step.
static uint16_t *scratch_reserve(nm_bf16_scratch *s, size_t n) {
    if (n > s->cap) {
        nm_free(s->data);
        s->data = nm_aligned_alloc(n * sizeof(uint16_t));
        s->cap = n;
    }
    return s->data;
}

// --- fp32 -> bf16 ----------------------------------------------------------------------------

// Below this many elements the conversion is cheaper than waking the OpenMP team.
#define NM_BF16_PARALLEL_MIN (1 << 16)

void nm_cpu_cast_bf16(const nm_ops *be, uint16_t *dst, const float *src, int64_t n) {
    NM_CHECK(n >= 0, "cast_bf16 n=%lld", (long long)n);
#pragma omp parallel for schedule(static) if (n >= NM_BF16_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) dst[i] = nm_f32_to_bf16(src[i]);
}

void nm_cpu_widen_bf16(const nm_ops *be, float *dst, const uint16_t *src, int64_t n) {
    NM_CHECK(n >= 0, "widen_bf16 n=%lld", (long long)n);
#pragma omp parallel for schedule(static) if (n >= NM_BF16_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) dst[i] = nm_bf16_to_f32(src[i]);
}

// dst(rows, cols) packed (=) bf16 of src(rows, cols) with leading dimension ld.
static void cast_bf16_2d(uint16_t *dst, const float *src, int64_t ld, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= NM_BF16_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *s = src + r * ld;
        uint16_t *d = dst + r * cols;
        for (int64_t c = 0; c < cols; c++) d[c] = nm_f32_to_bf16(s[c]);
    }
}

// An NM_F32_BF16 operand (rows, cols; leading dimension ld) claims bf16 values in fp32 storage:
// the low 16 bits of every element zero. A caller that labels an unrounded tensor so would make
// widen multiply unrounded values where oneDNN rounds them, a difference too small for a loss
// comparison to tell from summation order. Debug builds check every element (`make sanitize`
// runs the model's bf16 paths, test_vocab_tile); release builds trust the label, since the
// check is one more pass over the operand, the pass the label saves.
static void check_rounded(const void *x, nm_dtype type, int64_t rows, int64_t cols, int64_t ld) {
#ifndef NDEBUG
    if (type != NM_F32_BF16) return;
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *u = (const uint32_t *)x + r * ld;
        for (int64_t c = 0; c < cols; c++) {
            NM_CHECK((u[c] & 0xffffu) == 0, "gemm_bf16: operand labelled NM_F32_BF16 holds 0x%08x at row %lld col %lld, "
                     "not a bf16 value (round it with round_bf16 first)", (unsigned)u[c], (long long)r, (long long)c);
        }
    }
#else
    (void)x, (void)type, (void)rows, (void)cols, (void)ld;
#endif
}

// The bf16 view of an operand stored (rows, cols) with leading dimension *ld: itself when it
// is bf16 already, else its rounding into scratch, packed (*ld becomes cols).
static const uint16_t *as_bf16(nm_bf16_scratch *s, const void *x, nm_dtype type, int64_t rows,
                               int64_t cols, int64_t *ld) {
    if (type == NM_BF16) return x;
    // NM_F32_BF16 holds bf16 values: the cast below is exact for them
    NM_CHECK(type == NM_F32 || type == NM_F32_BF16, "gemm_bf16 operand type %d", (int)type);
    check_rounded(x, type, rows, cols, *ld);
    uint16_t *dst = scratch_reserve(s, (size_t)rows * (size_t)cols);
    cast_bf16_2d(dst, x, *ld, rows, cols);
    *ld = cols;
    return dst;
}

// --- the "widen" kernel ----------------------------------------------------------------------

static float *f32_scratch_reserve(nm_f32_scratch *s, size_t n) {
    if (n > s->cap) {
        nm_free(s->data);
        s->data = nm_aligned_alloc(n * sizeof(float));
        s->cap = n;
    }
    return s->data;
}

// dst(rows, cols) packed (=) the fp32 value of the bf16 operand x (rows, cols; leading dimension
// ld): exact widening of bf16 storage, or the bf16 rounding of fp32 storage. One thread.
static void widen_rows(float *dst, const void *x, nm_dtype type, int64_t rows, int64_t cols, int64_t ld) {
    for (int64_t r = 0; r < rows; r++) {
        float *d = dst + r * cols;
        if (type == NM_BF16) {
            const uint16_t *h = (const uint16_t *)x + r * ld;
            for (int64_t c = 0; c < cols; c++) d[c] = nm_bf16_to_f32(h[c]);
        } else {
            const float *f = (const float *)x + r * ld;
            for (int64_t c = 0; c < cols; c++) d[c] = nm_bf16_round(f[c]);
        }
    }
}

// The fp32 view of an operand's bf16 value, stored (rows, cols) with leading dimension *ld:
// the operand itself when it is NM_F32_BF16 (its values are bf16 already), else written
// packed into scratch (*ld becomes cols).
static const float *as_widened(nm_f32_scratch *s, const void *x, nm_dtype type, int64_t rows, int64_t cols,
                               int64_t *ld) {
    if (type == NM_F32_BF16) {
        check_rounded(x, type, rows, cols, *ld);
        return x;
    }
    NM_CHECK(type == NM_F32 || type == NM_BF16, "gemm_bf16 operand type %d", (int)type);
    float *dst = f32_scratch_reserve(s, (size_t)rows * (size_t)cols);
    int64_t ldx = *ld;
    if (rows * cols >= NM_BF16_PARALLEL_MIN) {
#pragma omp parallel
        {
            // contiguous row blocks, one per thread
            int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
            size_t elem = type == NM_BF16 ? sizeof(uint16_t) : sizeof(float);
            widen_rows(dst + r0 * cols, (const char *)x + (size_t)(r0 * ldx) * elem, type, r1 - r0, cols, ldx);
        }
    } else {
        widen_rows(dst, x, type, rows, cols, ldx);
    }
    *ld = cols;
    return dst;
}

// dst(n) (=) bf16(src) in fp32 storage (dst may be src): an activation rounded once where it
// is produced, or the model's per-step weight copy for the widen kernel.
void nm_cpu_round_bf16(const nm_ops *be, float *dst, const float *src, int64_t n) {
    NM_CHECK(n >= 0, "round_bf16 n=%lld", (long long)n);
#pragma omp parallel for schedule(static) if (n >= NM_BF16_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) dst[i] = nm_bf16_round(src[i]);
}

// x(n) (=) bf16(x) in place, bits(n) (=) the same values in bf16 storage: one pass where
// round_bf16 then cast_bf16 read x twice (the bf16 twin of an activation, bf16_twin.c).
void nm_cpu_round_cast_bf16(const nm_ops *be, float *x, uint16_t *bits, int64_t n) {
    NM_CHECK(n >= 0, "round_cast_bf16 n=%lld", (long long)n);
#pragma omp parallel for schedule(static) if (n >= NM_BF16_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        uint16_t h = nm_f32_to_bf16(x[i]);
        bits[i] = h;
        x[i] = nm_bf16_to_f32(h);
    }
}

// widen multiplies fp32 operands: a weight kept as NM_F32_BF16 is read with no conversion,
// where an NM_BF16 one is widened on every call (twice per step: forward and input gradient).
nm_dtype nm_cpu_gemm_bf16_weight_type(const nm_ops *be) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    NM_CHECK(!omp_in_parallel(), "gemm_bf16 state is set up from one thread");
    init_once(g);
    return g->kernel == BF16_WIDEN ? NM_F32_BF16 : NM_BF16;
}

// --- the GEMM --------------------------------------------------------------------------------

// Row-major op(X) of shape (rows, cols), stored transposed or not with leading dimension ld:
// strides (ld, 1) or (1, ld). rt: every dimension and non-unit stride at run time.
static void matrix_desc(dnnl_memory_desc_t *md, dnnl_data_type_t dt, int64_t rows, int64_t cols,
                        nm_transpose t, int64_t ld, int rt) {
    int64_t R = DNNL_RUNTIME_DIM_VAL;
    dnnl_dims_t dims = {rt ? R : rows, rt ? R : cols};
    dnnl_dims_t strides = {t == NM_TRANS ? 1 : (rt ? R : ld), t == NM_TRANS ? (rt ? R : ld) : 1};
    NM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(md, 2, dims, dt, strides));
}

// Creates the primitive of one (ta, tb, alpha != 1, beta != 0) in its slot; -1 with err
// where oneDNN cannot (no bf16 matmul on this ISA). No silent fp32 fallback: that would change
// the numerics the caller asked for.
static int create_primitive(nm_cpu_bf16_state *g, nm_transpose ta, nm_transpose tb, int scaled, int accumulate,
                            nm_error *err) {
    dnnl_primitive_t *slot = &g->prim[ta][tb][scaled][accumulate];
    if (*slot) return 0;
    dnnl_memory_desc_t a, b, c;
    matrix_desc(&a, dnnl_bf16, 0, 0, ta, 0, 1);
    matrix_desc(&b, dnnl_bf16, 0, 0, tb, 0, 1);
    matrix_desc(&c, dnnl_f32, 0, 0, NM_NO_TRANS, 0, 1);
    dnnl_matmul_desc_t desc;
    NM_DNNL_TRY(dnnl_matmul_desc_init(&desc, &a, &b, NULL, &c));
    dnnl_primitive_attr_t attr;
    NM_DNNL_TRY(dnnl_primitive_attr_create(&attr));
    dnnl_status_t st = dnnl_success;
    if (scaled) st = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &DNNL_RUNTIME_F32_VAL);
    if (st == dnnl_success && accumulate) {
        dnnl_post_ops_t po;
        st = dnnl_post_ops_create(&po);
        if (st == dnnl_success) {
            st = dnnl_post_ops_append_sum(po, 1.0f);
            if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(attr, po);
            dnnl_post_ops_destroy(po);
        }
    }
    dnnl_primitive_desc_t pd = NULL;
    if (st == dnnl_success) st = dnnl_primitive_desc_create(&pd, &desc, attr, g->engine, NULL);
    if (st == dnnl_success) st = dnnl_primitive_create(slot, pd);
    if (pd) dnnl_primitive_desc_destroy(pd);
    dnnl_primitive_attr_destroy(attr);
    if (st != dnnl_success) {
        *slot = NULL;
        return nm_error_set(err, "dnnl_primitive_desc_create(bf16 matmul): %s", dnnl_status2str(st));
    }
    return 0;
}

// The primitives exist once setup found the kernel usable (nm_cpu_gemm_bf16_onednn_usable), as
// it does for every model; a caller of the op itself (a test) gets them created here, and a
// machine without them a message naming the fix.
static dnnl_primitive_t get_primitive(const nm_ops *be, nm_transpose ta, nm_transpose tb, int scaled, int accumulate) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    char why[1024];
    if (!g->prim[ta][tb][scaled][accumulate] && !nm_cpu_gemm_bf16_onednn_usable(be, why, sizeof why))
        nm_check_failed(__FILE__, __LINE__, "onednn bf16 matmul usable", "%s; use NM_CPU_BF16_GEMM=widen", why);
    return g->prim[ta][tb][scaled][accumulate];
}

void nm_cpu_gemm_bf16(const nm_ops *be, nm_transpose ta, nm_transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
                      const void *A, nm_dtype a_type, int64_t lda, const void *B, nm_dtype b_type,
                      int64_t ldb, float beta, float *C, int64_t ldc) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    NM_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_bf16 dims M=%lld N=%lld K=%lld", (long long)M,
             (long long)N, (long long)K);
    NM_CHECK((ta == NM_NO_TRANS || ta == NM_TRANS) && (tb == NM_NO_TRANS || tb == NM_TRANS),
             "gemm_bf16 transpose flags %d %d", (int)ta, (int)tb);
    if (M == 0 || N == 0) return;
    NM_CHECK(ldc >= N, "gemm_bf16 ldc=%lld < N=%lld", (long long)ldc, (long long)N);
    if (K == 0 || alpha == 0.0f) {
        nm_cpu_scale_matrix(C, ldc, M, N, beta);
        return;
    }
    // Row-major op(A) is (M,K): stored (M,lda>=K) untransposed, (K,lda>=M) transposed.
    int64_t a_rows = ta == NM_NO_TRANS ? M : K, a_cols = ta == NM_NO_TRANS ? K : M;
    int64_t b_rows = tb == NM_NO_TRANS ? K : N, b_cols = tb == NM_NO_TRANS ? N : K;
    NM_CHECK(lda >= a_cols && ldb >= b_cols, "gemm_bf16 lda=%lld (need %lld) ldb=%lld (need %lld)",
             (long long)lda, (long long)a_cols, (long long)ldb, (long long)b_cols);
    NM_CHECK(!omp_in_parallel(), "gemm_bf16 keeps one set of scratch buffers: call it from one thread");
    init_once(g);

    if (g->kernel == BF16_WIDEN) {
        const float *a32 = as_widened(&g->wa, A, a_type, a_rows, a_cols, &lda);
        const float *b32 = as_widened(&g->wb, B, b_type, b_rows, b_cols, &ldb);
        nm_cpu_gemm(be, ta, tb, M, N, K, alpha, a32, lda, b32, ldb, beta, C, ldc);
        return;
    }
    const uint16_t *a16 = as_bf16(&g->a, A, a_type, a_rows, a_cols, &lda);
    const uint16_t *b16 = as_bf16(&g->b, B, b_type, b_rows, b_cols, &ldb);
    if (beta != 0.0f && beta != 1.0f) nm_cpu_scale_matrix(C, ldc, M, N, beta);
    int scaled = alpha != 1.0f, accumulate = beta != 0.0f;
    dnnl_primitive_t prim = get_primitive(be, ta, tb, scaled, accumulate);

    dnnl_memory_desc_t a_md, b_md, c_md;
    matrix_desc(&a_md, dnnl_bf16, M, K, ta, lda, 0);
    matrix_desc(&b_md, dnnl_bf16, K, N, tb, ldb, 0);
    matrix_desc(&c_md, dnnl_f32, M, N, NM_NO_TRANS, ldc, 0);
    dnnl_memory_t a_mem, b_mem, c_mem;
    // oneDNN takes non-const handles for every argument; it only reads SRC and WEIGHTS.
    NM_DNNL_CHECK(dnnl_memory_create(&a_mem, &a_md, g->engine, (void *)a16));
    NM_DNNL_CHECK(dnnl_memory_create(&b_mem, &b_md, g->engine, (void *)b16));
    NM_DNNL_CHECK(dnnl_memory_create(&c_mem, &c_md, g->engine, C));
    g->alpha = alpha;
    dnnl_exec_arg_t args[4] = {
        {DNNL_ARG_SRC, a_mem},
        {DNNL_ARG_WEIGHTS, b_mem},
        {DNNL_ARG_DST, c_mem},
        {DNNL_ARG_ATTR_OUTPUT_SCALES, g->alpha_mem},
    };
    NM_DNNL_CHECK(dnnl_primitive_execute(prim, g->stream, scaled ? 4 : 3, args));
    NM_DNNL_CHECK(dnnl_stream_wait(g->stream));
    NM_DNNL_CHECK(dnnl_memory_destroy(a_mem));
    NM_DNNL_CHECK(dnnl_memory_destroy(b_mem));
    NM_DNNL_CHECK(dnnl_memory_destroy(c_mem));
}

// --- grouped -----------------------------------------------------------------------------------
//
// widen: the groups' operands that are not NM_F32_BF16 already (the experts' bf16 weights) are
// widened into scratch, one group per thread, and the fp32 grouped GEMM runs the lot: the
// experts' small GEMMs run one per thread as in fp32 (gemm.c says why) instead of one
// multi-threaded call each. The groups go in chunks whose widened operands fit
// NM_BF16_GROUP_FLOATS, so a layer of many large experts never needs all of them in fp32.
// onednn: one multi-threaded bf16 matmul per group (its scratch is one per instance).
#define NM_BF16_GROUP_FLOATS ((size_t)1 << 24)  // 64 MiB

// Floats the widened copies of group x's operands take (0 for NM_F32_BF16 operands).
static size_t widened_floats(const nm_gemm_group *x, nm_dtype a_type, nm_dtype b_type) {
    if (x->M == 0 || x->N == 0) return 0;
    size_t a = a_type == NM_F32_BF16 ? 0 : (size_t)x->M * (size_t)x->K;
    size_t b = b_type == NM_F32_BF16 ? 0 : (size_t)x->K * (size_t)x->N;
    return a + b;
}

void nm_cpu_gemm_bf16_grouped(const nm_ops *be, nm_transpose ta, nm_transpose tb, float alpha, float beta,
                              const nm_gemm_group *groups, int64_t n, nm_dtype a_type, nm_dtype b_type) {
    nm_cpu_bf16_state *g = nm_cpu_ctx_of(be)->bf16;
    NM_CHECK(n >= 0, "gemm_bf16_grouped n=%lld", (long long)n);
    NM_CHECK(!omp_in_parallel(), "gemm_bf16 keeps one set of scratch buffers: call it from one thread");
    init_once(g);
    if (g->kernel == BF16_ONEDNN) {
        for (int64_t i = 0; i < n; i++) {
            const nm_gemm_group *x = &groups[i];
            nm_cpu_gemm_bf16(be, ta, tb, x->M, x->N, x->K, alpha, x->A, a_type, x->lda, x->B, b_type, x->ldb, beta, x->C,
                             x->ldc);
        }
        return;
    }
    NM_CHECK((a_type == NM_F32 || a_type == NM_BF16 || a_type == NM_F32_BF16) &&
                 (b_type == NM_F32 || b_type == NM_BF16 || b_type == NM_F32_BF16),
             "gemm_bf16_grouped operand types %d %d", (int)a_type, (int)b_type);
    if (n > g->grouped_cap) {
        nm_free(g->grouped_groups);
        g->grouped_groups = nm_malloc((size_t)n * sizeof *g->grouped_groups);
        g->grouped_cap = n;
    }
    for (int64_t g0 = 0; g0 < n;) {
        size_t floats = 0;
        int64_t g1 = g0;
        while (g1 < n) {
            size_t need = widened_floats(&groups[g1], a_type, b_type);
            if (g1 > g0 && floats + need > NM_BF16_GROUP_FLOATS) break;
            floats += need;
            g1++;
        }
        float *buf = f32_scratch_reserve(&g->grouped_buf, floats ? floats : 1);
        size_t at = 0;
        for (int64_t i = g0; i < g1; i++) {
            const nm_gemm_group *x = &groups[i];
            nm_gemm_group *y = &g->grouped_groups[i - g0];
            *y = *x;
            if (x->M == 0 || x->N == 0) continue;
            check_rounded(x->A, a_type, ta == NM_NO_TRANS ? x->M : x->K, ta == NM_NO_TRANS ? x->K : x->M, x->lda);
            check_rounded(x->B, b_type, tb == NM_NO_TRANS ? x->K : x->N, tb == NM_NO_TRANS ? x->N : x->K, x->ldb);
            // row-major op(A) (M,K) is stored (M,K) or (K,M); op(B) (K,N) as (K,N) or (N,K)
            if (a_type != NM_F32_BF16) {
                y->A = buf + at;
                y->lda = ta == NM_NO_TRANS ? x->K : x->M;
                at += (size_t)x->M * (size_t)x->K;
            }
            if (b_type != NM_F32_BF16) {
                y->B = buf + at;
                y->ldb = tb == NM_NO_TRANS ? x->N : x->K;
                at += (size_t)x->K * (size_t)x->N;
            }
        }
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t i = g0; i < g1; i++) {
            const nm_gemm_group *x = &groups[i];
            const nm_gemm_group *y = &g->grouped_groups[i - g0];
            if (x->M == 0 || x->N == 0) continue;
            if (a_type != NM_F32_BF16) {
                int64_t rows = ta == NM_NO_TRANS ? x->M : x->K;
                widen_rows((float *)y->A, x->A, a_type, rows, y->lda, x->lda);
            }
            if (b_type != NM_F32_BF16) {
                int64_t rows = tb == NM_NO_TRANS ? x->K : x->N;
                widen_rows((float *)y->B, x->B, b_type, rows, y->ldb, x->ldb);
            }
        }
        nm_cpu_gemm_grouped(be, ta, tb, alpha, beta, g->grouped_groups, g1 - g0);
        g0 = g1;
    }
}
