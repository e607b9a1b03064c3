// safetensors.c: implementation of safetensors.h.
//
// Validation follows the reference reader (huggingface/safetensors `SafeTensors::read_metadata`
// and `Metadata::validate`, formats.md 2.1): N <= 100 MB, the JSON header is an object of
// tensors (plus an optional string->string `__metadata__`), every tensor's byte range equals
// numel * bits / 8, and sorted by offset the ranges tile [0, data size) exactly.
// Not supported: reading FP8 / integer tensors as floats (refused by name), big-endian hosts.
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"
#include "core/parallel.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (the format is little-endian)"
#endif

#define MAX_HEADER_SIZE 100000000ull   // the Rust reader's limit

// --- dtypes ----------------------------------------------------------------------------------

typedef struct dtype_info {
    const char *name;
    int bits;
    nm_st_dtype kind;
} dtype_info;

static const dtype_info dtypes[] = {
    {"F32", 32, NM_ST_F32},      {"BF16", 16, NM_ST_BF16},      {"F16", 16, NM_ST_F16},
    {"F64", 64, NM_ST_F64},      {"BOOL", 8, NM_ST_OTHER},      {"U8", 8, NM_ST_OTHER},
    {"I8", 8, NM_ST_OTHER},      {"I16", 16, NM_ST_OTHER},      {"U16", 16, NM_ST_OTHER},
    {"I32", 32, NM_ST_OTHER},    {"U32", 32, NM_ST_OTHER},      {"I64", 64, NM_ST_OTHER},
    {"U64", 64, NM_ST_OTHER},    {"C64", 64, NM_ST_OTHER},      {"F8_E4M3", 8, NM_ST_OTHER},
    {"F8_E5M2", 8, NM_ST_OTHER}, {"F8_E8M0", 8, NM_ST_OTHER},   {"F8_E4M3FNUZ", 8, NM_ST_OTHER},
    {"F8_E5M2FNUZ", 8, NM_ST_OTHER}, {"F4", 4, NM_ST_OTHER},    {"F6_E2M3", 6, NM_ST_OTHER},
    {"F6_E3M2", 6, NM_ST_OTHER},
};

static const dtype_info *find_dtype(const char *name) {
    for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++) {
        if (strcmp(dtypes[i].name, name) == 0) return &dtypes[i];
    }
    return NULL;
}

// --- conversions -----------------------------------------------------------------------------

uint16_t nm_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN, keep sign
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (uint16_t)(u >> 16);
}

float nm_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

float nm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);          // inf / NaN
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
    } else if (man == 0) {
        u = sign;                                       // signed zero
    } else {
        // subnormal: value = man * 2^-24; normalise the mantissa
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float x;
    memcpy(&x, &u, 4);
    return x;
}

uint16_t nm_f32_to_f16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN stays (quiet) NaN
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf (max half 65504)
    uint32_t h, rem, half;
    if (a >= 0x38800000u) {  // normal half: rebias the exponent 127 -> 15, drop 13 mantissa bits
        h = (a - 0x38000000u) >> 13;
        rem = a & 0x1fffu;
        half = 0x1000u;
    } else if (a >= 0x33000000u) {  // subnormal half: value / 2^-24, rounded
        uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126u - (a >> 23);
        h = m >> shift;
        rem = m & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    } else {
        return (uint16_t)sign;  // below half the smallest subnormal: signed zero
    }
    if (rem > half || (rem == half && (h & 1u))) h++;  // round to nearest, ties to even (carries into the exponent)
    return (uint16_t)(sign | h);
}

