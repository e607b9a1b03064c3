// indexed.c: implementation of indexed.h (Megatron MMIDIDX reader and writer).
#include "data/indexed.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"

static const uint8_t idx_magic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};

// --- little-endian reads at any alignment -------------------------------------------------------
// Every x86/ARM machine we target is little-endian; memcpy keeps unaligned reads defined.

static inline uint64_t rd_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline int64_t rd_i64(const uint8_t *p) { int64_t v; memcpy(&v, p, 8); return v; }
static inline int32_t rd_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

int nm_indexed_itemsize(int dtype) {
    switch (dtype) {
    case NM_IDX_UINT8: case NM_IDX_INT8: return 1;
    case NM_IDX_INT16: case NM_IDX_UINT16: return 2;
    case NM_IDX_INT32: return 4;
    case NM_IDX_INT64: return 8;
    default: return 0;
    }
}

const char *nm_indexed_dtype_name(int dtype) {
    switch (dtype) {
    case NM_IDX_UINT8: return "uint8";
    case NM_IDX_INT8: return "int8";
    case NM_IDX_INT16: return "int16";
    case NM_IDX_INT32: return "int32";
    case NM_IDX_INT64: return "int64";
    case NM_IDX_FLOAT64: return "float64";
    case NM_IDX_FLOAT32: return "float32";
    case NM_IDX_UINT16: return "uint16";
    default: return "unknown";
    }
}

int nm_indexed_dtype_for_vocab(int64_t vocab_size) {
    return vocab_size < 65500 ? NM_IDX_UINT16 : NM_IDX_INT32;
}

// --- validation ------------------------------------------------------------------------------

