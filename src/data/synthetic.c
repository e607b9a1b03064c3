// synthetic.c: implementation of synthetic.h (the built-in corpus and its entropy floor).
#include "data/synthetic.h"

#include <math.h>
#include <string.h>

#include "core/rng.h"

#define WORD_MAX 8               // 7 letters + NUL
#define PURPOSE_LEXICON 0x53594e4cu   // "SYNL": lexicon and transitions
#define PURPOSE_DOCS 0x53594e44u      // "SYND": documents

struct nm_synthetic {
    nm_synthetic_params p;
    int W;
    char (*words)[WORD_MAX];    // (W,) spellings
    int *word_len;              // (W,)
    int *succ_start;            // (W + 1,) CSR rows of the transition table
    int *succ;                  // successor word ids
    double *succ_cdf;           // cumulative probabilities per row (last = 1)
    double *succ_p;             // probabilities per row
    double floor;               // nats per token
    double tokens_per_doc;
};

// A counter-based stream: draw k of stream `key` is nm_rng(key, k).
typedef struct stream { uint64_t key, i; } stream;
static double uniform(stream *s) { return nm_rng_uniform_f64(s->key, s->i++); }
static int uniform_int(stream *s, int n) {   // in [0, n)
    int v = (int)(uniform(s) * n);
    return v < n ? v : n - 1;
}

void nm_synthetic_params_default(nm_synthetic_params *p) {
    p->seed = 1;
    p->n_words = 256;
    p->min_successors = 4;
    p->max_successors = 8;
    p->p_sentence_end = 0.12;
    p->p_doc_end = 0.03;
}

static void make_word(stream *s, char *out) {
    static const char consonants[] = "bcdfghklmnprstvwz";
    static const char vowels[] = "aeiouy";
    int len = 2 + uniform_int(s, 6);   // 2..7 letters
    int vowel = uniform(s) < 0.3;
    for (int k = 0; k < len; k++) {
        // Mostly alternating consonants and vowels, with an occasional consonant pair, so
        // the words read like English without following any real vocabulary.
        out[k] = vowel ? vowels[uniform_int(s, 6)] : consonants[uniform_int(s, 17)];
        if (!(vowel == 0 && uniform(s) < 0.15)) vowel = !vowel;
    }
    out[len] = 0;
}

static double xlogx(double p) { return p > 0 ? p * log(p) : 0.0; }

// Stationary distribution and the floor; see the header comment for why this is exact.
static void compute_floor(nm_synthetic *s) {
    int W = s->W;
    double d = s->p.p_doc_end, q = s->p.p_sentence_end;
    double *mu = nm_malloc(sizeof(double) * (size_t)(W + 1));
    double *nx = nm_malloc(sizeof(double) * (size_t)(W + 1));
    for (int i = 0; i <= W; i++) mu[i] = 1.0 / (W + 1);   // state W is EOD
    for (int it = 0; it < 1000000; it++) {
        memset(nx, 0, sizeof(double) * (size_t)(W + 1));
        for (int w = 0; w < W; w++) {
            nx[W] += mu[w] * d;
            for (int k = s->succ_start[w]; k < s->succ_start[w + 1]; k++) nx[s->succ[k]] += mu[w] * (1 - d) * s->succ_p[k];
        }
        for (int w = 0; w < W; w++) nx[w] += mu[W] / W;
        double diff = 0;
        for (int i = 0; i <= W; i++) diff += fabs(nx[i] - mu[i]);
        memcpy(mu, nx, sizeof(double) * (size_t)(W + 1));
        if (diff < 1e-15) break;
    }
    double mean_len = 0;
    for (int w = 0; w < W; w++) mean_len += s->word_len[w];
    mean_len /= W;
    double h_sum = mu[W] * log((double)W), b_sum = mu[W] * mean_len;   // EOD -> first word
    for (int w = 0; w < W; w++) {
        double h_succ = 0, len_succ = 0;
        for (int k = s->succ_start[w]; k < s->succ_start[w + 1]; k++) {
            h_succ -= xlogx(s->succ_p[k]);
            len_succ += s->succ_p[k] * s->word_len[s->succ[k]];
        }
        double h = -xlogx(d) - xlogx(1 - d) + (1 - d) * (-xlogx(q) - xlogx(1 - q) + h_succ);
        double b = d * 2.0 + (1 - d) * (1.0 + q + len_succ);   // ".<EOD>" or " "/". " + word
        h_sum += mu[w] * h;
        b_sum += mu[w] * b;
    }
    s->floor = h_sum / b_sum;
    s->tokens_per_doc = b_sum / mu[W];   // mean bytes between two EODs (renewal)
    nm_free(mu);
    nm_free(nx);
}