const char *nm_shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int d = 0; d < ndim && k < n; d++) k += (size_t)snprintf(buf + k, n - k, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

// --- name hash -------------------------------------------------------------------------------
// Open addressing over tensor indices; a DeepSeek-V3 file set has ~91k tensors and the
// loader looks up every one, so lookup must not be linear.

static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

typedef struct name_hash {
    int *slots;                 // (cap) tensor index or -1
    size_t cap;                 // power of two >= 2 n
} name_hash;

static void hash_init(name_hash *h, int n) {
    h->cap = 16;
    while (h->cap < 2 * (size_t)n) h->cap *= 2;
    h->slots = nm_malloc(h->cap * sizeof(int));
    for (size_t i = 0; i < h->cap; i++) h->slots[i] = -1;
}

// Inserts index i with names[i]; returns the index already holding that name, or -1.
static int hash_insert(name_hash *h, char *const *names, int i) {
    size_t s = (size_t)fnv1a(names[i]) & (h->cap - 1);
    while (h->slots[s] >= 0) {
        if (strcmp(names[h->slots[s]], names[i]) == 0) return h->slots[s];
        s = (s + 1) & (h->cap - 1);
    }
    h->slots[s] = i;
    return -1;
}

static int hash_find(const name_hash *h, char *const *names, const char *name) {
    size_t s = (size_t)fnv1a(name) & (h->cap - 1);
    while (h->slots[s] >= 0) {
        if (strcmp(names[h->slots[s]], name) == 0) return h->slots[s];
        s = (s + 1) & (h->cap - 1);
    }
    return -1;
}

// --- reader ----------------------------------------------------------------------------------

struct nm_safetensors {
    char *path;
    uint8_t *map;               // whole file
    size_t size;
    const uint8_t *data;        // map + 8 + N
    size_t data_size;
    int n;
    char **names;               // (n)
    const dtype_info **dtype;   // (n)
    int *ndim;                  // (n)
    int64_t (*shape)[NM_ST_MAX_DIMS]; // (n)
    int64_t *numel;             // (n)
    uint64_t *begin, *end;      // (n) byte range relative to data
    name_hash hash;
};

void nm_safetensors_close(nm_safetensors *st) {
    if (!st) return;
    if (st->map && st->size) munmap(st->map, st->size);
    for (int i = 0; i < st->n; i++) nm_free(st->names[i]);
    nm_free(st->names);
    nm_free(st->dtype);
    nm_free(st->ndim);
    nm_free(st->shape);
    nm_free(st->numel);
    nm_free(st->begin);
    nm_free(st->end);
    nm_free(st->hash.slots);
    nm_free(st->path);
    nm_free(st);
}

// A JSON number that is a non-negative integer below 2^53 (exact in a double).
static int json_u64(const cJSON *it, uint64_t *out) {
    if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > 9007199254740992.0 ||
        it->valuedouble != (double)(uint64_t)it->valuedouble) {
        return -1;
    }
    *out = (uint64_t)it->valuedouble;
    return 0;
}

typedef struct range {
    uint64_t begin, end;
    int i;
} range;

static int cmp_range(const void *a, const void *b) {
    const range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end ? 1 : 0;
}

// Parses one tensor entry into slot i. Returns 0 or -1 with the message.
static int parse_entry(nm_safetensors *st, int i, const cJSON *e, nm_error *err) {
    const char *p = st->path, *name = st->names[i];
    if (!cJSON_IsObject(e)) return nm_error_set(err, "%s: tensor '%s': header entry is not an object", p, name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt)) return nm_error_set(err, "%s: tensor '%s': missing or non-string 'dtype'", p, name);
    st->dtype[i] = find_dtype(dt->valuestring);
    if (!st->dtype[i]) return nm_error_set(err, "%s: tensor '%s': unknown dtype '%s'", p, name, dt->valuestring);
    if (!cJSON_IsArray(sh)) return nm_error_set(err, "%s: tensor '%s': missing or non-array 'shape'", p, name);
    int nd = cJSON_GetArraySize(sh);
    if (nd > NM_ST_MAX_DIMS) return nm_error_set(err, "%s: tensor '%s': %d dims (at most %d supported)", p, name, nd, NM_ST_MAX_DIMS);
    st->ndim[i] = nd;
    uint64_t numel = 1;
    for (int d = 0; d < nd; d++) {
        uint64_t v;
        if (json_u64(cJSON_GetArrayItem(sh, d), &v)) {
            return nm_error_set(err, "%s: tensor '%s': shape entry %d is not a non-negative integer", p, name, d);
        }
        st->shape[i][d] = (int64_t)v;
        if (v != 0 && numel > (UINT64_MAX >> 8) / v) return nm_error_set(err, "%s: tensor '%s': shape overflows", p, name);
        numel *= v;
    }
    st->numel[i] = (int64_t)numel;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || json_u64(cJSON_GetArrayItem(off, 0), &st->begin[i]) ||
        json_u64(cJSON_GetArrayItem(off, 1), &st->end[i])) {
        return nm_error_set(err, "%s: tensor '%s': 'data_offsets' must be [begin, end] of non-negative integers", p, name);
    }
    uint64_t bits = numel * (uint64_t)st->dtype[i]->bits;
    char sb[128];
    if (bits % 8) {
        return nm_error_set(err, "%s: tensor '%s': %s %s is not a whole number of bytes", p, name,
                            st->dtype[i]->name, nm_shape_str(sb, sizeof(sb), nd, st->shape[i]));
    }
    if (st->end[i] < st->begin[i] || st->end[i] - st->begin[i] != bits / 8) {
        return nm_error_set(err, "%s: tensor '%s': data_offsets [%llu, %llu] hold %lld bytes but %s %s needs %llu",
                            p, name, (unsigned long long)st->begin[i], (unsigned long long)st->end[i],
                            (long long)(st->end[i] - st->begin[i]), st->dtype[i]->name,
                            nm_shape_str(sb, sizeof(sb), nd, st->shape[i]), (unsigned long long)(bits / 8));
    }
    if (st->end[i] > st->data_size) {
        return nm_error_set(err, "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the data area "
                                 "(%zu bytes; file truncated?)",
                            p, name, (unsigned long long)st->begin[i], (unsigned long long)st->end[i], st->data_size);
    }
    return 0;
}