// Checks everything listed in the header comment; fills the derived fields of ds.
// idx_name/bin_name are the file names used in messages.
static int validate(nm_indexed *ds, const char *idx_name, const char *bin_name, nm_error *err) {
    const uint8_t *p = ds->idx;
    size_t size = ds->idx_size;
    if (size < NM_IDX_HEADER_SIZE) {
        return nm_error_set(err, "%s: truncated index: %zu bytes, the header alone is %d bytes", idx_name, size,
                            NM_IDX_HEADER_SIZE);
    }
    if (memcmp(p, idx_magic, 9) != 0) {
        return nm_error_set(err,
                            "%s: bad magic %02x %02x %02x %02x %02x %02x %02x %02x %02x, expected \"MMIDIDX\\0\\0\" "
                            "(not a Megatron MMIDIDX index)",
                            idx_name, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]);
    }
    uint64_t version = rd_u64(p + 9);
    if (version != 1) return nm_error_set(err, "%s: version is %llu, only version 1 exists", idx_name, (unsigned long long)version);
    int dtype = p[17];
    int itemsize = nm_indexed_itemsize(dtype);
    if (dtype == NM_IDX_FLOAT32 || dtype == NM_IDX_FLOAT64) {
        return nm_error_set(err, "%s: dtype code %d (%s) is not a token type (token files use 4 = int32 or 8 = uint16)",
                            idx_name, dtype, nm_indexed_dtype_name(dtype));
    }
    if (itemsize == 0) return nm_error_set(err, "%s: unknown dtype code %d (known: 1,2,3,4,5,8)", idx_name, dtype);
    uint64_t S = rd_u64(p + 18), Dc = rd_u64(p + 26);

    // File size == 34 + 12 S + 8 Dc, computed without overflow for any S, Dc.
    size_t body = size - NM_IDX_HEADER_SIZE;
    if (S > body / 12 || Dc > (body - 12 * S) / 8) {
        return nm_error_set(err,
                            "%s: truncated index: %zu bytes, but S=%llu sequences and Dc=%llu document indices need "
                            "34 + 12*S + 8*Dc bytes",
                            idx_name, size, (unsigned long long)S, (unsigned long long)Dc);
    }
    size_t need = NM_IDX_HEADER_SIZE + 12 * (size_t)S + 8 * (size_t)Dc;
    // A multimodal file carries S more bytes (int8 sequence_modes); the tokens are the same.
    if (size != need && size != need + S) {
        return nm_error_set(err, "%s: index is %zu bytes, but S=%llu and Dc=%llu give 34 + 12*S + 8*Dc = %zu bytes", idx_name,
                            size, (unsigned long long)S, (unsigned long long)Dc, need);
    }
    if (Dc < 1) return nm_error_set(err, "%s: document_indices count Dc=0, it needs at least the leading 0", idx_name);

    const uint8_t *lens = p + NM_IDX_HEADER_SIZE;
    const uint8_t *ptrs = lens + 4 * (size_t)S;
    const uint8_t *docs = ptrs + 8 * (size_t)S;
    // Running byte offset; stays <= bin_size, so no overflow however large S is.
    uint64_t running = 0;
    int32_t max_len = 0;
    for (uint64_t i = 0; i < S; i++) {
        int32_t len = rd_i32(lens + 4 * i);
        int64_t ptr = rd_i64(ptrs + 8 * i);
        if (len < 0) return nm_error_set(err, "%s: sequence_lengths[%llu] = %d is negative", idx_name, (unsigned long long)i, len);
        uint64_t nbytes = (uint64_t)len * (uint64_t)itemsize;
        if (ptr < 0 || (uint64_t)ptr > ds->bin_size || nbytes > ds->bin_size - (uint64_t)ptr) {
            if ((uint64_t)ptr == running) {   // the index is consistent, the .bin is short
                return nm_error_set(err,
                                    "%s: %zu bytes, but %s needs %llu bytes to hold sequence %llu "
                                    "(sequence_pointers = %lld, sequence_lengths = %d): truncated .bin",
                                    bin_name, ds->bin_size, idx_name, (unsigned long long)(running + nbytes),
                                    (unsigned long long)i, (long long)ptr, len);
            }
            return nm_error_set(err,
                                "%s: sequence_pointers[%llu] = %lld with sequence_lengths[%llu] = %d (%llu bytes) lies "
                                "outside %s (%zu bytes)",
                                idx_name, (unsigned long long)i, (long long)ptr, (unsigned long long)i, len,
                                (unsigned long long)nbytes, bin_name, ds->bin_size);
        }
        if ((uint64_t)ptr != running) {
            return nm_error_set(err,
                                "%s: sequence_pointers[%llu] = %lld, but the sum of the previous sequence_lengths * %d "
                                "bytes is %llu",
                                idx_name, (unsigned long long)i, (long long)ptr, itemsize, (unsigned long long)running);
        }
        running += nbytes;
        if (len > max_len) max_len = len;
    }
    if (running != ds->bin_size) {
        return nm_error_set(err, "%s: %zu bytes, but the index describes %llu tokens * %d bytes = %llu bytes%s", bin_name,
                            ds->bin_size, (unsigned long long)(running / (uint64_t)itemsize), itemsize,
                            (unsigned long long)running, ds->bin_size < running ? " (truncated .bin?)" : "");
    }
    int64_t prev = rd_i64(docs);
    if (prev != 0) return nm_error_set(err, "%s: document_indices[0] = %lld, must be 0", idx_name, (long long)prev);
    for (uint64_t d = 1; d < Dc; d++) {
        int64_t v = rd_i64(docs + 8 * d);
        if (v < prev) {
            return nm_error_set(err, "%s: document_indices[%llu] = %lld is less than document_indices[%llu] = %lld (must not decrease)",
                                idx_name, (unsigned long long)d, (long long)v, (unsigned long long)(d - 1), (long long)prev);
        }
        prev = v;
    }
    if ((uint64_t)prev != S) {
        return nm_error_set(err, "%s: last document_indices[%llu] = %lld, must equal the sequence count S = %llu", idx_name,
                            (unsigned long long)(Dc - 1), (long long)prev, (unsigned long long)S);
    }
    ds->dtype = dtype;
    ds->itemsize = itemsize;
    ds->n_seqs = (int64_t)S;
    ds->n_docs = (int64_t)Dc - 1;
    ds->n_tokens = (int64_t)(running / (uint64_t)itemsize);
    ds->max_len = max_len;
    return 0;
}

// --- open / close ----------------------------------------------------------------------------

static int map_file(const char *path, const uint8_t **data, size_t *size, nm_error *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return nm_error_set(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return nm_error_set(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return nm_error_set(err, "%s is %s, not a file: a dataset is the PREFIX.bin / PREFIX.idx pair that prepare writes",
                            path, S_ISDIR(st.st_mode) ? "a directory" : "a pipe or device");
    }
    *size = (size_t)st.st_size;
    *data = NULL;
    if (st.st_size > 0) {   // mmap of length 0 fails; an empty .bin is valid for empty documents
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            return nm_error_set(err, "%s: cannot mmap %zu bytes: %s", path, *size, strerror(e));
        }
        *data = m;
    }
    close(fd);
    return 0;
}

