// prepare.c: implementation of prepare.h (text/JSONL -> .bin/.idx, parallel tokenization).
//
// Pipeline per input file: mmap it, cut it into documents (parts = sentences) until a batch
// holds BATCH_BYTES of text or BATCH_DOCS documents, tokenize every part of the batch on the
// OpenMP threads, then append the batch to the writer in input order. JSON is parsed on the
// main thread: cJSON keeps a global error position that every parse call writes, so parsing
// on several threads would race.
#include "data/prepare.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "core/parallel.h"
#include "data/indexed.h"
#include "data/tokenizer.h"

#define BATCH_BYTES ((size_t)8 << 20)
#define BATCH_DOCS 16384
#define BIG_INPUT ((int64_t)64 << 20)   // progress lines even when stderr is not a terminal

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// --- a batch of documents ----------------------------------------------------------------------

typedef struct part {
    const char *text;           // into the mmap or into the batch's owned strings
    size_t len;
    int32_t *ids;               // tokenizer output (nm_malloc'd)
    int64_t n_ids;
    int rc;                     // tokenizer status
} part;

typedef struct batch {
    part *parts;
    int64_t n_parts, cap_parts;
    int64_t *doc_end;           // (n_docs,) one past the document's last part
    int64_t n_docs, cap_docs;
    char **owned;               // strings copied out of JSON
    int64_t n_owned, cap_owned;
    size_t bytes;               // text bytes in the batch
} batch;

static void batch_add_part(batch *b, const char *text, size_t len) {
    if (b->n_parts == b->cap_parts) {
        b->cap_parts = b->cap_parts ? 2 * b->cap_parts : 1024;
        b->parts = nm_realloc(b->parts, sizeof(part) * (size_t)b->cap_parts);
    }
    b->parts[b->n_parts++] = (part){.text = text, .len = len};
    b->bytes += len;
}

static void batch_end_doc(batch *b) {
    if (b->n_docs == b->cap_docs) {
        b->cap_docs = b->cap_docs ? 2 * b->cap_docs : 1024;
        b->doc_end = nm_realloc(b->doc_end, sizeof(int64_t) * (size_t)b->cap_docs);
    }
    b->doc_end[b->n_docs++] = b->n_parts;
}

static const char *batch_own(batch *b, const char *s, size_t len) {
    if (b->n_owned == b->cap_owned) {
        b->cap_owned = b->cap_owned ? 2 * b->cap_owned : 1024;
        b->owned = nm_realloc(b->owned, sizeof(char *) * (size_t)b->cap_owned);
    }
    char *copy = nm_malloc(len + 1);
    memcpy(copy, s, len);
    copy[len] = 0;
    b->owned[b->n_owned++] = copy;
    return copy;
}

static void batch_clear(batch *b) {
    for (int64_t i = 0; i < b->n_parts; i++) nm_free(b->parts[i].ids);
    for (int64_t i = 0; i < b->n_owned; i++) nm_free(b->owned[i]);
    b->n_parts = b->n_docs = b->n_owned = 0;
    b->bytes = 0;
}

static void batch_free(batch *b) {
    batch_clear(b);
    nm_free(b->parts);
    nm_free(b->doc_end);
    nm_free(b->owned);
}

static int batch_full(const batch *b) { return b->bytes >= BATCH_BYTES || b->n_docs >= BATCH_DOCS; }

// --- the run -----------------------------------------------------------------------------------

typedef struct run {
    const nm_prepare_opts *o;
    const nm_tokenizer *tok;
    int32_t eod;
    nm_indexed_writer *w;
    batch b;
    int32_t *scratch;           // part ids + EOD
    int64_t cap_scratch;
    int64_t bytes_done, bytes_total;
    double t0, t_last_progress;
    int progress, tty;
} run;

