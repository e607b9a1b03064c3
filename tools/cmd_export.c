// cmd_export.c: `nanomegatron export`: a model directory or a run's checkpoint as a Hugging
// Face directory or a llama.cpp GGUF file, with the run's tokenizer.
//
//   export --model DIR|RUN_DIR [--step N] --out OUT --format hf|gguf [--dtype fp32|bf16|f16|q8_0]
//          [--tokenizer T.json|bytes] [--max-shard-size 5GB]
// A run directory exports its newest valid checkpoint, or step_N with --step. The tokenizer is
// the one the run trained with (trainer.json), else the model directory's tokenizer.json, else
// the byte tokenizer. What each format holds: src/io/hf_export.h and src/io/gguf_export.h.
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "args.h"
#include "model_dir.h"
#include "commands.h"
#include "data/vocab_export.h"
#include "core/fileio.h"
#include "io/gguf_export.h"
#include "io/hf_dir.h"
#include "io/hf_export.h"
#include "train/checkpoint.h"

// "5GB", "200MB", "4096": decimal units as transformers' max_shard_size.
static int parse_size(const char *s, int64_t *out) {
    char *end;
    double v = strtod(s, &end);
    double mul = 1;
    if (!strcasecmp(end, "kb") || !strcasecmp(end, "k")) mul = 1e3;
    else if (!strcasecmp(end, "mb") || !strcasecmp(end, "m")) mul = 1e6;
    else if (!strcasecmp(end, "gb") || !strcasecmp(end, "g")) mul = 1e9;
    else if (*end) return -1;
    if (end == s || !(v > 0)) return -1;
    *out = (int64_t)(v * mul);
    return 0;
}

// --- progress -----------------------------------------------------------------------------------

typedef struct progress {
    int tty;
    double t0, last;
    int last_decile;
} progress;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Redrawn in place on a terminal (at most 10 times a second); one line per 10% otherwise.
static void on_progress(void *ctx, int64_t done, int64_t total, const char *what) {
    progress *p = ctx;
    double t = now_s(), pct = total > 0 ? 100.0 * (double)done / (double)total : 100.0;
    int decile = (int)(pct / 10);
    if (p->tty ? (t - p->last < 0.1 && done < total) : (decile == p->last_decile && done < total)) return;
    p->last = t;
    p->last_decile = decile;
    fprintf(stderr, "%sexport %5.1f%% | %.1f of %.1f MB | %.0fs | %-40.40s%s", p->tty ? "\r" : "", pct, (double)done / 1e6,
            (double)total / 1e6, t - p->t0, what, p->tty ? "" : "\n");
    if (p->tty && done >= total) fputc('\n', stderr);
    fflush(stderr);
}

int nm_cmd_export(int argc, char **argv) {
    static const char *const value_flags[] = {"model", "step", "out", "format", "dtype", "tokenizer", "max-shard-size", NULL};
    nm_args a;
    if (nm_args_parse(&a, "export", argc, argv, value_flags, NULL) != 0) return 2;
    const char *model = nm_args_str(&a, "model", NULL), *out = nm_args_str(&a, "out", NULL);
    const char *format = nm_args_str(&a, "format", NULL), *dtype_s = nm_args_str(&a, "dtype", "fp32");
    int64_t step, shard = 0;
    if (!model || !out || !format) {
        fprintf(stderr, "export: --model, --out and --format are required\n");
        return 2;
    }
    if (nm_args_i64_in(&a, "step", -1, 0, NM_ARGS_SEED_MAX, &step)) return 2;
    int hf = !strcmp(format, "hf"), gguf = !strcmp(format, "gguf");
    if (!hf && !gguf) {
        fprintf(stderr, "export: --format must be hf or gguf, got '%s'\n", format);
        return 2;
    }
    int f32 = !strcmp(dtype_s, "fp32") || !strcmp(dtype_s, "f32"), bf16 = !strcmp(dtype_s, "bf16"),
        f16 = !strcmp(dtype_s, "f16") || !strcmp(dtype_s, "fp16"), q8 = !strcmp(dtype_s, "q8_0");
    if (!f32 && !bf16 && !f16 && !q8) {
        fprintf(stderr, "export: --dtype must be fp32, bf16, f16 or q8_0, got '%s'\n", dtype_s);
        return 2;
    }
    if (hf && q8) {
        fprintf(stderr, "export: --dtype q8_0 is a GGUF type; an hf export is fp32, bf16 or f16\n");
        return 2;
    }
    if (nm_args_has(&a, "max-shard-size") && (!hf || parse_size(nm_args_str(&a, "max-shard-size", ""), &shard))) {
        fprintf(stderr, "export: --max-shard-size takes a size such as 5GB or 500MB, and only with --format hf\n");
        return 2;
    }
    if (!nm_args_has(&a, "max-shard-size")) shard = 5000000000LL;  // transformers' default "5GB"
    // A GGUF export is one file, written to a temporary name beside --out and renamed at the
    // end: onto a directory the rename fails, after the whole model has been written.
    struct stat st;
    if (gguf && stat(out, &st) == 0 && S_ISDIR(st.st_mode)) {
        fprintf(stderr, "export: --out %s is a directory; --format gguf writes one file: give a file path such as "
                        "%s/model.gguf\n", out, out);
        return 2;
    }
    if (hf && stat(out, &st) == 0 && !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "export: --out %s is a file; --format hf writes a directory: give a new directory path\n", out);
        return 2;
    }

    nm_error err = {{0}};
    char dir[4200], tok_path[4200];
    nm_model_config cfg = {0};
    nm_param_table t = {0};
    nm_export_vocab vocab = {0};
    float *params = NULL;
    int rc = 1;
    if (nm_resolve_model_dir(model, step, dir, sizeof(dir), tok_path, sizeof(tok_path), &err) != 0) goto done;
    if (nm_args_has(&a, "tokenizer")) snprintf(tok_path, sizeof(tok_path), "%s", nm_args_str(&a, "tokenizer", "bytes"));
    if (nm_hf_dir_load_config(dir, &cfg, &err) != 0) goto done;
    if (nm_param_table_build(&t, &cfg, &err) != 0) goto done;
    params = nm_aligned_alloc(t.n_floats * sizeof(float));
    if (nm_hf_dir_load_params(dir, &t, params, &err) != 0) goto done;
    if (nm_export_vocab_load(&vocab, tok_path, &err) != 0) goto done;
    progress p = {.tty = isatty(2), .t0 = now_s(), .last = -1, .last_decile = -1};
    if (hf) {
        nm_st_dtype dt = f32 ? NM_ST_F32 : bf16 ? NM_ST_BF16 : NM_ST_F16;
        if (nm_hf_export(out, &cfg, &t, params, &vocab, dt, shard, on_progress, &p, &err) != 0) goto done;
    } else {
        nm_ggml_type dt = f32 ? NM_GGML_F32 : bf16 ? NM_GGML_BF16 : f16 ? NM_GGML_F16 : NM_GGML_Q8_0;
        if (nm_gguf_export(out, &cfg, &t, params, &vocab, dt, on_progress, &p, &err) != 0) goto done;
    }
    printf("exported %s (step dir %s, tokenizer %s) to %s as %s %s\n", model, dir, tok_path, out, format, dtype_s);
    rc = 0;
done:
    if (rc != 0) fprintf(stderr, "nanomegatron export: %s\n", err.msg);
    nm_free(params);
    nm_export_vocab_free(&vocab);
    nm_param_table_free(&t);
    nm_model_config_free(&cfg);
    return rc;
}