static void release(const uint8_t *data, size_t size, int owned) {
    if (!data) return;
    if (owned == 1) nm_free((void *)data);
    else if (owned == 0) munmap((void *)data, size);
}

void nm_indexed_close(nm_indexed *ds) {
    if (!ds) return;
    release(ds->idx, ds->idx_size, ds->idx_owned);
    release(ds->bin, ds->bin_size, ds->bin_owned);
    nm_free(ds->name);
    nm_free(ds);
}

// The two slips a prefix invites, when PREFIX.idx does not exist: "x.bin" or "x.idx" for the
// prefix "x" (the files are what a listing shows), and the dataset's directory. Say so,
// rather than "x.bin.idx: cannot open".
static int check_prefix(const char *prefix, nm_error *err) {
    size_t n = strlen(prefix);
    char *idx_path = nm_malloc(n + 8);
    snprintf(idx_path, n + 8, "%s.idx", prefix);
    int exists = access(idx_path, F_OK) == 0;
    nm_free(idx_path);
    if (exists) return 0;   // whatever its name (a dataset may really be called "x.bin")
    if (n > 4 && (!strcmp(prefix + n - 4, ".bin") || !strcmp(prefix + n - 4, ".idx")))
        return nm_error_set(err, "%s: give the dataset prefix without %s (%.*s), the name both %.*s.bin and %.*s.idx "
                            "share", prefix, prefix + n - 4, (int)(n - 4), prefix, (int)(n - 4), prefix, (int)(n - 4),
                            prefix);
    struct stat st;
    if (stat(prefix, &st) == 0 && S_ISDIR(st.st_mode))
        return nm_error_set(err, "%s is a directory; a dataset is named by its prefix, the path of PREFIX.bin and "
                            "PREFIX.idx without the extension (e.g. %s/name_text_document)", prefix, prefix);
    return 0;
}

int nm_indexed_open(nm_indexed **out, const char *prefix, nm_error *err) {
    if (check_prefix(prefix, err)) return -1;
    size_t n = strlen(prefix) + 8;
    char *idx_path = nm_malloc(n), *bin_path = nm_malloc(n);
    snprintf(idx_path, n, "%s.idx", prefix);
    snprintf(bin_path, n, "%s.bin", prefix);
    nm_indexed *ds = nm_calloc(1, sizeof(*ds));
    ds->name = nm_strdup(prefix);
    int rc = map_file(idx_path, &ds->idx, &ds->idx_size, err);
    if (rc == 0) rc = map_file(bin_path, &ds->bin, &ds->bin_size, err);
    if (rc == 0) rc = validate(ds, idx_path, bin_path, err);
    nm_free(idx_path);
    nm_free(bin_path);
    if (rc != 0) {
        nm_indexed_close(ds);
        return rc;
    }
    *out = ds;
    return 0;
}

int nm_indexed_open_memory(nm_indexed **out, const char *name, const void *idx, size_t idx_size, const void *bin,
                           size_t bin_size, int own, nm_error *err) {
    nm_indexed *ds = nm_calloc(1, sizeof(*ds));
    ds->name = nm_strdup(name);
    ds->idx = idx;
    ds->idx_size = idx_size;
    ds->bin = bin;
    ds->bin_size = bin_size;
    ds->idx_owned = ds->bin_owned = own ? 1 : -1;
    size_t n = strlen(name) + 8;
    char *idx_name = nm_malloc(n), *bin_name = nm_malloc(n);
    snprintf(idx_name, n, "%s.idx", name);
    snprintf(bin_name, n, "%s.bin", name);
    int rc = validate(ds, idx_name, bin_name, err);
    nm_free(idx_name);
    nm_free(bin_name);
    if (rc != 0) {
        nm_indexed_close(ds);
        return rc;
    }
    *out = ds;
    return 0;
}

// --- access ----------------------------------------------------------------------------------

int32_t nm_indexed_seq_len(const nm_indexed *ds, int64_t i) {
    NM_CHECK(i >= 0 && i < ds->n_seqs, "%s: sequence %lld of %lld", ds->name, (long long)i, (long long)ds->n_seqs);
    return rd_i32(ds->idx + NM_IDX_HEADER_SIZE + 4 * (size_t)i);
}

int64_t nm_indexed_seq_ptr(const nm_indexed *ds, int64_t i) {
    NM_CHECK(i >= 0 && i < ds->n_seqs, "%s: sequence %lld of %lld", ds->name, (long long)i, (long long)ds->n_seqs);
    return rd_i64(ds->idx + NM_IDX_HEADER_SIZE + 4 * (size_t)ds->n_seqs + 8 * (size_t)i);
}

