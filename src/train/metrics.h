// metrics.h: what a run reports as it goes: metrics.jsonl (one JSON object per optimizer
// step), the progress line on the terminal, and the loss curve as a standalone SVG.
//
// metrics.jsonl: {"step": <1-based>, "loss": <total loss>, <caller's keys in order>...}
// Numbers are written in the shortest form that reads back to the same double; NaN and
// Inf (JSON has neither) are written as null. Each line is flushed when written, so a
// killed run loses at most the line in progress; nm_metrics_sync fsyncs (at checkpoints).
//
// Progress line (design.md 10):
//   step    50/500 | loss 3.412 | mtp 3.650 | lr 3.0e-4 | gnorm 0.81 | 41.2k tok/s | 61% MFU | eta 1m12s
// On a TTY it is redrawn in place (\r ... ESC[K) and kept with a newline on log steps; to a
// file or pipe only the kept lines are written.
//
// loss.svg: train (and validation) loss against step, axes with 1-2-5 ticks, labels and a
// legend; valid standalone SVG 1.1 (xmlns), written atomically (fileio.h).
#pragma once

#include <stdint.h>
#include <stdio.h>

#include "core/check.h"

// --- metrics.jsonl -------------------------------------------------------------------------

typedef enum nm_metric_kind { NM_METRIC_FLOAT = 0, NM_METRIC_INT = 1, NM_METRIC_STRING = 2 } nm_metric_kind;

typedef struct nm_metric {
    const char *key;            // JSON key (written escaped)
    nm_metric_kind kind;
    double f;                   // NM_METRIC_FLOAT
    int64_t i;                  // NM_METRIC_INT
    const char *s;              // NM_METRIC_STRING
} nm_metric;

#define NM_METRIC_F(k, v) ((nm_metric){.key = (k), .kind = NM_METRIC_FLOAT, .f = (v)})
#define NM_METRIC_I(k, v) ((nm_metric){.key = (k), .kind = NM_METRIC_INT, .i = (v)})
#define NM_METRIC_S(k, v) ((nm_metric){.key = (k), .kind = NM_METRIC_STRING, .s = (v)})

typedef struct nm_metrics_writer nm_metrics_writer;

// Opens path for appending (append = 1, e.g. on resume) or truncates it (append = 0).
int nm_metrics_open(nm_metrics_writer **out, const char *path, int append, nm_error *err);
// Writes {"step": step, "loss": loss, kv[0], ..., kv[n-1]} and a newline, then flushes.
int nm_metrics_write(nm_metrics_writer *w, int64_t step, double loss, const nm_metric *kv, int n, nm_error *err);
// fflush + fsync (call at checkpoints so the log is at least as durable as the checkpoint).
int nm_metrics_sync(nm_metrics_writer *w, nm_error *err);
void nm_metrics_close(nm_metrics_writer *w);

// Formats the JSON line (no newline) into buf; returns the length it needs, like snprintf.
size_t nm_metrics_format_line(char *buf, size_t cap, int64_t step, double loss, const nm_metric *kv, int n);

// --- progress line -------------------------------------------------------------------------

typedef struct nm_progress {
    int64_t step;               // 1-based step just finished
    int64_t total;              // total steps
    double loss;
    double mtp_loss;            // NaN: not shown
    double lr;
    double grad_norm;           // NaN: not shown
    double tokens_per_s;
    double mfu;                 // fraction in [0, 1]; NaN: not shown
    double eta_s;               // seconds left; NaN or < 0: not shown
} nm_progress;

// The line without \r or \n. Returns the length it needs, like snprintf.
size_t nm_progress_format(char *buf, size_t cap, const nm_progress *p);
// tty: "\r<line>\033[K", plus "\n" when keep; not a tty: "<line>\n" only when keep.
void nm_progress_print(FILE *fp, const nm_progress *p, int tty, int keep);
int nm_progress_is_tty(FILE *fp);

// Remaining time from the steps done since a reference point: (total - step) * elapsed /
// steps_done. Returns NaN when steps_done <= 0.
double nm_progress_eta(int64_t step, int64_t total, int64_t steps_done, double elapsed_s);

// "45s", "1m12s", "2h05m", "3d04h"; "?" for NaN/negative.
void nm_format_duration(char *buf, size_t cap, double seconds);
// 41234 -> "41.2k", 1.5e6 -> "1.50M", 512 -> "512".
void nm_format_si(char *buf, size_t cap, double v);

// --- loss plot -----------------------------------------------------------------------------

typedef struct nm_plot_series {
    const char *label;          // legend text (escaped), e.g. "train", "validation"
    const char *color;          // SVG colour, e.g. "#1f77b4"; NULL: a default per series
    const double *x;            // (n) steps
    const double *y;            // (n) losses; non-finite points break the line
    int64_t n;
} nm_plot_series;

// Writes the plot atomically to path. Returns 0 or -1 with err naming the path.
int nm_plot_write_svg(const char *path, const char *title, const nm_plot_series *series, int n_series,
                      nm_error *err);
