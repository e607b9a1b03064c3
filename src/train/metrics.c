// metrics.c: metrics.jsonl writer, progress line and SVG loss plot (see metrics.h).
#include "train/metrics.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/fileio.h"

// --- small string builder over a caller buffer ------------------------------------------------

// Appends like snprintf but keeps counting past the end, so the caller learns the size
// it needs (snprintf's contract) while the buffer is never overrun.
typedef struct sbuf {
    char *buf;
    size_t cap, len;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = b->len < b->cap ? b->cap - b->len : 0;
    int n = vsnprintf(room ? b->buf + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0) b->len += (size_t)n;
}

static void sb_putc(sbuf *b, char c) {
    if (b->len + 1 < b->cap) {
        b->buf[b->len] = c;
        b->buf[b->len + 1] = 0;
    }
    b->len++;
}

// --- JSON ---------------------------------------------------------------------------------------

static void json_string(sbuf *b, const char *s) {
    sb_putc(b, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            sb_putc(b, '\\');
            sb_putc(b, (char)*p);
        } else if (*p < 0x20) {
            sb_printf(b, "\\u%04x", *p);
        } else {
            sb_putc(b, (char)*p);
        }
    }
    sb_putc(b, '"');
}

// Shortest %.Ng that reads back to exactly v, so logs are both readable ("0.001") and
// exact enough to compare two runs bit for bit.
static void json_number(sbuf *b, double v) {
    if (!isfinite(v)) {
        sb_printf(b, "null");
        return;
    }
    char tmp[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*g", prec, v);
        if (strtod(tmp, NULL) == v) break;
    }
    sb_printf(b, "%s", tmp);
}

size_t nm_metrics_format_line(char *buf, size_t cap, int64_t step, double loss, const nm_metric *kv, int n) {
    sbuf b = {buf, cap, 0};
    if (cap) buf[0] = 0;
    sb_printf(&b, "{\"step\": %lld, \"loss\": ", (long long)step);
    json_number(&b, loss);
    for (int i = 0; i < n; i++) {
        sb_printf(&b, ", ");
        json_string(&b, kv[i].key);
        sb_printf(&b, ": ");
        switch (kv[i].kind) {
        case NM_METRIC_FLOAT: json_number(&b, kv[i].f); break;
        case NM_METRIC_INT: sb_printf(&b, "%lld", (long long)kv[i].i); break;
        case NM_METRIC_STRING:
            if (kv[i].s) json_string(&b, kv[i].s);
            else sb_printf(&b, "null");
            break;
        }
    }
    sb_putc(&b, '}');
    return b.len;
}

struct nm_metrics_writer {
    FILE *fp;
    char *path;
    char *line;                 // line buffer, grown only when a line needs more
    size_t cap;
};

int nm_metrics_open(nm_metrics_writer **out, const char *path, int append, nm_error *err) {
    *out = NULL;
    FILE *fp = fopen(path, append ? "ab" : "wb");
    if (!fp) return nm_error_set(err, "%s: cannot open metrics log: %s", path, strerror(errno));
    nm_metrics_writer *w = nm_calloc(1, sizeof(*w));
    w->fp = fp;
    w->path = nm_strdup(path);
    w->cap = 1024;
    w->line = nm_malloc(w->cap);
    *out = w;
    return 0;
}

int nm_metrics_write(nm_metrics_writer *w, int64_t step, double loss, const nm_metric *kv, int n, nm_error *err) {
    size_t need = nm_metrics_format_line(w->line, w->cap, step, loss, kv, n) + 2;
    if (need > w->cap) {
        w->cap = need * 2;
        w->line = nm_realloc(w->line, w->cap);
        nm_metrics_format_line(w->line, w->cap, step, loss, kv, n);
    }
    size_t len = strlen(w->line);
    w->line[len] = '\n';
    if (nm_fwrite_all(w->fp, w->line, len + 1, w->path, err)) return -1;
    if (fflush(w->fp) != 0) return nm_error_set(err, "%s: cannot write: %s", w->path, strerror(errno));
    return 0;
}

