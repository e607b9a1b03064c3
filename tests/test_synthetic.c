// test_synthetic.c: the built-in corpus (src/data/synthetic.c).
//  - ~2M tokens decode back into words of the lexicon with the documented separators and
//    capitalisation (the byte stream is uniquely decodable);
//  - the empirical conditional entropy of the word process (plug-in estimate from
//    (state, event) counts, divided by the tokens) matches the analytic floor;
//  - the same seed gives the same corpus, another seed another one; the in-memory dataset
//    holds exactly the documents nm_synthetic_document produces.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/check.h"
#include "data/synthetic.h"

#include "test_util.h"

static const nm_synthetic *lex;

static int find_word(const char *w, int len) {
    for (int i = 0; i < nm_synthetic_n_words(lex); i++) {
        const char *v = nm_synthetic_word(lex, i);
        if ((int)strlen(v) == len && memcmp(v, w, (size_t)len) == 0) return i;
    }
    return -1;
}

// Reads a word at t[*k]: letters, capital first iff `capital`. Returns its id or -1.
static int read_word(const int32_t *t, int64_t n, int64_t *k, int capital) {
    char buf[16];
    int len = 0;
    while (*k < n && len < 15 && ((t[*k] >= 'a' && t[*k] <= 'z') || (t[*k] >= 'A' && t[*k] <= 'Z'))) {
        int c = t[*k];
        int upper = c >= 'A' && c <= 'Z';
        if (upper != (len == 0 && capital)) return -1;
        buf[len++] = (char)(upper ? c - 'A' + 'a' : c);
        (*k)++;
    }
    return len ? find_word(buf, len) : -1;
}

static void test_entropy(void) {
    nm_synthetic_params p;
    nm_synthetic_params_default(&p);
    p.seed = (uint64_t)time(NULL);   // a fresh lexicon and chain each run (printed)
    printf("corpus seed %llu\n", (unsigned long long)p.seed);
    nm_synthetic *s;
    nm_error err;
    NM_CHECK(nm_synthetic_create(&s, &p, &err) == 0, "%s", err.msg);
    lex = s;
    int W = nm_synthetic_n_words(s);
    // Events from state w (W = document start): 0 = end of document, 1 + sep * W + next.
    int64_t n_events = 1 + 2 * (int64_t)W;
    int64_t *pair = calloc((size_t)((W + 1) * n_events), sizeof(int64_t));
    int64_t *state = calloc((size_t)(W + 1), sizeof(int64_t));
    int32_t *buf = NULL;
    int64_t cap = 0, tokens = 0, docs = 0, bad = 0;
    for (int64_t d = 0; tokens < 2000000; d++, docs++) {
        int64_t n = nm_synthetic_document(s, d, &buf, &cap), k = 0;
        tokens += n;
        int w = read_word(buf, n, &k, 1);
        if (w < 0) { bad++; continue; }
        pair[W * n_events + 1 + w]++;   // document start -> first word (sep slot 0)
        state[W]++;
        for (;;) {
            int ev, next = -1;
            if (k + 1 < n && buf[k] == '.' && buf[k + 1] == NM_SYNTHETIC_EOD && k + 2 == n) {
                ev = 0;
            } else if (k < n && buf[k] == ' ') {
                k++;
                next = read_word(buf, n, &k, 0);
                ev = 1 + next;
            } else if (k + 1 < n && buf[k] == '.' && buf[k + 1] == ' ') {
                k += 2;
                next = read_word(buf, n, &k, 1);
                ev = 1 + W + next;
            } else {
                ev = -1;
            }
            if (ev < 0 || (ev > 0 && next < 0)) { bad++; break; }
            pair[w * n_events + ev]++;
            state[w]++;
            if (ev == 0) break;
            w = next;
        }
    }
    EXPECT(bad == 0, "%lld of %lld documents do not decode into lexicon words and separators", (long long)bad, (long long)docs);
    // Plug-in conditional entropy: sum over (state, event) of c log(c_state / c), per token.
    double h = 0;
    for (int st = 0; st <= W; st++) {
        for (int64_t e = 0; e < n_events; e++) {
            int64_t c = pair[st * n_events + e];
            if (c) h += (double)c * log((double)state[st] / (double)c);
        }
    }
    h /= (double)tokens;
    double floor = nm_synthetic_entropy_floor(s);
    double tpd = nm_synthetic_tokens_per_doc(s);
    printf("synthetic: %lld tokens, %lld docs (%.1f tokens/doc, analytic %.1f) | entropy floor %.6f nats/token, "
           "empirical %.6f (%+.2f%%)\n",
           (long long)tokens, (long long)docs, (double)tokens / (double)docs, tpd, floor, h, 100 * (h / floor - 1));
    // Tolerance: ~360k events give a sampling error of the plug-in estimate of about 0.1%
    // and a downward bias of (cells / 2N) ~ 0.3% (some 3.5k (state, event) cells); the
    // tokens-per-event ratio adds ~0.1%. 1.5% is several sigma, and a wrong floor formula
    // (e.g. forgetting the separator choice, ~0.33 nats/event of 2) is off by far more.
    EXPECT(fabs(h / floor - 1) < 0.015, "empirical %.6f vs floor %.6f nats/token", h, floor);
    EXPECT(fabs((double)tokens / (double)docs / tpd - 1) < 0.05, "tokens per document %.2f vs %.2f",
           (double)tokens / (double)docs, tpd);
    free(pair);
    free(state);
    nm_free(buf);
    nm_synthetic_destroy(s);
}

