// test_tensorboard.c: the event-file encoder reproduces the checked bytes of formats.md 5.5,
// the CRC32C check value, varint edge cases, and the writer's file (name, first record,
// framing of every record).
//
// With `--write DIR` it writes the event file that tests/interop/test_tensorboard_read.py
// parses with an independent reader: tags "train/loss" and "train/lr" at steps 1..50 with
// loss = 10 / step and lr = step * 1e-4 (as f32), plus one event holding three tags at
// step 1000 ("a" = 1, "b" = -2.5, "c/ü" = 3e38), and one at step -1 ("neg" = 0).
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/fileio.h"
#include "train/tensorboard.h"

#include "test_util.h"

static void hexdump(const char *what, const uint8_t *b, size_t n) {
    fprintf(stderr, "%s:", what);
    for (size_t i = 0; i < n; i++) fprintf(stderr, " %02x", b[i]);
    fputc('\n', stderr);
}

// --- formats.md 5.5 --------------------------------------------------------------------------------

static void test_checked_bytes(void) {
    static const uint8_t want1[] = {
        0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa3, 0x7f, 0x4b, 0x22,              // len 24 | crc
        0x09, 0x00, 0x00, 0x00, 0x40, 0xfc, 0x54, 0xd9, 0x41,                                // wall_time
        0x1a, 0x0d, 0x62, 0x72, 0x61, 0x69, 0x6e, 0x2e, 0x45, 0x76, 0x65, 0x6e, 0x74, 0x3a, 0x32, // file_version
        0xec, 0xed, 0x8f, 0x9d,                                                              // crc(payload)
    };
    static const uint8_t want2[] = {
        0x1a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x12, 0x9b, 0xd8, 0x2d,
        0x09, 0x00, 0x00, 0x20, 0x40, 0xfc, 0x54, 0xd9, 0x41, 0x10, 0x64, 0x2a, 0x0d, 0x0a, 0x0b, 0x0a,
        0x04, 0x6c, 0x6f, 0x73, 0x73, 0x15, 0x00, 0x00, 0x20, 0x40,
        0xbd, 0xe1, 0x11, 0xcb,
    };
    uint8_t buf[128];
    nm_tb_event e1 = {.wall_time = 1700000000.0, .file_version = "brain.Event:2"};
    size_t n1 = nm_tb_encode_record(buf, sizeof(buf), &e1);
    EXPECT(n1 == sizeof(want1) && !memcmp(buf, want1, n1), "event 1 bytes differ (%zu bytes)", n1);
    if (n1 != sizeof(want1) || memcmp(buf, want1, n1)) hexdump("got ", buf, n1);

    const char *tag = "loss";
    float v = 2.5f;
    nm_tb_event e2 = {.wall_time = 1700000000.5, .step = 100, .n_values = 1, .tags = &tag, .values = &v};
    size_t n2 = nm_tb_encode_record(buf, sizeof(buf), &e2);
    EXPECT(n2 == sizeof(want2) && !memcmp(buf, want2, n2), "event 2 bytes differ (%zu bytes)", n2);
    if (n2 != sizeof(want2) || memcmp(buf, want2, n2)) hexdump("got ", buf, n2);

    // Sizing call writes nothing.
    uint8_t small[4] = {0xAA, 0xAA, 0xAA, 0xAA};
    EXPECT(nm_tb_encode_record(small, sizeof(small), &e2) == sizeof(want2) && small[0] == 0xAA, "short buffer");

    // CRC32C check value (formats.md 5.2) and the masked form of the 8 length bytes above.
    EXPECT(nm_crc32c(0, "123456789", 9) == 0xE3069283u, "crc32c check value");
    EXPECT(nm_tb_masked_crc32c(want1, 8) == 0x224b7fa3u, "masked crc of len 24");
}

// --- varints through the step field ----------------------------------------------------------------

static void test_varints(void) {
    uint8_t buf[64];
    // step 300 = 0b1_0010_1100 -> ac 02 (two bytes, LSB group first).
    nm_tb_event e = {.wall_time = 0.0, .step = 300};
    size_t n = nm_tb_encode_record(buf, sizeof(buf), &e);
    EXPECT(n == 12 + 9 + 3 + 4 && buf[21] == 0x10 && buf[22] == 0xac && buf[23] == 0x02, "step 300 varint");
    // step -1: ten bytes, ff x9 then 01.
    e.step = -1;
    n = nm_tb_encode_record(buf, sizeof(buf), &e);
    int ok = n == 12 + 9 + 11 + 4 && buf[21] == 0x10 && buf[31] == 0x01;
    for (int i = 22; i < 31; i++) ok &= buf[i] == 0xff;
    EXPECT(ok, "step -1 must be a 10-byte varint");
    // step 0 is omitted (proto3 default).
    e.step = 0;
    EXPECT(nm_tb_encode_record(buf, sizeof(buf), &e) == 12 + 9 + 4, "step 0 not omitted");
    // A tag of 200 bytes needs a 2-byte length inside a 2-byte Value length.
    char tag[201];
    memset(tag, 'x', 200);
    tag[200] = 0;
    const char *tp = tag;
    float v = 1.0f;
    nm_tb_event e2 = {.wall_time = 0.0, .n_values = 1, .tags = &tp, .values = &v};
    // Value = 1 + 2 + 200 + 5 = 208; Summary = 1 + 2 + 208 = 211; Event = 9 + 1 + 2 + 211 = 223
    EXPECT(nm_tb_encode_record(NULL, 0, &e2) == 12 + 223 + 4, "long tag sizes");
}

