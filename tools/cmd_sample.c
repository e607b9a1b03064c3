// cmd_sample.c: `nanomegatron sample`: generate text from a model directory or a run
// directory (its newest valid checkpoint, with the run's tokenizer).
//
//   sample --model DIR|RUN_DIR --prompt TEXT [--tokens N] [--temperature T] [--top-p P]
//          [--seed S] [--tokenizer T]
// Temperature 0 is greedy decoding. Draws come from the counter-based generator keyed by
// (seed, token index), so a seed always gives the same text. No KV cache: each token re-runs
// the forward over the window (the models this is for are small).
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "args.h"
#include "model_dir.h"
#include "commands.h"
#include "core/rng.h"
#include "data/tokenizer.h"
#include "core/fileio.h"
#include "io/hf_dir.h"
#include "nanomegatron.h"

typedef struct prob_index {
    float p;
    int32_t id;
} prob_index;

static int by_prob_desc(const void *a, const void *b) {
    const prob_index *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id < y->id ? -1 : 1;
}

// Samples from logits (V) with temperature and nucleus (top-p); u is uniform in [0, 1).
static int32_t sample_token(const float *logits, int64_t V, double temperature, double top_p, double u,
                            prob_index *scratch /* (V) */) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++) {
        if (logits[i] > logits[best]) best = i;
    }
    if (temperature <= 0.0) return (int32_t)best;
    double sum = 0.0;
    for (int64_t i = 0; i < V; i++) {
        scratch[i].p = (float)exp((logits[i] - logits[best]) / temperature);
        scratch[i].id = (int32_t)i;
        sum += scratch[i].p;
    }
    qsort(scratch, (size_t)V, sizeof(prob_index), by_prob_desc);
    // Smallest prefix whose mass reaches top_p, then sample within it.
    double mass = 0.0;
    int64_t n = 0;
    while (n < V && (n == 0 || mass < top_p * sum)) mass += scratch[n++].p;
    double target = u * mass, acc = 0.0;
    for (int64_t i = 0; i < n; i++) {
        acc += scratch[i].p;
        if (acc > target) return scratch[i].id;
    }
    return scratch[n - 1].id;
}

