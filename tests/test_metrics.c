// test_metrics.c: metrics.jsonl lines parse as JSON (cJSON) with exact numbers, the writer
// appends and flushes, the progress line and its ETA / duration formatting, and loss.svg is
// well-formed standalone SVG (a small XML checker here, plus Python's xml.etree when
// NM_PYTHON is set).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "core/rng.h"
#include "core/fileio.h"
#include "train/metrics.h"

#include "test_util.h"

static const cJSON *get(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }

// --- jsonl -----------------------------------------------------------------------------------------

static void test_json_line(uint64_t seed) {
    char buf[1024];
    nm_metric kv[] = {
        NM_METRIC_F("mtp_loss", 3.25),
        NM_METRIC_F("lr", 1e-5),
        NM_METRIC_I("skipped", 2),
        NM_METRIC_I("tokens", 9007199254740993LL),  // not representable as a double: written as an integer
        NM_METRIC_F("grad_norm", NAN),              // JSON has no NaN: null
        NM_METRIC_F("inf", -INFINITY),
        NM_METRIC_S("note", "a \"quoted\"\\ line\nwith\tcontrol"),
        NM_METRIC_S("none", NULL),
    };
    size_t n = nm_metrics_format_line(buf, sizeof(buf), 7, 2.5, kv, 8);
    EXPECT(n == strlen(buf) && !strchr(buf, '\n'), "length %zu vs %zu, or raw newline", n, strlen(buf));
    EXPECT(!strncmp(buf, "{\"step\": 7, \"loss\": 2.5, \"mtp_loss\": 3.25, \"lr\": 1e-05,", 52), "start: %s", buf);
    EXPECT(strstr(buf, "\"tokens\": 9007199254740993"), "int64 exact: %s", buf);
    cJSON *o = cJSON_Parse(buf);
    EXPECT(o != NULL, "not JSON: %s", buf);
    if (o) {
        EXPECT(get(o, "step")->valuedouble == 7 && get(o, "loss")->valuedouble == 2.5, "step/loss");
        EXPECT(get(o, "lr")->valuedouble == 1e-5 && get(o, "skipped")->valuedouble == 2, "lr/skipped");
        EXPECT(cJSON_IsNull(get(o, "grad_norm")) && cJSON_IsNull(get(o, "inf")) && cJSON_IsNull(get(o, "none")),
               "non-finite / NULL -> null");
        EXPECT(!strcmp(get(o, "note")->valuestring, "a \"quoted\"\\ line\nwith\tcontrol"), "string escaping");
        cJSON_Delete(o);
    }
    // Truncation: the return value is the full length; the buffer stays terminated.
    char small[16];
    EXPECT(nm_metrics_format_line(small, sizeof(small), 7, 2.5, kv, 8) == n && strlen(small) == 15, "truncation");

    // Numbers round-trip exactly (shortest repr), on fresh random doubles of every magnitude.
    uint64_t key = nm_rng_key(seed, NM_RNG_TEST, 5, 0);
    int exact = 1;
    for (int i = 0; i < 2000; i++) {
        double v = (nm_rng_uniform_f64(key, 2 * i) - 0.5) * pow(10.0, (double)(i % 40) - 20.0);
        nm_metrics_format_line(buf, sizeof(buf), 1, v, NULL, 0);
        cJSON *p = cJSON_Parse(buf);
        double back = p ? strtod(strstr(buf, "\"loss\": ") + 8, NULL) : NAN;
        exact &= p && back == v;
        cJSON_Delete(p);
    }
    EXPECT(exact, "a double did not round-trip through the line");
    nm_metrics_format_line(buf, sizeof(buf), 1, 0.1, NULL, 0);
    EXPECT(!strcmp(buf, "{\"step\": 1, \"loss\": 0.1}"), "shortest form: %s", buf);
}