int nm_metrics_sync(nm_metrics_writer *w, nm_error *err) {
    if (fflush(w->fp) != 0 || fsync(fileno(w->fp)) != 0)
        return nm_error_set(err, "%s: cannot sync: %s", w->path, strerror(errno));
    return 0;
}

void nm_metrics_close(nm_metrics_writer *w) {
    if (!w) return;
    if (w->fp) fclose(w->fp);
    nm_free(w->path);
    nm_free(w->line);
    nm_free(w);
}

// --- progress line ------------------------------------------------------------------------------

void nm_format_duration(char *buf, size_t cap, double s) {
    if (!(s >= 0.0) || !isfinite(s)) {
        snprintf(buf, cap, "?");
        return;
    }
    long long t = llround(s);
    if (t < 60) snprintf(buf, cap, "%llds", t);
    else if (t < 3600) snprintf(buf, cap, "%lldm%02llds", t / 60, t % 60);
    else if (t < 86400) snprintf(buf, cap, "%lldh%02lldm", t / 3600, (t % 3600) / 60);
    else snprintf(buf, cap, "%lldd%02lldh", t / 86400, (t % 86400) / 3600);
}

void nm_format_si(char *buf, size_t cap, double v) {
    double a = fabs(v);
    if (!isfinite(v)) snprintf(buf, cap, "?");
    else if (a < 999.5) snprintf(buf, cap, "%.0f", v);
    else if (a < 999.5e3) snprintf(buf, cap, "%.1fk", v / 1e3);
    else if (a < 999.5e6) snprintf(buf, cap, "%.2fM", v / 1e6);
    else snprintf(buf, cap, "%.2fG", v / 1e9);
}

double nm_progress_eta(int64_t step, int64_t total, int64_t steps_done, double elapsed_s) {
    if (steps_done <= 0) return NAN;
    int64_t left = total - step;
    if (left < 0) left = 0;
    return (double)left * elapsed_s / (double)steps_done;
}

// "3.0e-04" -> "3.0e-4": the exponent's leading zero only costs width.
static void format_lr(char *buf, size_t cap, double lr) {
    snprintf(buf, cap, "%.1e", lr);
    char *e = strchr(buf, 'e');
    if (!e) return;
    char *d = e + 1;
    if (*d == '-' || *d == '+') d++;
    while (d[0] == '0' && d[1]) memmove(d, d + 1, strlen(d));
    if (e[1] == '+') memmove(e + 1, e + 2, strlen(e + 1));
}

size_t nm_progress_format(char *buf, size_t cap, const nm_progress *p) {
    sbuf b = {buf, cap, 0};
    if (cap) buf[0] = 0;
    int width = snprintf(NULL, 0, "%lld", (long long)p->total);
    sb_printf(&b, "step %*lld/%lld | loss %.3f", width, (long long)p->step, (long long)p->total, p->loss);
    if (!isnan(p->mtp_loss)) sb_printf(&b, " | mtp %.3f", p->mtp_loss);
    char tmp[32];
    format_lr(tmp, sizeof(tmp), p->lr);
    sb_printf(&b, " | lr %s", tmp);
    if (!isnan(p->grad_norm)) sb_printf(&b, " | gnorm %.2f", p->grad_norm);
    nm_format_si(tmp, sizeof(tmp), p->tokens_per_s);
    sb_printf(&b, " | %s tok/s", tmp);
    if (!isnan(p->mfu)) sb_printf(&b, " | %.0f%% MFU", 100.0 * p->mfu);
    if (p->eta_s >= 0.0 && isfinite(p->eta_s)) {
        nm_format_duration(tmp, sizeof(tmp), p->eta_s);
        sb_printf(&b, " | eta %s", tmp);
    }
    return b.len;
}

void nm_progress_print(FILE *fp, const nm_progress *p, int tty, int keep) {
    if (!tty && !keep) return;
    char line[512];
    nm_progress_format(line, sizeof(line), p);
    if (tty) fprintf(fp, "\r%s\033[K%s", line, keep ? "\n" : "");
    else fprintf(fp, "%s\n", line);
    fflush(fp);
}