static int parse_header(nm_safetensors *st, const char *hdr, size_t len, nm_error *err) {
    const char *p = st->path;
    const char *endp = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, len, &endp, 0);
    if (!root) return nm_error_set(err, "%s: header is not valid JSON (near byte %zu of %zu)", p,
                                   endp ? (size_t)(endp - hdr) : 0, len);
    int rc = 0;
    for (const char *q = endp; q && q < hdr + len; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\r' && *q != '\n' && *q != '\0') {
            rc = nm_error_set(err, "%s: unexpected bytes after the JSON header at byte %zu", p, (size_t)(q - hdr));
            break;
        }
    }
    if (rc == 0 && !cJSON_IsObject(root)) rc = nm_error_set(err, "%s: header is not a JSON object", p);
    if (rc) { cJSON_Delete(root); return rc; }

    int n = 0;
    for (const cJSON *c = root->child; c; c = c->next) n += strcmp(c->string, "__metadata__") != 0;
    st->names = nm_calloc((size_t)n + 1, sizeof(char *));
    st->dtype = nm_calloc((size_t)n + 1, sizeof(*st->dtype));
    st->ndim = nm_calloc((size_t)n + 1, sizeof(int));
    st->shape = nm_calloc((size_t)n + 1, sizeof(*st->shape));
    st->numel = nm_calloc((size_t)n + 1, sizeof(int64_t));
    st->begin = nm_calloc((size_t)n + 1, sizeof(uint64_t));
    st->end = nm_calloc((size_t)n + 1, sizeof(uint64_t));
    hash_init(&st->hash, n);
    for (const cJSON *c = root->child; c && rc == 0; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(c)) { rc = nm_error_set(err, "%s: __metadata__ is not an object", p); break; }
            for (const cJSON *m = c->child; m; m = m->next) {
                if (!cJSON_IsString(m)) {
                    rc = nm_error_set(err, "%s: __metadata__ value of '%s' is not a string", p, m->string);
                    break;
                }
            }
            continue;
        }
        int i = st->n++;
        st->names[i] = nm_strdup(c->string);
        if (hash_insert(&st->hash, st->names, i) >= 0) {
            rc = nm_error_set(err, "%s: tensor '%s' appears twice in the header", p, c->string);
            break;
        }
        rc = parse_entry(st, i, c, err);
    }
    cJSON_Delete(root);
    if (rc) return rc;

    // Sorted by offset, the byte ranges must tile the data area exactly.
    range *order = nm_malloc((size_t)(n + 1) * sizeof(range));
    for (int i = 0; i < n; i++) order[i] = (range){st->begin[i], st->end[i], i};
    qsort(order, (size_t)n, sizeof(range), cmp_range);
    uint64_t at = 0;
    for (int k = 0; k < n && rc == 0; k++) {
        int i = order[k].i;
        if (st->begin[i] < at) {
            rc = nm_error_set(err, "%s: tensor '%s' (data_offsets [%llu, %llu]) overlaps tensor '%s'", p, st->names[i],
                              (unsigned long long)st->begin[i], (unsigned long long)st->end[i], st->names[order[k - 1].i]);
        } else if (st->begin[i] > at) {
            rc = nm_error_set(err, "%s: %llu unused bytes before tensor '%s' (data_offsets [%llu, %llu])", p,
                              (unsigned long long)(st->begin[i] - at), st->names[i],
                              (unsigned long long)st->begin[i], (unsigned long long)st->end[i]);
        }
        at = st->end[i];
    }
    nm_free(order);
    if (rc == 0 && at != st->data_size) {
        rc = nm_error_set(err, "%s: %llu trailing bytes after the last tensor (data area %zu bytes, tensors end at %llu)",
                          p, (unsigned long long)(st->data_size - at), st->data_size, (unsigned long long)at);
    }
    return rc;
}