static void test_writer(void) {
    char path[] = "metrics_test_XXXXXX";
    int fd = mkstemp(path);
    EXPECT(fd >= 0, "mkstemp");
    if (fd < 0) return;
    close(fd);
    nm_metrics_writer *w;
    nm_error err;
    EXPECT(nm_metrics_open(&w, path, 0, &err) == 0, "%s", err.msg);
    // A long string forces the line buffer to grow.
    char long_note[3000];
    memset(long_note, 'x', sizeof(long_note) - 1);
    long_note[sizeof(long_note) - 1] = 0;
    for (int s = 1; s <= 3; s++) {
        nm_metric kv[2] = {NM_METRIC_F("lr", 1e-3 * s), NM_METRIC_S("note", s == 2 ? long_note : "short")};
        EXPECT(nm_metrics_write(w, s, 10.0 / s, kv, 2, &err) == 0, "%s", err.msg);
        // Flushed per line: the file already holds s lines before close.
        char *data = NULL;
        size_t size = 0;
        nm_file_read_all(path, &data, &size, &err);
        int lines = 0;
        for (size_t i = 0; data && i < size; i++) lines += data[i] == '\n';
        EXPECT(lines == s, "after step %d the file has %d lines", s, lines);
        nm_free(data);
    }
    EXPECT(nm_metrics_sync(w, &err) == 0, "%s", err.msg);
    nm_metrics_close(w);
    // Resume appends.
    EXPECT(nm_metrics_open(&w, path, 1, &err) == 0, "%s", err.msg);
    EXPECT(nm_metrics_write(w, 4, 2.5, NULL, 0, &err) == 0, "%s", err.msg);
    nm_metrics_close(w);

    char *data = NULL;
    size_t size = 0;
    EXPECT(nm_file_read_all(path, &data, &size, &err) == 0, "%s", err.msg);
    int step = 0;
    for (char *line = data, *nl; data && (nl = strchr(line, '\n')); line = nl + 1) {
        *nl = 0;
        cJSON *o = cJSON_Parse(line);
        step++;
        EXPECT(o && get(o, "step")->valuedouble == step && cJSON_IsNumber(get(o, "loss")), "line %d: %.80s", step,
               line);
        if (o && step == 2) EXPECT(strlen(get(o, "note")->valuestring) == sizeof(long_note) - 1, "long line");
        cJSON_Delete(o);
    }
    EXPECT(step == 4, "%d lines", step);
    nm_free(data);
    unlink(path);
    EXPECT(nm_metrics_open(&w, "no/such/dir/metrics.jsonl", 0, &err) != 0 && strstr(err.msg, "no/such/dir"),
           "bad path: %s", err.msg);
}

// --- progress line ---------------------------------------------------------------------------------

static void expect_duration(double s, const char *want, int line) {
    char buf[32];
    nm_format_duration(buf, sizeof(buf), s);
    if (strcmp(buf, want)) {
        fprintf(stderr, "FAIL line %d: duration(%g) = \"%s\", want \"%s\"\n", line, s, buf, want);
        failures++;
    }
}
#define DUR(s, want) expect_duration((s), (want), __LINE__)

static void test_progress(void) {
    DUR(0, "0s");
    DUR(59.4, "59s");
    DUR(59.6, "1m00s");
    DUR(72, "1m12s");
    DUR(3599, "59m59s");
    DUR(3600, "1h00m");
    DUR(7500, "2h05m");
    DUR(90000, "1d01h");
    DUR(NAN, "?");
    DUR(-1, "?");

    // ETA: 50 of 500 steps done in 10 s -> 450 steps at 0.2 s.
    EXPECT(nm_progress_eta(50, 500, 50, 10.0) == 90.0, "eta");
    EXPECT(nm_progress_eta(60, 500, 10, 5.0) == 220.0, "eta from a later reference point");
    EXPECT(isnan(nm_progress_eta(0, 500, 0, 0.0)), "eta with no steps");
    EXPECT(nm_progress_eta(600, 500, 600, 10.0) == 0.0, "eta past the end");

    char si[32];
    nm_format_si(si, sizeof(si), 41234);
    EXPECT(!strcmp(si, "41.2k"), "%s", si);
    nm_format_si(si, sizeof(si), 1.5e6);
    EXPECT(!strcmp(si, "1.50M"), "%s", si);
    nm_format_si(si, sizeof(si), 512);
    EXPECT(!strcmp(si, "512"), "%s", si);

    nm_progress p = {.step = 50, .total = 500, .loss = 3.4123, .mtp_loss = 3.65, .lr = 3e-4, .grad_norm = 0.81,
                     .tokens_per_s = 41234, .mfu = 0.61, .eta_s = 72};
    char line[256];
    nm_progress_format(line, sizeof(line), &p);
    const char *want = "step  50/500 | loss 3.412 | mtp 3.650 | lr 3.0e-4 | gnorm 0.81 | 41.2k tok/s | 61% MFU | eta 1m12s";
    EXPECT(!strcmp(line, want), "\n got: %s\nwant: %s", line, want);
    nm_progress q = {.step = 1000, .total = 1000, .loss = 2.0, .mtp_loss = NAN, .lr = 1.5e-10, .grad_norm = NAN,
                     .tokens_per_s = 12, .mfu = NAN, .eta_s = NAN};
    nm_progress_format(line, sizeof(line), &q);
    EXPECT(!strcmp(line, "step 1000/1000 | loss 2.000 | lr 1.5e-10 | 12 tok/s"), "optional fields: %s", line);

    // TTY: redrawn in place, newline only when kept. Not a TTY: only kept lines, plain.
    FILE *fp = tmpfile();
    if (!fp) return;
    nm_progress_print(fp, &p, 1, 0);
    nm_progress_print(fp, &p, 1, 1);
    nm_progress_print(fp, &p, 0, 0);
    nm_progress_print(fp, &p, 0, 1);
    rewind(fp);
    char out[1024] = {0};
    size_t got = fread(out, 1, sizeof(out) - 1, fp);
    fclose(fp);
    char expect[1024];
    snprintf(expect, sizeof(expect), "\r%s\033[K\r%s\033[K\n%s\n", want, want, want);
    EXPECT(got == strlen(expect) && !strcmp(out, expect), "print output differs (%zu bytes)", got);
}