int64_t nm_indexed_doc_index(const nm_indexed *ds, int64_t d) {
    NM_CHECK(d >= 0 && d <= ds->n_docs, "%s: document index %lld of %lld", ds->name, (long long)d, (long long)ds->n_docs + 1);
    return rd_i64(ds->idx + NM_IDX_HEADER_SIZE + 12 * (size_t)ds->n_seqs + 8 * (size_t)d);
}

int nm_indexed_read(const nm_indexed *ds, int64_t i, int64_t offset, int64_t n, int32_t *out, nm_error *err) {
    int32_t len = nm_indexed_seq_len(ds, i);
    NM_CHECK(offset >= 0 && n >= 0 && offset + n <= len, "%s: sequence %lld has %d tokens, asked [%lld, %lld)", ds->name,
             (long long)i, len, (long long)offset, (long long)(offset + n));
    const uint8_t *src = ds->bin + nm_indexed_seq_ptr(ds, i) + offset * ds->itemsize;
    switch (ds->dtype) {
    case NM_IDX_UINT8:
        for (int64_t k = 0; k < n; k++) out[k] = src[k];
        break;
    case NM_IDX_INT8:
        for (int64_t k = 0; k < n; k++) out[k] = (int8_t)src[k];
        break;
    case NM_IDX_UINT16:
        for (int64_t k = 0; k < n; k++) { uint16_t v; memcpy(&v, src + 2 * k, 2); out[k] = v; }
        break;
    case NM_IDX_INT16:
        for (int64_t k = 0; k < n; k++) { int16_t v; memcpy(&v, src + 2 * k, 2); out[k] = v; }
        break;
    case NM_IDX_INT32:
        if (n) memcpy(out, src, 4 * (size_t)n);
        break;
    case NM_IDX_INT64:
        for (int64_t k = 0; k < n; k++) {
            int64_t v = rd_i64(src + 8 * k);
            if (v < INT32_MIN || v > INT32_MAX) {
                return nm_error_set(err, "%s.bin: token %lld of sequence %lld is %lld, outside int32", ds->name,
                                    (long long)(offset + k), (long long)i, (long long)v);
            }
            out[k] = (int32_t)v;
        }
        break;
    default:
        NM_PANIC("%s: dtype %d passed validation", ds->name, ds->dtype);
    }
    return 0;
}

// --- writer ----------------------------------------------------------------------------------

struct nm_indexed_writer {
    char *prefix;
    int dtype, itemsize;
    nm_atomic_file bin;         // PREFIX.bin, streamed
    char *bin_path;
    int32_t *lengths;           // (S,) grows
    int64_t n_seqs, cap_seqs;
    int64_t *doc_index;         // (Dc,) grows, starts as [0]
    int64_t n_doc_index, cap_doc_index;
    int64_t n_tokens;
    union {                     // dtype conversion buffer for fwrite (a union: no aliasing casts)
        uint8_t u8[1 << 16];
        uint16_t u16[1 << 15];
        int64_t i64[1 << 13];
    } buf;
    int finalized;
};

int nm_indexed_writer_create(nm_indexed_writer **out, const char *prefix, int dtype, nm_error *err) {
    int itemsize = nm_indexed_itemsize(dtype);
    if (itemsize == 0) return nm_error_set(err, "%s: cannot write dtype code %d", prefix, dtype);
    nm_indexed_writer *w = nm_calloc(1, sizeof(*w));
    w->prefix = nm_strdup(prefix);
    w->dtype = dtype;
    w->itemsize = itemsize;
    size_t n = strlen(prefix) + 8;
    w->bin_path = nm_malloc(n);
    snprintf(w->bin_path, n, "%s.bin", prefix);
    if (nm_atomic_open(&w->bin, w->bin_path, err) != 0) {
        nm_free(w->bin_path);
        nm_free(w->prefix);
        nm_free(w);
        return -1;
    }
    w->cap_seqs = 1024;
    w->lengths = nm_malloc(sizeof(int32_t) * (size_t)w->cap_seqs);
    w->cap_doc_index = 1024;
    w->doc_index = nm_malloc(sizeof(int64_t) * (size_t)w->cap_doc_index);
    w->doc_index[w->n_doc_index++] = 0;
    *out = w;
    return 0;
}