int nm_progress_is_tty(FILE *fp) { return isatty(fileno(fp)); }

// --- SVG loss plot ------------------------------------------------------------------------------

static void xml_text(FILE *fp, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", fp); break;
        case '<': fputs("&lt;", fp); break;
        case '>': fputs("&gt;", fp); break;
        case '"': fputs("&quot;", fp); break;
        case '\'': fputs("&apos;", fp); break;
        default:
            // XML 1.0 forbids most control characters even escaped.
            if ((unsigned char)*s >= 0x20 || *s == '\t' || *s == '\n') fputc(*s, fp);
        }
    }
}

// 1-2-5 tick spacing giving about `target` intervals over [lo, hi].
static double nice_step(double lo, double hi, int target) {
    double raw = (hi - lo) / target;
    double mag = pow(10.0, floor(log10(raw)));
    double f = raw / mag;
    double nice = f < 1.5 ? 1.0 : f < 3.5 ? 2.0 : f < 7.5 ? 5.0 : 10.0;
    return nice * mag;
}

typedef struct axis {
    double lo, hi, step;        // data range snapped to ticks
} axis;

static axis make_axis(double mn, double mx) {
    if (!(mn <= mx)) {
        mn = 0.0;
        mx = 1.0;
    }
    if (mx - mn < 1e-12 * (fabs(mx) + 1.0)) {  // flat data: give it some height
        double pad = fabs(mx) > 0 ? 0.1 * fabs(mx) : 1.0;
        mn -= pad;
        mx += pad;
    }
    axis a;
    a.step = nice_step(mn, mx, 6);
    a.lo = floor(mn / a.step) * a.step;
    a.hi = ceil(mx / a.step) * a.step;
    return a;
}

#define SVG_W 800
#define SVG_H 480
#define PLOT_L 80
#define PLOT_R 20
#define PLOT_T 40
#define PLOT_B 60
#define MAX_POINTS 4000          // beyond this a polyline only costs file size