// --- SVG ------------------------------------------------------------------------------------------------

// A small well-formedness check: balanced tags, quoted attributes, known entities, one root.
static int xml_well_formed(const char *s, char *why, size_t cap) {
    char stack[64][32];
    int depth = 0, roots = 0;
    const char *p = s;
    if (!strncmp(p, "<?xml", 5)) {
        p = strstr(p, "?>");
        if (!p) return snprintf(why, cap, "unterminated declaration"), 0;
        p += 2;
    }
    while (*p) {
        if (*p == '&') {
            static const char *const ents[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"};
            int ok = 0;
            for (int i = 0; i < 5; i++) ok |= !strncmp(p, ents[i], strlen(ents[i]));
            if (!ok) return snprintf(why, cap, "bad entity at %.20s", p), 0;
            p++;
            continue;
        }
        if (*p != '<') {
            if (depth == 0 && !(*p == ' ' || *p == '\n')) return snprintf(why, cap, "text outside the root"), 0;
            p++;
            continue;
        }
        p++;
        int closing = *p == '/';
        if (closing) p++;
        char name[32];
        size_t n = 0;
        while (*p && *p != ' ' && *p != '>' && *p != '/' && *p != '\n' && n < 31) name[n++] = *p++;
        name[n] = 0;
        if (!n) return snprintf(why, cap, "empty tag name"), 0;
        if (closing) {
            if (depth == 0 || strcmp(stack[depth - 1], name))
                return snprintf(why, cap, "</%s> does not close <%s>", name, depth ? stack[depth - 1] : ""), 0;
            depth--;
            if (*p != '>') return snprintf(why, cap, "junk in </%s>", name), 0;
            p++;
            continue;
        }
        // Attributes: name="value" pairs, '<' never inside a value.
        while (*p && *p != '>' && !(p[0] == '/' && p[1] == '>')) {
            if (*p == '"') {
                const char *q = strchr(p + 1, '"');
                if (!q) return snprintf(why, cap, "unterminated attribute in <%s>", name), 0;
                for (const char *c = p + 1; c < q; c++)
                    if (*c == '<') return snprintf(why, cap, "'<' in an attribute of <%s>", name), 0;
                p = q + 1;
            } else {
                p++;
            }
        }
        if (!*p) return snprintf(why, cap, "unterminated <%s>", name), 0;
        if (depth == 0) roots++;
        if (*p == '/') {
            p += 2;
        } else {
            if (depth == 64) return snprintf(why, cap, "too deep"), 0;
            snprintf(stack[depth++], 32, "%s", name);
            p++;
        }
    }
    if (depth) return snprintf(why, cap, "<%s> never closed", stack[depth - 1]), 0;
    if (roots != 1) return snprintf(why, cap, "%d root elements", roots), 0;
    return 1;
}

static void check_svg_file(const char *path, const char *must_contain) {
    char *data = NULL;
    size_t size = 0;
    nm_error err;
    EXPECT(nm_file_read_all(path, &data, &size, &err) == 0, "%s", err.msg);
    if (!data) return;
    char why[128] = "";
    EXPECT(xml_well_formed(data, why, sizeof(why)), "%s: not well-formed: %s", path, why);
    EXPECT(strstr(data, "<svg xmlns=\"http://www.w3.org/2000/svg\""), "no xmlns");
    EXPECT(strstr(data, must_contain), "missing %s", must_contain);
    nm_free(data);
    // An independent parser when the test environment provides Python.
    const char *py = getenv("NM_PYTHON");
    if (py && access(py, X_OK) == 0) {
        char cmd[1024];
        snprintf(cmd, sizeof(cmd),
                 "\"%s\" -c \"import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); "
                 "assert r.tag == '{http://www.w3.org/2000/svg}svg', r.tag\" %s",
                 py, path);
        EXPECT(system(cmd) == 0, "xml.etree rejected %s", path);
    }
}

static void test_svg(void) {
    enum { N = 300 };
    double x[N], y[N], vx[3] = {100, 200, 300}, vy[3] = {3.1, 2.6, 2.4};
    for (int i = 0; i < N; i++) {
        x[i] = i + 1;
        y[i] = 2.0 + 4.0 * exp(-i / 60.0);
    }
    y[150] = NAN;  // a skipped step: the line breaks there
    nm_plot_series s[2] = {
        {.label = "train", .x = x, .y = y, .n = N},
        {.label = "validation <held-out> & \"quoted\"", .color = "#d62728", .x = vx, .y = vy, .n = 3},
    };
    const char *path = "test_metrics_loss.svg";
    nm_error err;
    EXPECT(nm_plot_write_svg(path, "tiny-train: loss & <val>", s, 2, &err) == 0, "%s", err.msg);
    check_svg_file(path, "validation &lt;held-out&gt; &amp; &quot;quoted&quot;");
    char *data = NULL;
    size_t size = 0;
    nm_file_read_all(path, &data, &size, &err);
    // The NaN splits the train curve into two subpaths; 3 validation markers are drawn.
    int moves = 0, circles = 0;
    const char *d = data ? strstr(data, " d=\"") : NULL;
    for (const char *c = d; c && *c && *c != '/'; c++) moves += *c == 'M';
    for (const char *c = data; c && (c = strstr(c, "<circle")); c++) circles++;
    EXPECT(moves == 2, "train path has %d subpaths, want 2", moves);
    EXPECT(circles == 3, "%d markers, want 3 (validation only)", circles);
    EXPECT(data && strstr(data, ">step</text>") && strstr(data, ">loss</text>"), "axis labels");
    nm_free(data);

    // No finite point at all (before the first step): still a valid file.
    double nx[1] = {1}, ny[1] = {NAN};
    nm_plot_series e = {.label = "train", .x = nx, .y = ny, .n = 1};
    EXPECT(nm_plot_write_svg(path, NULL, &e, 1, &err) == 0, "%s", err.msg);
    check_svg_file(path, "no data yet");

    // Long runs are thinned, flat curves still get a y range.
    enum { M = 20000 };
    double *lx = nm_malloc(M * sizeof(double)), *ly = nm_malloc(M * sizeof(double));
    for (int i = 0; i < M; i++) lx[i] = i + 1, ly[i] = 5.0;
    nm_plot_series l = {.label = "train", .x = lx, .y = ly, .n = M};
    EXPECT(nm_plot_write_svg(path, "flat", &l, 1, &err) == 0, "%s", err.msg);
    check_svg_file(path, "flat");
    nm_file_read_all(path, &data, &size, &err);
    int points = 0;
    for (const char *c = data; c && *c; c++) points += *c == 'L';
    EXPECT(points > 1000 && points <= 4001, "%d points drawn for %d steps", points, M);
    EXPECT(size < 200000, "svg of %zu bytes", size);
    nm_free(data);
    nm_free(lx);
    nm_free(ly);
    unlink(path);
    EXPECT(nm_plot_write_svg("no/such/dir/loss.svg", "x", &e, 1, &err) != 0 && strstr(err.msg, "no/such/dir"),
           "bad path: %s", err.msg);
}

int main(void) {
    uint64_t seed = (uint64_t)getpid();
    if (getenv("NM_TEST_SEED")) seed = strtoull(getenv("NM_TEST_SEED"), NULL, 10);
    printf("test_metrics: seed %llu (set NM_TEST_SEED to replay)\n", (unsigned long long)seed);
    test_json_line(seed);
    test_writer();
    test_progress();
    test_svg();
    if (failures) {
        fprintf(stderr, "test_metrics: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_metrics: ok\n");
    return 0;
}
