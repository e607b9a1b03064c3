// tensorboard.c: TFRecord + hand-written protobuf encoder for scalar summaries.
// Reference: formats.md 5 (TensorBoard record_writer.py, event.proto, summary.proto); the
// bytes of formats.md 5.5 are reproduced in tests/test_tensorboard.c.
#include "train/tensorboard.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/fileio.h"

// --- protobuf wire encoding (formats.md 5.4) ---------------------------------------------------

static size_t varint_size(uint64_t v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static uint8_t *put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) *p++ = (uint8_t)(v >> (8 * i));
    return p;
}

static uint8_t *put_bytes_field(uint8_t *p, uint8_t key, const void *data, size_t n) {
    *p++ = key;
    p = put_varint(p, n);
    memcpy(p, data, n);
    return p + n;
}

// Summary.Value{tag = 1 (0x0A), simple_value = 2 (0x15, fixed32)}
static size_t value_size(const char *tag) {
    size_t tl = strlen(tag);
    return 1 + varint_size(tl) + tl + 1 + 4;
}

static size_t summary_size(const nm_tb_event *ev) {
    size_t n = 0;
    for (int i = 0; i < ev->n_values; i++) {
        size_t vs = value_size(ev->tags[i]);
        n += 1 + varint_size(vs) + vs;
    }
    return n;
}

static size_t event_size(const nm_tb_event *ev) {
    size_t n = 1 + 8;  // wall_time = 1, fixed64 (0x09)
    // step = 2 (0x10); a negative int64 is a 10-byte two's-complement varint.
    if (ev->step != 0) n += 1 + varint_size((uint64_t)ev->step);
    if (ev->file_version) {
        size_t fl = strlen(ev->file_version);
        n += 1 + varint_size(fl) + fl;
    }
    if (ev->n_values > 0) {
        size_t ss = summary_size(ev);
        n += 1 + varint_size(ss) + ss;
    }
    return n;
}

static uint8_t *put_event(uint8_t *p, const nm_tb_event *ev) {
    uint64_t bits;
    memcpy(&bits, &ev->wall_time, 8);
    *p++ = 0x09;
    p = put_le(p, bits, 8);
    if (ev->step != 0) {
        *p++ = 0x10;
        p = put_varint(p, (uint64_t)ev->step);
    }
    if (ev->file_version) p = put_bytes_field(p, 0x1A, ev->file_version, strlen(ev->file_version));
    if (ev->n_values > 0) {
        *p++ = 0x2A;  // summary = 5
        p = put_varint(p, summary_size(ev));
        for (int i = 0; i < ev->n_values; i++) {
            *p++ = 0x0A;  // Summary.value = 1
            p = put_varint(p, value_size(ev->tags[i]));
            p = put_bytes_field(p, 0x0A, ev->tags[i], strlen(ev->tags[i]));
            uint32_t fb;
            memcpy(&fb, &ev->values[i], 4);
            *p++ = 0x15;
            p = put_le(p, fb, 4);
        }
    }
    return p;
}

// --- TFRecord framing (formats.md 5.2) ---------------------------------------------------------

uint32_t nm_tb_masked_crc32c(const void *data, size_t size) {
    uint32_t crc = nm_crc32c(0, data, size);
    return ((crc >> 15) | (crc << 17)) + 0xA282EAD8u;
}

size_t nm_tb_encode_record(uint8_t *out, size_t cap, const nm_tb_event *ev) {
    size_t len = event_size(ev);
    size_t total = 8 + 4 + len + 4;
    if (total > cap) return total;
    uint8_t *p = put_le(out, len, 8);
    p = put_le(p, nm_tb_masked_crc32c(out, 8), 4);
    uint8_t *payload = p;
    p = put_event(p, ev);
    NM_CHECK((size_t)(p - payload) == len, "event size %zu != %zu", (size_t)(p - payload), len);
    p = put_le(p, nm_tb_masked_crc32c(payload, len), 4);
    return total;
}

