// tokenizer.h: byte-level BPE tokenizers, read from and written as Hugging Face tokenizer.json.
//
// What it does:
//  - loads a HF tokenizer.json whose model is BPE over the ByteLevel alphabet (GPT-2,
//    DeepSeek-V3 and what `tokenizers`' ByteLevel BPE trainer writes), or the built-in byte
//    tokenizer "bytes";
//  - encodes exactly like `Tokenizer.from_file(p).encode(text, add_special_tokens=False).ids`
//    (added tokens first, then normalizer, pre-tokenizer, BPE by merge rank);
//  - decodes to raw bytes, i.e. HF `decode(ids, skip_special_tokens=False)` before its lossy
//    UTF-8 conversion, so decode(encode(x)) == x for every byte string x when the tokenizer
//    adds no prefix space (our trained ones and DeepSeek-V3's do not);
//  - trains a GPT-2-style byte-level BPE from text files and writes a tokenizer.json that HF
//    `tokenizers` loads and encodes identically.
//
// What it deliberately does not do: post-processors (bos/eos insertion is the data pipeline's
// job; encode behaves like add_special_tokens=False), truncation/padding, offsets, BPE
// dropout, byte_fallback, unk tokens for missing bytes, Unicode normalizers. Files that need
// one of these are refused at load time with a message naming the field, never silently
// mis-encoded.
//
// Input that is not valid UTF-8 (which HF cannot take: Python str is always valid): each
// maximal run of bytes that do not start a valid UTF-8 sequence becomes one pre-token of its
// own; the valid stretches around it are pre-tokenized as separate strings. That keeps
// encode a total function on bytes and decode its exact inverse.
//
// Thread safety: a loaded tokenizer is immutable. encode/decode may run concurrently on one
// tokenizer; every call owns its scratch (PCRE2 match data, BPE heap, word cache).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

typedef struct nm_tokenizer nm_tokenizer;

// path: a tokenizer.json, or the literal "bytes" for the byte tokenizer: ids 0..255 are the
// raw bytes, 256 is "<|endoftext|>" (eod), vocab 257. The byte tokenizer encodes every byte
// as itself, it does not match "<|endoftext|>" in text.
int nm_tokenizer_load(nm_tokenizer **out, const char *path, nm_error *err);
void nm_tokenizer_free(nm_tokenizer *t);   // NULL-safe

// Max id + 1 over the model vocab and the added tokens.
int64_t nm_tokenizer_vocab_size(const nm_tokenizer *t);

// End-of-document id, -1 if none. Rule: the `eos_token` named in a tokenizer_config.json
// next to the tokenizer.json, when that file exists and the token is in the vocabulary;
// otherwise the first of "<|endoftext|>", "<｜end▁of▁sentence｜>", "</s>" that is an added
// token or a vocab entry; otherwise -1. "bytes": 256.
int32_t nm_tokenizer_eod(const nm_tokenizer *t);

// Encodes len bytes of text (need not be NUL-terminated nor valid UTF-8). *ids is allocated
// with nm_malloc (also when *n_ids is 0); the caller nm_free()s it.
int nm_tokenizer_encode(const nm_tokenizer *t, const char *text, size_t len, int32_t **ids, int64_t *n_ids,
                        nm_error *err);

// Concatenated bytes of the tokens. Like HF's ByteLevel decoder, a token string whose chars
// are all in the byte alphabet gives the bytes they stand for, any other its own UTF-8; so an
// added token gives its content ("<|endoftext|>" is itself), except one made only of alphabet
// chars above U+007F ("été" gives the bytes E9 74 E9, as in HF). *text is nm_malloc'ed,
// NUL-terminated for convenience (not counted in *len); caller nm_free()s. An id outside
// [0, vocab) or one that names no token is an error naming the id and its position.
int nm_tokenizer_decode(const nm_tokenizer *t, const int32_t *ids, int64_t n, char **text, size_t *len,
                        nm_error *err);

// Learns a byte-level BPE with vocab_size tokens in all (>= 257) from text files and writes
// out_path atomically. Ids: 0..255 are the single bytes in byte order (id b is byte b, like
// the "bytes" tokenizer), then one id per learned merge, then "<|endoftext|>" as the last id
// (a special added token). Pre-tokenization is GPT-2's (ByteLevel, use_regex, no prefix
// space); "<|endoftext|>" in the text separates documents and is not learned from. Stops
// early (smaller vocab) when no pair occurs any more.
int nm_tokenizer_train(const char *const *files, int n_files, int64_t vocab_size, const char *out_path,
                       nm_error *err);

// As nm_tokenizer_train, also reporting the phase timings in seconds (any pointer may be NULL):
// read+pre-tokenize+count, merges, write.
typedef struct nm_tokenizer_train_stats {
    double t_count;             // read files, pre-tokenize, count words
    double t_merge;             // learn the merges
    double t_write;             // write tokenizer.json
    int64_t n_bytes;            // input bytes
    int64_t n_words;            // distinct pre-tokens
    int64_t n_merges;           // merges learned
    int64_t vocab_size;         // final vocab size (<= requested)
} nm_tokenizer_train_stats;

int nm_tokenizer_train_ex(const char *const *files, int n_files, int64_t vocab_size, const char *out_path,
                          nm_tokenizer_train_stats *stats, nm_error *err);