int nm_synthetic_create(nm_synthetic **out, const nm_synthetic_params *p, nm_error *err) {
    if (p->n_words < 2 || p->n_words > 100000) return nm_error_set(err, "synthetic corpus: n_words = %d, need 2..100000", p->n_words);
    if (p->min_successors < 1 || p->max_successors < p->min_successors || p->max_successors > p->n_words) {
        return nm_error_set(err, "synthetic corpus: successors %d..%d invalid for %d words", p->min_successors,
                            p->max_successors, p->n_words);
    }
    if (!(p->p_doc_end > 0 && p->p_doc_end < 1) || !(p->p_sentence_end >= 0 && p->p_sentence_end < 1)) {
        return nm_error_set(err, "synthetic corpus: p_doc_end = %g must be in (0,1), p_sentence_end = %g in [0,1)", p->p_doc_end,
                            p->p_sentence_end);
    }
    nm_synthetic *s = nm_calloc(1, sizeof(*s));
    s->p = *p;
    int W = s->W = p->n_words;
    s->words = nm_calloc((size_t)W, WORD_MAX);
    s->word_len = nm_malloc(sizeof(int) * (size_t)W);
    stream st = {nm_rng_key(p->seed, NM_RNG_DATA, PURPOSE_LEXICON, 0), 0};
    for (int w = 0; w < W; w++) {
        // Distinct spellings are what makes the byte stream decodable (header comment);
        // a quadratic duplicate check is fine for a few hundred words.
        for (;;) {
            make_word(&st, s->words[w]);
            int dup = 0;
            for (int v = 0; v < w && !dup; v++) dup = strcmp(s->words[v], s->words[w]) == 0;
            if (!dup) break;
        }
        s->word_len[w] = (int)strlen(s->words[w]);
    }
    s->succ_start = nm_malloc(sizeof(int) * (size_t)(W + 1));
    s->succ = nm_malloc(sizeof(int) * (size_t)W * (size_t)p->max_successors);
    s->succ_p = nm_malloc(sizeof(double) * (size_t)W * (size_t)p->max_successors);
    s->succ_cdf = nm_malloc(sizeof(double) * (size_t)W * (size_t)p->max_successors);
    int k = 0;
    for (int w = 0; w < W; w++) {
        s->succ_start[w] = k;
        int n = p->min_successors + uniform_int(&st, p->max_successors - p->min_successors + 1);
        double sum = 0;
        for (int j = 0; j < n; j++) {
            int v, dup;
            do {
                v = uniform_int(&st, W);
                dup = 0;
                for (int m = s->succ_start[w]; m < k + j; m++) dup |= s->succ[m] == v;
            } while (dup);
            s->succ[k + j] = v;
            double e = -log(1.0 - uniform(&st));   // Exp(1): normalised, a Dirichlet(1) row
            s->succ_p[k + j] = e;
            sum += e;
        }
        double c = 0;
        for (int j = 0; j < n; j++) {
            s->succ_p[k + j] /= sum;
            c += s->succ_p[k + j];
            s->succ_cdf[k + j] = c;
        }
        s->succ_cdf[k + n - 1] = 1.0;
        k += n;
    }
    s->succ_start[W] = k;
    compute_floor(s);
    *out = s;
    return 0;
}

void nm_synthetic_destroy(nm_synthetic *s) {
    if (!s) return;
    nm_free(s->words);
    nm_free(s->word_len);
    nm_free(s->succ_start);
    nm_free(s->succ);
    nm_free(s->succ_p);
    nm_free(s->succ_cdf);
    nm_free(s);
}

int nm_synthetic_n_words(const nm_synthetic *s) { return s->W; }
const char *nm_synthetic_word(const nm_synthetic *s, int i) {
    NM_CHECK(i >= 0 && i < s->W, "word %d of %d", i, s->W);
    return s->words[i];
}
double nm_synthetic_entropy_floor(const nm_synthetic *s) { return s->floor; }
double nm_synthetic_tokens_per_doc(const nm_synthetic *s) { return s->tokens_per_doc; }

static void push(int32_t **buf, int64_t *cap, int64_t *n, int32_t t) {
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 1024;
        *buf = nm_realloc(*buf, sizeof(int32_t) * (size_t)*cap);
    }
    (*buf)[(*n)++] = t;
}

static void push_word(const nm_synthetic *s, int w, int capital, int32_t **buf, int64_t *cap, int64_t *n) {
    for (int k = 0; k < s->word_len[w]; k++) {
        unsigned char c = (unsigned char)s->words[w][k];
        push(buf, cap, n, k == 0 && capital ? c - 'a' + 'A' : c);
    }
}