static int token_fits(int dtype, int32_t t) {
    switch (dtype) {
    case NM_IDX_UINT8: return t >= 0 && t <= 255;
    case NM_IDX_INT8: return t >= -128 && t <= 127;
    case NM_IDX_UINT16: return t >= 0 && t <= 65535;
    case NM_IDX_INT16: return t >= -32768 && t <= 32767;
    default: return 1;
    }
}

int nm_indexed_writer_add_item(nm_indexed_writer *w, const int32_t *tokens, int64_t n, nm_error *err) {
    NM_CHECK(!w->finalized && n >= 0, "n=%lld", (long long)n);
    if (n > INT32_MAX) return nm_error_set(err, "%s: sequence of %lld tokens exceeds the int32 length field", w->prefix, (long long)n);
    int64_t per = (int64_t)sizeof(w->buf.u8) / w->itemsize;
    for (int64_t s = 0; s < n; s += per) {
        int64_t m = n - s < per ? n - s : per;
        const int32_t *src = tokens + s;
        // One loop per width (the common two are straight conversions the compiler vectorises);
        // range checks first, so a bad token is reported before anything of it is written.
        int ok = 1;
        for (int64_t k = 0; k < m; k++) ok &= token_fits(w->dtype, src[k]);
        if (!ok) {
            for (int64_t k = 0; k < m; k++) {
                if (!token_fits(w->dtype, src[k])) {
                    return nm_error_set(err, "%s: token id %d does not fit dtype %s", w->prefix, src[k],
                                        nm_indexed_dtype_name(w->dtype));
                }
            }
        }
        switch (w->itemsize) {
        case 1:
            for (int64_t k = 0; k < m; k++) w->buf.u8[k] = (uint8_t)src[k];
            break;
        case 2:
            for (int64_t k = 0; k < m; k++) w->buf.u16[k] = (uint16_t)src[k];
            break;
        case 4:
            memcpy(w->buf.u8, src, 4 * (size_t)m);
            break;
        default:
            for (int64_t k = 0; k < m; k++) w->buf.i64[k] = src[k];
            break;
        }
        if (nm_fwrite_all(w->bin.fp, w->buf.u8, (size_t)(m * w->itemsize), w->bin_path, err) != 0) return -1;
    }
    if (w->n_seqs == w->cap_seqs) {
        w->cap_seqs *= 2;
        w->lengths = nm_realloc(w->lengths, sizeof(int32_t) * (size_t)w->cap_seqs);
    }
    w->lengths[w->n_seqs++] = (int32_t)n;
    w->n_tokens += n;
    return 0;
}

int nm_indexed_writer_end_document(nm_indexed_writer *w, nm_error *err) {
    NM_CHECK(!w->finalized, "writer already finalized");
    if (w->n_doc_index == w->cap_doc_index) {
        w->cap_doc_index *= 2;
        w->doc_index = nm_realloc(w->doc_index, sizeof(int64_t) * (size_t)w->cap_doc_index);
    }
    w->doc_index[w->n_doc_index++] = w->n_seqs;
    return 0;
}

int nm_indexed_writer_add_document(nm_indexed_writer *w, const int32_t *tokens, int64_t n, nm_error *err) {
    if (nm_indexed_writer_add_item(w, tokens, n, err) != 0) return -1;
    return nm_indexed_writer_end_document(w, err);
}

int64_t nm_indexed_writer_tokens(const nm_indexed_writer *w) { return w->n_tokens; }
int64_t nm_indexed_writer_docs(const nm_indexed_writer *w) { return w->n_doc_index - 1; }
int64_t nm_indexed_writer_seqs(const nm_indexed_writer *w) { return w->n_seqs; }

void nm_indexed_build_idx(int dtype, const int32_t *lengths, int64_t S, const int64_t *doc_index, int64_t Dc,
                          uint8_t **idx, size_t *idx_size) {
    int itemsize = nm_indexed_itemsize(dtype);
    NM_CHECK(itemsize > 0 && S >= 0 && Dc >= 1, "dtype=%d S=%lld Dc=%lld", dtype, (long long)S, (long long)Dc);
    size_t size = NM_IDX_HEADER_SIZE + 12 * (size_t)S + 8 * (size_t)Dc;
    uint8_t *p = nm_malloc(size);
    memcpy(p, idx_magic, 9);
    uint64_t version = 1, s64 = (uint64_t)S, dc64 = (uint64_t)Dc;
    memcpy(p + 9, &version, 8);
    p[17] = (uint8_t)dtype;
    memcpy(p + 18, &s64, 8);
    memcpy(p + 26, &dc64, 8);
    uint8_t *lens = p + NM_IDX_HEADER_SIZE, *ptrs = lens + 4 * (size_t)S, *docs = ptrs + 8 * (size_t)S;
    if (S) memcpy(lens, lengths, 4 * (size_t)S);
    int64_t running = 0;   // pointers[i] = sum_{j<i} lengths[j] * itemsize, in int64 like Megatron
    for (int64_t i = 0; i < S; i++) {
        memcpy(ptrs + 8 * i, &running, 8);
        running += (int64_t)lengths[i] * itemsize;
    }
    memcpy(docs, doc_index, 8 * (size_t)Dc);
    *idx = p;
    *idx_size = size;
}