static void show_progress(run *r, int final) {
    double t = now_s();
    if (!r->progress) return;
    if (!final && t - r->t_last_progress < (r->tty ? 0.25 : 10.0)) return;
    r->t_last_progress = t;
    double el = t - r->t0 > 1e-9 ? t - r->t0 : 1e-9;
    double frac = r->bytes_total ? (double)r->bytes_done / (double)r->bytes_total : 1.0;
    double eta = frac > 0 ? el * (1 - frac) / frac : 0;
    fprintf(stderr, "%sprepare: %.1f/%.1f MB (%.0f%%) | %lld docs | %.2fM tok/s | ETA %dm%02ds%s", r->tty ? "\r" : "",
            (double)r->bytes_done / 1e6, (double)r->bytes_total / 1e6, 100 * frac,
            (long long)nm_indexed_writer_docs(r->w), (double)nm_indexed_writer_tokens(r->w) / el / 1e6, (int)eta / 60,
            (int)eta % 60, r->tty && !final ? "" : "\n");
    fflush(stderr);
}

// The batch's parts tokenized by nm_parallel_for's threads; the first failing part (lowest
// index, whichever thread met it) is the one reported.
typedef struct encode_job {
    run *r;
    pthread_mutex_t lock;
    int64_t first_bad;
    nm_error bad_err;
} encode_job;

static void encode_parts(void *ctx, int64_t begin, int64_t end) {
    encode_job *j = ctx;
    for (int64_t i = begin; i < end; i++) {
        part *p = &j->r->b.parts[i];
        nm_error e;
        p->ids = NULL;
        p->n_ids = 0;
        p->rc = nm_tokenizer_encode(j->r->tok, p->text, p->len, &p->ids, &p->n_ids, &e);
        if (p->rc != 0) {
            pthread_mutex_lock(&j->lock);
            if (j->first_bad < 0 || i < j->first_bad) {
                j->first_bad = i;
                j->bad_err = e;
            }
            pthread_mutex_unlock(&j->lock);
        }
    }
}

// Tokenizes the batch in parallel, then writes it in order.
static int flush_batch(run *r, nm_error *err) {
    batch *b = &r->b;
    encode_job job = {.r = r, .lock = PTHREAD_MUTEX_INITIALIZER, .first_bad = -1};
    job.bad_err.msg[0] = 0;
    nm_parallel_for(b->n_parts, 4, r->o->workers > 0 ? r->o->workers : 0, encode_parts, &job);
    pthread_mutex_destroy(&job.lock);
    int64_t first_bad = job.first_bad;
    nm_error bad_err = job.bad_err;
    if (first_bad >= 0) {
        *err = bad_err;
        return -1;
    }
    int64_t p0 = 0;
    for (int64_t d = 0; d < b->n_docs; d++) {
        int64_t p1 = b->doc_end[d], last = -1;
        for (int64_t i = p0; i < p1; i++) {
            if (b->parts[i].n_ids > 0) last = i;
        }
        for (int64_t i = p0; i < p1; i++) {
            part *p = &b->parts[i];
            if (p->n_ids == 0) continue;   // Megatron drops empty sentences
            const int32_t *ids = p->ids;
            int64_t n = p->n_ids;
            if (i == last && r->o->append_eod) {
                // EOD joins the last sentence (its length grows by 1), as preprocess_data.py.
                if (n + 1 > r->cap_scratch) {
                    r->cap_scratch = 2 * (n + 1);
                    r->scratch = nm_realloc(r->scratch, sizeof(int32_t) * (size_t)r->cap_scratch);
                }
                memcpy(r->scratch, ids, sizeof(int32_t) * (size_t)n);
                r->scratch[n++] = r->eod;
                ids = r->scratch;
            }
            if (nm_indexed_writer_add_item(r->w, ids, n, err) != 0) return -1;
        }
        if (nm_indexed_writer_end_document(r->w, err) != 0) return -1;
        p0 = p1;
    }
    batch_clear(b);
    show_progress(r, 0);
    return 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcasecmp(s + n - m, suffix) == 0;
}

static int is_blank(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r') return 0;
    }
    return 1;
}