int nm_plot_write_svg(const char *path, const char *title, const nm_plot_series *series, int n_series,
                      nm_error *err) {
    static const char *const default_colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"};
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    for (int s = 0; s < n_series; s++) {
        for (int64_t i = 0; i < series[s].n; i++) {
            double x = series[s].x[i], y = series[s].y[i];
            if (!isfinite(x) || !isfinite(y)) continue;
            if (x < xmin) xmin = x;
            if (x > xmax) xmax = x;
            if (y < ymin) ymin = y;
            if (y > ymax) ymax = y;
        }
    }
    int empty = !(xmin <= xmax);
    axis ax = make_axis(xmin, xmax), ay = make_axis(ymin, ymax);
    const double pw = SVG_W - PLOT_L - PLOT_R, ph = SVG_H - PLOT_T - PLOT_B;
#define PX(x) (PLOT_L + ((x) - ax.lo) / (ax.hi - ax.lo) * pw)
#define PY(y) (PLOT_T + ph - ((y) - ay.lo) / (ay.hi - ay.lo) * ph)

    nm_atomic_file f;
    if (nm_atomic_open(&f, path, err)) return -1;
    FILE *fp = f.fp;
    fprintf(fp, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(fp,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n",
            SVG_W, SVG_H, SVG_W, SVG_H);
    fprintf(fp, "<rect x=\"0\" y=\"0\" width=\"%d\" height=\"%d\" fill=\"white\"/>\n", SVG_W, SVG_H);
    if (title) {
        fprintf(fp, "<text x=\"%d\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">", SVG_W / 2);
        xml_text(fp, title);
        fprintf(fp, "</text>\n");
    }

    // Grid, ticks and tick labels. The +0.5 step guard absorbs rounding in lo + k*step.
    fprintf(fp, "<g stroke=\"#dddddd\" stroke-width=\"1\">\n");
    for (double t = ax.lo; t <= ax.hi + 0.5 * ax.step; t += ax.step)
        fprintf(fp, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%.1f\"/>\n", PX(t), PLOT_T, PX(t), PLOT_T + ph);
    for (double t = ay.lo; t <= ay.hi + 0.5 * ay.step; t += ay.step)
        fprintf(fp, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", PLOT_L, PY(t), PLOT_L + pw, PY(t));
    fprintf(fp, "</g>\n<g fill=\"#333333\">\n");
    for (double t = ax.lo; t <= ax.hi + 0.5 * ax.step; t += ax.step)
        fprintf(fp, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n", PX(t), PLOT_T + ph + 18,
                fabs(t) < 1e-9 * ax.step ? 0.0 : t);
    for (double t = ay.lo; t <= ay.hi + 0.5 * ay.step; t += ay.step)
        fprintf(fp, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", PLOT_L - 6, PY(t) + 4,
                fabs(t) < 1e-9 * ay.step ? 0.0 : t);
    fprintf(fp, "</g>\n");
    fprintf(fp, "<rect x=\"%d\" y=\"%d\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#333333\"/>\n", PLOT_L,
            PLOT_T, pw, ph);
    fprintf(fp, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">step</text>\n", PLOT_L + pw / 2, SVG_H - 16);
    fprintf(fp, "<text x=\"18\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 18 %.1f)\">loss</text>\n",
            PLOT_T + ph / 2, PLOT_T + ph / 2);
    if (empty)
        fprintf(fp, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" fill=\"#999999\">no data yet</text>\n",
                PLOT_L + pw / 2, PLOT_T + ph / 2);

    // Curves: one path per series, "M" after every non-finite gap; markers for short series
    // (validation points are few and a line between them hides where they were measured).
    for (int s = 0; s < n_series && !empty; s++) {
        const nm_plot_series *se = &series[s];
        const char *color = se->color ? se->color : default_colors[s % 5];
        int64_t stride = se->n > MAX_POINTS ? (se->n + MAX_POINTS - 1) / MAX_POINTS : 1;
        fprintf(fp, "<path fill=\"none\" stroke-width=\"1.5\" stroke=\"");
        xml_text(fp, color);
        fprintf(fp, "\" d=\"");
        int pen_down = 0;
        for (int64_t i = 0; i < se->n; i++) {
            if (i % stride != 0 && i != se->n - 1) continue;
            double x = se->x[i], y = se->y[i];
            if (!isfinite(x) || !isfinite(y)) {
                pen_down = 0;
                continue;
            }
            fprintf(fp, "%s%.1f %.1f ", pen_down ? "L" : "M", PX(x), PY(y));
            pen_down = 1;
        }
        fprintf(fp, "\"/>\n");
        if (se->n <= 100) {
            fprintf(fp, "<g fill=\"");
            xml_text(fp, color);
            fprintf(fp, "\">\n");
            for (int64_t i = 0; i < se->n; i++) {
                if (isfinite(se->x[i]) && isfinite(se->y[i]))
                    fprintf(fp, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\"/>\n", PX(se->x[i]), PY(se->y[i]));
            }
            fprintf(fp, "</g>\n");
        }
    }

    // Legend, top right inside the plot.
    for (int s = 0; s < n_series; s++) {
        const char *color = series[s].color ? series[s].color : default_colors[s % 5];
        double ly = PLOT_T + 16 + 18 * s, lx = PLOT_L + pw - 150;
        fprintf(fp, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke-width=\"2\" stroke=\"", lx, ly - 4,
                lx + 24, ly - 4);
        xml_text(fp, color);
        fprintf(fp, "\"/>\n<text x=\"%.1f\" y=\"%.1f\">", lx + 30, ly);
        xml_text(fp, series[s].label ? series[s].label : "");
        fprintf(fp, "</text>\n");
    }
    fprintf(fp, "</svg>\n");
#undef PX
#undef PY
    if (ferror(fp)) {
        nm_atomic_abort(&f);
        return nm_error_set(err, "%s: write failed", path);
    }
    return nm_atomic_commit(&f, err);
}