static void test_determinism(void) {
    nm_synthetic_params p;
    nm_synthetic_params_default(&p);
    nm_indexed *a, *b, *c;
    nm_error err;
    NM_CHECK(nm_synthetic_build(&a, &p, 50000, &err) == 0, "%s", err.msg);
    NM_CHECK(nm_synthetic_build(&b, &p, 50000, &err) == 0, "%s", err.msg);
    p.seed = 2;
    NM_CHECK(nm_synthetic_build(&c, &p, 50000, &err) == 0, "%s", err.msg);
    EXPECT(a->bin_size == b->bin_size && memcmp(a->bin, b->bin, a->bin_size) == 0, "same seed, different corpus");
    EXPECT(a->idx_size == b->idx_size && memcmp(a->idx, b->idx, a->idx_size) == 0, "same seed, different index");
    EXPECT(a->bin_size != c->bin_size || memcmp(a->bin, c->bin, a->bin_size) != 0, "seeds 1 and 2 give the same corpus");
    EXPECT(a->n_tokens >= 50000 && a->n_docs == a->n_seqs, "tokens %lld docs %lld", (long long)a->n_tokens, (long long)a->n_docs);
    // Document d of the dataset is nm_synthetic_document(d), ending in EOD.
    nm_synthetic *s;
    nm_synthetic_params_default(&p);
    NM_CHECK(nm_synthetic_create(&s, &p, &err) == 0, "%s", err.msg);
    int32_t *buf = NULL, *got = nm_malloc(sizeof(int32_t) * (size_t)(a->max_len + 1));
    int64_t cap = 0;
    for (int64_t d = 0; d < a->n_docs; d++) {
        int64_t n = nm_synthetic_document(s, d, &buf, &cap);
        EXPECT(n == nm_indexed_seq_len(a, d) && buf[n - 1] == NM_SYNTHETIC_EOD, "document %lld length", (long long)d);
        if (n != nm_indexed_seq_len(a, d)) break;
        NM_CHECK(nm_indexed_read(a, d, 0, n, got, &err) == 0, "%s", err.msg);
        EXPECT(memcmp(got, buf, sizeof(int32_t) * (size_t)n) == 0, "document %lld tokens", (long long)d);
    }
    // The default corpus's floor is a fixed number (the README quotes it).
    printf("default corpus (seed 1): entropy floor %.6f nats/token, %.1f tokens/document\n", nm_synthetic_entropy_floor(s),
           nm_synthetic_tokens_per_doc(s));
    printf("sample: \"");
    for (int64_t k = 0; k < 160 && k < nm_indexed_seq_len(a, 0); k++) {
        NM_CHECK(nm_indexed_read(a, 0, k, 1, got, &err) == 0, "%s", err.msg);
        if (got[0] < 256) putchar(got[0]);
    }
    printf("\"\n");
    nm_free(buf);
    nm_free(got);
    nm_synthetic_destroy(s);
    nm_indexed_close(a);
    nm_indexed_close(b);
    nm_indexed_close(c);
}

int main(void) {
    test_entropy();
    test_determinism();
    if (failures) {
        fprintf(stderr, "test_synthetic: %d failures\n", failures);
        return 1;
    }
    printf("test_synthetic: ok\n");
    return 0;
}