// Plain text: blocks of non-blank lines. With final = 0 (a chunk of a compressed stream) a
// block still open at the end is left for the next chunk: *used is where it starts (size when
// none is open); every block before it is in the batch.
static int cut_text(run *r, const char *path, const char *data, size_t size, int final, size_t *used,
                    nm_error *err) {
    (void)path;
    *used = size;
    if (r->o->doc_per_file) {
        batch_add_part(&r->b, data, size);
        batch_end_doc(&r->b);
        r->bytes_done += (int64_t)size;
        return batch_full(&r->b) ? flush_batch(r, err) : 0;
    }
    size_t pos = 0, block = 0, block_end = 0;
    int in_block = 0;
    while (pos < size) {
        const char *nl = memchr(data + pos, '\n', size - pos);
        size_t end = nl ? (size_t)(nl - data) : size;   // line is [pos, end)
        if (is_blank(data + pos, end - pos)) {
            if (in_block) {
                batch_add_part(&r->b, data + block, block_end - block);
                batch_end_doc(&r->b);
                in_block = 0;
                r->bytes_done += (int64_t)(end - block);
                if (batch_full(&r->b) && flush_batch(r, err) != 0) return -1;
            }
        } else {
            if (!in_block) {
                in_block = 1;
                block = pos;
            }
            block_end = end;
        }
        pos = nl ? end + 1 : size;
    }
    if (in_block && !final) *used = block;  // its end is in the next chunk
    else if (in_block) {
        batch_add_part(&r->b, data + block, block_end - block);
        batch_end_doc(&r->b);
    }
    return 0;
}

// JSONL: one object per line, the key's string (or list of strings) is the document. Lines
// are numbered from *line + 1 (the lines of earlier chunks); with final = 0 a last line
// without its newline is left for the next chunk (*used: where it starts).
static int cut_jsonl(run *r, const char *path, const char *data, size_t size, int final, size_t *used,
                     int64_t *lines, nm_error *err) {
    const char *key = r->o->json_key ? r->o->json_key : "text";
    size_t pos = 0;
    int64_t line = *lines;
    *used = size;
    while (pos < size) {
        const char *nl = memchr(data + pos, '\n', size - pos);
        if (!nl && !final) {
            *used = pos;
            break;
        }
        size_t end = nl ? (size_t)(nl - data) : size;
        line++;
        const char *s = data + pos;
        size_t n = end - pos;
        pos = nl ? end + 1 : size;
        if (is_blank(s, n)) continue;
        cJSON *obj = cJSON_ParseWithLength(s, n);
        if (!obj) return nm_error_set(err, "%s:%lld: not valid JSON", path, (long long)line);
        int rc = 0;
        const cJSON *v = cJSON_IsObject(obj) ? cJSON_GetObjectItemCaseSensitive(obj, key) : NULL;
        if (!cJSON_IsObject(obj)) {
            rc = nm_error_set(err, "%s:%lld: expected a JSON object per line", path, (long long)line);
        } else if (cJSON_IsString(v)) {
            size_t len = strlen(v->valuestring);
            batch_add_part(&r->b, batch_own(&r->b, v->valuestring, len), len);
        } else if (cJSON_IsArray(v)) {
            const cJSON *it;
            cJSON_ArrayForEach(it, v) {
                if (!cJSON_IsString(it)) {
                    rc = nm_error_set(err, "%s:%lld: field \"%s\" is a list with a non-string element", path, (long long)line, key);
                    break;
                }
                size_t len = strlen(it->valuestring);
                batch_add_part(&r->b, batch_own(&r->b, it->valuestring, len), len);
            }
        } else {
            rc = nm_error_set(err, "%s:%lld: no string field \"%s\"", path, (long long)line, key);
        }
        cJSON_Delete(obj);
        if (rc != 0) return -1;
        batch_end_doc(&r->b);
        r->bytes_done += (int64_t)(pos - (size_t)(s - data));
        if (batch_full(&r->b) && flush_batch(r, err) != 0) return -1;
    }
    *lines = line;
    return 0;
}