int64_t nm_synthetic_document(const nm_synthetic *s, int64_t d, int32_t **buf, int64_t *cap) {
    stream st = {nm_rng_key(s->p.seed, NM_RNG_DATA, PURPOSE_DOCS, (uint64_t)d), 0};
    int64_t n = 0;
    int w = uniform_int(&st, s->W);
    push_word(s, w, 1, buf, cap, &n);
    for (;;) {
        if (uniform(&st) < s->p.p_doc_end) {
            push(buf, cap, &n, '.');
            push(buf, cap, &n, NM_SYNTHETIC_EOD);
            return n;
        }
        int sentence_end = uniform(&st) < s->p.p_sentence_end;
        if (sentence_end) push(buf, cap, &n, '.');
        push(buf, cap, &n, ' ');
        double u = uniform(&st);
        int k = s->succ_start[w], last = s->succ_start[w + 1] - 1;
        while (k < last && u >= s->succ_cdf[k]) k++;
        w = s->succ[k];
        push_word(s, w, sentence_end, buf, cap, &n);
    }
}

// Shared by build and write: generates documents until n_tokens, handing each to `sink`.
typedef int (*doc_sink)(void *ctx, const int32_t *tokens, int64_t n, nm_error *err);

static int generate(const nm_synthetic_params *p, int64_t n_tokens, doc_sink sink, void *ctx, nm_error *err) {
    nm_synthetic *s;
    if (nm_synthetic_create(&s, p, err) != 0) return -1;
    int32_t *buf = NULL;
    int64_t cap = 0, total = 0;
    int rc = 0;
    for (int64_t d = 0; total < n_tokens && rc == 0; d++) {
        int64_t n = nm_synthetic_document(s, d, &buf, &cap);
        rc = sink(ctx, buf, n, err);
        total += n;
    }
    nm_free(buf);
    nm_synthetic_destroy(s);
    return rc;
}

typedef struct mem_sink {
    uint16_t *tokens;
    int64_t n, cap;
    int32_t *lengths;
    int64_t n_docs, cap_docs;
} mem_sink;

static int mem_add(void *ctx, const int32_t *tokens, int64_t n, nm_error *err) {
    mem_sink *m = ctx;
    if (n > INT32_MAX) return nm_error_set(err, "synthetic document of %lld tokens", (long long)n);
    while (m->n + n > m->cap) {
        m->cap = m->cap ? 2 * m->cap : 1 << 16;
        m->tokens = nm_realloc(m->tokens, sizeof(uint16_t) * (size_t)m->cap);
    }
    for (int64_t k = 0; k < n; k++) m->tokens[m->n + k] = (uint16_t)tokens[k];
    m->n += n;
    if (m->n_docs == m->cap_docs) {
        m->cap_docs = m->cap_docs ? 2 * m->cap_docs : 1024;
        m->lengths = nm_realloc(m->lengths, sizeof(int32_t) * (size_t)m->cap_docs);
    }
    m->lengths[m->n_docs++] = (int32_t)n;
    return 0;
}

int nm_synthetic_build(nm_indexed **out, const nm_synthetic_params *p, int64_t n_tokens, nm_error *err) {
    mem_sink m = {0};
    if (generate(p, n_tokens, mem_add, &m, err) != 0) {
        nm_free(m.tokens);
        nm_free(m.lengths);
        return -1;
    }
    int64_t *doc_index = nm_malloc(sizeof(int64_t) * (size_t)(m.n_docs + 1));
    for (int64_t i = 0; i <= m.n_docs; i++) doc_index[i] = i;
    uint8_t *idx;
    size_t idx_size;
    nm_indexed_build_idx(NM_IDX_UINT16, m.lengths, m.n_docs, doc_index, m.n_docs + 1, &idx, &idx_size);
    nm_free(doc_index);
    nm_free(m.lengths);
    char name[96];
    snprintf(name, sizeof(name), "synthetic(seed=%llu)", (unsigned long long)p->seed);
    // The machine is little-endian (indexed.c reads the same way), so uint16 memory is .bin.
    return nm_indexed_open_memory(out, name, idx, idx_size, m.tokens, sizeof(uint16_t) * (size_t)m.n, 1, err);
}

static int writer_add(void *ctx, const int32_t *tokens, int64_t n, nm_error *err) {
    return nm_indexed_writer_add_document(ctx, tokens, n, err);
}

int nm_synthetic_write(const char *prefix, const nm_synthetic_params *p, int64_t n_tokens, nm_error *err) {
    nm_indexed_writer *w;
    if (nm_indexed_writer_create(&w, prefix, NM_IDX_UINT16, err) != 0) return -1;
    int rc = generate(p, n_tokens, writer_add, w, err);
    if (rc == 0) rc = nm_indexed_writer_finalize(w, err);
    nm_indexed_writer_destroy(w);
    return rc;
}