// --- writer ------------------------------------------------------------------------------------

struct nm_tb_writer {
    FILE *fp;
    char *path;
    uint8_t *buf;               // record scratch, grown only when a record needs more
    size_t cap;
};

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int nm_tb_open(nm_tb_writer **out, const char *logdir, double wall_time, nm_error *err) {
    *out = NULL;
    if (nm_mkdir_p(logdir, err)) return nm_error_prefix(err, "tensorboard");
    if (wall_time < 0) wall_time = now_seconds();

    char host[256] = "localhost";
    if (gethostname(host, sizeof(host) - 1) != 0 || !host[0]) strcpy(host, "localhost");
    host[sizeof(host) - 1] = 0;
    for (char *c = host; *c; c++) {
        if (*c == '/') *c = '_';  // a file name, whatever the host name holds
    }
    size_t n = strlen(logdir) + strlen(host) + 96;
    char *path = nm_malloc(n);
    // The pid keeps two writers started in the same second apart (TensorBoard's own writer
    // appends it too); readers only look for "tfevents" in the name. One process opening a
    // second writer in the same second (a Trainer resumed at once, from Python) gets a suffix.
    FILE *fp = NULL;
    for (int k = 0; k < 100 && !fp; k++) {
        int len = snprintf(path, n, "%s/events.out.tfevents.%010lld.%s.%ld", logdir, (long long)wall_time, host,
                           (long)getpid());
        if (k > 0) snprintf(path + len, n - (size_t)len, ".%d", k);
        fp = fopen(path, "wbx");
        if (!fp && errno != EEXIST) break;
    }
    if (!fp) {
        nm_error_set(err, "tensorboard: cannot create %s: %s", path, strerror(errno));
        nm_free(path);
        return -1;
    }
    nm_tb_writer *w = nm_calloc(1, sizeof(*w));
    w->fp = fp;
    w->path = path;
    nm_tb_event ev = {.wall_time = wall_time, .file_version = "brain.Event:2"};
    if (nm_tb_write_event(w, &ev, err) || nm_tb_flush(w, err)) {
        nm_tb_close(w);
        return -1;
    }
    *out = w;
    return 0;
}

int nm_tb_write_event(nm_tb_writer *w, const nm_tb_event *ev, nm_error *err) {
    size_t need = nm_tb_encode_record(NULL, 0, ev);
    if (need > w->cap) {
        w->cap = need < 4096 ? 4096 : need;
        w->buf = nm_realloc(w->buf, w->cap);
    }
    nm_tb_encode_record(w->buf, w->cap, ev);
    // One fwrite per record: stdio may still split it at a buffer boundary, but only the
    // tail of the file can be torn, which TensorBoard treats as "not written yet".
    return nm_fwrite_all(w->fp, w->buf, need, w->path, err);
}

int nm_tb_add_scalars(nm_tb_writer *w, int64_t step, const char *const *tags, const float *values, int n,
                      nm_error *err) {
    nm_tb_event ev = {.wall_time = now_seconds(), .step = step, .n_values = n, .tags = tags, .values = values};
    return nm_tb_write_event(w, &ev, err);
}

int nm_tb_add_scalar(nm_tb_writer *w, const char *tag, int64_t step, float value, nm_error *err) {
    return nm_tb_add_scalars(w, step, &tag, &value, 1, err);
}

int nm_tb_flush(nm_tb_writer *w, nm_error *err) {
    if (!w) return 0;  // not open (a trainer whose creation failed before it)
    if (fflush(w->fp) != 0) return nm_error_set(err, "tensorboard: cannot write %s", w->path);
    return 0;
}

const char *nm_tb_path(const nm_tb_writer *w) { return w->path; }

void nm_tb_close(nm_tb_writer *w) {
    if (!w) return;
    if (w->fp) fclose(w->fp);
    nm_free(w->path);
    nm_free(w->buf);
    nm_free(w);
}