// The input's kind from its name: JSONL or text, after a .gz / .zst suffix.
static int is_jsonl(const run *r, const char *path) {
    if (r->o->jsonl) return 1;
    size_t n = strlen(path);
    char name[4096];
    snprintf(name, sizeof name, "%s", path);
    if (n > 3 && ends_with(name, ".gz")) name[n - 3] = 0;
    else if (n > 4 && ends_with(name, ".zst")) name[n - 4] = 0;
    return ends_with(name, ".jsonl") || ends_with(name, ".json");
}

// Cuts a whole buffer (a mapped file, a stream read to its end).
static int cut_all(run *r, const char *path, const char *data, size_t size, nm_error *err) {
    size_t used;
    int64_t lines = 0;
    return is_jsonl(r, path) ? cut_jsonl(r, path, data, size, 1, &used, &lines, err)
                             : cut_text(r, path, data, size, 1, &used, err);
}

// --- streamed inputs: compressed files, pipes ---------------------------------------------------
//
// Corpora ship as .jsonl.gz (Dolma) and .jsonl.zst: decompressed by zlib and libzstd in chunks
// of STREAM_CHUNK bytes, each cut up to its last complete unit (a JSONL line, a text block),
// the rest carried to the next chunk, so memory is the chunk plus the longest unit, whatever
// the file's size (doc_per_file text is the exception: the whole stream is one document). A
// FIFO, a pipe or a process substitution (<(zcat x.gz)), which cannot be mapped, streams the
// same way from the descriptor already open (reopening a FIFO could lose its writer).

#define STREAM_CHUNK ((size_t)4 << 20)

enum { Z_GZIP, Z_ZSTD, Z_RAW };

typedef struct zreader {
    int zst;                    // Z_GZIP (zlib), Z_ZSTD or Z_RAW (a descriptor read as it is)
    int fd;                     // Z_RAW
    gzFile gz;
    FILE *fp;
    ZSTD_DStream *ds;
    char *in;
    ZSTD_inBuffer zin;
    size_t last;                // ZSTD_decompressStream's last answer: 0 at a frame's end
    int64_t in_bytes;           // compressed bytes read so far
    int eof;
    const char *path;
} zreader;

static int zreader_open(zreader *z, const char *path, int zst, int fd, nm_error *err) {
    *z = (zreader){.zst = zst, .path = path, .fd = fd};
    if (zst == Z_RAW) return 0;
    if (zst == Z_GZIP) {
        z->gz = gzopen(path, "rb");
        if (!z->gz) return nm_error_set(err, "%s: cannot open: %s", path, strerror(errno ? errno : ENOMEM));
        gzbuffer(z->gz, 1 << 20);
        return 0;
    }
    z->fp = fopen(path, "rb");
    if (!z->fp) return nm_error_set(err, "%s: cannot open: %s", path, strerror(errno));
    z->ds = ZSTD_createDStream();
    z->in = nm_malloc(ZSTD_DStreamInSize());
    z->zin = (ZSTD_inBuffer){z->in, 0, 0};
    if (!z->ds || ZSTD_isError(ZSTD_initDStream(z->ds))) return nm_error_set(err, "%s: cannot start zstd", path);
    return 0;
}

static void zreader_close(zreader *z) {
    if (z->zst == Z_RAW) close(z->fd);
    if (z->gz) gzclose(z->gz);
    if (z->fp) fclose(z->fp);
    if (z->ds) ZSTD_freeDStream(z->ds);
    nm_free(z->in);
}