// --- the writer --------------------------------------------------------------------------------------

static int write_sample(const char *dir, char *path_out, size_t cap, nm_error *err) {
    nm_tb_writer *w;
    if (nm_tb_open(&w, dir, -1.0, err)) return -1;
    snprintf(path_out, cap, "%s", nm_tb_path(w));
    for (int s = 1; s <= 50; s++) {
        const char *tags[2] = {"train/loss", "train/lr"};
        float vals[2] = {10.0f / (float)s, (float)s * 1e-4f};
        if (nm_tb_add_scalar(w, tags[0], s, vals[0], err) || nm_tb_add_scalar(w, tags[1], s, vals[1], err)) break;
        if (s % 10 == 0 && nm_tb_flush(w, err)) break;
    }
    const char *tags3[3] = {"a", "b", "c/\xc3\xbc"};
    const float vals3[3] = {1.0f, -2.5f, 3e38f};
    const char *neg = "neg";
    const float zero = 0.0f;
    int rc = nm_tb_add_scalars(w, 1000, tags3, vals3, 3, err);
    if (!rc) rc = nm_tb_add_scalars(w, -1, &neg, &zero, 1, err);
    if (!rc) rc = nm_tb_flush(w, err);
    nm_tb_close(w);
    return rc;
}

static uint64_t le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void test_writer(void) {
    char dir[] = "tb_test_XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        failures++;
        return;
    }
    char logdir[64];
    snprintf(logdir, sizeof(logdir), "%s/run/a", dir);  // created by nm_tb_open (mkdir -p)
    char path[512];
    nm_error err = {{0}};
    EXPECT(write_sample(logdir, path, sizeof(path), &err) == 0, "%s", err.msg);
    const char *base = strrchr(path, '/');
    EXPECT(base && !strncmp(base + 1, "events.out.tfevents.", 20), "file name %s", path);
    // %010d seconds right after the prefix.
    int digits = 0;
    for (const char *c = base + 21; *c >= '0' && *c <= '9'; c++) digits++;
    EXPECT(digits == 10 && base[31] == '.', "timestamp field in %s", base + 1);

    char *data = NULL;
    size_t size = 0;
    EXPECT(nm_file_read_all(path, &data, &size, &err) == 0, "%s", err.msg);
    const uint8_t *p = (const uint8_t *)data;
    size_t at = 0;
    int records = 0, framing_ok = 1;
    while (data && at + 12 <= size) {
        uint64_t len = le(p + at, 8);
        framing_ok &= (uint32_t)le(p + at + 8, 4) == nm_tb_masked_crc32c(p + at, 8);
        if (at + 12 + len + 4 > size) {
            framing_ok = 0;
            break;
        }
        framing_ok &= (uint32_t)le(p + at + 12 + len, 4) == nm_tb_masked_crc32c(p + at + 12, len);
        if (records == 0) {
            // The first event: wall_time then file_version "brain.Event:2", nothing else.
            framing_ok &= len == 24 && p[at + 12] == 0x09 && p[at + 21] == 0x1a &&
                          !memcmp(p + at + 23, "brain.Event:2", 13);
            double wt;
            memcpy(&wt, p + at + 13, 8);
            framing_ok &= fabs(wt - (double)time(NULL)) < 3600;
        }
        at += 12 + len + 4;
        records++;
    }
    EXPECT(framing_ok && at == size, "framing: %d records, %zu of %zu bytes", records, at, size);
    EXPECT(records == 1 + 100 + 2, "%d records", records);
    nm_free(data);

    // A second writer in the same directory gets its own file (pid in the name, "x" open mode).
    nm_tb_writer *w2;
    EXPECT(nm_tb_open(&w2, logdir, 1.0, &err) == 0, "%s", err.msg);
    if (w2) {
        EXPECT(strcmp(nm_tb_path(w2), path) != 0, "second writer reused %s", path);
        unlink(nm_tb_path(w2));
        nm_tb_close(w2);
    }
    // An unwritable location is an error naming it, not a crash.
    nm_tb_writer *w3 = NULL;
    EXPECT(nm_tb_open(&w3, "/proc/nm_no_such_dir", -1.0, &err) != 0 && strstr(err.msg, "nm_no_such_dir"),
           "bad logdir: %s", err.msg);

    unlink(path);
    char sub[128];
    snprintf(sub, sizeof(sub), "%s/run/a", dir);
    rmdir(sub);
    snprintf(sub, sizeof(sub), "%s/run", dir);
    rmdir(sub);
    rmdir(dir);
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--write")) {
        char path[512];
        nm_error err;
        if (write_sample(argv[2], path, sizeof(path), &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
        printf("%s\n", path);
        return 0;
    }
    test_checked_bytes();
    test_varints();
    test_writer();
    if (failures) {
        fprintf(stderr, "test_tensorboard: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_tensorboard: ok\n");
    return 0;
}
