// synthetic.h: the built-in corpus, so training works on a fresh machine with no download
// (design.md 7). English-looking text from a random lexicon and a first-order Markov chain
// over words, byte-tokenized, with an exactly computable entropy floor.
//
// The process (all draws from nm_rng keyed by (seed, document)):
//  - lexicon: W distinct lowercase words of 2-7 letters (consonant/vowel patterns);
//  - each word w has 4-8 distinct successors with Dirichlet(1) probabilities P(.|w);
//  - a document starts with a uniformly drawn word; after each word w: with probability
//    p_doc_end the document ends ("." then EOD); otherwise the sentence ends with
//    probability p_sentence_end (". ") or continues (" "), and the next word is drawn from
//    P(.|w). The first word of a document and of a sentence is capitalised.
//  - tokens are bytes (ids 0..255), EOD is id 256 (the byte tokenizer's <|endoftext|>).
//
// Entropy floor. Documents are i.i.d., so the concatenated stream is the stationary Markov
// chain on states {words, EOD} with EOD -> uniform start word. Its event entropy rate is
// sum_s mu_s H_s, mu the stationary distribution (power iteration in double) and H_s the
// entropy of the next event from s; each event renders to a fixed number of bytes B given
// (state, event), giving sum_s mu_s E[B | s] bytes per event. The byte stream is a bijective,
// causal re-encoding of the event stream: words are distinct strings of letters, a word ends
// at the first non-letter, and the separators " ", ". ", ".<EOD>" are distinguishable and
// capitalisation is determined by the preceding separator. So the byte stream's entropy rate
// is exactly (sum mu H) / (sum mu E[B]) nats per token: no model can do better on average,
// and a model that knows the lexicon and the transition table achieves it given enough
// context. A window that starts mid-document lacks its context for the first few tokens, so
// a training loss sits slightly (~1% at seq_len 256) above the floor.
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "data/indexed.h"

#define NM_SYNTHETIC_EOD 256    // end-of-document token id
#define NM_SYNTHETIC_VOCAB 257  // ids 0..256

typedef struct nm_synthetic_params {
    uint64_t seed;              // corpus seed (lexicon, transitions, documents)
    int n_words;                // W, lexicon size
    int min_successors, max_successors;
    double p_sentence_end;      // P(". " instead of " ") between two words
    double p_doc_end;           // P(document ends) after each word
} nm_synthetic_params;

typedef struct nm_synthetic nm_synthetic;

// Defaults: seed 1, W = 256, 4-8 successors, p_sentence_end = 0.12, p_doc_end = 0.03.
void nm_synthetic_params_default(nm_synthetic_params *p);

int nm_synthetic_create(nm_synthetic **out, const nm_synthetic_params *p, nm_error *err);
void nm_synthetic_destroy(nm_synthetic *s);

int nm_synthetic_n_words(const nm_synthetic *s);
const char *nm_synthetic_word(const nm_synthetic *s, int i);   // lowercase spelling of word i

// The exact entropy rate of the token stream, in nats per token (see above).
double nm_synthetic_entropy_floor(const nm_synthetic *s);
// Expected tokens per document (including the EOD).
double nm_synthetic_tokens_per_doc(const nm_synthetic *s);

// Document d as token ids (a pure function of (seed, d)); returns its length. *buf is grown
// with nm_realloc as needed (start with NULL / 0).
int64_t nm_synthetic_document(const nm_synthetic *s, int64_t d, int32_t **buf, int64_t *cap);

// Documents 0, 1, ... until at least n_tokens tokens, as an in-memory dataset (uint16,
// one sequence per document).
int nm_synthetic_build(nm_indexed **out, const nm_synthetic_params *p, int64_t n_tokens, nm_error *err);
// The same written to PREFIX.bin/.idx (atomically).
int nm_synthetic_write(const char *prefix, const nm_synthetic_params *p, int64_t n_tokens, nm_error *err);