// Up to cap decompressed bytes into buf: how many, 0 at the end of the stream, or -1 with err
// naming the file (corrupt or truncated).
static int64_t zreader_read(zreader *z, char *buf, size_t cap, nm_error *err) {
    if (z->zst == Z_RAW) {
        for (;;) {
            ssize_t got = read(z->fd, buf, cap);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0)
                return nm_error_set(err, "%s: read failed after %lld bytes: %s", z->path, (long long)z->in_bytes,
                                    strerror(errno));
            z->in_bytes += got;
            return got;
        }
    }
    if (z->zst == Z_GZIP) {
        unsigned ask = cap > (1u << 30) ? 1u << 30 : (unsigned)cap;
        int got = gzread(z->gz, buf, ask);
        int code = 0;
        const char *why = gzerror(z->gz, &code);
        if (got < 0 || (code != Z_OK && code != Z_STREAM_END))
            return nm_error_set(err, "%s: gzip stream: %s (corrupt or truncated)", z->path, why ? why : "error");
        z->in_bytes = gzoffset(z->gz);
        return got;
    }
    ZSTD_outBuffer out = {buf, cap, 0};
    while (out.pos == 0) {
        if (z->zin.pos == z->zin.size) {
            if (z->eof) break;
            size_t n = fread(z->in, 1, ZSTD_DStreamInSize(), z->fp);
            if (n == 0) {
                if (ferror(z->fp)) return nm_error_set(err, "%s: read failed: %s", z->path, strerror(errno));
                z->eof = 1;
                continue;
            }
            z->in_bytes += (int64_t)n;
            z->zin = (ZSTD_inBuffer){z->in, n, 0};
        }
        z->last = ZSTD_decompressStream(z->ds, &out, &z->zin);
        if (ZSTD_isError(z->last))
            return nm_error_set(err, "%s: zstd stream: %s", z->path, ZSTD_getErrorName(z->last));
    }
    if (out.pos == 0 && z->last != 0)
        return nm_error_set(err, "%s: zstd stream ends inside a frame (truncated)", z->path);
    return (int64_t)out.pos;
}

static int process_streamed(run *r, const char *path, int zst, int fd, nm_error *err) {
    zreader z;
    if (zreader_open(&z, path, zst, fd, err) != 0) {
        zreader_close(&z);
        return -1;
    }
    int jsonl = is_jsonl(r, path), whole = !jsonl && r->o->doc_per_file;
    size_t cap = STREAM_CHUNK, have = 0;
    char *buf = nm_malloc(cap);
    int64_t lines = 0, done_before = r->bytes_done, total_before = r->bytes_total;
    int rc = 0;
    for (;;) {
        // a unit longer than what the carried tail leaves free: the buffer grows by a chunk
        if (cap - have < STREAM_CHUNK / 2) buf = nm_realloc(buf, cap += STREAM_CHUNK);
        int end = 0;
        while (have < cap && !end) {
            int64_t got = zreader_read(&z, buf + have, cap - have, err);
            if (got < 0) {
                rc = -1;
                break;
            }
            end = got == 0;
            have += (size_t)got;
        }
        if (rc != 0) break;
        if (end && z.zst == Z_RAW && z.in_bytes == 0) {
            rc = nm_error_set(err, "%s: the stream ended without a byte: nothing to prepare (did its writer fail?)", path);
            break;
        }
        if (zst == Z_RAW) r->bytes_total = total_before + z.in_bytes;  // a pipe's size is what came
        if (whole && !end) continue;
        size_t used;
        rc = jsonl ? cut_jsonl(r, path, buf, have, end, &used, &lines, err) : cut_text(r, path, buf, have, end, &used, err);
        // the batch's parts point into buf: tokenized before the tail moves
        if (rc == 0 && r->b.n_parts + r->b.n_docs > 0) rc = flush_batch(r, err);
        r->bytes_done = done_before + z.in_bytes;
        if (rc != 0 || end) break;
        memmove(buf, buf + used, have - used);
        have -= used;
    }
    nm_free(buf);
    zreader_close(&z);
    return rc;
}