int nm_safetensors_open(nm_safetensors **out, const char *path, nm_error *err) {
    *out = NULL;
    nm_safetensors *st = nm_calloc(1, sizeof(*st));
    st->path = nm_strdup(path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        nm_error_set(err, "%s: cannot open: %s", path, strerror(errno));
        nm_safetensors_close(st);
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        nm_error_set(err, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        nm_safetensors_close(st);
        return -1;
    }
    st->size = (size_t)sb.st_size;
    if (st->size < 8) {
        close(fd);
        nm_error_set(err, "%s: file is %zu bytes, too short for a safetensors header (truncated?)", path, st->size);
        nm_safetensors_close(st);
        return -1;
    }
    void *m = mmap(NULL, st->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        st->size = 0;
        nm_error_set(err, "%s: mmap failed: %s", path, strerror(errno));
        nm_safetensors_close(st);
        return -1;
    }
    st->map = m;
    uint64_t N = 0;
    for (int b = 7; b >= 0; b--) N = (N << 8) | st->map[b];
    if (N > MAX_HEADER_SIZE) {
        nm_error_set(err, "%s: header length %llu exceeds the format's limit of %llu bytes (not a safetensors file?)",
                     path, (unsigned long long)N, MAX_HEADER_SIZE);
        nm_safetensors_close(st);
        return -1;
    }
    if (8 + N > st->size) {
        nm_error_set(err, "%s: header length %llu does not fit in the %zu-byte file (truncated?)", path,
                     (unsigned long long)N, st->size);
        nm_safetensors_close(st);
        return -1;
    }
    st->data = st->map + 8 + N;
    st->data_size = st->size - 8 - (size_t)N;
    if (parse_header(st, (const char *)st->map + 8, (size_t)N, err)) {
        nm_safetensors_close(st);
        return -1;
    }
    *out = st;
    return 0;
}

const char *nm_safetensors_path(const nm_safetensors *st) { return st->path; }
int nm_safetensors_count(const nm_safetensors *st) { return st->n; }
int nm_safetensors_find(const nm_safetensors *st, const char *name) { return hash_find(&st->hash, st->names, name); }

const char *nm_safetensors_name(const nm_safetensors *st, int i) {
    NM_CHECK(i >= 0 && i < st->n, "tensor index %d of %d", i, st->n);
    return st->names[i];
}

int nm_safetensors_shape(const nm_safetensors *st, int i, int64_t shape[NM_ST_MAX_DIMS]) {
    NM_CHECK(i >= 0 && i < st->n, "tensor index %d of %d", i, st->n);
    for (int d = 0; d < st->ndim[i]; d++) shape[d] = st->shape[i][d];
    return st->ndim[i];
}

int64_t nm_safetensors_numel(const nm_safetensors *st, int i) {
    NM_CHECK(i >= 0 && i < st->n, "tensor index %d of %d", i, st->n);
    return st->numel[i];
}

nm_st_dtype nm_safetensors_dtype(const nm_safetensors *st, int i) {
    NM_CHECK(i >= 0 && i < st->n, "tensor index %d of %d", i, st->n);
    return st->dtype[i]->kind;
}

const char *nm_safetensors_dtype_name(const nm_safetensors *st, int i) {
    NM_CHECK(i >= 0 && i < st->n, "tensor index %d of %d", i, st->n);
    return st->dtype[i]->name;
}

const void *nm_safetensors_data(const nm_safetensors *st, int i, size_t *nbytes) {
    NM_CHECK(i >= 0 && i < st->n, "tensor index %d of %d", i, st->n);
    if (nbytes) *nbytes = (size_t)(st->end[i] - st->begin[i]);
    return st->data + st->begin[i];
}

// bf16 or f16 elements widened to fp32, a piece of the tensor per call (nm_parallel_for).
typedef struct widen_job {
    float *dst;
    const uint8_t *src;
    int bf16;                   // else IEEE half
} widen_job;

static void widen_halves(void *ctx, int64_t begin, int64_t end) {
    const widen_job *j = ctx;
    for (int64_t k = begin; k < end; k++) {
        uint16_t h;
        memcpy(&h, j->src + 2 * k, 2);
        j->dst[k] = j->bf16 ? nm_bf16_to_f32(h) : nm_f16_to_f32(h);
    }
}

int nm_safetensors_read_f32(const nm_safetensors *st, int i, float *dst /* (numel) */, int64_t numel, nm_error *err) {
    NM_CHECK(i >= 0 && i < st->n, "tensor index %d of %d", i, st->n);
    const char *name = st->names[i];
    if (numel != st->numel[i]) {
        return nm_error_set(err, "%s: tensor '%s' has %lld elements, caller expects %lld", st->path, name,
                            (long long)st->numel[i], (long long)numel);
    }
    const uint8_t *src = st->data + st->begin[i];
    // The data area need not be aligned for foreign files (any header length is legal), so
    // every element is read through memcpy; the compiler turns that into plain loads.
    switch (st->dtype[i]->kind) {
    case NM_ST_F32:
        memcpy(dst, src, (size_t)numel * 4);
        return 0;
    case NM_ST_BF16:
    case NM_ST_F16: {
        widen_job job = {dst, src, st->dtype[i]->kind == NM_ST_BF16};
        nm_parallel_for(numel, 262144, 0, widen_halves, &job);
        return 0;
    }
    case NM_ST_F64:
        for (int64_t k = 0; k < numel; k++) {
            double x;
            memcpy(&x, src + 8 * k, 8);
            dst[k] = (float)x;
        }
        return 0;
    default:
        break;
    }
    const char *dt = st->dtype[i]->name;
    if (strncmp(dt, "F8_", 3) == 0) {
        return nm_error_set(err, "%s: tensor '%s' is %s: of the FP8 formats only F8_E4M3 matrices with "
                                 "128 x 128 block scales '<name>_scale_inv' (DeepSeek-V3's release layout) are read, "
                                 "by the model loader; dequantise other layouts first (e.g. DeepSeek's "
                                 "inference/fp8_cast_bf16.py)",
                            st->path, name, dt);
    }
    return nm_error_set(err, "%s: tensor '%s' has dtype %s, which cannot be read as floating point (want F32, BF16, "
                             "F16 or F64)", st->path, name, dt);
}

// --- writer ----------------------------------------------------------------------------------

typedef struct strbuf {
    char *s;
    size_t len, cap;
} strbuf;

static void sb_putn(strbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        while (b->len + n + 1 > b->cap) b->cap = b->cap ? 2 * b->cap : 4096;
        b->s = nm_realloc(b->s, b->cap);
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}

static void sb_puts(strbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

static void sb_json_string(strbuf *b, const char *s) {
    sb_puts(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = (char)c; sb_putn(b, esc, 2); }
        else if (c < 0x20) { snprintf(esc, sizeof(esc), "\\u%04x", c); sb_puts(b, esc); }
        else sb_putn(b, (const char *)&c, 1);
    }
    sb_puts(b, "\"");
}

int nm_safetensors_write(const char *path, const nm_st_tensor *tensors, int n, nm_error *err) {
    // Validate before creating anything.
    char **names = nm_malloc((size_t)(n + 1) * sizeof(char *));
    for (int i = 0; i < n; i++) names[i] = (char *)tensors[i].name;
    name_hash h;
    hash_init(&h, n);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const nm_st_tensor *t = &tensors[i];
        if (!t->name || !*t->name || strcmp(t->name, "__metadata__") == 0) {
            rc = nm_error_set(err, "%s: tensor %d has an empty or reserved name", path, i);
        } else if (hash_insert(&h, names, i) >= 0) {
            rc = nm_error_set(err, "%s: tensor '%s' given twice", path, t->name);
        } else if (t->ndim < 0 || t->ndim > NM_ST_MAX_DIMS) {
            rc = nm_error_set(err, "%s: tensor '%s': %d dims", path, t->name, t->ndim);
        } else if (t->dtype != NM_ST_F32 && t->dtype != NM_ST_BF16 && t->dtype != NM_ST_F16) {
            rc = nm_error_set(err, "%s: tensor '%s': only F32, BF16 and F16 can be written", path, t->name);
        }
        for (int d = 0; rc == 0 && d < t->ndim; d++) {
            if (t->shape[d] < 0) rc = nm_error_set(err, "%s: tensor '%s': negative dim", path, t->name);
        }
    }
    nm_free(h.slots);
    nm_free(names);
    if (rc) return rc;

    strbuf hdr = {0};
    sb_puts(&hdr, "{\"__metadata__\":{\"format\":\"pt\"}");
    uint64_t at = 0;
    int64_t *numel = nm_malloc((size_t)(n + 1) * sizeof(int64_t));
    for (int i = 0; i < n; i++) {
        const nm_st_tensor *t = &tensors[i];
        numel[i] = 1;
        for (int d = 0; d < t->ndim; d++) numel[i] *= t->shape[d];
        uint64_t bytes = (uint64_t)numel[i] * (t->dtype == NM_ST_F32 ? 4 : 2);
        char num[96];
        sb_puts(&hdr, ",");
        sb_json_string(&hdr, t->name);
        sb_puts(&hdr, t->dtype == NM_ST_F32    ? ":{\"dtype\":\"F32\",\"shape\":["
                      : t->dtype == NM_ST_F16 ? ":{\"dtype\":\"F16\",\"shape\":["
                                              : ":{\"dtype\":\"BF16\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            snprintf(num, sizeof(num), d ? ",%lld" : "%lld", (long long)t->shape[d]);
            sb_puts(&hdr, num);
        }
        snprintf(num, sizeof(num), "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)at,
                 (unsigned long long)(at + bytes));
        sb_puts(&hdr, num);
        at += bytes;
    }
    sb_puts(&hdr, "}");
    while (hdr.len % 8) sb_puts(&hdr, " ");  // data starts 8-aligned, as safetensors itself writes

    nm_atomic_file f;
    if (nm_atomic_open(&f, path, err)) {
        nm_free(hdr.s);
        nm_free(numel);
        return -1;
    }
    uint8_t len8[8];
    for (int b = 0; b < 8; b++) len8[b] = (uint8_t)((uint64_t)hdr.len >> (8 * b));
    rc = nm_fwrite_all(f.fp, len8, 8, path, err);
    if (rc == 0) rc = nm_fwrite_all(f.fp, hdr.s, hdr.len, path, err);
    enum { CHUNK = 1 << 20 };
    uint16_t *buf = NULL;
    for (int i = 0; i < n && rc == 0; i++) {
        const nm_st_tensor *t = &tensors[i];
        if (numel[i] == 0) continue;
        NM_CHECK(t->data != NULL, "tensor '%s' has no data", t->name);
        if (t->dtype == NM_ST_F32) {
            rc = nm_fwrite_all(f.fp, t->data, (size_t)numel[i] * 4, path, err);
            continue;
        }
        if (!buf) buf = nm_malloc(CHUNK * sizeof(uint16_t));
        for (int64_t s = 0; s < numel[i] && rc == 0; s += CHUNK) {
            int64_t m = numel[i] - s < CHUNK ? numel[i] - s : CHUNK;
            if (t->dtype == NM_ST_F16) {
                for (int64_t k = 0; k < m; k++) buf[k] = nm_f32_to_f16(t->data[s + k]);
            } else {
                for (int64_t k = 0; k < m; k++) buf[k] = nm_f32_to_bf16(t->data[s + k]);
            }
            rc = nm_fwrite_all(f.fp, buf, (size_t)m * 2, path, err);
        }
    }
    nm_free(buf);
    nm_free(hdr.s);
    nm_free(numel);
    if (rc) {
        nm_atomic_abort(&f);
        return -1;
    }
    return nm_atomic_commit(&f, err);
}