int nm_cmd_sample(int argc, char **argv) {
    static const char *const value_flags[] = {"model", "prompt", "tokens", "temperature", "top-p", "seed", "tokenizer", NULL};
    nm_args a;
    if (nm_args_parse(&a, "sample", argc, argv, value_flags, NULL) != 0) return 2;
    const char *model = nm_args_str(&a, "model", NULL), *prompt = nm_args_str(&a, "prompt", "");
    int64_t n_new, seed;
    double temperature, top_p;
    if (!model) {
        fprintf(stderr, "sample: --model is required\n");
        return 2;
    }
    // --tokens: each new token re-runs the forward over the window, so a million is already
    // days here; the bound turns a typo into a message, not an allocation failure.
    if (nm_args_i64_in(&a, "tokens", 200, 0, 1 << 20, &n_new) || nm_args_i64_in(&a, "seed", 1234, 0, NM_ARGS_SEED_MAX, &seed) ||
        nm_args_f64_in(&a, "temperature", 0.8, 0, 1000, &temperature) || nm_args_f64_in(&a, "top-p", 0.95, 0, 1, &top_p))
        return 2;
    if (top_p <= 0) {
        fprintf(stderr, "sample: --top-p %s keeps no token: give a number in (0, 1], e.g. 0.95 (1: no nucleus cut)\n",
                nm_args_str(&a, "top-p", ""));
        return 2;
    }
    nm_error err = {{0}};
    char dir[4200], tok_path[4200];
    nm_model_config cfg = {0};
    const nm_ops *ops = NULL;
    nm_model *m = NULL;
    nm_tokenizer *tok = NULL;
    int32_t *ids = NULL;
    float *logits = NULL;
    prob_index *scratch = NULL;
    int rc = 1;
    if (nm_resolve_model_dir(model, -1, dir, sizeof(dir), tok_path, sizeof(tok_path), &err) != 0) goto done;
    if (nm_args_has(&a, "tokenizer")) snprintf(tok_path, sizeof(tok_path), "%s", nm_args_str(&a, "tokenizer", "bytes"));
    if (nm_hf_dir_load_config(dir, &cfg, &err) != 0) goto done;
    if (nm_tokenizer_load(&tok, tok_path, &err) != 0) goto done;
    if (nm_tokenizer_vocab_size(tok) > cfg.V) {
        nm_error_set(&err, "tokenizer %s has %lld tokens but the model's vocab_size is %lld", tok_path,
                     (long long)nm_tokenizer_vocab_size(tok), (long long)cfg.V);
        goto done;
    }
    int64_t n_prompt;
    if (nm_tokenizer_encode(tok, prompt, strlen(prompt), &ids, &n_prompt, &err) != 0) goto done;
    if (n_prompt == 0) {
        // An empty prompt starts from the end-of-document token, as a new document would.
        int32_t eod = nm_tokenizer_eod(tok);
        if (eod < 0) {
            nm_error_set(&err, "empty --prompt and the tokenizer has no end-of-document token to start from");
            goto done;
        }
        ids[0] = eod;
        n_prompt = 1;
    }
    int64_t total = n_prompt + n_new;
    int64_t T_max = total < cfg.max_pos ? total : cfg.max_pos;
    // NM_BACKEND, else the CPU backend; destroyed after the model
    if (nm_backend_select(&ops, NULL, &err) != 0 ||
        nm_model_create(&m, &cfg, ops, 1, T_max < 2 ? 2 : T_max, &err) != 0) goto done;
    if (nm_hf_dir_load_model(dir, nm_model_table(m), &cfg, 0, nm_model_params(m), &err) != 0) goto done;
    ids = nm_realloc(ids, (size_t)total * sizeof(int32_t));
    logits = nm_malloc((size_t)(T_max * cfg.V) * sizeof(float));
    // Only ids the tokenizer can decode are drawn: the model's vocabulary is padded (to a
    // multiple of make_vocab_size_divisible_by), and an untrained padded row can still win.
    int64_t n_drawable = nm_tokenizer_vocab_size(tok) < cfg.V ? nm_tokenizer_vocab_size(tok) : cfg.V;
    scratch = nm_malloc((size_t)cfg.V * sizeof(prob_index));
    fwrite(prompt, 1, strlen(prompt), stdout);
    fflush(stdout);
    uint64_t key = nm_rng_key((uint64_t)seed, NM_RNG_SAMPLE, 0, 0);
    nm_loss_options opt = {.inference = 1, .grad_scale = 1.0f};
    for (int64_t n = n_prompt; n < total; n++) {
        int64_t T = n < T_max ? n : T_max;  // slide the window once the context is full
        nm_loss_terms lt;
        if (nm_model_forward(m, ids + (n - T), 1, T, &opt, &lt, logits, &err) != 0) goto done;
        ids[n] = sample_token(logits + (T - 1) * cfg.V, n_drawable, temperature, top_p, nm_rng_uniform_f64(key, (uint64_t)n),
                              scratch);
        char *text;
        size_t len;
        if (nm_tokenizer_decode(tok, ids + n, 1, &text, &len, &err) != 0) goto done;
        fwrite(text, 1, len, stdout);
        fflush(stdout);
        nm_free(text);
    }
    printf("\n");
    rc = 0;
done:
    if (rc != 0) fprintf(stderr, "nanomegatron sample: %s\n", err.msg);
    nm_free(ids);
    nm_free(logits);
    nm_free(scratch);
    nm_tokenizer_free(tok);
    nm_model_destroy(m);
    nm_backend_destroy(ops);
    nm_model_config_free(&cfg);
    return rc;
}