static int process_file(run *r, const char *path, nm_error *err) {
    if (ends_with(path, ".gz")) return process_streamed(r, path, Z_GZIP, -1, err);
    if (ends_with(path, ".zst")) return process_streamed(r, path, Z_ZSTD, -1, err);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return nm_error_set(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return nm_error_set(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) return process_streamed(r, path, Z_RAW, fd, err);
    size_t size = (size_t)st.st_size;
    const char *data = "";
    if (size > 0) {
        void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            return nm_error_set(err, "%s: cannot mmap %zu bytes: %s", path, size, strerror(e));
        }
        posix_madvise(m, size, POSIX_MADV_SEQUENTIAL);
        data = m;
    }
    close(fd);
    int64_t done_before = r->bytes_done;
    int rc = cut_all(r, path, data, size, err);
    // Parts point into the mapping: tokenize them before unmapping.
    if (rc == 0 && r->b.n_parts + r->b.n_docs > 0) rc = flush_batch(r, err);
    r->bytes_done = done_before + (int64_t)size;
    if (size > 0) munmap((void *)data, size);
    return rc;
}

int nm_prepare_run(const nm_prepare_opts *o, nm_prepare_stats *stats, nm_error *err) {
    double t0 = now_s();
    if (o->n_inputs < 1) return nm_error_set(err, "no input files (give --input FILE...)");
    if (o->workers < 0) return nm_error_set(err, "--workers %d must be >= 0", o->workers);
    run r = {.o = o, .t0 = t0};
    for (int i = 0; i < o->n_inputs; i++) {
        struct stat st;
        const char *in = o->inputs[i];
        if (stat(in, &st) != 0) return nm_error_set(err, "%s: cannot stat: %s", in, strerror(errno));
        if (S_ISDIR(st.st_mode))
            return nm_error_set(err, "%s is a directory; expected a text or JSONL file (give the files in it: --input "
                                "%s/*.txt)", in, in);
        // An empty file is almost always a failed download or a wrong path; an empty
        // dataset would only fail later, at training time, far from the cause.
        if (S_ISREG(st.st_mode) && st.st_size == 0)
            return nm_error_set(err, "%s is empty: no text to prepare (remove it from --input)", in);
        if (S_ISREG(st.st_mode)) r.bytes_total += st.st_size;
    }
    nm_tokenizer *tok;
    if (nm_tokenizer_load(&tok, o->tokenizer, err) != 0) return -1;
    r.tok = tok;
    r.eod = nm_tokenizer_eod(tok);
    if (o->append_eod && r.eod < 0) {
        nm_tokenizer_free(tok);
        return nm_error_set(err, "%s: --append-eod but the tokenizer has no end-of-document token", o->tokenizer);
    }
    int dtype = nm_indexed_dtype_for_vocab(nm_tokenizer_vocab_size(tok));
    if (nm_indexed_writer_create(&r.w, o->out_prefix, dtype, err) != 0) {
        nm_tokenizer_free(tok);
        return -1;
    }
    r.tty = isatty(2);
    r.progress = o->progress >= 0 ? o->progress : (r.tty || r.bytes_total > BIG_INPUT);
    int rc = 0;
    for (int i = 0; i < o->n_inputs && rc == 0; i++) rc = process_file(&r, o->inputs[i], err);
    if (rc == 0 && nm_indexed_writer_tokens(r.w) == 0)
        rc = nm_error_set(err, "%s%s: no tokens: every document is blank%s; nothing written to %s.bin/.idx", o->inputs[0],
                          o->n_inputs > 1 ? " and the other inputs" : "",
                          r.o->jsonl || ends_with(o->inputs[0], ".jsonl") || ends_with(o->inputs[0], ".json")
                              ? " (or lacks the --json-key field)" : "",
                          o->out_prefix);
    if (rc == 0) rc = nm_indexed_writer_finalize(r.w, err);
    if (rc == 0) show_progress(&r, 1);
    if (stats) {
        stats->bytes = r.bytes_total;
        stats->docs = nm_indexed_writer_docs(r.w);
        stats->seqs = nm_indexed_writer_seqs(r.w);
        stats->tokens = nm_indexed_writer_tokens(r.w);
        stats->dtype = dtype;
        stats->seconds = now_s() - t0;
    }
    nm_indexed_writer_destroy(r.w);
    batch_free(&r.b);
    nm_free(r.scratch);
    nm_tokenizer_free(tok);
    return rc;
}