int nm_indexed_writer_finalize(nm_indexed_writer *w, nm_error *err) {
    NM_CHECK(!w->finalized, "writer already finalized");
    size_t n = strlen(w->prefix) + 8;
    char *idx_path = nm_malloc(n);
    snprintf(idx_path, n, "%s.idx", w->prefix);
    uint8_t *idx;
    size_t idx_size;
    nm_indexed_build_idx(w->dtype, w->lengths, w->n_seqs, w->doc_index, w->n_doc_index, &idx, &idx_size);
    nm_atomic_file f;
    int rc = nm_atomic_open(&f, idx_path, err);
    if (rc == 0) {
        rc = nm_fwrite_all(f.fp, idx, idx_size, idx_path, err);
        // .bin first: once it is in place the matching .idx follows.
        if (rc == 0) rc = nm_atomic_commit(&w->bin, err);
        if (rc == 0) rc = nm_atomic_commit(&f, err);
        else nm_atomic_abort(&f);
    }
    nm_free(idx);
    nm_free(idx_path);
    if (rc == 0) w->finalized = 1;
    return rc;
}

void nm_indexed_writer_destroy(nm_indexed_writer *w) {
    if (!w) return;
    nm_atomic_abort(&w->bin);   // no-op after a successful commit
    nm_free(w->lengths);
    nm_free(w->doc_index);
    nm_free(w->bin_path);
    nm_free(w->prefix);
    nm_free(w);
}

// --- merge -------------------------------------------------------------------------------------

int nm_indexed_merge(const char *const *prefixes, int n, const char *out_prefix, int64_t *docs, int64_t *tokens,
                     nm_error *err) {
    if (n < 1) return nm_error_set(err, "merge: no input datasets");
    nm_indexed *first;
    if (nm_indexed_open(&first, prefixes[0], err) != 0) return -1;
    int dtype = first->dtype;
    nm_indexed_close(first);
    nm_indexed_writer *w;
    if (nm_indexed_writer_create(&w, out_prefix, dtype, err) != 0) return -1;
    int32_t *buf = NULL;
    int64_t cap = 0;
    int rc = 0;
    for (int k = 0; k < n && rc == 0; k++) {
        nm_indexed *ds;
        if (nm_indexed_open(&ds, prefixes[k], err) != 0) {
            rc = -1;
            break;
        }
        if (ds->dtype != dtype) {
            rc = nm_error_set(err, "merge: %s holds %s tokens, %s %s: merge datasets of one tokenizer's dtype",
                              prefixes[k], nm_indexed_dtype_name(ds->dtype), prefixes[0], nm_indexed_dtype_name(dtype));
        }
        // Each document's sequences (its sentences), then the document's end, as written.
        for (int64_t d = 0; rc == 0 && d < ds->n_docs; d++) {
            int64_t s0 = nm_indexed_doc_index(ds, d), s1 = nm_indexed_doc_index(ds, d + 1);
            for (int64_t s = s0; rc == 0 && s < s1; s++) {
                int64_t len = nm_indexed_seq_len(ds, s);
                if (len > cap) {
                    cap = len;
                    buf = nm_realloc(buf, sizeof(int32_t) * (size_t)cap);
                }
                rc = nm_indexed_read(ds, s, 0, len, buf, err);
                if (rc == 0) rc = nm_indexed_writer_add_item(w, buf, len, err);
            }
            if (rc == 0) rc = nm_indexed_writer_end_document(w, err);
        }
        nm_indexed_close(ds);
    }
    nm_free(buf);
    if (rc == 0) {
        if (docs) *docs = nm_indexed_writer_docs(w);
        if (tokens) *tokens = nm_indexed_writer_tokens(w);
        rc = nm_indexed_writer_finalize(w, err);
    }
    nm_indexed_writer_destroy(w);
    return rc;
}
